// polysample._core: the layer between Python and the C API.
//
// It checks every array against what the C call needs (dtype, shape, strides,
// where the memory lives), raises before any work when something does not
// fit, and releases the GIL for the C call. Arrays arrive either as DLPack
// objects (anything with __dlpack__, or the buffer protocol) or, on the
// PyTorch fast path, as a tuple describing the tensor (see RawArray below),
// which saves the cost of exporting a DLPack capsule per tensor per call.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <polysample.h>

#include "names.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace nb = nanobind;

namespace {

// DLPack device types (dlpack.h, DLDeviceType).
constexpr int32_t dl_cpu = 1;
constexpr int32_t dl_cuda = 2;
constexpr int32_t dl_cuda_host = 3;
constexpr int32_t dl_rocm = 10;
constexpr int32_t dl_rocm_host = 11;
constexpr int32_t dl_cuda_managed = 13;

using namespace polysample_python;

int kind_of(nb::dlpack::dtype dtype)
{
    using code = nb::dlpack::dtype_code;
    if (dtype.lanes != 1)
        return kind_other;
    if (dtype.code == (uint8_t)code::Float && dtype.bits == 32) return kind_f32;
    if (dtype.code == (uint8_t)code::Float && dtype.bits == 16) return kind_f16;
    if (dtype.code == (uint8_t)code::Bfloat && dtype.bits == 16) return kind_bf16;
    if (dtype.code == (uint8_t)code::Int && dtype.bits == 32) return kind_i32;
    if (dtype.code == (uint8_t)code::Int && dtype.bits == 64) return kind_i64;
    if (dtype.code == (uint8_t)code::UInt && dtype.bits == 64) return kind_u64;
    if (dtype.code == (uint8_t)code::UInt && dtype.bits == 32) return kind_u32;
    if (dtype.code == (uint8_t)code::UInt && dtype.bits == 8) return kind_u8;
    return kind_other;
}

// A failed check or C call; turned into polysample.Error(status, message).
struct Failure {
    psm_status status;
    std::string message;
};

[[noreturn]] void fail(psm_status status, std::string message)
{
    throw Failure{status, std::move(message)};
}


// One array as the checks see it. keep_* hold the imported DLPack array (if
// any) so that its memory stays valid until the call returns.
struct View {
    void *data = nullptr;
    int kind = kind_other;
    int32_t device_type = dl_cpu;
    int32_t device_id = 0;
    size_t ndim = 0;
    int64_t shape[2] = {0, 0};
    int64_t strides[2] = {0, 0}; // in elements
    std::optional<nb::ndarray<nb::ro>> keep_read_only;
    std::optional<nb::ndarray<>> keep_writable;
};

std::string python_type_name(nb::handle object)
{
    return nb::cast<std::string>(nb::str(nb::handle((PyObject *)Py_TYPE(object.ptr()))));
}

template <typename Array> void fill_view(View &view, const Array &array, const char *role)
{
    view.data = (void *)array.data();
    view.kind = kind_of(array.dtype());
    view.device_type = array.device_type();
    view.device_id = array.device_id();
    view.ndim = array.ndim();
    if (view.ndim > 2)
        fail(PSM_ERR_INVALID_ARGUMENT,
             std::string(role) + " must be 1-D or 2-D; got " + std::to_string(view.ndim) + "-D");
    for (size_t i = 0; i < view.ndim; ++i) {
        view.shape[i] = (int64_t)array.shape(i);
        view.strides[i] = array.stride(i);
    }
}

// A RawArray is the tuple (data_pointer, kind, device_type, device_id,
// shape, strides), strides in elements; python/polysample/torch.py builds it
// from a tensor's own attributes.
View view_of(nb::handle object, const char *role, bool writable)
{
    View view;
    if (nb::isinstance<nb::tuple>(object)) {
        nb::tuple raw = nb::borrow<nb::tuple>(object);
        if (raw.size() != 6)
            fail(PSM_ERR_INVALID_ARGUMENT, std::string(role) + ": a raw array is a 6-tuple");
        view.data = (void *)nb::cast<uintptr_t>(raw[0]);
        view.kind = nb::cast<int>(raw[1]);
        view.device_type = nb::cast<int32_t>(raw[2]);
        view.device_id = nb::cast<int32_t>(raw[3]);
        nb::tuple shape = nb::borrow<nb::tuple>(raw[4]);
        nb::tuple strides = nb::borrow<nb::tuple>(raw[5]);
        view.ndim = shape.size();
        if (view.ndim > 2 || strides.size() != view.ndim)
            fail(PSM_ERR_INVALID_ARGUMENT,
                 std::string(role) + " must be 1-D or 2-D; got " + std::to_string(view.ndim) + "-D");
        for (size_t i = 0; i < view.ndim; ++i) {
            view.shape[i] = nb::cast<int64_t>(shape[i]);
            view.strides[i] = nb::cast<int64_t>(strides[i]);
        }
        return view;
    }
    if (writable) {
        nb::ndarray<> array;
        if (!nb::try_cast<nb::ndarray<>>(object, array, false))
            fail(PSM_ERR_INVALID_ARGUMENT,
                 std::string(role) + " must be a writable array supporting DLPack or the "
                 "buffer protocol; got " + python_type_name(object));
        fill_view(view, array, role);
        view.keep_writable = std::move(array);
    } else {
        nb::ndarray<nb::ro> array;
        if (!nb::try_cast<nb::ndarray<nb::ro>>(object, array, false))
            fail(PSM_ERR_INVALID_ARGUMENT,
                 std::string(role) + " must be an array supporting DLPack or the buffer "
                 "protocol; got " + python_type_name(object));
        fill_view(view, array, role);
        view.keep_read_only = std::move(array);
    }
    return view;
}

bool is_host_memory(int32_t device_type)
{
    return device_type == dl_cpu || device_type == dl_cuda_host || device_type == dl_rocm_host;
}

const char *device_type_name(int32_t device_type)
{
    switch (device_type) {
    case dl_cpu: return "host";
    case dl_cuda: return "CUDA";
    case dl_cuda_host: return "CUDA pinned host";
    case dl_rocm: return "ROCm";
    case dl_rocm_host: return "ROCm pinned host";
    case dl_cuda_managed: return "CUDA managed";
    }
    return "other";
}

// Symbols of the CUDA driver, looked up in the already loaded libcuda.so.1
// (loaded by whichever framework made the CUDA tensor), so that the
// extension itself needs no CUDA at build or load time.
using exchange_capture_mode_fn = int (*)(int *mode);
exchange_capture_mode_fn find_exchange_capture_mode()
{
    void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!driver)
        return nullptr;
    return (exchange_capture_mode_fn)dlsym(driver, "cuThreadExchangeStreamCaptureMode");
}

// A sharded call in progress (docs/SAMPLING.md section 8): the views keep
// the shard's logits alive for the rounds; the outputs are written into the
// vectors at the last round and handed to Python as bytes.
class Sharded {
public:
    Sharded(std::vector<View> views, psm_sharded *call, size_t outputs)
        : views_(std::move(views)), call_(call), tokens_(outputs), logprobs_(outputs)
    {
    }
    Sharded(const Sharded &) = delete;
    Sharded &operator=(const Sharded &) = delete;
    ~Sharded() { psm_sharded_end(call_); }

    psm_output tokens_output() { return psm_output{tokens_.data(), PSM_MEMORY_HOST}; }
    psm_output logprobs_output() { return psm_output{logprobs_.data(), PSM_MEMORY_HOST}; }
    void attach(psm_sharded *call) { call_ = call; }

    // One round: gathered is None the first time, then the previous round's
    // all-gather (bytes). Returns this rank's bytes, or None once the
    // outputs are written.
    nb::object next(nb::handle gathered)
    {
        const char *data = nullptr;
        size_t size = 0;
        if (!gathered.is_none()) {
            if (!nb::isinstance<nb::bytes>(gathered))
                fail(PSM_ERR_INVALID_ARGUMENT, "gathered must be bytes (or None the first time)");
            nb::bytes bytes = nb::borrow<nb::bytes>(gathered);
            data = bytes.c_str();
            size = bytes.size();
        }
        const void *send = nullptr;
        size_t send_bytes = 0;
        psm_status status;
        {
            nb::gil_scoped_release release;
            status = psm_sharded_next(call_, data, size, &send, &send_bytes);
        }
        if (status != PSM_OK)
            fail(status, psm_last_error());
        if (send_bytes == 0) {
            done_ = true;
            return nb::none();
        }
        return nb::bytes((const char *)send, send_bytes);
    }

    // (tokens, logprobs) as bytes of int32 and float32, once next() gave None.
    nb::tuple outputs() const
    {
        if (!done_)
            fail(PSM_ERR_INVALID_ARGUMENT, "the sharded call has not finished its rounds");
        return nb::make_tuple(nb::bytes((const char *)tokens_.data(), tokens_.size() * 4),
                              nb::bytes((const char *)logprobs_.data(), logprobs_.size() * 4));
    }

private:
    std::vector<View> views_;
    psm_sharded *call_ = nullptr;
    std::vector<int32_t> tokens_;
    std::vector<float> logprobs_;
    bool done_ = false;
};

class Context {
public:
    Context(int backend, int device, bool check_rows, uintptr_t native_stream, int cpu_threads,
            nb::object notice)
        : notice_(std::move(notice))
    {
        psm_context_options options;
        psm_context_options_init(&options);
        options.backend = (psm_backend)backend;
        options.device_index = device;
        options.check_rows = check_rows ? 1 : 0;
        options.native_stream = (void *)native_stream;
        options.cpu_threads = cpu_threads;
        if (!notice_.is_none()) {
            options.notice = &Context::forward_notice;
            options.notice_user_data = this;
        }
        psm_status status;
        {
            // Creation may compile kernels (OpenCL, first use): minutes on a CPU.
            nb::gil_scoped_release release;
            status = psm_context_create(&options, &context_);
        }
        if (status != PSM_OK)
            fail(status, psm_last_error());
        backend_ = psm_context_backend(context_);
        device_ = device;
    }

    ~Context()
    {
        if (context_) {
            nb::gil_scoped_release release;
            psm_context_destroy(context_);
        }
    }

    Context(const Context &) = delete;
    Context &operator=(const Context &) = delete;

    int backend() const { return backend_; }
    std::string device_name() const { return psm_context_device_name(context_); }
    std::string selection_reason() const { return psm_context_selection_reason(context_); }

    void reserve(int64_t rows, int64_t vocab, int64_t num_samples)
    {
        psm_status status;
        {
            nb::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            status = psm_context_reserve(context_, rows, vocab, num_samples);
        }
        if (status != PSM_OK)
            fail(status, psm_last_error());
    }

    void synchronize()
    {
        psm_status status;
        {
            nb::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            status = psm_synchronize(context_);
        }
        if (status != PSM_OK)
            fail(status, psm_last_error());
    }

    // mode 0: psm_sample into `out` (tokens) and `logprobs_out` (optional);
    // mode 1: psm_probs into `out`. scalars: (temperature, top_k, top_p,
    // min_p, seed, offset, num_samples, filter_order); arrays: the per-row
    // and request-state arrays in the order of Arrays below, each None or an
    // array. workspace:
    // None, a uint8 array, or a callable that takes the bytes the call needs
    // and returns such an array (polysample.torch allocates it from torch's
    // allocator that way, after the size query). processing: None or the
    // tuple described at Processing below; top: None or the tuple described
    // at attach_top below (mode 0 only).
    void run(int mode, nb::handle logits_object, nb::tuple scalars, nb::tuple arrays,
             nb::handle out_object, nb::handle logprobs_object, nb::handle workspace_object,
             nb::handle processing_object, nb::handle top_object)
    {
        Prepared call = prepare(mode, logits_object, Scalars::of(scalars), arrays, out_object,
                                logprobs_object);
        attach_processing(call, processing_object);
        attach_top(call, top_object);
        if (!workspace_object.is_none()) {
            nb::object workspace = nb::borrow(workspace_object);
            if (PyCallable_Check(workspace.ptr())) {
                size_t bytes = workspace_size_of(call);
                workspace = workspace(bytes);
            }
            attach_workspace(call, workspace);
        }
        psm_status status;
        {
            nb::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            status = execute(call);
        }
        if (status != PSM_OK)
            fail(status, psm_last_error());
    }

    // The bytes of workspace that run() with the same arguments needs.
    size_t workspace_size(int mode, nb::handle logits_object, nb::tuple scalars,
                          nb::tuple arrays, nb::handle out_object, nb::handle logprobs_object,
                          nb::handle processing_object, nb::handle top_object)
    {
        Prepared call = prepare(mode, logits_object, Scalars::of(scalars), arrays, out_object,
                                logprobs_object);
        attach_processing(call, processing_object);
        attach_top(call, top_object);
        return workspace_size_of(call);
    }

    // psm_verify (docs/SAMPLING.md section 7). target: the target logits,
    // requests * (k + 1) rows (polysample/_verify.py flattens a 3-D array);
    // scalars and arrays: the target's, as for run(), one per-row value per
    // request (row_indices None); drafts: (tokens, parents, draft_logits,
    // draft_probs): int32 requests x k, None or int32 requests x k, None or
    // requests * k rows of logits, None or requests * k rows of float32;
    // draft_params: None or (scalars, arrays) shaping draft_logits (the
    // library refuses them without draft_logits);
    // outputs: (accepted, tokens, path_nodes, logprobs): int32 requests,
    // int32 requests x (k + 1) twice, float32 requests x (k + 1). Array
    // lengths are checked here; values (tokens, parents, probabilities,
    // parameters) are the library's to check.
    void verify(nb::handle target_object, nb::tuple scalars, nb::tuple arrays, nb::tuple drafts,
                nb::handle draft_params_object, nb::tuple outputs)
    {
        if (drafts.size() != 4 || outputs.size() != 4)
            fail(PSM_ERR_INTERNAL, "verify: drafts and outputs have 4 entries each");
        std::vector<View> views;
        views.reserve(32);
        const psm_tensor target = logits_tensor(views, target_object, "target_logits");
        const int32_t device = views.front().device_id;
        psm_params target_params;
        set_scalars(target_params, Scalars::of(scalars));

        views.push_back(view_of(drafts[0], "draft_tokens", false));
        const View &tokens = views.back();
        expect_kind(tokens, kind_i32, "draft_tokens");
        if (tokens.ndim != 2)
            fail(PSM_ERR_INVALID_ARGUMENT, "draft_tokens must be 2-D (requests, k)");
        const int64_t requests = tokens.shape[0];
        const int64_t nodes = tokens.shape[1];
        // Outside 1 .. PSM_MAX_DRAFT_NODES the library refuses k before it
        // reads any array, with its own message.
        const bool nodes_valid = nodes >= 1 && nodes <= PSM_MAX_DRAFT_NODES;
        if (nodes_valid && target.rows != requests * (nodes + 1))
            fail(PSM_ERR_INVALID_ARGUMENT,
                 "target_logits has " + std::to_string(target.rows) + " rows; draft_tokens' " +
                     std::to_string(requests) + " requests of k = " + std::to_string(nodes) +
                     " need requests x (k + 1) = " + std::to_string(requests * (nodes + 1)));
        auto node_array = [&](const View &view, const char *role) {
            if (view.ndim != 2 || view.shape[0] != requests || view.shape[1] != nodes)
                fail(PSM_ERR_INVALID_ARGUMENT, std::string(role) + " must have draft_tokens' "
                                               "shape (" + std::to_string(requests) + ", " +
                                               std::to_string(nodes) + ")");
            if (nodes_valid &&
                ((nodes > 1 && view.strides[1] != 1) || (requests > 1 && view.strides[0] != nodes)))
                fail(PSM_ERR_INVALID_ARGUMENT, std::string(role) + " must be C-contiguous");
            same_memory(views, view, role, target.memory, device);
        };
        node_array(tokens, "draft_tokens");
        psm_drafts raw_drafts;
        psm_drafts_init(&raw_drafts);
        raw_drafts.nodes = (int32_t)std::min<int64_t>(nodes, INT32_MAX);
        raw_drafts.tokens = (const int32_t *)tokens.data;
        if (!drafts[1].is_none()) {
            views.push_back(view_of(drafts[1], "parents", false));
            expect_kind(views.back(), kind_i32, "parents");
            node_array(views.back(), "parents");
            raw_drafts.parents = (const int32_t *)views.back().data;
        }
        psm_tensor draft_logits{}, draft_probs{};
        psm_params draft_params;
        if (!drafts[2].is_none()) {
            draft_logits = logits_tensor(views, drafts[2], "draft_logits");
            same_memory(views, views.back(), "draft_logits", target.memory, device);
            raw_drafts.draft_logits = &draft_logits;
        }
        if (!draft_params_object.is_none()) {
            nb::tuple given = nb::borrow<nb::tuple>(draft_params_object);
            set_scalars(draft_params, Scalars::of(nb::borrow<nb::tuple>(given[0])));
            set_arrays(views, draft_params, nb::borrow<nb::tuple>(given[1]), "draft_", requests,
                       target.memory, device);
            raw_drafts.draft_params = &draft_params;
        }
        if (!drafts[3].is_none()) {
            draft_probs = logits_tensor(views, drafts[3], "draft_probs");
            same_memory(views, views.back(), "draft_probs", target.memory, device);
            raw_drafts.draft_probs = &draft_probs;
        }
        set_arrays(views, target_params, arrays, "", requests, target.memory, device);

        views.push_back(view_of(outputs[0], "accepted output", true));
        const View &accepted = views.back();
        expect_kind(accepted, kind_i32, "accepted output");
        if (accepted.ndim != 1 || accepted.shape[0] != requests ||
            (requests > 1 && accepted.strides[0] != 1))
            fail(PSM_ERR_INVALID_ARGUMENT, "accepted output must be 1-D and contiguous, one "
                                           "value per request");
        psm_verification result{};
        result.accepted = psm_output{accepted.data, memory_of(accepted, "accepted output")};
        const int32_t positions = (int32_t)std::min<int64_t>(nodes + 1, INT32_MAX);
        const char *roles[3] = {"tokens output", "path_nodes output", "logprobs output"};
        psm_output *slots[3] = {&result.tokens, &result.path_nodes, &result.logprobs};
        for (size_t i = 0; i < 3; ++i) {
            views.push_back(view_of(outputs[i + 1], roles[i], true));
            *slots[i] = output(views.back(), i == 2 ? kind_f32 : kind_i32, roles[i], 2, requests,
                               positions);
        }
        const bool any_host = target.memory == PSM_MEMORY_HOST ||
                              result.accepted.memory == PSM_MEMORY_HOST;
        const bool synchronize = any_host && backend_ != PSM_BACKEND_CPU;
        psm_status status;
        {
            nb::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            status = psm_verify(context_, &target, &target_params, &raw_drafts, &result);
            if (status == PSM_OK && synchronize)
                status = psm_synchronize(context_);
        }
        if (status != PSM_OK)
            fail(status, psm_last_error());
    }

    // Starts a sharded call (docs/SAMPLING.md section 8) on this rank's
    // columns of host logits; scalars and arrays as for run() (host arrays
    // only); output_rows: the logits' rows, or the entries of row_indices.
    Sharded *sharded(nb::handle logits_object, int64_t first_token, int64_t full_vocab,
                     int32_t shard_index, int32_t shard_count, nb::tuple scalars,
                     nb::tuple arrays, int64_t output_rows)
    {
        std::vector<View> views;
        views.reserve(16);
        const psm_tensor logits = logits_tensor(views, logits_object, "logits");
        if (logits.memory != PSM_MEMORY_HOST)
            fail(PSM_ERR_UNSUPPORTED, "sharded calls take host logits so far");
        psm_params params;
        set_scalars(params, Scalars::of(scalars));
        if (params.num_samples < 1)
            fail(PSM_ERR_INVALID_PARAMETER, "num_samples is " +
                                                std::to_string(params.num_samples) +
                                                "; expected >= 1");
        set_arrays(views, params, arrays, "", output_rows, logits.memory,
                   views.front().device_id);
        if (params.row_indices)
            params.output_rows = output_rows;
        const size_t outputs = (size_t)output_rows * (size_t)params.num_samples;
        const psm_shard shard{first_token, full_vocab, shard_index, shard_count};
        auto call = std::make_unique<Sharded>(std::move(views), nullptr, outputs);
        psm_sharded *raw = nullptr;
        psm_status status;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            status = psm_sharded_begin(context_, &logits, &shard, &params, call->tokens_output(),
                                       call->logprobs_output(), &raw);
        }
        if (status != PSM_OK)
            fail(status, psm_last_error());
        call->attach(raw);
        return call.release();
    }

    // The C call's own time, for the overhead measurement in polysample.bench:
    // `repeats` calls of psm_sample on the given arrays, each timed alone on
    // the host (a steady clock around the call), with a synchronisation every
    // `sync_every` calls outside the timed part so that an asynchronous
    // backend's queue stays short. Returns the per-call times in seconds.
    std::vector<double> time_sample(nb::handle logits_object, nb::handle out_object, int repeats,
                                    int sync_every)
    {
        Prepared call = prepare(0, logits_object, Scalars{}, nb::tuple(), out_object, nb::none());
        call.synchronize = false;
        std::vector<double> seconds;
        seconds.reserve(repeats > 0 ? repeats : 0);
        psm_status status = PSM_OK;
        {
            nb::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            for (int i = 0; i < repeats && status == PSM_OK; ++i) {
                auto start = std::chrono::steady_clock::now();
                status = execute(call);
                auto stop = std::chrono::steady_clock::now();
                seconds.push_back(std::chrono::duration<double>(stop - start).count());
                if (status == PSM_OK && sync_every > 0 && (i + 1) % sync_every == 0)
                    status = psm_synchronize(context_);
            }
            if (status == PSM_OK)
                status = psm_synchronize(context_);
        }
        if (status != PSM_OK)
            fail(status, psm_last_error());
        return seconds;
    }

private:
    struct Prepared {
        int mode = 0;
        psm_tensor logits{};
        psm_params params{};
        psm_output tokens{};
        psm_output logprobs{};
        psm_tensor probs{};
        bool synchronize = false;
        // The processing struct params.processing points to when
        // has_processing; the pointer is set by c_params(), at the call,
        // since a Prepared moves.
        psm_logit_processing processing{};
        bool has_processing = false;
        // The top-N request params.top_logprobs points to when has_top (set
        // by c_params() too).
        psm_top_logprobs top{};
        bool has_top = false;
        // Keeps imported arrays alive. At most 29 (logits, the arrays, 2
        // outputs, the workspace, 11 processing arrays, 3 top-N outputs):
        // prepare() reserves them up front, so references into it stay
        // valid while it fills.
        std::vector<View> views;

        psm_params c_params() const
        {
            psm_params copy = params;
            copy.processing = has_processing ? &processing : nullptr;
            copy.top_logprobs = has_top ? &top : nullptr;
            return copy;
        }
    };

    struct Scalars {
        float temperature = 1.0f;
        int32_t top_k = 0;
        float top_p = 1.0f;
        float min_p = 0.0f;
        uint64_t seed = 0;
        uint64_t offset = 0;
        int32_t num_samples = 1;
        int32_t filter_order = PSM_FILTER_ORDER_POLYSAMPLE;

        static Scalars of(nb::tuple values)
        {
            if (values.size() != 8)
                fail(PSM_ERR_INTERNAL, "scalars: expected 8 values");
            Scalars scalars;
            scalars.temperature = nb::cast<float>(values[0]);
            scalars.top_k = nb::cast<int32_t>(values[1]);
            scalars.top_p = nb::cast<float>(values[2]);
            scalars.min_p = nb::cast<float>(values[3]);
            scalars.seed = nb::cast<uint64_t>(values[4]);
            scalars.offset = nb::cast<uint64_t>(values[5]);
            scalars.num_samples = nb::cast<int32_t>(values[6]);
            scalars.filter_order = nb::cast<int32_t>(values[7]);
            return scalars;
        }
    };

    // The order of the `arrays` tuple (polysample/__init__.py, ARRAY_NAMES).
    enum Arrays : size_t { temperature_rows, top_k_rows, top_p_rows, min_p_rows, seed_rows,
                           offset_rows, subsequence_rows, row_indices, seed_tensor,
                           offset_tensor, array_count };

    size_t workspace_size_of(const Prepared &call)
    {
        size_t bytes = 0;
        psm_status status;
        {
            nb::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            const psm_params params = call.c_params();
            status = call.mode == 0
                         ? psm_sample_workspace_size(context_, &call.logits, &params,
                                                     call.tokens, call.logprobs, &bytes)
                         : psm_probs_workspace_size(context_, &call.logits, &params,
                                                    &call.probs, &bytes);
        }
        if (status != PSM_OK)
            fail(status, psm_last_error());
        return bytes;
    }

    // The caller's workspace: a 1-D contiguous uint8 array in the memory the
    // context's backend takes as workspace (host on the CPU backend, the
    // device on CUDA and HIP; an OpenCL workspace is a cl_mem, which no
    // Python array is).
    void attach_workspace(Prepared &call, nb::handle object)
    {
        if (backend_ == PSM_BACKEND_OPENCL)
            fail(PSM_ERR_UNSUPPORTED, "workspace: the OpenCL backend's workspace is a cl_mem, "
                                      "which Python arrays are not; leave workspace unset");
        call.views.push_back(view_of(object, "workspace", true));
        const View &view = call.views.back();
        expect_kind(view, kind_u8, "workspace");
        if (view.ndim != 1 || (view.shape[0] > 1 && view.strides[0] != 1))
            fail(PSM_ERR_INVALID_ARGUMENT, "workspace must be a 1-D contiguous uint8 array");
        psm_memory memory = memory_of(view, "workspace");
        psm_memory needed = backend_ == PSM_BACKEND_CPU ? PSM_MEMORY_HOST : PSM_MEMORY_DEVICE;
        if (memory != needed)
            fail(PSM_ERR_WRONG_BACKEND,
                 std::string("workspace is in ") + device_type_name(view.device_type) +
                     " memory; the " + psm_backend_name((psm_backend)backend_) +
                     " backend's workspace is " +
                     (needed == PSM_MEMORY_HOST ? "host memory" : "device memory"));
        call.params.workspace = view.shape[0] > 0 ? view.data : nullptr;
        call.params.workspace_bytes = view.shape[0] > 0 ? (size_t)view.shape[0] : 0;
    }

    // The `processing` tuple (polysample/_processing.py, processing_tuple):
    // (allowed_mask, bias_offsets, bias_tokens, bias_values,
    // history_offsets, history_tokens, prompt_offsets, prompt_tokens,
    // repetition_penalty_per_row, frequency_penalty_per_row,
    // presence_penalty_per_row, (repetition, frequency, presence)), each
    // array None or an array in the logits' memory. Every length is checked
    // here, and host offsets against their entry arrays, so that the library
    // never reads past an array; their contents are the library's to check.
    enum Processing : size_t { mask_array, bias_offsets, bias_tokens, bias_values,
                               history_offsets, history_tokens, prompt_offsets, prompt_tokens,
                               repetition_rows, frequency_rows, presence_rows,
                               penalty_scalars, processing_count };

    void attach_processing(Prepared &call, nb::handle object)
    {
        if (object.is_none())
            return;
        nb::tuple items = nb::borrow<nb::tuple>(object);
        if (items.size() != processing_count)
            fail(PSM_ERR_INTERNAL, "processing: expected " +
                                       std::to_string((int)processing_count) + " entries");
        psm_logit_processing &p = call.processing;
        psm_logit_processing_init(&p);
        nb::tuple penalties = nb::borrow<nb::tuple>(items[(size_t)penalty_scalars]);
        p.repetition_penalty = nb::cast<float>(penalties[0]);
        p.frequency_penalty = nb::cast<float>(penalties[1]);
        p.presence_penalty = nb::cast<float>(penalties[2]);

        const int64_t rows = call.params.row_indices ? call.params.output_rows : call.logits.rows;
        const psm_memory memory = call.logits.memory;
        const int32_t device = call.views.front().device_id;
        if (!items[(size_t)mask_array].is_none()) {
            call.views.push_back(view_of(items[(size_t)mask_array], "allowed_mask", false));
            const View &mask = call.views.back();
            if (mask.kind != kind_i32) // int32 (torch's) is read as the same 32 bits
                expect_kind(mask, kind_u32, "allowed_mask");
            if (mask.ndim != 2 || mask.shape[0] != rows || mask.shape[1] < 1)
                fail(PSM_ERR_INVALID_ARGUMENT, "allowed_mask must have shape (rows, words), "
                                               "one row per output row (" +
                                                   std::to_string(rows) + ")");
            if ((mask.shape[1] > 1 && mask.strides[1] != 1) ||
                (rows > 1 && mask.strides[0] != mask.shape[1]))
                fail(PSM_ERR_INVALID_ARGUMENT, "allowed_mask must be C-contiguous");
            same_memory(call.views, mask, "allowed_mask", memory, device);
            p.allowed_mask = (const uint32_t *)mask.data;
            p.allowed_mask_words = mask.shape[1];
        }
        const void *values = nullptr;
        row_lists(call, items, bias_offsets, bias_tokens, "logit_bias", rows, memory, device,
                  &p.bias_offsets, &p.bias_tokens, &values);
        p.bias_values = (const float *)values;
        row_lists(call, items, history_offsets, history_tokens, "history", rows, memory, device,
                  &p.history_offsets, &p.history_tokens, nullptr);
        row_lists(call, items, prompt_offsets, prompt_tokens, "prompt", rows, memory, device,
                  &p.prompt_offsets, &p.prompt_tokens, nullptr);
        p.repetition_penalty_per_row =
            (const float *)per_row(call.views, items[(size_t)repetition_rows], kind_f32,
                                   "repetition_penalty_per_row", rows, memory, device);
        p.frequency_penalty_per_row =
            (const float *)per_row(call.views, items[(size_t)frequency_rows], kind_f32,
                                   "frequency_penalty_per_row", rows, memory, device);
        p.presence_penalty_per_row =
            (const float *)per_row(call.views, items[(size_t)presence_rows], kind_f32,
                                   "presence_penalty_per_row", rows, memory, device);
        call.has_processing = true;
    }

    // The `top` tuple (polysample/__init__.py, _top_request): (count, mode,
    // top_tokens, top_logprobs, ranks): N, the psm_logprob_mode, the rows x N
    // int32 and float32 outputs and the optional rows x num_samples int32
    // ranks (None: not asked), shaped and placed like the tokens output.
    void attach_top(Prepared &call, nb::handle object)
    {
        if (object.is_none())
            return;
        if (call.mode != 0)
            fail(PSM_ERR_INTERNAL, "top: psm_sample only");
        nb::tuple items = nb::borrow<nb::tuple>(object);
        if (items.size() != 5)
            fail(PSM_ERR_INTERNAL, "top: expected 5 entries");
        psm_top_logprobs &top = call.top;
        top.count = nb::cast<int32_t>(items[0]);
        top.mode = (psm_logprob_mode)nb::cast<int>(items[1]);
        const size_t ndim = call.views.front().ndim == 2 || call.params.row_indices ? 2 : 1;
        const int64_t rows = call.params.row_indices ? call.params.output_rows : call.logits.rows;
        call.views.push_back(view_of(items[2], "top_tokens output", true));
        top.tokens = output(call.views.back(), kind_i32, "top_tokens output", ndim, rows,
                            top.count);
        call.views.push_back(view_of(items[3], "top_logprobs output", true));
        top.logprobs = output(call.views.back(), kind_f32, "top_logprobs output", ndim, rows,
                              top.count);
        if (!items[4].is_none()) {
            call.views.push_back(view_of(items[4], "ranks output", true));
            top.sampled_ranks = output(call.views.back(), kind_i32, "ranks output", ndim, rows,
                                       call.params.num_samples);
        }
        call.has_top = true;
        const bool any_host = top.tokens.memory == PSM_MEMORY_HOST ||
                              top.logprobs.memory == PSM_MEMORY_HOST ||
                              (top.sampled_ranks.data && top.sampled_ranks.memory == PSM_MEMORY_HOST);
        call.synchronize = call.synchronize || (any_host && backend_ != PSM_BACKEND_CPU);
    }

    void same_memory(const std::vector<View> &views, const View &view, const std::string &role,
                     psm_memory logits_memory, int32_t logits_device) const
    {
        psm_memory memory = memory_of(view, role.c_str());
        if (memory != logits_memory ||
            (memory == PSM_MEMORY_DEVICE && view.device_id != logits_device))
            fail(PSM_ERR_INVALID_ARGUMENT,
                 role + " must be in the same memory as the logits (" +
                     device_type_name(views.front().device_type) + ")");
    }

    // A 1-D contiguous array of `count` elements (any count when count < 0).
    const View &list_array(Prepared &call, nb::handle object, int kind, const std::string &role,
                           int64_t count, psm_memory memory, int32_t device)
    {
        call.views.push_back(view_of(object, role.c_str(), false));
        const View &view = call.views.back();
        expect_kind(view, kind, role.c_str());
        if (view.ndim != 1)
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be 1-D");
        if (count >= 0 && view.shape[0] != count)
            fail(PSM_ERR_INVALID_ARGUMENT, role + " has " + std::to_string(view.shape[0]) +
                                               " values; expected " + std::to_string(count));
        if (view.shape[0] > 1 && view.strides[0] != 1)
            fail(PSM_ERR_INVALID_ARGUMENT, role + " must be contiguous");
        same_memory(call.views, view, role, memory, device);
        return view;
    }

    // One CSR list argument: offsets (rows + 1, int64), tokens (int32) and,
    // for the bias, values (float32, one per token: the entry after tokens).
    void row_lists(Prepared &call, nb::tuple items, size_t offsets_at, size_t tokens_at,
                   const char *name, int64_t rows, psm_memory memory, int32_t device,
                   const int64_t **offsets_out, const int32_t **tokens_out,
                   const void **values_out)
    {
        // An empty array may come with no storage; the library takes a
        // missing entry array for a missing list, so it gets this instead.
        static const int32_t no_tokens[1] = {0};
        static const float no_values[1] = {0.0f};
        if (items[offsets_at].is_none())
            return;
        const std::string base(name);
        const View &offsets = list_array(call, items[offsets_at], kind_i64, base + " offsets",
                                         rows + 1, memory, device);
        const View &tokens =
            list_array(call, items[tokens_at], kind_i32, base + " tokens", -1, memory, device);
        const int64_t entries = tokens.shape[0];
        if (memory == PSM_MEMORY_HOST) {
            const std::string problem =
                list_offsets_problem((const int64_t *)offsets.data, rows, entries, base);
            if (!problem.empty())
                fail(PSM_ERR_INVALID_ARGUMENT, problem);
        }
        *offsets_out = (const int64_t *)offsets.data;
        *tokens_out = entries > 0 ? (const int32_t *)tokens.data : no_tokens;
        if (values_out) {
            const View &values = list_array(call, items[tokens_at + 1], kind_f32,
                                            base + " values", entries, memory, device);
            *values_out = entries > 0 ? values.data : (const void *)no_values;
        }
    }

    static void forward_notice(void *user_data, const char *message)
    {
        Context *self = (Context *)user_data;
        nb::gil_scoped_acquire acquire;
        try {
            self->notice_(std::string(message));
        } catch (nb::python_error &error) {
            error.discard_as_unraisable("polysample notice callback");
        }
    }

    psm_status execute(const Prepared &call)
    {
        const psm_params params = call.c_params();
        psm_status status = call.mode == 0
                                ? psm_sample(context_, &call.logits, &params, call.tokens,
                                             call.logprobs)
                                : psm_probs(context_, &call.logits, &params, &call.probs);
        if (status == PSM_OK && call.synchronize)
            status = psm_synchronize(context_);
        return status;
    }

    // Where `view` lives for this context's backend, or a failure naming `role`.
    psm_memory memory_of(const View &view, const char *role) const
    {
        const int32_t type = view.device_type;
        if (backend_ == PSM_BACKEND_CPU || backend_ == PSM_BACKEND_OPENCL) {
            if (is_host_memory(type) || (backend_ == PSM_BACKEND_CPU && type == dl_cuda_managed))
                return PSM_MEMORY_HOST;
        } else {
            const int32_t own = backend_ == PSM_BACKEND_CUDA ? dl_cuda : dl_rocm;
            if (is_host_memory(type))
                return PSM_MEMORY_HOST;
            if (type == own || (backend_ == PSM_BACKEND_CUDA && type == dl_cuda_managed)) {
                if (device_ < 0)
                    fail(PSM_ERR_INVALID_ARGUMENT,
                         std::string(role) + " is in device memory, but this context was "
                         "created without a device index (AUTO); create it with device=N");
                if (view.device_id != device_)
                    fail(PSM_ERR_WRONG_BACKEND,
                         std::string(role) + " is on device " + std::to_string(view.device_id) +
                             ", the context on device " + std::to_string(device_));
                return PSM_MEMORY_DEVICE;
            }
        }
        fail(PSM_ERR_WRONG_BACKEND,
             std::string(role) + " is in " + device_type_name(type) + " memory, which the " +
                 psm_backend_name((psm_backend)backend_) + " backend cannot read");
    }

    static void expect_kind(const View &view, int kind, const char *role)
    {
        if (view.kind != kind)
            fail(PSM_ERR_INVALID_ARGUMENT, std::string(role) + " must be " + kind_name(kind) +
                                               "; got " + kind_name(view.kind));
    }

    // A per-row array: 1-D, `rows` long, contiguous, in the logits' memory;
    // with single, one value (the seed or offset read when the call runs).
    const void *per_row(std::vector<View> &views, nb::handle object, int kind, const char *role,
                        int64_t rows, psm_memory logits_memory, int32_t logits_device,
                        bool single = false)
    {
        if (object.is_none())
            return nullptr;
        views.push_back(view_of(object, role, false));
        const View &view = views.back();
        if (kind == kind_u64 && view.kind == kind_i64)
            ; // seeds and offsets: int64 is read as the same 64 bits unsigned
        else if (kind == kind_u32 && view.kind == kind_i32)
            ; // subsequences: int32 is read as the same 32 bits unsigned
        else
            expect_kind(view, kind, role);
        if (single && (view.ndim != 1 || view.shape[0] != 1))
            fail(PSM_ERR_INVALID_ARGUMENT,
                 std::string(role) + " must be a 1-D array of one value");
        if (view.ndim != 1 || view.shape[0] != rows)
            fail(PSM_ERR_INVALID_ARGUMENT, std::string(role) + " must be 1-D with one value per "
                                           "row (" + std::to_string(rows) + ")");
        if (rows > 1 && view.strides[0] != 1)
            fail(PSM_ERR_INVALID_ARGUMENT, std::string(role) + " must be contiguous");
        psm_memory memory = memory_of(view, role);
        bool same_place = memory == logits_memory &&
                          (memory == PSM_MEMORY_HOST || view.device_id == logits_device);
        if (!same_place)
            fail(PSM_ERR_INVALID_ARGUMENT,
                 std::string(role) + " must be in the same memory as the logits (" +
                     device_type_name(views.front().device_type) + ")");
        return view.data;
    }

    // A rows x vocab tensor of logits (float32, float16 or bfloat16; 1-D is
    // one row) with a contiguous last dimension and rows that do not
    // overlap; its view is appended to `views`.
    psm_tensor logits_tensor(std::vector<View> &views, nb::handle object, const char *role)
    {
        views.push_back(view_of(object, role, false));
        const View &logits = views.back();
        const std::string name(role);
        if (logits.kind != kind_f32 && logits.kind != kind_f16 && logits.kind != kind_bf16)
            fail(PSM_ERR_INVALID_ARGUMENT, name + " must be float32, float16 or bfloat16; got " +
                                               kind_name(logits.kind));
        if (logits.ndim == 0)
            fail(PSM_ERR_INVALID_ARGUMENT, name + " must be 1-D or 2-D; got a scalar");
        const size_t last = logits.ndim - 1;
        const int64_t vocab = logits.shape[last];
        const int64_t rows = logits.ndim == 2 ? logits.shape[0] : 1;
        if (rows < 1 || vocab < 1)
            fail(PSM_ERR_INVALID_ARGUMENT, name + " must have at least one row and one column; "
                                                  "got shape (" + std::to_string(rows) + ", " +
                                                  std::to_string(vocab) + ")");
        if (vocab > 1 && logits.strides[last] != 1)
            fail(PSM_ERR_INVALID_ARGUMENT,
                 name + ": the last dimension must be contiguous (element stride 1, got " +
                     std::to_string(logits.strides[last]) +
                     "); copy it first, e.g. numpy.ascontiguousarray(x) or x.contiguous()");
        int64_t row_stride = vocab;
        if (rows > 1) {
            row_stride = logits.strides[0];
            if (row_stride < vocab)
                fail(PSM_ERR_INVALID_ARGUMENT,
                     name + ": the row stride (" + std::to_string(row_stride) +
                         " elements) is below the vocabulary (" + std::to_string(vocab) +
                         "): rows overlap or are broadcast; copy it first, e.g. "
                         "numpy.ascontiguousarray(x) or x.contiguous()");
        }
        psm_tensor tensor{};
        tensor.data = logits.data;
        tensor.dtype = logits.kind == kind_f32   ? PSM_DTYPE_F32
                       : logits.kind == kind_f16 ? PSM_DTYPE_F16
                                                 : PSM_DTYPE_BF16;
        tensor.memory = memory_of(logits, role);
        tensor.rows = rows;
        tensor.vocab = vocab;
        tensor.row_stride = row_stride;
        return tensor;
    }

    // psm_params_init, then the scalars.
    static void set_scalars(psm_params &params, const Scalars &scalars)
    {
        psm_params_init(&params);
        params.temperature = scalars.temperature;
        params.top_k = scalars.top_k;
        params.top_p = scalars.top_p;
        params.min_p = scalars.min_p;
        params.seed = scalars.seed;
        params.offset = scalars.offset;
        params.num_samples = scalars.num_samples;
        params.filter_order = scalars.filter_order;
    }

    // The per-row arrays of `arrays` (empty, or one entry per Arrays, each
    // None or an array of `rows` values in the logits' memory) into params;
    // `prefix` starts their names in messages ("draft_" for a draft's).
    void set_arrays(std::vector<View> &views, psm_params &params, nb::tuple arrays,
                    const std::string &prefix, int64_t rows, psm_memory memory, int32_t device)
    {
        if (arrays.size() == 0)
            return;
        if (arrays.size() != array_count)
            fail(PSM_ERR_INTERNAL, "arrays: expected " + std::to_string((int)array_count) +
                                       " entries");
        auto rows_array = [&](Arrays index, int kind, const char *name, bool single = false) {
            const std::string role = prefix + name;
            return per_row(views, arrays[(size_t)index], kind, role.c_str(),
                           single ? 1 : rows, memory, device, single);
        };
        params.temperature_per_row =
            (const float *)rows_array(temperature_rows, kind_f32, "temperature_per_row");
        params.top_k_per_row = (const int32_t *)rows_array(top_k_rows, kind_i32, "top_k_per_row");
        params.top_p_per_row = (const float *)rows_array(top_p_rows, kind_f32, "top_p_per_row");
        params.min_p_per_row = (const float *)rows_array(min_p_rows, kind_f32, "min_p_per_row");
        params.seed_per_row = (const uint64_t *)rows_array(seed_rows, kind_u64, "seed_per_row");
        params.offset_per_row =
            (const uint64_t *)rows_array(offset_rows, kind_u64, "offset_per_row");
        params.subsequence_per_row =
            (const uint32_t *)rows_array(subsequence_rows, kind_u32, "subsequence_per_row");
        params.row_indices = (const int64_t *)rows_array(row_indices, kind_i64, "row_indices");
        params.seed_pointer =
            (const uint64_t *)rows_array(seed_tensor, kind_u64, "seed_tensor", true);
        params.offset_pointer =
            (const uint64_t *)rows_array(offset_tensor, kind_u64, "offset_tensor", true);
    }

    Prepared prepare(int mode, nb::handle logits_object, const Scalars &scalars,
                     nb::tuple arrays, nb::handle out_object, nb::handle logprobs_object)
    {
        if (arrays.size() != 0 && arrays.size() != array_count)
            fail(PSM_ERR_INTERNAL, "arrays: expected " + std::to_string((int)array_count) +
                                       " entries");
        auto array = [&](Arrays index) -> nb::handle {
            return arrays.size() == 0 ? nb::handle(Py_None) : nb::handle(arrays[(size_t)index]);
        };
        Prepared call;
        call.mode = mode;
        call.views.reserve(32);
        call.logits = logits_tensor(call.views, logits_object, "logits");
        const View &logits = call.views.front();
        const int64_t vocab = call.logits.vocab;
        const int64_t rows = call.logits.rows;
        const psm_memory logits_memory = call.logits.memory;
        const int32_t logits_device = logits.device_id;

        set_scalars(call.params, scalars);
        const int32_t num_samples = scalars.num_samples;
        if (num_samples < 1)
            fail(PSM_ERR_INVALID_PARAMETER,
                 "num_samples is " + std::to_string(num_samples) + "; expected >= 1");

        // Output rows: the entries of row_indices, else the logits' rows.
        // With row indices the outputs are 2-D, one row per entry.
        int64_t out_rows = rows;
        size_t out_ndim = logits.ndim;
        if (!array(row_indices).is_none()) {
            call.views.push_back(view_of(array(row_indices), "row_indices", false));
            const View &indices = call.views.back();
            expect_kind(indices, kind_i64, "row_indices");
            if (indices.ndim != 1 || indices.shape[0] < 1)
                fail(PSM_ERR_INVALID_ARGUMENT,
                     "row_indices must be 1-D with at least one entry");
            out_rows = indices.shape[0];
            out_ndim = 2;
            call.views.pop_back(); // read again below with the per-row checks
        }
        set_arrays(call.views, call.params, arrays, "", out_rows, logits_memory, logits_device);
        call.params.output_rows = call.params.row_indices ? out_rows : 0;

        bool any_host = logits_memory == PSM_MEMORY_HOST;
        if (mode == 0) {
            call.views.push_back(view_of(out_object, "tokens output", true));
            call.tokens = output(call.views.back(), kind_i32, "tokens output", out_ndim,
                                 out_rows, num_samples);
            any_host = any_host || call.tokens.memory == PSM_MEMORY_HOST;
            if (!logprobs_object.is_none()) {
                call.views.push_back(view_of(logprobs_object, "logprobs output", true));
                call.logprobs = output(call.views.back(), kind_f32, "logprobs output", out_ndim,
                                       out_rows, num_samples);
                any_host = any_host || call.logprobs.memory == PSM_MEMORY_HOST;
            }
        } else {
            call.views.push_back(view_of(out_object, "probs output", true));
            const View &probs = call.views.back();
            expect_kind(probs, kind_f32, "probs output");
            if (probs.ndim != out_ndim || (out_ndim == 2 && probs.shape[0] != out_rows) ||
                probs.shape[out_ndim - 1] != vocab)
                fail(PSM_ERR_INVALID_ARGUMENT,
                     call.params.row_indices ? "probs output must have shape "
                                               "(len(row_indices), vocab)"
                                             : "probs output must have the logits' shape");
            if (vocab > 1 && probs.strides[out_ndim - 1] != 1)
                fail(PSM_ERR_INVALID_ARGUMENT, "probs output: the last dimension must be "
                                               "contiguous");
            int64_t probs_stride = out_rows > 1 ? probs.strides[0] : vocab;
            if (probs_stride < vocab)
                fail(PSM_ERR_INVALID_ARGUMENT, "probs output: the row stride is below the "
                                               "vocabulary");
            call.probs.data = probs.data;
            call.probs.dtype = PSM_DTYPE_F32;
            call.probs.memory = memory_of(probs, "probs output");
            call.probs.rows = out_rows;
            call.probs.vocab = vocab;
            call.probs.row_stride = probs_stride;
            any_host = any_host || call.probs.memory == PSM_MEMORY_HOST;
        }
        // Host results must be complete when Python sees them, and host
        // inputs must outlive the copies that a device backend queues.
        call.synchronize = any_host && backend_ != PSM_BACKEND_CPU;
        return call;
    }

    // A rows x num_samples output, C-contiguous: of shape
    // logits.shape[:-1] + (num_samples,), or (len(row_indices), num_samples).
    psm_output output(const View &view, int kind, const char *role, size_t ndim, int64_t rows,
                      int32_t num_samples) const
    {
        expect_kind(view, kind, role);
        bool shape_ok = view.ndim == ndim && view.shape[view.ndim - 1] == num_samples &&
                        (view.ndim == 1 || view.shape[0] == rows);
        if (!shape_ok)
            fail(PSM_ERR_INVALID_ARGUMENT,
                 std::string(role) + " must have shape (rows, num_samples): rows of the "
                 "logits, or len(row_indices)");
        bool contiguous = (num_samples == 1 || view.strides[view.ndim - 1] == 1) &&
                          (view.ndim == 1 || view.shape[0] == 1 || view.strides[0] == num_samples);
        if (!contiguous)
            fail(PSM_ERR_INVALID_ARGUMENT, std::string(role) + " must be C-contiguous");
        return psm_output{view.data, memory_of(view, role)};
    }

    psm_context *context_ = nullptr;
    int backend_ = PSM_BACKEND_AUTO;
    int device_ = -1;
    std::mutex mutex_;
    nb::object notice_;
};

// Sets the calling thread's CUDA stream-capture mode (0 global, 1 thread
// local, 2 relaxed) and returns the previous one; -1 when no CUDA driver is
// loaded. polysample/torch.py relaxes it while creating a context during a
// CUDA-graph capture, when the library's workspace allocation would
// otherwise be refused.
int exchange_capture_mode(int mode)
{
    static exchange_capture_mode_fn exchange = find_exchange_capture_mode();
    if (!exchange)
        return -1;
    int previous = mode;
    if (exchange(&previous) != 0)
        fail(PSM_ERR_DRIVER, "cuThreadExchangeStreamCaptureMode failed");
    return previous;
}

nb::dict backend_info()
{
    nb::dict backends;
    for (int backend = PSM_BACKEND_CPU; backend < PSM_BACKEND_COUNT; ++backend) {
        const char *reason = "";
        nb::dict entry;
        bool compiled = psm_backend_compiled((psm_backend)backend) != 0;
        bool available = psm_backend_available((psm_backend)backend, &reason) != 0;
        entry["compiled"] = compiled;
        entry["available"] = available;
        entry["reason"] = std::string(reason ? reason : "");
        entry["devices"] = available ? psm_backend_device_count((psm_backend)backend) : 0;
        backends[psm_backend_name((psm_backend)backend)] = entry;
    }
    return backends;
}

PyObject *error_class = nullptr;

} // namespace

NB_MODULE(_core, module)
{
    module.doc() = "polysample's extension; use the `polysample` package instead.";
    nb::set_leak_warnings(false); // cached contexts live until the interpreter exits

    nb::register_exception_translator([](const std::exception_ptr &pointer, void *) {
        try {
            std::rethrow_exception(pointer);
        } catch (const Failure &failure) {
            if (!error_class) {
                nb::object errors = nb::module_::import_("polysample._errors");
                error_class = nb::object(errors.attr("Error")).release().ptr();
            }
            nb::object exception = nb::handle(error_class)(
                status_name(failure.status), failure.message, (int)failure.status);
            PyErr_SetObject(error_class, exception.ptr());
        }
    });

    nb::class_<Context>(module, "Context")
        .def(nb::init<int, int, bool, uintptr_t, int, nb::object>(), nb::arg("backend"),
             nb::arg("device"), nb::arg("check_rows"), nb::arg("native_stream"),
             nb::arg("cpu_threads"), nb::arg("notice").none())
        .def_prop_ro("backend", &Context::backend)
        .def_prop_ro("device_name", &Context::device_name)
        .def_prop_ro("selection_reason", &Context::selection_reason)
        .def("reserve", &Context::reserve)
        .def("synchronize", &Context::synchronize)
        .def("run", &Context::run, nb::arg("mode"), nb::arg("logits"), nb::arg("scalars"),
             nb::arg("arrays"), nb::arg("out"), nb::arg("logprobs_out").none(),
             nb::arg("workspace").none(), nb::arg("processing").none() = nb::none(),
             nb::arg("top").none() = nb::none())
        .def("workspace_size", &Context::workspace_size, nb::arg("mode"), nb::arg("logits"),
             nb::arg("scalars"), nb::arg("arrays"), nb::arg("out"),
             nb::arg("logprobs_out").none(), nb::arg("processing").none() = nb::none(),
             nb::arg("top").none() = nb::none())
        .def("verify", &Context::verify, nb::arg("target"), nb::arg("scalars"),
             nb::arg("arrays"), nb::arg("drafts"), nb::arg("draft_params").none(),
             nb::arg("outputs"))
        .def("time_sample", &Context::time_sample)
        .def("sharded", &Context::sharded, nb::arg("logits"), nb::arg("first_token"),
             nb::arg("full_vocab"), nb::arg("shard_index"), nb::arg("shard_count"),
             nb::arg("scalars"), nb::arg("arrays"), nb::arg("output_rows"),
             nb::rv_policy::take_ownership);

    nb::class_<Sharded>(module, "Sharded")
        .def("next", &Sharded::next, nb::arg("gathered").none())
        .def("outputs", &Sharded::outputs);

    module.def("backend_info", &backend_info);
    module.def("exchange_capture_mode", &exchange_capture_mode);
    module.def("version", [] { return std::string(psm_version_string()); });
    module.def("max_top_logprobs", [] { return (int)PSM_MAX_TOP_LOGPROBS; });
    module.def("backend_name", [](int backend) {
        return std::string(psm_backend_name((psm_backend)backend));
    });
}
