//! Top-N logprobs through the safe crate, on the CPU backend: the processed
//! list is the kept tokens in rank order with the probabilities `probs`
//! gives, the raw list is the float64 log-softmax of the logits as given,
//! and each drawn token's rank counts the candidates above it.

use polysample::{Backend, ContextOptions, Logits, LogprobMode, Params, Status};

fn logits_of(rows: usize, vocab: usize) -> Vec<f32> {
    // Values on a grid of 0.25 so that ties occur; a fixed formula, no RNG.
    (0..rows * vocab).map(|i| ((i * 7919 % 61) as f32 - 30.0) * 0.25).collect()
}

/// Indices with candidate[i] in rank order (higher logit, then lower index).
fn ranked(row: &[f32], candidate: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).filter(|&i| candidate(i)).collect();
    order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
    order
}

#[test]
fn processed_and_raw_lists_and_ranks() {
    let (rows, vocab, count) = (3, 500, 10);
    let values = logits_of(rows, vocab);
    let logits = Logits::f32(&values, rows, vocab);
    let mut context = ContextOptions::new().backend(Backend::Cpu).create().unwrap();
    let params = Params::new().temperature(0.8).top_p(0.7).num_samples(16).seed(4);
    let probs = context.probs(&logits, &params).unwrap();

    let top = context.sample_with_top_logprobs(&logits, &params, count, LogprobMode::Processed).unwrap();
    let raw = context.sample_with_top_logprobs(&logits, &params, count, LogprobMode::Raw).unwrap();
    assert_eq!(top.tokens, raw.tokens, "the mode changes the lists, not the draws");
    for r in 0..rows {
        let row = &values[r * vocab..(r + 1) * vocab];
        let kept = ranked(row, |i| probs[r * vocab + i] > 0.0);
        for e in 0..count {
            let got = top.top_tokens[r * count + e];
            if e < kept.len() {
                assert_eq!(got, kept[e] as i32, "row {r} entry {e}");
                let want = (probs[r * vocab + kept[e]] as f64).ln();
                assert!((top.top_logprobs[r * count + e] as f64 - want).abs() <= 1e-5 + 1e-6 * want.abs());
            } else {
                assert_eq!(got, -1);
                assert_eq!(top.top_logprobs[r * count + e], f32::NEG_INFINITY);
            }
        }
        let all = ranked(row, |_| true);
        let max = row[all[0]] as f64;
        let log_sum = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        for e in 0..count {
            assert_eq!(raw.top_tokens[r * count + e], all[e] as i32, "raw row {r} entry {e}");
            let want = row[all[e]] as f64 - max - log_sum;
            assert!((raw.top_logprobs[r * count + e] as f64 - want).abs() <= 1e-5 + 1e-6 * want.abs());
        }
        for j in 0..16 {
            let drawn = top.tokens[r * 16 + j] as usize;
            let processed_rank = kept.iter().position(|&i| i == drawn).unwrap() + 1;
            let raw_rank = all.iter().position(|&i| i == drawn).unwrap() + 1;
            assert_eq!(top.ranks[r * 16 + j], processed_rank as i32);
            assert_eq!(raw.ranks[r * 16 + j], raw_rank as i32);
        }
    }
}

#[test]
fn count_out_of_range_is_refused() {
    let values = logits_of(1, 40);
    let logits = Logits::f32(&values, 1, 40);
    let mut context = ContextOptions::new().backend(Backend::Cpu).create().unwrap();
    for count in [0, 65] {
        let error = context.sample_with_top_logprobs(&logits, &Params::new(), count, LogprobMode::Raw).unwrap_err();
        assert_eq!(error.status, Status::InvalidParameter);
        assert!(error.message.contains(&format!("top_logprobs count is {count}")), "{}", error.message);
    }
}
