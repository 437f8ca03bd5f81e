//! Logit processing through the safe API (docs/SAMPLING.md, section 1): a
//! processed call gives exactly the tokens, logprobs and probabilities of a
//! plain call on logits processed here by the contract's rules; bad input
//! fails with the library's (or this crate's) message and writes nothing.
//! Every backend runs processing, so a refusal fails the test.

mod common;

use common::*;
use polysample::{
    Backend, Context, DeviceLogits, DevicePerRow, DeviceProcessing, Dtype, Error, Logits, Params, Processing, Status,
};

const VOCAB: usize = 700;
const WORDS: usize = VOCAB.div_ceil(32);
const SENTINEL: i32 = 77;

/// A batch with every kind of processing, as per-row lists.
struct Batch {
    rows: usize,
    logits: Vec<f32>,
    history: Vec<Vec<i32>>,
    prompt: Vec<Vec<i32>>,
    bias: Vec<Vec<(i32, f32)>>,
    mask: Vec<u32>,
    repetition: Vec<f32>,
    frequency: Vec<f32>,
    presence: Vec<f32>,
}

fn below(generator: &mut Generator, bound: usize) -> usize {
    (generator.uniform() * bound as f64) as usize
}

/// Tokens from a pool of 40 so that histories repeat tokens and the lists
/// overlap; every row holds a masked (-inf) logit at 5 and a zero at 6, and
/// row 0's history starts with both.
fn batch(rows: usize, seed: u64) -> Batch {
    let mut generator = Generator::new(seed);
    let mut logits = generator.normal_logits(rows * VOCAB, 2.0);
    for row in 0..rows {
        logits[row * VOCAB + 5] = f32::NEG_INFINITY;
        logits[row * VOCAB + 6] = 0.0;
    }
    let pool_token = |generator: &mut Generator| (below(generator, 40) * 17 % VOCAB) as i32;
    let mut history = Vec::new();
    let mut prompt = Vec::new();
    let mut bias = Vec::new();
    for _ in 0..rows {
        let length = below(&mut generator, 40);
        history.push((0..length).map(|_| pool_token(&mut generator)).collect::<Vec<_>>());
        let length = below(&mut generator, 20);
        prompt.push((0..length).map(|_| pool_token(&mut generator)).collect::<Vec<_>>());
        let length = below(&mut generator, 25);
        bias.push(
            (0..length)
                .map(|_| (pool_token(&mut generator), (8.0 * generator.uniform() - 4.0) as f32))
                .collect::<Vec<_>>(),
        );
    }
    history[0].splice(0..0, [5, 6]);
    // About 3 tokens in 4 allowed; row 1 allows all.
    let mask = (0..rows * WORDS)
        .map(|word| if word / WORDS == 1 { u32::MAX } else { (generator.next_u64() | generator.next_u64()) as u32 })
        .collect();
    let repetition =
        (0..rows).map(|row| if row % 3 == 0 { 1.0 } else { (0.5 + 1.5 * generator.uniform()) as f32 }).collect();
    let frequency = (0..rows).map(|row| if row % 4 == 1 { 0.0 } else { (generator.uniform() - 0.25) as f32 }).collect();
    let presence =
        (0..rows).map(|row| if row % 4 == 2 { 0.0 } else { (2.0 * generator.uniform() - 0.5) as f32 }).collect();
    Batch { rows, logits, history, prompt, bias, mask, repetition, frequency, presence }
}

/// 1/r as the contract computes it: four Newton steps from a bit-level
/// guess, each operation a correctly rounded f32 operation.
fn penalty_reciprocal(r: f32) -> f32 {
    let mut reciprocal = f32::from_bits(0x7ef3_11c3u32.wrapping_sub(r.to_bits()));
    for _ in 0..4 {
        let error = 1.0 - r * reciprocal;
        reciprocal += reciprocal * error;
    }
    reciprocal
}

/// The contract's read of a logit: tiny magnitudes (and -0) become +0.
fn read_logit(x: f32) -> f32 {
    if x.abs() < f32::from_bits(0x1f80_0000)
    /* 2^-64 */
    {
        0.0
    } else {
        x
    }
}

/// Section 1's rules, token by token.
fn process_literally(batch: &Batch) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch.logits.len());
    for row in 0..batch.rows {
        let (repetition, frequency, presence) = (batch.repetition[row], batch.frequency[row], batch.presence[row]);
        for token in 0..VOCAB {
            let mut x = read_logit(batch.logits[row * VOCAB + token]);
            let count = batch.history[row].iter().filter(|&&listed| listed as usize == token).count();
            let in_prompt = batch.prompt[row].iter().any(|&listed| listed as usize == token);
            if count > 0 || in_prompt {
                if repetition != 1.0 {
                    x = if x > 0.0 { x * penalty_reciprocal(repetition) } else { x * repetition };
                }
                if count > 0 {
                    x = x - frequency * count as f32;
                    x = x - presence;
                }
            }
            for &(listed, value) in &batch.bias[row] {
                if listed as usize == token {
                    x = x + value;
                }
            }
            if (batch.mask[row * WORDS + token / 32] >> (token % 32)) & 1 == 0 {
                x = f32::NEG_INFINITY;
            }
            out.push(read_logit(x));
        }
    }
    out
}

/// CSR offsets and entries of per-row lists.
fn csr<T: Copy>(rows: &[Vec<T>]) -> (Vec<i64>, Vec<T>) {
    let mut offsets = vec![0i64];
    for row in rows {
        offsets.push(offsets.last().unwrap() + row.len() as i64);
    }
    (offsets, rows.concat())
}

/// Runs a processed sample: tokens and logprobs.
fn sample_processed(
    context: &mut Context,
    backend: Backend,
    test: &str,
    logits: &Logits<'_>,
    params: &Params<'_>,
    samples: usize,
) -> (Vec<i32>, Vec<f32>) {
    let length = params.output_rows(logits.rows()) * samples;
    let (mut tokens, mut logprobs) = (vec![SENTINEL; length], vec![0.0f32; length]);
    match context.sample_into(logits, params, &mut tokens, Some(&mut logprobs)) {
        Ok(()) => (tokens, logprobs),
        Err(error) => panic!("{test} on {backend}: {error}"),
    }
}

#[test]
fn a_processed_call_equals_a_plain_call_on_the_processed_logits() {
    let batch = batch(6, 40);
    let processed = process_literally(&batch);
    let processing = Processing::new()
        .history(&batch.history)
        .prompt(&batch.prompt)
        .logit_bias(&batch.bias)
        .allowed_mask(&batch.mask)
        .repetition_penalty_per_row(&batch.repetition)
        .frequency_penalty_per_row(&batch.frequency)
        .presence_penalty_per_row(&batch.presence);
    let settings = [
        Params::new().temperature(0.9),
        Params::new().temperature(0.8).top_k(50).top_p(0.9),
        Params::new().temperature(0.7).min_p(0.05),
        Params::new().greedy(),
    ];
    let samples = 16;
    for (backend, mut context) in contexts("processing equals the processed logits") {
        let logits = Logits::f32(&batch.logits, batch.rows, VOCAB);
        let plain_logits = Logits::f32(&processed, batch.rows, VOCAB);
        for (index, setting) in settings.iter().enumerate() {
            let setting = setting.seed(100 + index as u64).num_samples(samples as u32);
            let expected = context.sample_with_logprobs(&plain_logits, &setting).unwrap();
            let params = setting.processing(&processing);
            let got = sample_processed(&mut context, backend, "processing", &logits, &params, samples);
            // Bit for bit: NaN logprobs of bad rows would differ under ==.
            assert_eq!(got.0, expected.0, "{backend} setting {index}: tokens");
            let bits = |values: &[f32]| values.iter().map(|value| value.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.1), bits(&expected.1), "{backend} setting {index}: logprobs");
            let probs = context.probs(&logits, &params).unwrap();
            assert_eq!(bits(&probs), bits(&context.probs(&plain_logits, &setting).unwrap()), "{backend} probs");
        }
    }
}

#[test]
fn csr_slices_and_scalar_penalties_equal_per_row_lists() {
    let batch = batch(5, 41);
    let (history_offsets, history_tokens) = csr(&batch.history);
    let (prompt_offsets, prompt_tokens) = csr(&batch.prompt);
    let (bias_offsets, bias_entries) = csr(&batch.bias);
    let bias_tokens: Vec<i32> = bias_entries.iter().map(|&(token, _)| token).collect();
    let bias_values: Vec<f32> = bias_entries.iter().map(|&(_, value)| value).collect();
    // Rows 32 words apart: the mask's words of a row, then padding.
    let padded: Vec<u32> = batch
        .mask
        .chunks(WORDS)
        .flat_map(|row| row.iter().copied().chain(std::iter::repeat(0).take(32 - WORDS)))
        .collect();
    let borrowed = Processing::new()
        .history_csr(&history_offsets, &history_tokens)
        .prompt_csr(&prompt_offsets, &prompt_tokens)
        .logit_bias_csr(&bias_offsets, &bias_tokens, &bias_values)
        .allowed_mask_with_words(&padded, 32)
        .repetition_penalty(1.3)
        .frequency_penalty(0.25)
        .presence_penalty(-0.5);
    let owned = Processing::new()
        .history(&batch.history)
        .prompt(&batch.prompt)
        .logit_bias(&batch.bias)
        .allowed_mask(&batch.mask)
        .repetition_penalty_per_row(&[1.3; 5])
        .frequency_penalty_per_row(&[0.25; 5])
        .presence_penalty_per_row(&[-0.5; 5]);
    let logits = Logits::f32(&batch.logits, batch.rows, VOCAB);
    for (backend, mut context) in contexts("CSR processing") {
        let params = Params::new().seed(9).num_samples(20);
        let got = sample_processed(&mut context, backend, "CSR processing", &logits, &params.processing(&borrowed), 20);
        let expected = context.sample_with_logprobs(&logits, &params.processing(&owned)).unwrap();
        assert_eq!(got, expected, "{backend}");
        assert_ne!(got.0, context.sample(&logits, &params).unwrap(), "{backend}: processing changed nothing");
    }
}

#[test]
fn processing_follows_the_output_rows_of_a_row_gather() {
    let batch = batch(3, 42);
    let indices = [2i64, 2, 0, 1];
    // Output rows 0 and 1 sample the same logits with different histories.
    let history = vec![vec![10, 10, 11], vec![], vec![6, 7], vec![1; 30]];
    let processing = Processing::new().history(&history).frequency_penalty(1.5).presence_penalty(0.5);
    let copied: Vec<f32> = indices
        .iter()
        .flat_map(|&row| batch.logits[row as usize * VOCAB..(row as usize + 1) * VOCAB].to_vec())
        .collect();
    let params = Params::new().seed(3).num_samples(8).processing(&processing);
    for (backend, mut context) in contexts("processing with a row gather") {
        let gathered = params.row_indices(&indices);
        let got = sample_processed(
            &mut context,
            backend,
            "processing with a row gather",
            &Logits::f32(&batch.logits, 3, VOCAB),
            &gathered,
            8,
        );
        assert_eq!(got, context.sample_with_logprobs(&Logits::f32(&copied, 4, VOCAB), &params).unwrap(), "{backend}");
    }
}

/// sample_into with sentinel outputs; the error, after checking nothing
/// was written.
fn failing(processing: &Processing<'_>) -> Error {
    let values = Generator::new(43).logits(2 * VOCAB, -1.0, 1.0);
    let mut tokens = [SENTINEL; 2];
    let error = cpu_context()
        .sample_into(&Logits::f32(&values, 2, VOCAB), &Params::new().processing(processing), &mut tokens, None)
        .unwrap_err();
    assert_eq!(tokens, [SENTINEL; 2], "tokens written despite {error}");
    error
}

#[test]
fn bad_processing_fails_with_its_status_and_message() {
    let cases: Vec<(Processing<'_>, Status, &str)> = vec![
        (
            Processing::new().history(&[vec![1, 2], vec![3, 700]]),
            Status::InvalidParameter,
            "processing: row 1: history_tokens[3] is 700; the vocab is 700",
        ),
        (
            Processing::new().logit_bias(&[vec![(-1, 1.0)], vec![]]),
            Status::InvalidParameter,
            "processing: row 0: bias_tokens[0] is -1; the vocab is 700",
        ),
        (
            Processing::new().logit_bias(&[vec![], vec![(3, f32::INFINITY)]]),
            Status::InvalidParameter,
            "processing: row 1: bias_values[0] is inf; expected finite",
        ),
        (
            Processing::new().history_csr(&[0, 3, 1], &[1, 2, 3]),
            Status::InvalidArgument,
            "processing: history_offsets[2] = 1 is below history_offsets[1] = 3",
        ),
        (
            Processing::new().repetition_penalty(0.0),
            Status::InvalidParameter,
            "processing: repetition_penalty is 0; expected 1e-3 .. 1e3 (1 = off)",
        ),
        (
            Processing::new().frequency_penalty_per_row(&[0.0, f32::NAN]),
            Status::InvalidParameter,
            "processing: row 1: frequency_penalty is nan; expected -1e3 .. 1e3 (0 = off)",
        ),
        (
            Processing::new().allowed_mask_with_words(&[u32::MAX; 2 * 5], 5),
            Status::InvalidArgument,
            "processing: allowed_mask_words is 5; a row of 700 tokens needs 22 (0 means that)",
        ),
        // Lengths, checked by this crate before the library is called.
        (
            Processing::new().history_csr(&[0, 2], &[1, 2]),
            Status::InvalidArgument,
            "processing: history offsets has 2 values for 2 rows; expected rows + 1 = 3",
        ),
        (
            Processing::new().prompt_csr(&[0, 1, 4], &[1, 2, 3]),
            Status::InvalidArgument,
            "processing: prompt offsets[2] is 4; the prompt lists hold 3 entries",
        ),
        (
            Processing::new().logit_bias_csr(&[0, 1, 2], &[1, 2], &[0.5]),
            Status::InvalidArgument,
            "processing: logit bias has 2 tokens but 1 values; expected one value per token",
        ),
        (
            Processing::new().allowed_mask(&[u32::MAX; WORDS]),
            Status::InvalidArgument,
            "processing: allowed_mask has 22 words; expected rows x words = 2 x 22 = 44",
        ),
        (
            Processing::new().presence_penalty_per_row(&[0.5]),
            Status::InvalidArgument,
            "processing: presence_penalty_per_row has 1 values for 2 rows; expected one per output row",
        ),
    ];
    for (processing, status, message) in &cases {
        let error = failing(processing);
        assert_eq!((error.status, error.message.as_str()), (*status, *message));
    }
}

#[test]
fn a_mask_that_allows_nothing_makes_a_bad_row() {
    let values = Generator::new(44).logits(2 * VOCAB, -1.0, 1.0);
    let mut mask = vec![u32::MAX; 2 * WORDS];
    mask[WORDS..].fill(0);
    let processing = Processing::new().allowed_mask(&mask);
    let params = Params::new().num_samples(2).processing(&processing);
    let logits = Logits::f32(&values, 2, VOCAB);
    let (tokens, logprobs) = cpu_context().sample_with_logprobs(&logits, &params).unwrap();
    assert!(tokens[..2].iter().all(|&token| (0..VOCAB as i32).contains(&token)));
    assert_eq!(tokens[2..], [-1, -1]);
    assert!(logprobs[2..].iter().all(|value| value.is_nan()));
    let mut checking = polysample::ContextOptions::new().backend(Backend::Cpu).check_rows(true).create().unwrap();
    let error = checking.sample(&logits, &params).unwrap_err();
    assert_eq!(error.status, Status::BadRow, "{error}");
}

#[test]
fn device_processing_equals_host_processing() {
    let batch = batch(5, 43);
    let (history_offsets, history_tokens) = csr(&batch.history);
    let (prompt_offsets, prompt_tokens) = csr(&batch.prompt);
    let bias_tokens: Vec<Vec<i32>> = batch.bias.iter().map(|row| row.iter().map(|entry| entry.0).collect()).collect();
    let bias_values: Vec<Vec<f32>> = batch.bias.iter().map(|row| row.iter().map(|entry| entry.1).collect()).collect();
    let ((bias_offsets, bias_tokens), (_, bias_values)) = (csr(&bias_tokens), csr(&bias_values));
    let host = Processing::new()
        .history(&batch.history)
        .prompt(&batch.prompt)
        .logit_bias(&batch.bias)
        .allowed_mask(&batch.mask)
        .repetition_penalty_per_row(&batch.repetition)
        .frequency_penalty(0.25)
        .presence_penalty_per_row(&batch.presence);
    // The CPU backend's device memory is host memory: the same arrays.
    let device = DeviceProcessing {
        allowed_mask: batch.mask.as_ptr(),
        bias_offsets: bias_offsets.as_ptr(),
        bias_tokens: bias_tokens.as_ptr(),
        bias_values: bias_values.as_ptr(),
        history_offsets: history_offsets.as_ptr(),
        history_tokens: history_tokens.as_ptr(),
        prompt_offsets: prompt_offsets.as_ptr(),
        prompt_tokens: prompt_tokens.as_ptr(),
        frequency_penalty: 0.25,
        repetition_penalty_per_row: batch.repetition.as_ptr(),
        presence_penalty_per_row: batch.presence.as_ptr(),
        ..DeviceProcessing::default()
    };
    let per_row = DevicePerRow { processing: Some(device), ..DevicePerRow::default() };
    let logits = DeviceLogits {
        data: batch.logits.as_ptr().cast_mut().cast(),
        dtype: Dtype::F32,
        rows: batch.rows,
        vocab: VOCAB,
        row_stride: 0,
    };
    let setting = Params::new().temperature(0.8).top_k(60).top_p(0.95).seed(17).num_samples(8);
    let mut context = cpu_context();
    let expected = context
        .sample_with_logprobs(&Logits::f32(&batch.logits, batch.rows, VOCAB), &setting.processing(&host))
        .unwrap();
    let (mut tokens, mut logprobs) = (vec![SENTINEL; batch.rows * 8], vec![0.0f32; batch.rows * 8]);
    let mut probs = vec![0.0f32; batch.rows * VOCAB];
    // SAFETY: host memory serves as the CPU backend's device memory; every
    // array lives through the calls and holds what its offsets and rows say.
    unsafe {
        context.sample_device(&logits, &setting, &per_row, tokens.as_mut_ptr(), logprobs.as_mut_ptr()).unwrap();
        context.probs_device(&logits, &setting, &per_row, probs.as_mut_ptr()).unwrap();
    }
    assert_eq!(tokens, expected.0);
    assert_eq!(logprobs, expected.1);
    let expected_probs =
        context.probs(&Logits::f32(&batch.logits, batch.rows, VOCAB), &setting.processing(&host)).unwrap();
    assert_eq!(probs, expected_probs);
    // Processing in Params (host slices) is refused by the device calls, and
    // nothing is written.
    let mut token = SENTINEL;
    // SAFETY: as above; the call fails before reading anything.
    let error = unsafe {
        context.sample_device(
            &logits,
            &Params::new().processing(&Processing::new().presence_penalty(1.0)),
            &DevicePerRow::default(),
            &mut token,
            std::ptr::null_mut(),
        )
    }
    .unwrap_err();
    assert_eq!(error.status, Status::InvalidArgument);
    assert_eq!(
        error.message,
        "logit processing of Params is host memory; device calls take it in DevicePerRow::processing"
    );
    assert_eq!(token, SENTINEL);
}
