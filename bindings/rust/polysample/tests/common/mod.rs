//! Shared by the integration tests: the backends to run on, skips that stay
//! visible, and deterministic inputs.
#![allow(dead_code)]

use polysample::{Backend, Context, ContextOptions};
use std::io::Write;
use std::path::Path;

/// A line on the real stderr: the test harness captures `eprintln!` of
/// passing tests, and a skip must be seen. run-tests.sh counts these lines.
pub fn report_skip(what: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {what}: {reason}");
}

/// The backends named in POLYSAMPLE_TEST_BACKENDS (comma-separated names,
/// each optionally `:N` for a device); default `cpu` alone, to keep CI fast.
pub fn requested_backends() -> Vec<(Backend, Option<u32>)> {
    let list = std::env::var("POLYSAMPLE_TEST_BACKENDS").unwrap_or_default();
    let list = if list.trim().is_empty() { "cpu".to_string() } else { list };
    list.split(',')
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| {
            let (name, device) =
                match entry.split_once(':') {
                    Some((name, index)) => (
                        name,
                        Some(index.trim().parse().unwrap_or_else(|_| {
                            panic!("POLYSAMPLE_TEST_BACKENDS={list}: bad device index in {entry:?}")
                        })),
                    ),
                    None => (entry, None),
                };
            let backend: Backend =
                name.parse().unwrap_or_else(|error| panic!("POLYSAMPLE_TEST_BACKENDS={list}: {error}"));
            assert!(backend != Backend::Auto, "POLYSAMPLE_TEST_BACKENDS={list}: name concrete backends");
            (backend, device)
        })
        .collect()
}

/// A context per requested backend that is available; the others are
/// reported as skipped for `test`.
pub fn contexts(test: &str) -> Vec<(Backend, Context)> {
    let mut contexts = Vec::new();
    for (backend, device) in requested_backends() {
        let availability = backend.availability();
        if !availability.available {
            report_skip(&format!("{test} on {backend}"), &availability.reason);
            continue;
        }
        let mut options = ContextOptions::new().backend(backend);
        if let Some(index) = device {
            options = options.device(index);
        }
        let context = options
            .create()
            .unwrap_or_else(|error| panic!("{backend} is available but context creation failed: {error}"));
        contexts.push((backend, context));
    }
    contexts
}

pub fn cpu_context() -> Context {
    ContextOptions::new().backend(Backend::Cpu).create().expect("the CPU backend is always available")
}

/// splitmix64: a small deterministic generator, so inputs are the same on
/// every run and platform.
pub struct Generator(u64);

impl Generator {
    pub fn new(seed: u64) -> Generator {
        Generator(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `count` values uniform in [low, high).
    pub fn logits(&mut self, count: usize, low: f32, high: f32) -> Vec<f32> {
        (0..count).map(|_| low + (high - low) * self.uniform() as f32).collect()
    }

    /// `count` values ~ N(0, sigma^2) (Box-Muller).
    pub fn normal_logits(&mut self, count: usize, sigma: f64) -> Vec<f32> {
        (0..count)
            .map(|_| {
                let u = 1.0 - self.uniform();
                let v = self.uniform();
                (sigma * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }
}

/// The index of the largest value, the lowest index on ties.
pub fn argmax(row: &[f32]) -> i32 {
    let mut best = 0;
    for (index, &value) in row.iter().enumerate() {
        if value > row[best] {
            best = index;
        }
    }
    best as i32
}

/// softmax(row / temperature) in float64 over the tokens where `kept` is
/// true (0 elsewhere).
pub fn softmax_f64(row: &[f32], temperature: f64, kept: impl Fn(usize) -> bool) -> Vec<f64> {
    let max = row
        .iter()
        .enumerate()
        .filter(|(index, _)| kept(*index))
        .map(|(_, &value)| value as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = row
        .iter()
        .enumerate()
        .map(|(index, &value)| if kept(index) { ((value as f64 - max) / temperature).exp() } else { 0.0 })
        .collect();
    let total: f64 = weights.iter().sum();
    weights.into_iter().map(|weight| weight / total).collect()
}

/// Token indices of a row, most probable first (higher logit, then lower index).
pub fn rank_order(row: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
    order
}

/// f32 -> IEEE half bits, for values exactly representable as normal halves
/// or zero (the tests only use such values, and check that they are).
pub fn f16_bits_exact(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if value == 0.0 {
        return sign;
    }
    let exponent = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mantissa = bits & 0x7f_ffff;
    assert!((1..31).contains(&exponent) && mantissa & 0x1fff == 0, "{value} is not an exact normal half");
    sign | ((exponent as u16) << 10) | (mantissa >> 13) as u16
}

/// f32 -> bfloat16 bits, for values whose low 16 bits are zero.
pub fn bf16_bits_exact(value: f32) -> u16 {
    let bits = value.to_bits();
    assert!(bits & 0xffff == 0, "{value} is not an exact bfloat16");
    (bits >> 16) as u16
}

/// A C-order .npy file (format 1.0) of `rows x columns` values of `descr`,
/// given as little-endian bytes, for the C command-line tool.
fn write_npy(path: &Path, descr: &str, rows: usize, columns: usize, data: &[u8]) {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {columns}), }}");
    // The magic, version and length take 10 bytes; the whole header ends in
    // a newline at a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).expect("write the .npy file");
}

/// A float32 .npy file of `rows x columns` values.
pub fn write_npy_f32(path: &Path, values: &[f32], rows: usize, columns: usize) {
    let data: Vec<u8> = values.iter().flat_map(|value| value.to_le_bytes()).collect();
    write_npy(path, "<f4", rows, columns, &data);
}

/// An int32 .npy file of `rows x columns` values.
pub fn write_npy_i32(path: &Path, values: &[i32], rows: usize, columns: usize) {
    let data: Vec<u8> = values.iter().flat_map(|value| value.to_le_bytes()).collect();
    write_npy(path, "<i4", rows, columns, &data);
}
