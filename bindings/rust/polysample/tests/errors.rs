//! Bad requests: the status, the message, and that nothing was written.

mod common;

use common::*;
use polysample::{Backend, ContextOptions, Error, Logits, Params, Status};

const VOCAB: usize = 64;
const SENTINEL: i32 = 77;

fn logits() -> Vec<f32> {
    Generator::new(20).logits(2 * VOCAB, -1.0, 1.0)
}

/// Runs sample_into with sentinel-filled outputs and returns the error,
/// after checking the outputs were left alone.
fn failing_sample(logits: &Logits<'_>, params: &Params<'_>, tokens_len: usize, logprobs_len: usize) -> Error {
    let mut context = cpu_context();
    let mut tokens = vec![SENTINEL; tokens_len];
    let mut logprobs = vec![SENTINEL as f32; logprobs_len];
    let error = context.sample_into(logits, params, &mut tokens, Some(&mut logprobs)).unwrap_err();
    assert!(tokens.iter().all(|&t| t == SENTINEL), "tokens written despite {error}");
    assert!(logprobs.iter().all(|&l| l == SENTINEL as f32), "logprobs written despite {error}");
    error
}

#[test]
fn parameters_out_of_range_give_invalid_parameter_and_the_librarys_message() {
    let values = logits();
    let logits = Logits::f32(&values, 2, VOCAB);
    let cases: [(Params<'_>, &str); 6] = [
        (Params::new().top_p(0.0), "top_p is 0; expected in (0, 1] (1 = off)"),
        (Params::new().top_p(1.5), "top_p is 1.5; expected in (0, 1] (1 = off)"),
        (Params::new().temperature(-1.0), "temperature is -1; expected 0 .. 1e6 (0 is greedy)"),
        (Params::new().temperature(f32::NAN), "temperature is nan; expected 0 .. 1e6 (0 is greedy)"),
        (Params::new().min_p(2.0), "min_p is 2; expected in [0, 1] (0 = off)"),
        (Params::new().num_samples(0), "num_samples is 0; expected >= 1"),
    ];
    for (params, message) in cases {
        let error = failing_sample(&logits, &params, 2, 2);
        assert_eq!(error.status, Status::InvalidParameter, "{error}");
        assert_eq!(error.message, message);
        assert_eq!(error.to_string(), format!("sampling parameter out of range: {message}"));
    }
}

#[test]
fn a_bad_per_row_value_names_its_row() {
    let values = logits();
    let top_ps = [0.9f32, -0.5];
    let error = failing_sample(&Logits::f32(&values, 2, VOCAB), &Params::new().top_p_per_row(&top_ps), 2, 2);
    assert_eq!(error.status, Status::InvalidParameter);
    assert_eq!(error.message, "row 1: top_p is -0.5; expected in (0, 1] (1 = off)");
}

#[test]
fn probs_of_bad_parameters_write_nothing() {
    let values = logits();
    let mut probs = vec![SENTINEL as f32; 2 * VOCAB];
    let error = cpu_context()
        .probs_into(&Logits::f32(&values, 2, VOCAB), &Params::new().top_k(3).top_p(0.0), &mut probs)
        .unwrap_err();
    assert_eq!(error.status, Status::InvalidParameter);
    assert!(error.message.contains("top_p"), "{error}");
    assert!(probs.iter().all(|&p| p == SENTINEL as f32));
}

#[test]
fn slices_of_the_wrong_length_are_refused_before_the_call() {
    let values = logits();
    let logits = Logits::f32(&values, 2, VOCAB);
    let params = Params::new().num_samples(3);
    let cases = [
        (
            failing_sample(&Logits::f32(&values[1..], 2, VOCAB), &params, 6, 6),
            "logits: 127 values for 2 rows x 64 (row stride 64); expected 128",
        ),
        (
            failing_sample(&Logits::f32(&values, 1, VOCAB), &params, 3, 3),
            "logits: 128 values for 1 rows x 64 (row stride 64); expected 64",
        ),
        (
            failing_sample(&Logits::f32(&values, 2, VOCAB).with_row_stride(100), &params, 6, 6),
            "logits: 128 values for 2 rows x 64 (row stride 100); expected 164 .. 200",
        ),
        (failing_sample(&logits, &params, 5, 6), "tokens has 5 values; expected rows x num_samples = 2 x 3 = 6"),
        (failing_sample(&logits, &params, 6, 7), "logprobs has 7 values; expected rows x num_samples = 2 x 3 = 6"),
        (
            failing_sample(&logits, &params.seed_per_row(&[1, 2, 3]), 6, 6),
            "seed_per_row has 3 values for 2 rows; expected one per row",
        ),
        (
            failing_sample(&logits, &params.top_k_per_row(&[1]), 6, 6),
            "top_k_per_row has 1 values for 2 rows; expected one per row",
        ),
        (
            failing_sample(&Logits::f32(&values, 2, VOCAB).with_row_stride(10), &params, 6, 6),
            "logits: row_stride is 10, below vocab 64",
        ),
        (failing_sample(&Logits::f32(&[], 0, VOCAB), &params, 0, 0), "logits: rows is 0; expected >= 1"),
    ];
    for (error, message) in cases {
        assert_eq!(error.status, Status::InvalidArgument, "{error}");
        assert_eq!(error.message, message);
    }
    let mut probs = vec![SENTINEL as f32; 2 * VOCAB - 1];
    let error = cpu_context().probs_into(&logits, &Params::new(), &mut probs).unwrap_err();
    assert_eq!(error.status, Status::InvalidArgument);
    assert_eq!(error.message, "probs has 127 values; expected rows x vocab = 2 x 64 = 128");
    assert!(probs.iter().all(|&p| p == SENTINEL as f32));
}

#[test]
fn checking_mode_refuses_a_bad_row_and_names_it() {
    let mut values = logits();
    values[VOCAB + 5] = f32::INFINITY;
    let mut context = ContextOptions::new().backend(Backend::Cpu).check_rows(true).create().unwrap();
    let mut tokens = [SENTINEL; 2];
    let error = context.sample_into(&Logits::f32(&values, 2, VOCAB), &Params::new(), &mut tokens, None).unwrap_err();
    assert_eq!(error.status, Status::BadRow);
    assert!(error.message.starts_with("row 1 "), "{error}");
    assert_eq!(tokens, [SENTINEL; 2]);
}

#[test]
fn device_calls_refuse_host_per_row_slices() {
    let values = logits();
    let temperatures = [1.0f32, 1.0];
    let mut tokens = [SENTINEL; 2];
    let device_logits = polysample::DeviceLogits {
        data: values.as_ptr() as *mut _,
        dtype: polysample::Dtype::F32,
        rows: 2,
        vocab: VOCAB,
        row_stride: 0,
    };
    // SAFETY: CPU backend, host buffers of the right sizes; the call fails
    // before the library is reached.
    let error = unsafe {
        cpu_context().sample_device(
            &device_logits,
            &Params::new().temperature_per_row(&temperatures),
            &Default::default(),
            tokens.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .unwrap_err();
    assert_eq!(error.status, Status::InvalidArgument);
    assert!(error.message.contains("DevicePerRow"), "{error}");
    assert_eq!(tokens, [SENTINEL; 2]);
}

#[test]
fn an_unavailable_backend_fails_with_its_reason() {
    for backend in [Backend::Cuda, Backend::Hip, Backend::Opencl] {
        let availability = backend.availability();
        if availability.available {
            report_skip(&format!("unavailable-backend error for {backend}"), "it is available here");
            continue;
        }
        let error = ContextOptions::new().backend(backend).create().unwrap_err();
        // Not built, no device, or a runtime that fails to start.
        assert!(
            [Status::BackendNotCompiled, Status::NoDevice, Status::Driver].contains(&error.status),
            "{backend}: {error} (availability: {})",
            availability.reason
        );
        assert!(!error.message.is_empty(), "{backend}");
    }
}

#[test]
fn errors_are_std_errors_with_the_status_text() {
    let error = cpu_context().sample(&Logits::f32(&[1.0, 2.0], 1, 2), &Params::new().top_p(0.0)).unwrap_err();
    let boxed: Box<dyn std::error::Error> = Box::new(error.clone());
    assert_eq!(boxed.to_string(), error.to_string());
    assert_eq!(Status::InvalidParameter.raw(), polysample::sys::PSM_ERR_INVALID_PARAMETER);
    assert_eq!(Status::from_raw(polysample::sys::PSM_OK), None);
    assert_eq!(Status::from_raw(99), Some(Status::Other(99)));
    assert_eq!(Status::Other(99).description(), "unknown status");
}
