//! Samples from logits in a CUDA buffer through the unsafe device entry, on a
//! stream the program owns, and checks that the tokens equal the CPU
//! backend's for the same logits (and the logprobs agree to float rounding).
//!
//! std only: the CUDA runtime is opened with dlopen (libcudart.so, or the
//! path in POLYSAMPLE_CUDART). Without a usable CUDA backend it says why and
//! exits with status 0, so it can run anywhere; a mismatch exits with 1.
//!
//!     cargo run --offline --example cuda_buffer

use polysample::{Backend, Context, ContextOptions, DeviceLogits, DevicePerRow, Dtype, Logits, Params};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::process::ExitCode;

const ROWS: usize = 64;
const VOCAB: usize = 151_936;
const SAMPLES: usize = 4;

#[link(name = "dl")]
extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *const c_char;
}
const RTLD_NOW: c_int = 2;

type CudaError = c_int;
const CUDA_MEMCPY_HOST_TO_DEVICE: c_int = 1;
const CUDA_MEMCPY_DEVICE_TO_HOST: c_int = 2;

type MallocFn = unsafe extern "C" fn(*mut *mut c_void, usize) -> CudaError;
type FreeFn = unsafe extern "C" fn(*mut c_void) -> CudaError;
type MemcpyFn = unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int) -> CudaError;
type StreamCreateFn = unsafe extern "C" fn(*mut *mut c_void) -> CudaError;
type StreamDestroyFn = unsafe extern "C" fn(*mut c_void) -> CudaError;
type ErrorStringFn = unsafe extern "C" fn(CudaError) -> *const c_char;

/// The few CUDA runtime calls the example needs, resolved at run time.
struct CudaRuntime {
    malloc: MallocFn,
    free: FreeFn,
    memcpy: MemcpyFn,
    stream_create: StreamCreateFn,
    stream_destroy: StreamDestroyFn,
    error_string: ErrorStringFn,
}

impl CudaRuntime {
    fn open() -> Result<CudaRuntime, String> {
        let candidates: Vec<String> = match std::env::var("POLYSAMPLE_CUDART") {
            Ok(path) => vec![path],
            Err(_) => ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
                .iter()
                .map(|name| name.to_string())
                .collect(),
        };
        let mut errors = Vec::new();
        for name in &candidates {
            let c_name = CString::new(name.as_str()).unwrap();
            // SAFETY: a NUL-terminated name; the handle is never closed, so
            // the resolved functions stay valid for the whole program.
            let handle = unsafe { dlopen(c_name.as_ptr(), RTLD_NOW) };
            if handle.is_null() {
                errors.push(last_dl_error());
                continue;
            }
            let symbol = |symbol: &str| -> Result<*mut c_void, String> {
                let c_symbol = CString::new(symbol).unwrap();
                // SAFETY: a live handle and a NUL-terminated name.
                let address = unsafe { dlsym(handle, c_symbol.as_ptr()) };
                if address.is_null() {
                    Err(format!("{name} has no {symbol}"))
                } else {
                    Ok(address)
                }
            };
            // SAFETY: each symbol is the CUDA runtime function of that name,
            // whose C signature the field's type repeats.
            unsafe {
                return Ok(CudaRuntime {
                    malloc: std::mem::transmute::<*mut c_void, MallocFn>(symbol("cudaMalloc")?),
                    free: std::mem::transmute::<*mut c_void, FreeFn>(symbol("cudaFree")?),
                    memcpy: std::mem::transmute::<*mut c_void, MemcpyFn>(symbol("cudaMemcpy")?),
                    stream_create: std::mem::transmute::<*mut c_void, StreamCreateFn>(symbol("cudaStreamCreate")?),
                    stream_destroy: std::mem::transmute::<*mut c_void, StreamDestroyFn>(symbol("cudaStreamDestroy")?),
                    error_string: std::mem::transmute::<*mut c_void, ErrorStringFn>(symbol("cudaGetErrorString")?),
                });
            }
        }
        Err(format!("could not open the CUDA runtime: {}", errors.join("; ")))
    }

    fn check(&self, what: &str, error: CudaError) -> Result<(), String> {
        if error == 0 {
            return Ok(());
        }
        // SAFETY: cudaGetErrorString returns a static string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(error)) }.to_string_lossy();
        Err(format!("{what}: CUDA error {error}: {text}"))
    }
}

fn last_dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated, thread-local string.
    let text = unsafe { dlerror() };
    if text.is_null() {
        "unknown dlopen error".into()
    } else {
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    }
}

/// A device allocation, freed on drop.
struct DeviceBuffer<'a> {
    runtime: &'a CudaRuntime,
    pointer: *mut c_void,
}

impl<'a> DeviceBuffer<'a> {
    fn new(runtime: &'a CudaRuntime, bytes: usize) -> Result<DeviceBuffer<'a>, String> {
        let mut pointer = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        runtime.check("cudaMalloc", unsafe { (runtime.malloc)(&mut pointer, bytes) })?;
        Ok(DeviceBuffer { runtime, pointer })
    }

    fn upload<T: Copy>(runtime: &'a CudaRuntime, values: &[T]) -> Result<DeviceBuffer<'a>, String> {
        let bytes = std::mem::size_of_val(values);
        let buffer = DeviceBuffer::new(runtime, bytes)?;
        // SAFETY: both sides hold `bytes` bytes; cudaMemcpy returns when the
        // copy is complete.
        runtime.check("cudaMemcpy to the device", unsafe {
            (runtime.memcpy)(buffer.pointer, values.as_ptr().cast(), bytes, CUDA_MEMCPY_HOST_TO_DEVICE)
        })?;
        Ok(buffer)
    }

    fn download<T: Copy + Default>(&self, count: usize) -> Result<Vec<T>, String> {
        let mut values = vec![T::default(); count];
        // SAFETY: the buffer holds at least `count` values of T.
        self.runtime.check("cudaMemcpy to the host", unsafe {
            (self.runtime.memcpy)(
                values.as_mut_ptr().cast(),
                self.pointer,
                std::mem::size_of_val(values.as_slice()),
                CUDA_MEMCPY_DEVICE_TO_HOST,
            )
        })?;
        Ok(values)
    }
}

impl Drop for DeviceBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated by cudaMalloc, freed once.
        unsafe { (self.runtime.free)(self.pointer) };
    }
}

/// splitmix64 -> roughly N(0, 4) logits: the same on every run.
fn logits() -> Vec<f32> {
    let mut state = 1u64;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..ROWS * VOCAB)
        .map(|_| (2.0 * (-2.0 * (1.0 - uniform()).ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos()) as f32)
        .collect()
}

/// Tokens and logprobs of one run on CUDA: from device memory on the
/// program's stream, with per-row seeds and temperatures in device memory.
fn sample_on_cuda(
    runtime: &CudaRuntime,
    logits: &[f32],
    seeds: &[u64],
    temperatures: &[f32],
    params: &Params<'_>,
) -> Result<(Vec<i32>, Vec<f32>, String), String> {
    let mut stream = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    runtime.check("cudaStreamCreate", unsafe { (runtime.stream_create)(&mut stream) })?;
    let result = (|| {
        // SAFETY: the stream is alive until after the context is dropped
        // (at the end of this closure).
        let mut context = unsafe { ContextOptions::new().backend(Backend::Cuda).native_stream(stream) }
            .create()
            .map_err(|error| format!("creating the CUDA context: {error}"))?;
        let device = context.device_name();
        let device_logits = DeviceBuffer::upload(runtime, logits)?;
        let device_seeds = DeviceBuffer::upload(runtime, seeds)?;
        let device_temperatures = DeviceBuffer::upload(runtime, temperatures)?;
        let tokens = DeviceBuffer::new(runtime, ROWS * SAMPLES * 4)?;
        let logprobs = DeviceBuffer::new(runtime, ROWS * SAMPLES * 4)?;
        let input =
            DeviceLogits { data: device_logits.pointer, dtype: Dtype::F32, rows: ROWS, vocab: VOCAB, row_stride: 0 };
        let per_row = DevicePerRow {
            seed: device_seeds.pointer.cast(),
            temperature: device_temperatures.pointer.cast(),
            ..Default::default()
        };
        // SAFETY: every buffer is device memory of the context's device with
        // the sizes the contract asks for, and lives until after synchronize.
        unsafe { context.sample_device(&input, params, &per_row, tokens.pointer.cast(), logprobs.pointer.cast()) }
            .map_err(|error| format!("sample_device: {error}"))?;
        context.synchronize().map_err(|error| format!("synchronize: {error}"))?;
        Ok((tokens.download::<i32>(ROWS * SAMPLES)?, logprobs.download::<f32>(ROWS * SAMPLES)?, device))
    })();
    // SAFETY: created above; the context using it has been dropped.
    unsafe { (runtime.stream_destroy)(stream) };
    result
}

fn main() -> ExitCode {
    let availability = Backend::Cuda.availability();
    if !availability.available {
        println!("cuda_buffer: skipped, the CUDA backend is unavailable: {}", availability.reason);
        return ExitCode::SUCCESS;
    }
    let runtime = match CudaRuntime::open() {
        Ok(runtime) => runtime,
        Err(reason) => {
            println!("cuda_buffer: skipped: {reason}");
            return ExitCode::SUCCESS;
        }
    };

    let logits = logits();
    let seeds: Vec<u64> = (0..ROWS as u64).map(|row| 1000 + row).collect();
    let temperatures: Vec<f32> = (0..ROWS).map(|row| [0.0, 0.6, 1.0, 1.4][row % 4]).collect();
    let params = Params::new().top_k(50).top_p(0.9).min_p(0.01).offset(7).num_samples(SAMPLES as u32);

    let (cuda_tokens, cuda_logprobs, device) = match sample_on_cuda(&runtime, &logits, &seeds, &temperatures, &params) {
        Ok(result) => result,
        Err(error) => {
            eprintln!("cuda_buffer: FAILED: {error}");
            return ExitCode::FAILURE;
        }
    };
    let cpu_params = params.seed_per_row(&seeds).temperature_per_row(&temperatures);
    let (cpu_tokens, cpu_logprobs) = ContextOptions::new()
        .backend(Backend::Cpu)
        .create()
        .and_then(|mut context: Context| context.sample_with_logprobs(&Logits::f32(&logits, ROWS, VOCAB), &cpu_params))
        .expect("the CPU backend samples");

    let equal_tokens = cuda_tokens.iter().zip(&cpu_tokens).filter(|(a, b)| a == b).count();
    let largest_difference = cuda_logprobs
        .iter()
        .zip(&cpu_logprobs)
        .map(|(&a, &b)| ((a - b).abs() / b.abs().max(1.0)) as f64)
        .fold(0.0, f64::max);
    println!(
        "cuda_buffer: {ROWS} rows x {VOCAB} from device memory on {device}: {equal_tokens}/{} tokens equal to the \
         CPU backend's; largest logprob difference {largest_difference:.2e} (relative)",
        cuda_tokens.len()
    );
    println!("cuda_buffer: first row: cuda {:?} cpu {:?}", &cuda_tokens[..SAMPLES], &cpu_tokens[..SAMPLES]);
    // Tokens are exact across backends; logprobs agree to float rounding.
    if equal_tokens == cpu_tokens.len() && largest_difference <= 1e-5 {
        println!("cuda_buffer: PASS");
        ExitCode::SUCCESS
    } else {
        println!("cuda_buffer: FAIL");
        ExitCode::FAILURE
    }
}
