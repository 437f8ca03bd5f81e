//! Request state through the safe API: row gather, per-row offsets,
//! subsequences, the seed and offset read when the work runs, and the
//! caller's workspace; on every backend named in POLYSAMPLE_TEST_BACKENDS
//! (default: cpu) where the call is host-side.

mod common;

use common::*;
use polysample::{Backend, DeviceLogits, DevicePerRow, DeviceWorkspace, Dtype, Logits, Params, Status};

const VOCAB: usize = 1000;
const SENTINEL: i32 = 77;

/// The rows of `logits` (`VOCAB` wide) picked by `indices`, copied.
fn gathered(logits: &[f32], indices: &[i64]) -> Vec<f32> {
    indices.iter().flat_map(|&row| logits[row as usize * VOCAB..(row as usize + 1) * VOCAB].to_vec()).collect()
}

#[test]
fn a_row_gather_equals_sampling_the_copied_rows() {
    let logits = Generator::new(30).logits(4 * VOCAB, -2.0, 2.0);
    let indices = [2i64, 0, 2, 3, 1, 2];
    let copied = gathered(&logits, &indices);
    let temperatures = [0.5f32, 1.0, 1.5, 0.0, 0.9, 1.0];
    for (backend, mut context) in contexts("row gather") {
        let params = Params::new().seed(17).offset(4).top_k(300).num_samples(5).temperature_per_row(&temperatures);
        let (tokens, logprobs) =
            context.sample_with_logprobs(&Logits::f32(&logits, 4, VOCAB), &params.row_indices(&indices)).unwrap();
        let expected = context.sample_with_logprobs(&Logits::f32(&copied, 6, VOCAB), &params).unwrap();
        assert_eq!((tokens, logprobs), expected, "{backend}");
        let probs = context.probs(&Logits::f32(&logits, 4, VOCAB), &params.row_indices(&indices)).unwrap();
        assert_eq!(probs, context.probs(&Logits::f32(&copied, 6, VOCAB), &params).unwrap(), "{backend} probs");
    }
}

#[test]
fn per_row_offsets_equal_one_call_per_row_at_that_offset() {
    let logits = Generator::new(31).logits(4 * VOCAB, -1.0, 1.0);
    let offsets = [0u64, 5, 1 << 63, u64::MAX];
    let seeds = [3u64, 3, 9, 1 << 40];
    for (backend, mut context) in contexts("offset_per_row") {
        let params = Params::new().num_samples(6).offset_per_row(&offsets).seed_per_row(&seeds);
        let tokens = context.sample(&Logits::f32(&logits, 4, VOCAB), &params).unwrap();
        for row in 0..4 {
            let alone = Params::new().num_samples(6).offset(offsets[row]).seed_per_row(&seeds[row..row + 1]);
            let expected =
                context.sample(&Logits::f32(&logits[row * VOCAB..(row + 1) * VOCAB], 1, VOCAB), &alone).unwrap();
            assert_eq!(&tokens[row * 6..(row + 1) * 6], &expected[..], "{backend} row {row}");
        }
        // Rows 0 and 1 differ only in their offset: near-uniform rows of 1000
        // tokens agree on 6 draws by chance with probability about 1e-18.
        let same_offset = Params::new().num_samples(6).offset(0).seed_per_row(&seeds);
        let at_zero = context.sample(&Logits::f32(&logits, 4, VOCAB), &same_offset).unwrap();
        assert_eq!(at_zero[..6], tokens[..6], "{backend}: offset 0 per row is the scalar 0");
        assert_ne!(at_zero[6..12], tokens[6..12], "{backend}: offset 5 draws anew");
    }
}

#[test]
fn subsequences_are_the_default_streams_when_they_name_them_and_draw_apart_otherwise() {
    const ROWS: usize = 64;
    let logits = Generator::new(32).logits(VOCAB, -0.5, 0.5);
    let all_row_zero = [0i64; ROWS];
    let seeds = [1234u64; ROWS];
    let row_streams: Vec<u32> = (0..ROWS as u32).collect();
    let zeros = [0u32; ROWS];
    let sevens = [7u32; ROWS];
    for (backend, mut context) in contexts("subsequence_per_row") {
        let logits = Logits::f32(&logits, 1, VOCAB);
        let base = Params::new().num_samples(4).offset(11).row_indices(&all_row_zero);
        // The default stream is the row with one seed, 0 with per-row seeds.
        let scalar_seed = base.seed(1234);
        assert_eq!(
            context.sample(&logits, &scalar_seed).unwrap(),
            context.sample(&logits, &scalar_seed.subsequence_per_row(&row_streams)).unwrap(),
            "{backend}"
        );
        let per_row_seed = base.seed_per_row(&seeds);
        let same_stream = context.sample(&logits, &per_row_seed).unwrap();
        assert_eq!(same_stream, context.sample(&logits, &per_row_seed.subsequence_per_row(&zeros)).unwrap());
        assert!(same_stream.chunks(4).all(|row| row == &same_stream[..4]), "{backend}: one seed, one stream");
        let seventh = context.sample(&logits, &per_row_seed.subsequence_per_row(&sevens)).unwrap();
        assert!(seventh.chunks(4).all(|row| row == &seventh[..4]), "{backend}");
        assert_ne!(seventh[..4], same_stream[..4], "{backend}: stream 7 is not stream 0");
        // Distinct streams: two rows of 4 draws from about 1000 near-uniform
        // tokens agree with probability about 1e-12; 2016 pairs.
        let apart = context.sample(&logits, &per_row_seed.subsequence_per_row(&row_streams)).unwrap();
        let rows: Vec<&[i32]> = apart.chunks(4).collect();
        for first in 0..ROWS {
            for second in first + 1..ROWS {
                assert_ne!(rows[first], rows[second], "{backend}: streams {first} and {second}");
            }
        }
    }
}

#[test]
fn the_callers_workspace_gives_the_same_results_and_too_small_a_one_is_refused() {
    let logits = Generator::new(33).normal_logits(5 * VOCAB, 2.0);
    let logits = Logits::f32(&logits, 5, VOCAB);
    let params = Params::new().temperature(0.8).top_p(0.9).seed(5).num_samples(3);
    let mut context = cpu_context();
    let bytes = context.sample_workspace_size(&logits, &params).unwrap();
    assert!(bytes > 0, "the CPU backend needs tile arrays");
    let mut workspace = vec![0xa5u8; bytes];
    let (mut tokens, mut logprobs) = (vec![0; 15], vec![0.0; 15]);
    context.sample_into_with_workspace(&logits, &params, &mut tokens, Some(&mut logprobs), &mut workspace).unwrap();
    assert_eq!((tokens, logprobs), context.sample_with_logprobs(&logits, &params).unwrap());

    let probs_bytes = context.probs_workspace_size(&logits, &params).unwrap();
    let mut probs_workspace = vec![0u8; probs_bytes];
    let mut probs = vec![0.0; 5 * VOCAB];
    context.probs_into_with_workspace(&logits, &params, &mut probs, &mut probs_workspace).unwrap();
    assert_eq!(probs, context.probs(&logits, &params).unwrap());

    let mut small = vec![0u8; bytes - 1];
    let mut untouched = [SENTINEL; 15];
    let error = context.sample_into_with_workspace(&logits, &params, &mut untouched, None, &mut small).unwrap_err();
    assert_eq!(error.status, Status::InvalidArgument);
    assert_eq!(
        error.message,
        format!("workspace_bytes is {}; this call needs {bytes} (psm_sample_workspace_size)", bytes - 1)
    );
    assert_eq!(untouched, [SENTINEL; 15]);
}

#[test]
fn a_host_workspace_is_refused_on_a_device_backend() {
    let values = Generator::new(34).logits(2 * VOCAB, -1.0, 1.0);
    let mut ran = false;
    for (backend, mut context) in contexts("host workspace on a device backend") {
        if backend == Backend::Cpu {
            continue;
        }
        ran = true;
        let mut tokens = [SENTINEL; 2];
        let mut workspace = vec![0u8; 1 << 20];
        let error = context
            .sample_into_with_workspace(
                &Logits::f32(&values, 2, VOCAB),
                &Params::new(),
                &mut tokens,
                None,
                &mut workspace,
            )
            .unwrap_err();
        assert_eq!(error.status, Status::WrongBackend, "{backend}: {error}");
        assert_eq!(tokens, [SENTINEL; 2]);
    }
    if !ran {
        report_skip("host workspace on a device backend", "POLYSAMPLE_TEST_BACKENDS has no available device backend");
    }
}

#[test]
fn bad_request_state_is_refused_and_nothing_is_written() {
    let values = Generator::new(35).logits(2 * VOCAB, -1.0, 1.0);
    let logits = Logits::f32(&values, 2, VOCAB);
    let mut context = cpu_context();
    let cases: [(Params<'_>, usize, &str); 5] = [
        (Params::new().row_indices(&[0, 7, 1]), 3, "row_indices[1] is 7; logits have 2 rows"),
        (Params::new().row_indices(&[-1]), 1, "row_indices[0] is -1; logits have 2 rows"),
        (Params::new().row_indices(&[]), 0, "row_indices is empty; expected at least one entry"),
        (
            Params::new().row_indices(&[1, 1, 0]).offset_per_row(&[1, 2]),
            3,
            "offset_per_row has 2 values for 3 output rows; expected one per entry of row_indices",
        ),
        (
            Params::new().subsequence_per_row(&[1, 2, 3]),
            2,
            "subsequence_per_row has 3 values for 2 rows; expected one per row",
        ),
    ];
    for (params, rows, message) in cases {
        let mut tokens = vec![SENTINEL; rows];
        let error = context.sample_into(&logits, &params, &mut tokens, None).unwrap_err();
        assert_eq!((error.status, error.message.as_str()), (Status::InvalidArgument, message));
        assert!(tokens.iter().all(|&token| token == SENTINEL), "{message}");
    }
    // Outputs have one row per entry of row_indices.
    let mut tokens = [SENTINEL; 2];
    let error = context.sample_into(&logits, &Params::new().row_indices(&[0, 1, 1]), &mut tokens, None).unwrap_err();
    assert_eq!(error.message, "tokens has 2 values; expected rows x num_samples = 3 x 1 = 3");
    let mut probs = vec![0.0; 2 * VOCAB];
    let error = context.probs_into(&logits, &Params::new().row_indices(&[1]), &mut probs).unwrap_err();
    assert_eq!(error.message, format!("probs has {} values; expected rows x vocab = 1 x {VOCAB} = {VOCAB}", 2 * VOCAB));
}

fn device_logits(values: &[f32], rows: usize) -> DeviceLogits {
    DeviceLogits { data: values.as_ptr() as *mut _, dtype: Dtype::F32, rows, vocab: VOCAB, row_stride: 0 }
}

#[test]
fn the_device_entry_reads_request_state_from_memory_on_the_cpu_backend() {
    // On the CPU backend device memory is host memory, so the unsafe entry
    // is checked here against the host call with the same values.
    let values = Generator::new(36).logits(3 * VOCAB, -2.0, 2.0);
    let indices = [2i64, 2, 0, 1];
    let offsets = [8u64, 9, 8, 1 << 50];
    let streams = [4u32, 5, 4, 0];
    let mut context = cpu_context();
    let host_params = Params::new().seed(21).num_samples(2);
    let expected = context
        .sample_with_logprobs(
            &Logits::f32(&values, 3, VOCAB),
            &host_params.row_indices(&indices).offset_per_row(&offsets).subsequence_per_row(&streams),
        )
        .unwrap();
    let per_row = DevicePerRow {
        row_indices: indices.as_ptr(),
        output_rows: 4,
        offset: offsets.as_ptr(),
        subsequence: streams.as_ptr(),
        ..Default::default()
    };
    let bytes = context.sample_device_workspace_size(&device_logits(&values, 3), &host_params, &per_row).unwrap();
    let mut workspace = vec![0u8; bytes];
    let (mut tokens, mut logprobs) = (vec![0i32; 8], vec![0f32; 8]);
    // SAFETY: CPU backend: host buffers of the sizes the calls need, alive
    // and unchanged until synchronize returns.
    unsafe {
        context
            .sample_device_with_workspace(
                &device_logits(&values, 3),
                &host_params,
                &per_row,
                tokens.as_mut_ptr(),
                logprobs.as_mut_ptr(),
                &DeviceWorkspace { data: workspace.as_mut_ptr().cast(), bytes },
            )
            .unwrap();
    }
    context.synchronize().unwrap();
    assert_eq!((tokens, logprobs), expected);

    // The seed and offset by pointer equal the scalars with their values.
    let seed = [77u64];
    let offset = [123u64];
    let by_value = context.sample(&Logits::f32(&values, 3, VOCAB), &Params::new().seed(77).offset(123)).unwrap();
    let pointers = DevicePerRow { seed_pointer: seed.as_ptr(), offset_pointer: offset.as_ptr(), ..Default::default() };
    let mut tokens = vec![0i32; 3];
    // SAFETY: as above.
    unsafe {
        context
            .sample_device(
                &device_logits(&values, 3),
                &Params::new(),
                &pointers,
                tokens.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .unwrap();
    }
    context.synchronize().unwrap();
    assert_eq!(tokens, by_value);

    let probs_per_row = DevicePerRow { row_indices: indices.as_ptr(), output_rows: 4, ..Default::default() };
    let bytes =
        context.probs_device_workspace_size(&device_logits(&values, 3), &Params::new(), &probs_per_row).unwrap();
    let mut workspace = vec![0u8; bytes];
    let mut probs = vec![0f32; 4 * VOCAB];
    // SAFETY: as above.
    unsafe {
        context
            .probs_device_with_workspace(
                &device_logits(&values, 3),
                &Params::new(),
                &probs_per_row,
                probs.as_mut_ptr(),
                &DeviceWorkspace { data: workspace.as_mut_ptr().cast(), bytes },
            )
            .unwrap();
    }
    context.synchronize().unwrap();
    assert_eq!(probs, context.probs(&Logits::f32(&values, 3, VOCAB), &Params::new().row_indices(&indices)).unwrap());
}

#[test]
fn a_seed_pointer_with_per_row_seeds_is_refused() {
    let values = Generator::new(37).logits(2 * VOCAB, -1.0, 1.0);
    let seed = [1u64];
    let seeds = [1u64, 2];
    let per_row = DevicePerRow { seed_pointer: seed.as_ptr(), seed: seeds.as_ptr(), ..Default::default() };
    let mut tokens = [SENTINEL; 2];
    // SAFETY: CPU backend, host buffers of the right sizes.
    let error = unsafe {
        cpu_context().sample_device(
            &device_logits(&values, 2),
            &Params::new(),
            &per_row,
            tokens.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .unwrap_err();
    assert_eq!(error.status, Status::InvalidArgument);
    assert_eq!(error.message, "seed_pointer and seed_per_row are both set; give one");
    assert_eq!(tokens, [SENTINEL; 2]);
}
