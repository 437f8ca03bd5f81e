// polysample._torch_ops: C++ kernels (CPU and CUDA dispatch keys) for the
// ops torch.ops.polysample.sample, .sample_scalars and .probs, whose
// schemas and fake implementations python/polysample/torch.py defines.
//
// The Python kernels there pay for every tensor the call touches in Python
// (an output, a workspace, a tuple describing each array); these do the
// whole call in C++: the checks, the outputs and the workspace from torch's
// allocator (at::empty: the caching allocator on the current stream, a
// CUDA graph's pool during a capture), torch's current stream, the C call.
// They take the same arguments, make the same checks in the same order
// with the same messages as that path (python/src/core.cpp and the Python
// kernels), and give bit-identical results; python/tests/test_torch_ops.py
// compares the two.
//
// Built only when torch is importable by the building Python
// (python/CMakeLists.txt); polysample/torch.py registers these kernels
// (register_kernels) when the module loads and was built against the torch
// that runs, and keeps its Python kernels otherwise.
//
// Errors: torch turns a C++ exception from a kernel into a RuntimeError;
// the message is "polysample STATUS: message", which polysample/torch.py
// turns back into polysample.Error(STATUS, message).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>
#if defined(PSM_TORCH_CUDA_STREAM)
#include <c10/cuda/CUDAStream.h>
#endif

#include <polysample.h>

#include "names.h"

#include <dlfcn.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace nb = nanobind;

namespace {

using namespace polysample_python;

[[noreturn]] void fail(psm_status status, const std::string &message)
{
    throw std::runtime_error(std::string("polysample ") + status_name(status) + ": " + message);
}

Kind kind_of(c10::ScalarType type)
{
    switch (type) {
    case c10::ScalarType::Float: return kind_f32;
    case c10::ScalarType::Half: return kind_f16;
    case c10::ScalarType::BFloat16: return kind_bf16;
    case c10::ScalarType::Int: return kind_i32;
    case c10::ScalarType::Long: return kind_i64;
    case c10::ScalarType::UInt64: return kind_u64;
    case c10::ScalarType::UInt32: return kind_u32;
    case c10::ScalarType::Byte: return kind_u8;
    default: return kind_other;
    }
}

// A dtype as Python prints it ("torch.float64"), for messages.
std::string torch_dtype_name(c10::ScalarType type)
{
    switch (type) {
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Bool: return "torch.bool";
    case c10::ScalarType::ComplexFloat: return "torch.complex64";
    case c10::ScalarType::ComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(type);
    }
}

// Whether CUDA tensors are ROCm's (torch's HIP build names them cuda too):
// set by register_kernels from torch.version.hip.
bool rocm = false;

// A library context per (backend, device, stream), made at first use and
// never destroyed: a captured CUDA graph keeps using it, and destroying
// device contexts while the process exits races the driver's teardown.
struct OpContext {
    psm_context *context = nullptr;
    psm_backend backend = PSM_BACKEND_CPU;
    int device = -1;
    std::mutex mutex; // a psm_context runs one call at a time
};

using exchange_capture_mode_fn = int (*)(int *mode);

// cuThreadExchangeStreamCaptureMode from the CUDA driver torch has loaded,
// or null (no driver loaded: a CPU-only or ROCm torch).
exchange_capture_mode_fn exchange_capture_mode()
{
    static exchange_capture_mode_fn exchange = [] {
        void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        return driver ? (exchange_capture_mode_fn)dlsym(driver,
                                                        "cuThreadExchangeStreamCaptureMode")
                      : nullptr;
    }();
    return exchange;
}

constexpr uintptr_t cuda_stream_legacy = 1; // cudaStreamLegacy: torch's default stream
constexpr int capture_mode_relaxed = 2;

OpContext &context_for(const c10::Device &device)
{
    static std::mutex contexts_mutex;
    static auto *contexts = new std::map<std::tuple<int, int, uintptr_t>, OpContext *>();
    psm_backend backend = PSM_BACKEND_CPU;
    int index = -1;
    uintptr_t stream = 0;
    if (device.is_cuda()) {
        backend = rocm ? PSM_BACKEND_HIP : PSM_BACKEND_CUDA;
        index = device.index();
#if defined(PSM_TORCH_CUDA_STREAM)
        // A torch without the device-generic handle (python/CMakeLists.txt).
        stream = (uintptr_t)c10::cuda::getCurrentCUDAStream(device.index()).stream();
#else
        // torch's current stream through its device-generic interface, so
        // that this file needs neither CUDA's nor HIP's headers.
        const c10::impl::DeviceGuardImplInterface *guard =
            c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
        stream = (uintptr_t)guard->getStreamNativeHandle(guard->getStream(device));
#endif
        if (stream == 0) {
            if (rocm)
                fail(PSM_ERR_UNSUPPORTED, "ROCm: run under a torch.cuda.Stream; the library "
                                          "cannot name HIP's null stream");
            stream = cuda_stream_legacy;
        }
    } else if (!device.is_cpu()) {
        fail(PSM_ERR_UNSUPPORTED, "tensors on " + c10::DeviceTypeName(device.type(), true) +
                                      " are not supported (cpu and cuda are)");
    }
    std::lock_guard<std::mutex> lock(contexts_mutex);
    const auto key = std::make_tuple((int)backend, index, stream);
    auto found = contexts->find(key);
    if (found != contexts->end())
        return *found->second;

    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.device_index = index;
    options.native_stream = (void *)stream;
    // Creating a context may allocate device memory, which CUDA refuses
    // during a stream capture in the default (global) mode: relaxed for
    // this thread while it is made.
    exchange_capture_mode_fn exchange = backend == PSM_BACKEND_CUDA ? exchange_capture_mode()
                                                                    : nullptr;
    int previous = capture_mode_relaxed;
    const bool exchanged = exchange && exchange(&previous) == 0;
    psm_context *made = nullptr;
    const psm_status status = psm_context_create(&options, &made);
    const std::string message = status == PSM_OK ? "" : psm_last_error();
    if (exchanged)
        exchange(&previous);
    if (status != PSM_OK)
        fail(status, message);
    auto *context = new OpContext;
    context->context = made;
    context->backend = psm_context_backend(made);
    context->device = index;
    contexts->emplace(key, context);
    return *context;
}

// The checks of python/src/core.cpp on tensors, for one call on `context`.
class Checks {
public:
    explicit Checks(const OpContext &context, const at::Tensor &logits)
        : context_(context), logits_device_type_(device_type_name(logits))
    {
    }

    const char *device_type_name(const at::Tensor &tensor) const
    {
        if (tensor.device().is_cpu())
            return "host";
        if (tensor.device().is_cuda())
            return rocm ? "ROCm" : "CUDA";
        return "other";
    }

    psm_memory memory_of(const at::Tensor &tensor, const std::string &role) const
    {
        const bool host = tensor.device().is_cpu();
        if (context_.backend == PSM_BACKEND_CPU) {
            if (host)
                return PSM_MEMORY_HOST;
        } else {
            if (host)
                return PSM_MEMORY_HOST;
            if (tensor.device().is_cuda()) {
                if (tensor.device().index() != context_.device)
                    fail(PSM_ERR_WRONG_BACKEND,
                         role + " is on device " + std::to_string(tensor.device().index()) +
                             ", the context on device " + std::to_string(context_.device));
                return PSM_MEMORY_DEVICE;
            }
        }
        fail(PSM_ERR_WRONG_BACKEND, role + " is in " + device_type_name(tensor) +
                                        " memory, which the " +
                                        psm_backend_name(context_.backend) +
                                        " backend cannot read");
    }

    static void expect_kind(const at::Tensor &tensor, Kind kind, const std::string &role)
    {
        const Kind given = kind_of(tensor.scalar_type());
        if (given != kind)
            fail(PSM_ERR_INVALID_ARGUMENT,
                 role + " must be " + kind_name(kind) + "; got " + kind_name(given));
    }

    static void at_most_2d(const at::Tensor &tensor, const std::string &role)
    {
        if (tensor.dim() > 2)
            fail(PSM_ERR_INVALID_ARGUMENT,
                 role + " must be 1-D or 2-D; got " + std::to_string(tensor.dim()) + "-D");
    }

    void same_memory(const at::Tensor &tensor, const std::string &role, psm_memory memory,
                     int device) const
    {
        const psm_memory given = memory_of(tensor, role);
        if (given != memory || (given == PSM_MEMORY_DEVICE && tensor.device().index() != device))
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be in the same memory as the logits (" +
                                               logits_device_type_ + ")");
    }

    // A per-row array: 1-D, `rows` long, contiguous, in the logits' memory;
    // with single, one value. Unsigned arrays take the signed type of their
    // width as the same bits.
    const void *per_row(const c10::IValue &value, Kind kind, const std::string &role,
                        int64_t rows, psm_memory memory, int device, bool single = false) const
    {
        if (value.isNone())
            return nullptr;
        const at::Tensor &tensor = value.toTensor();
        at_most_2d(tensor, role);
        const Kind given = kind_of(tensor.scalar_type());
        if (!(kind == kind_u64 && given == kind_i64) && !(kind == kind_u32 && given == kind_i32))
            expect_kind(tensor, kind, role);
        if (single && (tensor.dim() != 1 || tensor.size(0) != 1))
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be a 1-D array of one value");
        if (tensor.dim() != 1 || tensor.size(0) != rows)
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be 1-D with one value per row (" +
                                               std::to_string(rows) + ")");
        if (rows > 1 && tensor.stride(0) != 1)
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be contiguous");
        const psm_memory given_memory = memory_of(tensor, role);
        if (given_memory != memory ||
            (given_memory == PSM_MEMORY_DEVICE && tensor.device().index() != device))
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be in the same memory as the logits (" +
                                               logits_device_type_ + ")");
        return tensor.data_ptr();
    }

    // A 1-D contiguous list array of `count` values (any count when < 0).
    const at::Tensor &list_array(const c10::IValue &value, Kind kind, const std::string &role,
                                 int64_t count, psm_memory memory, int device) const
    {
        if (value.isNone())
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be an array supporting DLPack or the "
                                                  "buffer protocol; got <class 'NoneType'>");
        const at::Tensor &tensor = value.toTensor();
        at_most_2d(tensor, role);
        expect_kind(tensor, kind, role);
        if (tensor.dim() != 1)
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be 1-D");
        if (count >= 0 && tensor.size(0) != count)
            fail(PSM_ERR_INVALID_ARGUMENT, role + " has " + std::to_string(tensor.size(0)) +
                                               " values; expected " + std::to_string(count));
        if (tensor.size(0) > 1 && tensor.stride(0) != 1)
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be contiguous");
        same_memory(tensor, role, memory, device);
        return tensor;
    }

private:
    const OpContext &context_;
    const char *logits_device_type_;
};

// The op's arguments, in schema order (polysample/torch.py defines them).
enum SampleArgument : size_t {
    s_logits, s_temperature, s_top_k, s_top_p, s_min_p, s_seed, s_offset, s_num_samples,
    s_arrays, // the 10 arrays of ArrayIndex below
    s_return_logprobs = s_arrays + 10, s_filter_order, s_processing, // 14 processing arguments
    s_top_logprobs = s_processing + 14, s_logprob_mode, s_return_ranks, sample_argument_count
};
enum ProbsArgument : size_t {
    p_logits, p_temperature, p_top_k, p_top_p, p_min_p,
    p_arrays, // temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row, row_indices
    p_filter_order = p_arrays + 5, p_processing, probs_argument_count = p_processing + 14
};
enum ArrayIndex : size_t { a_temperature, a_top_k, a_top_p, a_min_p, a_seed, a_offset,
                           a_subsequence, a_row_indices, a_seed_tensor, a_offset_tensor,
                           array_count };
// The processing arguments' order (polysample._processing.processing_tuple).
enum ProcessingIndex : size_t { q_mask, q_bias_offsets, q_bias_tokens, q_bias_values,
                                q_history_offsets, q_history_tokens, q_prompt_offsets,
                                q_prompt_tokens, q_repetition_rows, q_frequency_rows,
                                q_presence_rows, q_repetition, q_frequency, q_presence };

int32_t int32_argument(int64_t value, const char *name)
{
    if (value < INT32_MIN || value > INT32_MAX)
        fail(PSM_ERR_INVALID_PARAMETER,
             std::string(name) + " is " + std::to_string(value) + "; it must fit a 32-bit integer");
    return (int32_t)value;
}

// One call of either op. mode 0: psm_sample; 1: psm_probs.
struct Call {
    int mode = 0;
    at::Tensor logits;
    OpContext *context = nullptr;
    psm_tensor c_logits{};
    psm_params params{};
    psm_logit_processing processing{};
    bool has_processing = false;
    psm_top_logprobs top{};
    bool has_top = false;
    bool return_logprobs = false;
    bool return_ranks = false;
    std::vector<int64_t> rows_shape; // the outputs' leading dimensions
    int64_t out_rows = 0;
};

// The logits: python/polysample/torch.py's _check_logits, then core.cpp's
// layout checks.
void check_logits_kind(const at::Tensor &logits)
{
    if (logits.dim() != 1 && logits.dim() != 2)
        fail(PSM_ERR_INVALID_ARGUMENT,
             "logits must be 1-D or 2-D; got " + std::to_string(logits.dim()) + "-D");
    const Kind kind = kind_of(logits.scalar_type());
    if (kind != kind_f32 && kind != kind_f16 && kind != kind_bf16)
        fail(PSM_ERR_INVALID_ARGUMENT,
             "logits must be float32, float16 or bfloat16; got " +
                 torch_dtype_name(logits.scalar_type()));
}

// The start of a sample (mode 0) or probs (mode 1) call: the logits'
// kind, the library context for their device, the filters.
void begin_call(Call &call, int mode, const at::Tensor &logits, float temperature, int32_t top_k,
                float top_p, float min_p)
{
    call.mode = mode;
    call.logits = logits;
    check_logits_kind(call.logits);
    call.context = &context_for(call.logits.device());
    psm_params_init(&call.params);
    call.params.temperature = temperature;
    call.params.top_k = top_k;
    call.params.top_p = top_p;
    call.params.min_p = min_p;
}

psm_tensor logits_tensor(const Checks &checks, const at::Tensor &logits)
{
    const int64_t last = logits.dim() - 1;
    const int64_t vocab = logits.size(last);
    const int64_t rows = logits.dim() == 2 ? logits.size(0) : 1;
    if (rows < 1 || vocab < 1)
        fail(PSM_ERR_INVALID_ARGUMENT, "logits must have at least one row and one column; got "
                                       "shape (" + std::to_string(rows) + ", " +
                                           std::to_string(vocab) + ")");
    if (vocab > 1 && logits.stride(last) != 1)
        fail(PSM_ERR_INVALID_ARGUMENT,
             "logits: the last dimension must be contiguous (element stride 1, got " +
                 std::to_string(logits.stride(last)) +
                 "); copy it first, e.g. numpy.ascontiguousarray(x) or x.contiguous()");
    int64_t row_stride = vocab;
    if (rows > 1) {
        row_stride = logits.stride(0);
        if (row_stride < vocab)
            fail(PSM_ERR_INVALID_ARGUMENT,
                 "logits: the row stride (" + std::to_string(row_stride) +
                     " elements) is below the vocabulary (" + std::to_string(vocab) +
                     "): rows overlap or are broadcast; copy it first, e.g. "
                     "numpy.ascontiguousarray(x) or x.contiguous()");
    }
    psm_tensor tensor{};
    tensor.data = logits.data_ptr();
    const Kind kind = kind_of(logits.scalar_type());
    tensor.dtype = kind == kind_f32 ? PSM_DTYPE_F32 : kind == kind_f16 ? PSM_DTYPE_F16
                                                                       : PSM_DTYPE_BF16;
    tensor.memory = checks.memory_of(logits, "logits");
    tensor.rows = rows;
    tensor.vocab = vocab;
    tensor.row_stride = row_stride;
    return tensor;
}

// The per-row arrays (present ones: `given` maps ArrayIndex to the
// argument, or null for an array the op does not take).
void set_arrays(const Checks &checks, Call &call, const c10::IValue *const given[array_count])
{
    static const c10::IValue none;
    auto at = [&](ArrayIndex index) -> const c10::IValue & {
        return given[index] ? *given[index] : none;
    };
    const psm_memory memory = call.c_logits.memory;
    const int device = call.logits.device().index();
    const int64_t rows = call.out_rows;
    psm_params &p = call.params;
    p.temperature_per_row = (const float *)checks.per_row(at(a_temperature), kind_f32,
                                                          "temperature_per_row", rows, memory,
                                                          device);
    p.top_k_per_row = (const int32_t *)checks.per_row(at(a_top_k), kind_i32, "top_k_per_row",
                                                      rows, memory, device);
    p.top_p_per_row = (const float *)checks.per_row(at(a_top_p), kind_f32, "top_p_per_row",
                                                    rows, memory, device);
    p.min_p_per_row = (const float *)checks.per_row(at(a_min_p), kind_f32, "min_p_per_row",
                                                    rows, memory, device);
    p.seed_per_row = (const uint64_t *)checks.per_row(at(a_seed), kind_u64, "seed_per_row",
                                                      rows, memory, device);
    p.offset_per_row = (const uint64_t *)checks.per_row(at(a_offset), kind_u64,
                                                        "offset_per_row", rows, memory, device);
    p.subsequence_per_row = (const uint32_t *)checks.per_row(
        at(a_subsequence), kind_u32, "subsequence_per_row", rows, memory, device);
    p.row_indices = (const int64_t *)checks.per_row(at(a_row_indices), kind_i64, "row_indices",
                                                    rows, memory, device);
    p.seed_pointer = (const uint64_t *)checks.per_row(at(a_seed_tensor), kind_u64,
                                                      "seed_tensor", 1, memory, device, true);
    p.offset_pointer = (const uint64_t *)checks.per_row(at(a_offset_tensor), kind_u64,
                                                        "offset_tensor", 1, memory, device, true);
    p.output_rows = p.row_indices ? rows : 0;
}

// Shapes the outputs' rows and checks the logits and the arrays: the work
// of polysample/torch.py's _outputs (row_indices 1-D) and core.cpp's
// prepare, before anything is allocated.
void prepare(const Checks &checks, Call &call, const c10::IValue *const arrays[array_count])
{
    const c10::IValue *indices = arrays[a_row_indices];
    if (indices && !indices->isNone()) {
        const at::Tensor &tensor = indices->toTensor();
        if (tensor.dim() != 1)
            fail(PSM_ERR_INVALID_ARGUMENT,
                 "row_indices must be 1-D; got " + std::to_string(tensor.dim()) + "-D");
    }
    call.c_logits = logits_tensor(checks, call.logits);
    call.out_rows = call.c_logits.rows;
    call.rows_shape.assign(call.logits.sizes().begin(), call.logits.sizes().end() - 1);
    if (indices && !indices->isNone()) {
        const at::Tensor &tensor = indices->toTensor();
        Checks::expect_kind(tensor, kind_i64, "row_indices");
        if (tensor.size(0) < 1)
            fail(PSM_ERR_INVALID_ARGUMENT, "row_indices must be 1-D with at least one entry");
        call.out_rows = tensor.size(0);
        call.rows_shape.assign(1, call.out_rows);
    }
    set_arrays(checks, call, arrays);
}

// One CSR list: offsets (rows + 1, int64), tokens (int32) and, for the
// bias, values (float32, one per token).
void row_lists(const Checks &checks, Call &call, const c10::IValue *items, size_t offsets_at,
               const char *name, int64_t rows, const int64_t **offsets_out,
               const int32_t **tokens_out, const float **values_out)
{
    // An empty tensor may have no storage; the library takes a missing
    // entry array for a missing list, so it gets these instead.
    static const int32_t no_tokens[1] = {0};
    static const float no_values[1] = {0.0f};
    if (items[offsets_at].isNone())
        return;
    const psm_memory memory = call.c_logits.memory;
    const int device = call.logits.device().index();
    const std::string base(name);
    const at::Tensor &offsets = checks.list_array(items[offsets_at], kind_i64, base + " offsets",
                                                  rows + 1, memory, device);
    const at::Tensor &tokens = checks.list_array(items[offsets_at + 1], kind_i32,
                                                 base + " tokens", -1, memory, device);
    const int64_t entries = tokens.size(0);
    if (memory == PSM_MEMORY_HOST) {
        const std::string problem =
            list_offsets_problem((const int64_t *)offsets.data_ptr(), rows, entries, base);
        if (!problem.empty())
            fail(PSM_ERR_INVALID_ARGUMENT, problem);
    }
    *offsets_out = (const int64_t *)offsets.data_ptr();
    *tokens_out = entries > 0 ? (const int32_t *)tokens.data_ptr() : no_tokens;
    if (values_out) {
        const at::Tensor &values = checks.list_array(items[offsets_at + 2], kind_f32,
                                                     base + " values", entries, memory, device);
        *values_out = entries > 0 ? (const float *)values.data_ptr() : no_values;
    }
}

// The 14 processing arguments; none given and the penalties off is no
// processing (polysample/torch.py's _op_processing).
void attach_processing(const Checks &checks, Call &call, const c10::IValue *items)
{
    bool any = false;
    for (size_t i = 0; i < q_repetition; ++i)
        any = any || !items[i].isNone();
    const double repetition = items[q_repetition].toDouble();
    const double frequency = items[q_frequency].toDouble();
    const double presence = items[q_presence].toDouble();
    if (!any && repetition == 1.0 && frequency == 0.0 && presence == 0.0)
        return;
    psm_logit_processing &p = call.processing;
    psm_logit_processing_init(&p);
    p.repetition_penalty = (float)repetition;
    p.frequency_penalty = (float)frequency;
    p.presence_penalty = (float)presence;
    const int64_t rows = call.out_rows;
    const psm_memory memory = call.c_logits.memory;
    const int device = call.logits.device().index();
    if (!items[q_mask].isNone()) {
        const at::Tensor &mask = items[q_mask].toTensor();
        Checks::at_most_2d(mask, "allowed_mask");
        if (kind_of(mask.scalar_type()) != kind_i32) // int32 is read as the same 32 bits
            Checks::expect_kind(mask, kind_u32, "allowed_mask");
        if (mask.dim() != 2 || mask.size(0) != rows || mask.size(1) < 1)
            fail(PSM_ERR_INVALID_ARGUMENT, "allowed_mask must have shape (rows, words), one "
                                           "row per output row (" + std::to_string(rows) + ")");
        if ((mask.size(1) > 1 && mask.stride(1) != 1) ||
            (rows > 1 && mask.stride(0) != mask.size(1)))
            fail(PSM_ERR_INVALID_ARGUMENT, "allowed_mask must be C-contiguous");
        checks.same_memory(mask, "allowed_mask", memory, device);
        p.allowed_mask = (const uint32_t *)mask.data_ptr();
        p.allowed_mask_words = mask.size(1);
    }
    row_lists(checks, call, items, q_bias_offsets, "logit_bias", rows, &p.bias_offsets,
              &p.bias_tokens, &p.bias_values);
    row_lists(checks, call, items, q_history_offsets, "history", rows, &p.history_offsets,
              &p.history_tokens, nullptr);
    row_lists(checks, call, items, q_prompt_offsets, "prompt", rows, &p.prompt_offsets,
              &p.prompt_tokens, nullptr);
    p.repetition_penalty_per_row = (const float *)checks.per_row(
        items[q_repetition_rows], kind_f32, "repetition_penalty_per_row", rows, memory, device);
    p.frequency_penalty_per_row = (const float *)checks.per_row(
        items[q_frequency_rows], kind_f32, "frequency_penalty_per_row", rows, memory, device);
    p.presence_penalty_per_row = (const float *)checks.per_row(
        items[q_presence_rows], kind_f32, "presence_penalty_per_row", rows, memory, device);
    call.has_processing = true;
}

psm_params c_params(const Call &call)
{
    psm_params params = call.params;
    params.processing = call.has_processing ? &call.processing : nullptr;
    params.top_logprobs = call.has_top ? &call.top : nullptr;
    return params;
}

at::Tensor empty(const Call &call, std::vector<int64_t> shape, c10::ScalarType type)
{
    return at::empty(shape, call.logits.options().dtype(type));
}

std::vector<int64_t> rows_and(const Call &call, int64_t last)
{
    std::vector<int64_t> shape = call.rows_shape;
    shape.push_back(last);
    return shape;
}

// Sizes the workspace, takes it from torch's allocator (it stays alive
// until the call has been queued; torch then reuses it only for later work
// on this stream), and runs the call.
void execute(Call &call, const psm_output &tokens, const psm_output &logprobs,
             const psm_tensor *probs)
{
    OpContext &context = *call.context;
    std::lock_guard<std::mutex> lock(context.mutex);
    psm_params params = c_params(call);
    size_t bytes = 0;
    psm_status status = call.mode == 0 ? psm_sample_workspace_size(context.context,
                                                                   &call.c_logits, &params,
                                                                   tokens, logprobs, &bytes)
                                       : psm_probs_workspace_size(context.context,
                                                                  &call.c_logits, &params,
                                                                  probs, &bytes);
    if (status != PSM_OK)
        fail(status, psm_last_error());
    at::Tensor workspace;
    if (bytes > 0) {
        workspace = empty(call, {(int64_t)bytes}, c10::ScalarType::Byte);
        params.workspace = workspace.data_ptr();
        params.workspace_bytes = bytes;
    }
    status = call.mode == 0
                 ? psm_sample(context.context, &call.c_logits, &params, tokens, logprobs)
                 : psm_probs(context.context, &call.c_logits, &params, probs);
    if (status != PSM_OK)
        fail(status, psm_last_error());
}

// What psm_sample gives: the tokens and logprobs ((0,) when not asked), and
// with top-N its outputs (the ranks undefined without return_ranks).
struct SampleOutputs {
    at::Tensor tokens, logprobs, top_tokens, top_values, ranks;
};

// The sample op's work on its arguments `a` (schema order).
SampleOutputs run_sample(const c10::IValue *a)
{
    // polysample/_arguments.py's scalars(): what the Python kernel checks
    // first. Seeds and offsets arrive as their unsigned bits.
    const float temperature = (float)a[s_temperature].toDouble();
    const int32_t top_k = int32_argument(a[s_top_k].toInt(), "top_k");
    const float top_p = (float)a[s_top_p].toDouble();
    const float min_p = (float)a[s_min_p].toDouble();
    const int64_t num_samples = a[s_num_samples].toInt();
    if (num_samples < 1 || num_samples > INT32_MAX)
        fail(PSM_ERR_INVALID_PARAMETER, "num_samples is " + std::to_string(num_samples) +
                                            "; expected 1 to 2^31 - 1");
    const int32_t filter_order = int32_argument(a[s_filter_order].toInt(), "filter_order");

    Call call;
    begin_call(call, 0, a[s_logits].toTensor(), temperature, top_k, top_p, min_p);
    Checks checks(*call.context, call.logits);
    call.params.seed = (uint64_t)a[s_seed].toInt();
    call.params.offset = (uint64_t)a[s_offset].toInt();
    call.params.num_samples = (int32_t)num_samples;
    call.params.filter_order = filter_order;
    const c10::IValue *arrays[array_count];
    for (size_t i = 0; i < array_count; ++i)
        arrays[i] = &a[s_arrays + i];
    prepare(checks, call, arrays);
    attach_processing(checks, call, &a[s_processing]);
    // The library checks N and the mode too, but the outputs are shaped by
    // N before it is called.
    const int64_t top_count = a[s_top_logprobs].toInt();
    if (top_count < 0 || top_count > PSM_MAX_TOP_LOGPROBS)
        fail(PSM_ERR_INVALID_PARAMETER,
             "top_logprobs is " + std::to_string(top_count) + "; expected 1 to " +
                 std::to_string(PSM_MAX_TOP_LOGPROBS) + " (0: none)");
    const int32_t logprob_mode = int32_argument(a[s_logprob_mode].toInt(), "logprob_mode");
    call.has_top = top_count > 0;
    call.return_logprobs = a[s_return_logprobs].toBool() || call.has_top;
    call.return_ranks = call.has_top && a[s_return_ranks].toBool();

    // Every check passed: the outputs.
    const psm_memory memory = call.c_logits.memory;
    SampleOutputs out;
    out.tokens = empty(call, rows_and(call, num_samples), c10::ScalarType::Int);
    out.logprobs = call.return_logprobs
                       ? empty(call, rows_and(call, num_samples), c10::ScalarType::Float)
                       : empty(call, {0}, c10::ScalarType::Float);
    if (call.has_top) {
        out.top_tokens = empty(call, rows_and(call, top_count), c10::ScalarType::Int);
        out.top_values = empty(call, rows_and(call, top_count), c10::ScalarType::Float);
        call.top.count = (int32_t)top_count;
        call.top.mode = (psm_logprob_mode)logprob_mode;
        call.top.tokens = psm_output{out.top_tokens.data_ptr(), memory};
        call.top.logprobs = psm_output{out.top_values.data_ptr(), memory};
    }
    if (call.return_ranks) {
        out.ranks = empty(call, rows_and(call, num_samples), c10::ScalarType::Int);
        call.top.sampled_ranks = psm_output{out.ranks.data_ptr(), memory};
    }
    const psm_output tokens_out{out.tokens.data_ptr(), memory};
    const psm_output logprobs_out{call.return_logprobs ? out.logprobs.data_ptr() : nullptr,
                                  memory};
    execute(call, tokens_out, logprobs_out, nullptr);
    return out;
}

// polysample::sample: outputs not asked for are empty tensors.
void sample_kernel(const c10::OperatorHandle &, torch::jit::Stack *stack)
{
    auto arguments = torch::jit::last(*stack, sample_argument_count);
    SampleOutputs out = run_sample(arguments.data());
    auto absent = [&](at::Tensor &tensor, c10::ScalarType type) {
        if (!tensor.defined())
            tensor = at::empty({0}, out.tokens.options().dtype(type));
    };
    absent(out.top_tokens, c10::ScalarType::Int);
    absent(out.top_values, c10::ScalarType::Float);
    absent(out.ranks, c10::ScalarType::Int);
    torch::jit::drop(*stack, sample_argument_count);
    torch::jit::push(*stack, std::move(out.tokens), std::move(out.logprobs),
                     std::move(out.top_tokens), std::move(out.top_values), std::move(out.ranks));
}

// polysample::sample_scalars: sample with its scalars alone (no arrays,
// processing or top-N), the call the wrappers make most; fewer arguments
// to convert and two outputs instead of five.
enum ScalarsArgument : size_t { c_return_logprobs = s_num_samples + 1, c_filter_order,
                                scalars_argument_count };

void sample_scalars_kernel(const c10::OperatorHandle &, torch::jit::Stack *stack)
{
    auto arguments = torch::jit::last(*stack, scalars_argument_count);
    c10::IValue full[sample_argument_count]; // None where not set below
    for (size_t i = 0; i < s_arrays; ++i)
        full[i] = arguments[i];
    full[s_return_logprobs] = arguments[c_return_logprobs];
    full[s_filter_order] = arguments[c_filter_order];
    full[(size_t)s_processing + q_repetition] = 1.0;
    full[(size_t)s_processing + q_frequency] = 0.0;
    full[(size_t)s_processing + q_presence] = 0.0;
    full[s_top_logprobs] = (int64_t)0;
    full[s_logprob_mode] = (int64_t)0;
    full[s_return_ranks] = false;
    SampleOutputs out = run_sample(full);
    torch::jit::drop(*stack, scalars_argument_count);
    torch::jit::push(*stack, std::move(out.tokens), std::move(out.logprobs));
}

void probs_kernel(const c10::OperatorHandle &, torch::jit::Stack *stack)
{
    auto arguments = torch::jit::last(*stack, probs_argument_count);
    const c10::IValue *a = arguments.data();
    const float temperature = (float)a[p_temperature].toDouble();
    const int32_t top_k = int32_argument(a[p_top_k].toInt(), "top_k");
    const float top_p = (float)a[p_top_p].toDouble();
    const float min_p = (float)a[p_min_p].toDouble();
    const int32_t filter_order = int32_argument(a[p_filter_order].toInt(), "filter_order");

    Call call;
    begin_call(call, 1, a[p_logits].toTensor(), temperature, top_k, top_p, min_p);
    Checks checks(*call.context, call.logits);
    call.params.filter_order = filter_order;
    const c10::IValue *arrays[array_count] = {};
    arrays[a_temperature] = &a[p_arrays + 0];
    arrays[a_top_k] = &a[p_arrays + 1];
    arrays[a_top_p] = &a[p_arrays + 2];
    arrays[a_min_p] = &a[p_arrays + 3];
    arrays[a_row_indices] = &a[p_arrays + 4];
    prepare(checks, call, arrays);
    attach_processing(checks, call, &a[p_processing]);

    const int64_t vocab = call.c_logits.vocab;
    at::Tensor out = empty(call, rows_and(call, vocab), c10::ScalarType::Float);
    psm_tensor probs{};
    probs.data = out.data_ptr();
    probs.dtype = PSM_DTYPE_F32;
    probs.memory = call.c_logits.memory;
    probs.rows = call.out_rows;
    probs.vocab = vocab;
    probs.row_stride = vocab;
    execute(call, psm_output{}, psm_output{}, &probs);

    torch::jit::drop(*stack, probs_argument_count);
    torch::jit::push(*stack, std::move(out));
}

// Registers the kernels once; the Library objects live as long as the
// process, as TORCH_LIBRARY_IMPL's static ones do. Done on request rather
// than at load so that polysample/torch.py registers them only after it
// has checked that this module was built against the torch that runs.
void register_kernels(bool is_rocm)
{
    static std::once_flag once;
    std::call_once(once, [is_rocm] {
        rocm = is_rocm;
        for (c10::DispatchKey key : {c10::DispatchKey::CPU, c10::DispatchKey::CUDA}) {
            auto *library = new torch::Library(torch::Library::IMPL, "polysample", key,
                                               __FILE__, __LINE__);
            library->impl("sample", torch::CppFunction::makeFromBoxedFunction<&sample_kernel>());
            library->impl("sample_scalars",
                          torch::CppFunction::makeFromBoxedFunction<&sample_scalars_kernel>());
            library->impl("probs", torch::CppFunction::makeFromBoxedFunction<&probs_kernel>());
        }
    });
}

} // namespace

NB_MODULE(_torch_ops, module)
{
    module.doc() = "polysample's C++ kernels for torch.ops.polysample; polysample.torch "
                   "registers them.";
    module.attr("TORCH_VERSION") = PSM_TORCH_VERSION;
#if defined(PSM_TORCH_CUDA_STREAM)
    module.attr("CUDA_STREAM") = "c10::cuda::getCurrentCUDAStream";
#else
    module.attr("CUDA_STREAM") = "c10::impl::DeviceGuardImplInterface::getStreamNativeHandle";
#endif
    module.attr("SAMPLE_ARGUMENTS") = (int)sample_argument_count;
    module.attr("SAMPLE_SCALARS_ARGUMENTS") = (int)scalars_argument_count;
    module.attr("PROBS_ARGUMENTS") = (int)probs_argument_count;
    module.def("register_kernels", &register_kernels, nb::arg("rocm"));
}
