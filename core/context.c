/* context.c: creating a context, including run-time backend selection. */
#include "context.h"

#include "alloc.h"
#include "environment.h"
#include "error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* AUTO's preference: the fastest kind of device first, the CPU last. An
 * OpenCL CPU device (PoCL) is never AUTO's choice: the CPU backend is faster
 * on the same cores and needs no kernel compilation (it is used when named). */
static const psm_backend auto_order[] = {PSM_BACKEND_CUDA, PSM_BACKEND_HIP, PSM_BACKEND_OPENCL,
                                         PSM_BACKEND_CPU};

static _Thread_local const psm_environment *environment_of_creation;

const psm_environment *psm_environment_of_creation(void)
{
    return environment_of_creation;
}

void psm_context_options_init(psm_context_options *options)
{
    if (!options)
        return;
    memset(options, 0, sizeof *options);
    options->backend = PSM_BACKEND_AUTO;
    options->device_index = -1;
}

int psm_backend_compiled(psm_backend backend)
{
    return psm_registry_built(backend);
}

/* Loads (if need be) and probes a backend: 1 when it has a device. reason
 * says why not, or summarises the devices. */
static int probe_backend(psm_backend backend, int *device_count, int *auto_device_count,
                         char *reason, size_t reason_size)
{
    const char *failure = "";
    const psm_backend_ops *ops = psm_registry_load(backend, &failure);
    *device_count = 0;
    *auto_device_count = 0;
    reason[0] = '\0';
    if (!ops) {
        snprintf(reason, reason_size, "%s", failure);
        return 0;
    }
    int available = ops->probe(device_count, auto_device_count, reason, reason_size) &&
                    *device_count > 0;
    if (!available) {
        *device_count = 0;
        *auto_device_count = 0;
        if (reason[0] == '\0')
            snprintf(reason, reason_size, "no device found");
    } else if (reason[0] == '\0') {
        snprintf(reason, reason_size, "%d device(s)", *device_count);
    }
    return available;
}

static _Thread_local char availability_reason[768];

int psm_backend_available(psm_backend backend, const char **reason)
{
    int device_count = 0, auto_device_count = 0;
    int available = probe_backend(backend, &device_count, &auto_device_count,
                                  availability_reason, sizeof availability_reason);
    if (reason)
        *reason = availability_reason;
    return available;
}

int psm_backend_device_count(psm_backend backend)
{
    char reason[768];
    int device_count = 0, auto_device_count = 0;
    probe_backend(backend, &device_count, &auto_device_count, reason, sizeof reason);
    return device_count;
}

/* Checks that a named backend can run on device_index; the failure says why. */
static psm_status check_named_backend(psm_backend backend, int device_index)
{
    if (!psm_registry_built(backend))
        return psm_set_error(PSM_ERR_BACKEND_NOT_COMPILED,
                             "the %s backend is not compiled into this build (its toolchain was "
                             "missing or it was turned off at configure time)",
                             psm_backend_name(backend));
    char reason[768];
    int device_count = 0, auto_device_count = 0;
    if (!probe_backend(backend, &device_count, &auto_device_count, reason, sizeof reason))
        return psm_set_error(PSM_ERR_NO_DEVICE, "the %s backend is not available: %s",
                             psm_backend_name(backend), reason);
    if (device_index >= device_count)
        return psm_set_error(PSM_ERR_NO_DEVICE,
                             "device index %d asked for, but the %s backend has %d device(s)",
                             device_index, psm_backend_name(backend), device_count);
    return PSM_OK;
}

/* Picks the backend and device, and says why, without creating anything. */
static psm_status select_backend(const psm_context_options *options,
                                 const psm_environment *environment, psm_backend *backend_out,
                                 int *device_index_out, char *why, size_t why_size)
{
    psm_backend backend = options->backend;
    int device_index = options->device_index;
    if (backend == PSM_BACKEND_AUTO && environment->backend_set &&
        environment->backend != PSM_BACKEND_AUTO) {
        backend = environment->backend;
        if (device_index < 0)
            device_index = environment->device_index;
        snprintf(why, why_size, "POLYSAMPLE_BACKEND asks for %s", psm_backend_name(backend));
    } else if (backend == PSM_BACKEND_AUTO) {
        if (device_index < 0 && environment->backend_set)
            device_index = environment->device_index;
        size_t used = (size_t)snprintf(why, why_size, "auto:");
        for (size_t i = 0; i < sizeof auto_order / sizeof auto_order[0]; ++i) {
            char reason[768];
            int device_count = 0, auto_device_count = 0;
            probe_backend(auto_order[i], &device_count, &auto_device_count, reason,
                          sizeof reason);
            if (auto_device_count > 0) {
                backend = auto_order[i];
                if (used < why_size)
                    snprintf(why + used, why_size - used, " %s is available (%s)",
                             psm_backend_name(backend), reason);
                break;
            }
            if (used < why_size)
                used += (size_t)snprintf(why + used, why_size - used, " %s skipped (%s);",
                                         psm_backend_name(auto_order[i]), reason);
        }
        if (backend == PSM_BACKEND_AUTO)
            return psm_set_error(PSM_ERR_INTERNAL, "no backend available, not even the CPU");
    } else {
        snprintf(why, why_size, "requested");
    }
    if (device_index < 0)
        device_index = 0;
    psm_status status = check_named_backend(backend, device_index);
    if (status != PSM_OK)
        return status;
    *backend_out = backend;
    *device_index_out = device_index;
    return PSM_OK;
}

psm_status psm_context_create(const psm_context_options *options, psm_context **context_out)
{
    psm_clear_error();
    if (!context_out)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "context_out is NULL");
    psm_context_options defaults;
    if (!options) {
        psm_context_options_init(&defaults);
        options = &defaults;
    }
    if ((int)options->backend < 0 || (int)options->backend >= PSM_BACKEND_COUNT)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "unknown backend value %d",
                             (int)options->backend);
    /* Each CPU thread gets its own workspace (about 200 KB) at creation: an
     * unchecked count would have a typo allocate gigabytes. */
    if (options->cpu_threads < 0 || options->cpu_threads > PSM_MAX_CPU_THREADS)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "cpu_threads is %d; expected 0 .. %d (0: OpenMP's default)",
                             options->cpu_threads, PSM_MAX_CPU_THREADS);

    psm_environment environment;
    psm_status status =
        psm_environment_read(&environment, options->backend == PSM_BACKEND_AUTO);
    if (status != PSM_OK)
        return status;

    psm_context *context = psm_alloc_zeroed(1, sizeof *context);
    if (!context)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot allocate a context");
    int device_index = 0;
    status = select_backend(options, &environment, &context->backend, &device_index,
                            context->selection_reason, sizeof context->selection_reason);
    if (status == PSM_OK) {
        context->ops = psm_registry_load(context->backend, NULL);
        context->check_rows = options->check_rows != 0;
        environment_of_creation = &environment;
        status = context->ops->create(options, device_index, &context->state,
                                      context->device_name, sizeof context->device_name);
        environment_of_creation = NULL;
    }
    if (status != PSM_OK) {
        psm_free(context);
        return status;
    }
    *context_out = context;
    return PSM_OK;
}

void psm_context_destroy(psm_context *context)
{
    if (!context)
        return;
    context->ops->destroy(context->state);
    psm_free(context);
}

psm_backend psm_context_backend(const psm_context *context)
{
    return context ? context->backend : PSM_BACKEND_AUTO;
}

const char *psm_context_device_name(const psm_context *context)
{
    return context ? context->device_name : "";
}

const char *psm_context_selection_reason(const psm_context *context)
{
    return context ? context->selection_reason : "";
}
