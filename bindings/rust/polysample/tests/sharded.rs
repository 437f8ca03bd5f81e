//! Sharded calls against Context::sample_with_logprobs on the whole rows:
//! the same tokens and logprob bits on every rank, for splits at and inside
//! tiles and shard orders that differ from the column order; the refusals.

use polysample::{Backend, Context, ContextOptions, Logits, Params, Shard, Status};

const ROWS: usize = 3;
const VOCAB: usize = 5000;

fn cpu() -> Context {
    ContextOptions::new().backend(Backend::Cpu).create().expect("a CPU context")
}

fn logits() -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..ROWS * VOCAB)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / 16_777_216.0 - 0.5) * 12.0
        })
        .collect()
}

/// Runs every rank's call in turn, each round's all-gather by concatenation
/// in shard order; returns each rank's (tokens, logprobs).
fn run(values: &[f32], cuts: &[usize], order: &[usize], params: &Params<'_>) -> Vec<(Vec<i32>, Vec<f32>)> {
    let count = cuts.len() + 1;
    let mut edges = vec![0];
    edges.extend_from_slice(cuts);
    edges.push(VOCAB);
    let views: Vec<Logits<'_>> = (0..count)
        .map(|k| {
            let (first, next) = (edges[k], edges[k + 1]);
            Logits::f32(&values[first..(ROWS - 1) * VOCAB + next], ROWS, next - first).with_row_stride(VOCAB)
        })
        .collect();
    let mut contexts: Vec<Context> = (0..count).map(|_| cpu()).collect();
    let mut calls: Vec<(usize, polysample::Sharded<'_>)> = contexts
        .iter_mut()
        .zip(views.iter())
        .enumerate()
        .map(|(k, (context, view))| {
            let shard = Shard { first_token: edges[k], full_vocab: VOCAB, index: order[k], count };
            (order[k], context.sharded(view, shard, params).expect("begin"))
        })
        .collect();
    calls.sort_by_key(|(index, _)| *index);
    let mut gathered: Option<Vec<u8>> = None;
    for _round in 0..40 {
        let mut next = Vec::new();
        let mut sizes = Vec::new();
        for (_, call) in calls.iter_mut() {
            if let Some(bytes) = call.next(gathered.as_deref()).expect("a round") {
                sizes.push(bytes.len());
                next.extend_from_slice(bytes);
            } else {
                sizes.push(0);
            }
        }
        assert!(sizes.iter().all(|&size| size == sizes[0]), "ranks sent {sizes:?} bytes");
        if sizes[0] == 0 {
            return calls
                .iter()
                .map(|(_, call)| {
                    let (tokens, logprobs) = call.outputs().expect("outputs after the last round");
                    (tokens.to_vec(), logprobs.to_vec())
                })
                .collect();
        }
        gathered = Some(next);
    }
    panic!("more than 40 rounds");
}

#[test]
fn every_rank_equals_the_unsharded_call() {
    let values = logits();
    let whole = Logits::f32(&values, ROWS, VOCAB);
    let seeds = [11u64, 12, 13];
    let settings = [
        Params::new().temperature(0.8).seed(3).num_samples(2),
        Params::new().temperature(0.8).top_p(0.9).seed(4).num_samples(2),
        Params::new().temperature(1.1).top_k(40).top_p(0.8).min_p(0.02).seed(5),
        Params::new().temperature(0.7).min_p(0.1).seed_per_row(&seeds),
        Params::new().greedy(),
    ];
    let splits: [(&[usize], &[usize]); 4] = [
        (&[], &[0]),
        (&[2048], &[1, 0]),
        (&[1500, 1501, 3900], &[2, 0, 3, 1]),
        (&[300, 600, 900, 1200], &[4, 3, 2, 1, 0]),
    ];
    let mut context = cpu();
    for params in &settings {
        let (tokens, logprobs) = context.sample_with_logprobs(&whole, params).expect("unsharded");
        for (cuts, order) in splits {
            for (rank, (rank_tokens, rank_logprobs)) in run(&values, cuts, order, params).iter().enumerate() {
                assert_eq!(rank_tokens, &tokens, "cuts {cuts:?}, rank {rank}: tokens");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(rank_logprobs), bits(&logprobs), "cuts {cuts:?}, rank {rank}: logprob bits");
            }
        }
    }
}

#[test]
fn refusals_and_misuse() {
    let values = logits();
    let view = Logits::f32(&values[..(ROWS - 1) * VOCAB + 2500], ROWS, 2500).with_row_stride(VOCAB);
    let mut context = cpu();
    let too_many = Shard { first_token: 0, full_vocab: VOCAB, index: 0, count: 65 };
    let error = context.sharded(&view, too_many, &Params::new()).unwrap_err();
    assert_eq!(error.status, Status::InvalidArgument, "{error}");
    let outside = Shard { first_token: 3000, full_vocab: VOCAB, index: 0, count: 2 };
    assert_eq!(context.sharded(&view, outside, &Params::new()).unwrap_err().status, Status::InvalidArgument);
    let shard = Shard { first_token: 0, full_vocab: VOCAB, index: 0, count: 2 };
    let mut call = context.sharded(&view, shard, &Params::new()).expect("begin");
    assert_eq!(call.next(Some(&[0u8; 8])).unwrap_err().status, Status::InvalidArgument);
    let first = call.next(None).expect("the first round").expect("bytes to send").to_vec();
    assert!(call.outputs().is_none());
    // A gathered buffer of one rank's bytes where two were expected.
    assert_eq!(call.next(Some(&first)).unwrap_err().status, Status::InvalidArgument);
    assert_eq!(call.next(Some(&first)).unwrap_err().status, Status::InvalidArgument);
    assert!(call.outputs().is_none());
}
