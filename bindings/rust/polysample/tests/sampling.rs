//! Known behaviour of sampling through the safe API, on every backend named
//! in POLYSAMPLE_TEST_BACKENDS (default: cpu).

mod common;

use common::*;
use polysample::{Backend, Logits, Params};

const VOCAB: usize = 1000;
const ROWS: usize = 16;

#[test]
fn greedy_is_the_argmax_with_the_lowest_index_on_ties() {
    let mut generator = Generator::new(1);
    let mut logits = generator.logits(ROWS * VOCAB, -4.0, 4.0);
    // Row 3: a three-way tie for the maximum; the lowest index wins.
    for &index in &[700, 120, 950] {
        logits[3 * VOCAB + index] = 9.0;
    }
    let expected: Vec<i32> = logits.chunks(VOCAB).map(argmax).collect();
    assert_eq!(expected[3], 120);
    for (backend, mut context) in contexts("greedy") {
        let params = Params::new().greedy().num_samples(3).seed(5);
        let (tokens, logprobs) = context.sample_with_logprobs(&Logits::f32(&logits, ROWS, VOCAB), &params).unwrap();
        for row in 0..ROWS {
            assert_eq!(&tokens[row * 3..row * 3 + 3], &[expected[row]; 3], "{backend} row {row}");
        }
        assert!(logprobs.iter().all(|&logprob| logprob == 0.0), "{backend}: greedy logprobs are 0");
        // Below 1e-5 is greedy too.
        let tokens = context.sample(&Logits::f32(&logits, ROWS, VOCAB), &Params::new().temperature(5e-6)).unwrap();
        assert_eq!(tokens, expected, "{backend}");
    }
}

#[test]
fn a_seed_gives_the_same_tokens_and_another_seed_or_offset_other_ones() {
    let logits = Generator::new(2).logits(ROWS * VOCAB, -1.0, 1.0);
    let logits = Logits::f32(&logits, ROWS, VOCAB);
    let params = Params::new().seed(42).num_samples(4);
    let mut by_backend = Vec::new();
    for (backend, mut context) in contexts("determinism") {
        let first = context.sample(&logits, &params).unwrap();
        assert_eq!(first, context.sample(&logits, &params).unwrap(), "{backend}: same seed, same tokens");
        // Near-uniform rows of 1000 tokens: 64 draws agreeing by chance has
        // probability about 1e-190.
        assert_ne!(first, context.sample(&logits, &params.seed(43)).unwrap(), "{backend}: another seed");
        assert_ne!(first, context.sample(&logits, &params.offset(1)).unwrap(), "{backend}: another offset");
        assert!(first.iter().all(|&token| (0..VOCAB as i32).contains(&token)));
        by_backend.push((backend, first));
    }
    // The contract: every backend draws the same tokens.
    for (backend, tokens) in &by_backend[1..] {
        assert_eq!(tokens, &by_backend[0].1, "{backend} differs from {}", by_backend[0].0);
    }
}

#[test]
fn a_fresh_context_draws_what_another_drew() {
    let logits = Generator::new(3).logits(4 * VOCAB, -2.0, 2.0);
    let logits = Logits::f32(&logits, 4, VOCAB);
    let params = Params::new().seed(7).top_k(40).top_p(0.95);
    let first = cpu_context().sample(&logits, &params).unwrap();
    assert_eq!(first, cpu_context().sample(&logits, &params).unwrap());
}

#[test]
fn top_k_keeps_exactly_the_k_most_probable_tokens() {
    const K: usize = 5;
    let logits = Generator::new(4).logits(4 * VOCAB, 0.0, 2.0);
    for (backend, mut context) in contexts("top-k") {
        let params = Params::new().top_k(K as u32).seed(11).num_samples(2000);
        let tokens = context.sample(&Logits::f32(&logits, 4, VOCAB), &params).unwrap();
        let probs = context.probs(&Logits::f32(&logits, 4, VOCAB), &params).unwrap();
        for (row, values) in logits.chunks(VOCAB).enumerate() {
            let top: Vec<i32> = rank_order(values)[..K].iter().map(|&index| index as i32).collect();
            let drawn = &tokens[row * 2000..(row + 1) * 2000];
            assert!(drawn.iter().all(|token| top.contains(token)), "{backend} row {row}: a token outside the top {K}");
            // Each kept token has probability above 0.1 here: 2000 draws miss
            // one with probability below 1e-90.
            assert!(top.iter().all(|token| drawn.contains(token)), "{backend} row {row}: a top-{K} token never drawn");
            let row_probs = &probs[row * VOCAB..(row + 1) * VOCAB];
            let nonzero: Vec<i32> = (0..VOCAB).filter(|&i| row_probs[i] > 0.0).map(|i| i as i32).collect();
            let mut sorted_top = top.clone();
            sorted_top.sort();
            assert_eq!(nonzero, sorted_top, "{backend} row {row}: probs outside the top {K}");
        }
    }
}

/// Total-variation distance between the library's probs and a float64
/// softmax over the same kept set: the contract bounds it by 1e-6; the f32
/// rounding of the output adds at most 2^-24 per unit of mass.
const TV_BOUND: f64 = 1e-6 + 6e-8;

fn total_variation(probs: &[f32], reference: &[f64]) -> f64 {
    0.5 * probs.iter().zip(reference).map(|(&p, &r)| (p as f64 - r).abs()).sum::<f64>()
}

#[test]
fn probs_sum_to_one_and_match_a_float64_softmax() {
    const WIDE: usize = 5000;
    let logits = Generator::new(5).normal_logits(8 * WIDE, 2.0);
    for (backend, mut context) in contexts("probs") {
        for temperature in [0.8f32, 1.0, 1.7] {
            let params = Params::new().temperature(temperature);
            let probs = context.probs(&Logits::f32(&logits, 8, WIDE), &params).unwrap();
            for (row, values) in logits.chunks(WIDE).enumerate() {
                let row_probs = &probs[row * WIDE..(row + 1) * WIDE];
                let sum: f64 = row_probs.iter().map(|&p| p as f64).sum();
                assert!((sum - 1.0).abs() <= 2.0 * TV_BOUND, "{backend} T {temperature} row {row}: sum {sum}");
                let reference = softmax_f64(values, temperature as f64, |_| true);
                let distance = total_variation(row_probs, &reference);
                assert!(distance <= TV_BOUND, "{backend} T {temperature} row {row}: TV distance {distance:e}");
            }
        }
    }
}

#[test]
fn top_p_keeps_the_shortest_prefix_reaching_p_and_renormalises() {
    const P: f32 = 0.6;
    let logits = Generator::new(6).normal_logits(6 * VOCAB, 1.5);
    for (backend, mut context) in contexts("top-p") {
        let params = Params::new().temperature(0.9).top_p(P);
        let probs = context.probs(&Logits::f32(&logits, 6, VOCAB), &params).unwrap();
        for (row, values) in logits.chunks(VOCAB).enumerate() {
            let row_probs = &probs[row * VOCAB..(row + 1) * VOCAB];
            let order = rank_order(values);
            let kept = row_probs.iter().filter(|&&p| p > 0.0).count();
            assert!(order[..kept].iter().all(|&i| row_probs[i] > 0.0), "{backend} row {row}: kept set is not a prefix");
            let full = softmax_f64(values, 0.9, |_| true);
            let mass = |count: usize| order[..count].iter().map(|&i| full[i]).sum::<f64>();
            assert!(mass(kept - 1) < P as f64 + 1e-6, "{backend} row {row}: {kept} tokens, one fewer reaches p");
            assert!(mass(kept) >= P as f64 - 1e-6, "{backend} row {row}: {kept} tokens do not reach p");
            let in_prefix: Vec<bool> = {
                let mut flags = vec![false; VOCAB];
                order[..kept].iter().for_each(|&i| flags[i] = true);
                flags
            };
            let reference = softmax_f64(values, 0.9, |i| in_prefix[i]);
            let distance = total_variation(row_probs, &reference);
            assert!(distance <= TV_BOUND, "{backend} row {row}: TV distance {distance:e}");
        }
    }
}

#[test]
fn min_p_keeps_tokens_at_least_p_times_the_top_one() {
    const MIN_P: f64 = 0.05;
    let logits = Generator::new(7).normal_logits(4 * VOCAB, 1.0);
    for (backend, mut context) in contexts("min-p") {
        let probs = context.probs(&Logits::f32(&logits, 4, VOCAB), &Params::new().min_p(MIN_P as f32)).unwrap();
        for (row, values) in logits.chunks(VOCAB).enumerate() {
            let max = values.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            for (token, &value) in values.iter().enumerate() {
                let ratio = (value as f64 - max).exp();
                let kept = probs[row * VOCAB + token] > 0.0;
                // Ratios within 1e-5 of the threshold could go either way at
                // the contract's precision; the rest must be decided right.
                if ratio > MIN_P * (1.0 + 1e-5) {
                    assert!(kept, "{backend} row {row} token {token}: ratio {ratio} dropped");
                } else if ratio < MIN_P * (1.0 - 1e-5) {
                    assert!(!kept, "{backend} row {row} token {token}: ratio {ratio} kept");
                }
            }
        }
    }
}

#[test]
fn per_row_parameters_act_like_separate_calls() {
    const N: usize = 4;
    let logits = Generator::new(8).logits(N * VOCAB, -3.0, 3.0);
    let temperatures = [0.0f32, 0.7, 1.3, 1.0];
    let top_ks = [0i32, 1, 50, 0];
    let top_ps = [1.0f32, 1.0, 0.8, 0.5];
    let min_ps = [0.0f32, 0.0, 0.0, 0.1];
    let seeds = [10u64, 11, 12, 13];
    for (backend, mut context) in contexts("per-row") {
        let params = Params::new()
            .num_samples(8)
            .offset(3)
            .temperature_per_row(&temperatures)
            .top_k_per_row(&top_ks)
            .top_p_per_row(&top_ps)
            .min_p_per_row(&min_ps)
            .seed_per_row(&seeds);
        let (tokens, logprobs) = context.sample_with_logprobs(&Logits::f32(&logits, N, VOCAB), &params).unwrap();
        for row in 0..N {
            let single = Params::new()
                .num_samples(8)
                .offset(3)
                .temperature(temperatures[row])
                .top_k(top_ks[row] as u32)
                .top_p(top_ps[row])
                .min_p(min_ps[row])
                .seed(seeds[row]);
            let values = &logits[row * VOCAB..(row + 1) * VOCAB];
            let (alone, alone_logprobs) =
                context.sample_with_logprobs(&Logits::f32(values, 1, VOCAB), &single).unwrap();
            assert_eq!(&tokens[row * 8..(row + 1) * 8], &alone[..], "{backend} row {row}");
            assert_eq!(&logprobs[row * 8..(row + 1) * 8], &alone_logprobs[..], "{backend} row {row}");
        }
        // Greedy (row 0) and top-k 1 (row 1) both give the argmax.
        assert_eq!(&tokens[..8], &[argmax(&logits[..VOCAB]); 8]);
        assert_eq!(&tokens[8..16], &[argmax(&logits[VOCAB..2 * VOCAB]); 8]);
    }
}

#[test]
fn per_row_seeds_make_a_row_independent_of_its_position() {
    let logits = Generator::new(9).logits(3 * VOCAB, -1.0, 1.0);
    let mut reversed = Vec::new();
    for row in (0..3).rev() {
        reversed.extend_from_slice(&logits[row * VOCAB..(row + 1) * VOCAB]);
    }
    for (backend, mut context) in contexts("per-row seeds") {
        let seeds = [5u64, 6, 7];
        let reversed_seeds = [7u64, 6, 5];
        let forward = context
            .sample(&Logits::f32(&logits, 3, VOCAB), &Params::new().num_samples(5).seed_per_row(&seeds))
            .unwrap();
        let backward = context
            .sample(&Logits::f32(&reversed, 3, VOCAB), &Params::new().num_samples(5).seed_per_row(&reversed_seeds))
            .unwrap();
        for row in 0..3 {
            assert_eq!(&forward[row * 5..row * 5 + 5], &backward[(2 - row) * 5..(2 - row) * 5 + 5], "{backend}");
        }
    }
}

#[test]
fn f16_and_bf16_inputs_equal_the_same_values_in_f32() {
    // Multiples of 1/8 in [-8, 8]: exact in f16 and in bfloat16.
    let mut generator = Generator::new(10);
    let values: Vec<f32> = (0..ROWS * VOCAB).map(|_| (generator.next_u64() % 129) as f32 / 8.0 - 8.0).collect();
    let halves: Vec<u16> = values.iter().map(|&v| f16_bits_exact(v)).collect();
    let brains: Vec<u16> = values.iter().map(|&v| bf16_bits_exact(v)).collect();
    for (backend, mut context) in contexts("f16/bf16") {
        let params = Params::new().temperature(0.9).top_k(100).top_p(0.9).seed(3).num_samples(3);
        let f32_result = context.sample_with_logprobs(&Logits::f32(&values, ROWS, VOCAB), &params).unwrap();
        let f32_probs = context.probs(&Logits::f32(&values, ROWS, VOCAB), &params).unwrap();
        for (name, logits) in [("f16", Logits::f16(&halves, ROWS, VOCAB)), ("bf16", Logits::bf16(&brains, ROWS, VOCAB))]
        {
            assert_eq!(context.sample_with_logprobs(&logits, &params).unwrap(), f32_result, "{backend} {name}");
            assert_eq!(context.probs(&logits, &params).unwrap(), f32_probs, "{backend} {name} probs");
        }
    }
}

#[test]
fn logprobs_are_the_log_of_the_drawn_tokens_probability() {
    let logits = Generator::new(11).normal_logits(8 * VOCAB, 2.0);
    for (backend, mut context) in contexts("logprobs") {
        let params = Params::new().temperature(0.8).top_k(200).min_p(0.001).seed(9).num_samples(16);
        let (tokens, logprobs) = context.sample_with_logprobs(&Logits::f32(&logits, 8, VOCAB), &params).unwrap();
        let probs = context.probs(&Logits::f32(&logits, 8, VOCAB), &params).unwrap();
        for (index, (&token, &logprob)) in tokens.iter().zip(&logprobs).enumerate() {
            let row = index / 16;
            let probability = probs[row * VOCAB + token as usize] as f64;
            assert!(probability > 0.0, "{backend}: token {token} has probability 0");
            // Both are floats from the same exact integers; each is within
            // float rounding (about 1e-6 relative) of the exact value.
            let tolerance = 2e-6 * (logprob as f64).abs().max(1.0);
            assert!(
                (logprob as f64 - probability.ln()).abs() <= tolerance,
                "{backend} row {row} token {token}: logprob {logprob}, ln(prob) {}",
                probability.ln()
            );
        }
    }
}

#[test]
fn a_row_stride_reads_the_same_rows() {
    const STRIDE: usize = VOCAB + 24;
    let compact = Generator::new(12).logits(4 * VOCAB, -2.0, 2.0);
    let mut padded = vec![f32::NAN; 3 * STRIDE + VOCAB]; // the padding would poison a row if read
    for row in 0..4 {
        padded[row * STRIDE..row * STRIDE + VOCAB].copy_from_slice(&compact[row * VOCAB..(row + 1) * VOCAB]);
    }
    for (backend, mut context) in contexts("row stride") {
        let params = Params::new().seed(1).num_samples(6);
        let expected = context.sample(&Logits::f32(&compact, 4, VOCAB), &params).unwrap();
        let strided = Logits::f32(&padded, 4, VOCAB).with_row_stride(STRIDE);
        assert_eq!(context.sample(&strided, &params).unwrap(), expected, "{backend}");
    }
}

#[test]
fn a_bad_row_gets_token_minus_one_and_nan() {
    let mut logits = Generator::new(13).logits(3 * VOCAB, -1.0, 1.0);
    logits[VOCAB + 17] = f32::NAN;
    for (backend, mut context) in contexts("bad row") {
        let (tokens, logprobs) =
            context.sample_with_logprobs(&Logits::f32(&logits, 3, VOCAB), &Params::new().num_samples(2)).unwrap();
        assert_eq!(&tokens[2..4], &[-1, -1], "{backend}");
        assert!(logprobs[2].is_nan() && logprobs[3].is_nan(), "{backend}");
        assert!(tokens[0] >= 0 && tokens[4] >= 0, "{backend}: the other rows are sampled");
        let probs = context.probs(&Logits::f32(&logits, 3, VOCAB), &Params::new()).unwrap();
        assert!(probs[VOCAB..2 * VOCAB].iter().all(|p| p.is_nan()), "{backend}");
    }
}

#[test]
fn the_device_entry_on_the_cpu_backend_equals_the_host_call() {
    // On the CPU backend device memory is host memory, so the unsafe entry
    // can be checked here; examples/cuda_buffer.rs checks it on CUDA.
    let logits = Generator::new(14).logits(4 * VOCAB, -2.0, 2.0);
    let temperatures = [0.5f32, 1.0, 0.0, 2.0];
    let mut context = cpu_context();
    let host = context
        .sample_with_logprobs(
            &Logits::f32(&logits, 4, VOCAB),
            &Params::new().seed(8).num_samples(3).temperature_per_row(&temperatures),
        )
        .unwrap();
    let mut tokens = vec![0i32; 12];
    let mut logprobs = vec![0f32; 12];
    let device_logits = polysample::DeviceLogits {
        data: logits.as_ptr() as *mut _,
        dtype: polysample::Dtype::F32,
        rows: 4,
        vocab: VOCAB,
        row_stride: 0,
    };
    let per_row = polysample::DevicePerRow { temperature: temperatures.as_ptr(), ..Default::default() };
    // SAFETY: CPU backend: host buffers of the right sizes, alive and
    // unchanged until synchronize returns.
    unsafe {
        context
            .sample_device(
                &device_logits,
                &Params::new().seed(8).num_samples(3),
                &per_row,
                tokens.as_mut_ptr(),
                logprobs.as_mut_ptr(),
            )
            .unwrap();
    }
    context.synchronize().unwrap();
    assert_eq!((tokens, logprobs), host);

    let mut probs = vec![0f32; 4 * VOCAB];
    // SAFETY: as above.
    unsafe { context.probs_device(&device_logits, &Params::new(), &Default::default(), probs.as_mut_ptr()).unwrap() };
    context.synchronize().unwrap();
    assert_eq!(probs, context.probs(&Logits::f32(&logits, 4, VOCAB), &Params::new()).unwrap());
}

#[test]
fn reserve_then_sample_within_it() {
    let logits = Generator::new(15).logits(8 * VOCAB, -1.0, 1.0);
    for (backend, mut context) in contexts("reserve") {
        context.reserve(8, VOCAB, 4).unwrap();
        let tokens = context.sample(&Logits::f32(&logits, 8, VOCAB), &Params::new().num_samples(4)).unwrap();
        assert_eq!(tokens.len(), 32, "{backend}");
    }
}

#[test]
fn a_context_moves_to_another_thread() {
    fn assert_send<T: Send>(_: &T) {}
    let mut context = cpu_context();
    assert_send(&context);
    let logits = vec![0.0f32, 1.0, 5.0, 2.0];
    let tokens = std::thread::spawn(move || context.sample(&Logits::f32(&logits, 1, 4), &Params::new().greedy()))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(tokens, [2]);
}

#[test]
fn contexts_report_their_backend_and_device() {
    for (backend, context) in contexts("context info") {
        assert_eq!(context.backend(), Some(backend));
        assert!(!context.device_name().is_empty(), "{backend}");
        assert_eq!(context.selection_reason(), "requested", "{backend}");
    }
    let threads = polysample::ContextOptions::new().backend(Backend::Cpu).cpu_threads(1).create().unwrap();
    assert!(threads.device_name().contains("1 thread"), "{}", threads.device_name());
}
