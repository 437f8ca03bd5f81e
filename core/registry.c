/*
 * registry.c: the backends of this build. The CPU backend is part of the
 * core; each GPU backend that was built (CMake sets PSM_HAVE_<X>=1) is a
 * module, libpolysample-<name>.so, loaded on first use (core/module.h).
 *
 * Where a module is looked for, in order: each directory of
 * POLYSAMPLE_BACKEND_PATH (colon-separated), the directory of the file that
 * holds the core (libpolysample.so, or the program a static core is linked
 * into), and the library directory of the installation (PSM_MODULE_DIR).
 * The first file that exists is loaded; if it cannot be loaded (its vendor
 * runtime is missing, say), that is the backend's reason.
 */
#define _GNU_SOURCE /* dladdr */
#include "alloc.h"
#include "backend.h"
#include "context.h"
#include "error.h"
#include "module.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef PSM_HAVE_CUDA
#define PSM_HAVE_CUDA 0
#endif
#ifndef PSM_HAVE_HIP
#define PSM_HAVE_HIP 0
#endif
#ifndef PSM_HAVE_OPENCL
#define PSM_HAVE_OPENCL 0
#endif
#ifndef PSM_MODULE_DIR
#define PSM_MODULE_DIR ""
#endif

extern const psm_backend_ops psm_cpu_ops;

typedef struct module_slot {
    int built;                  /* the module was built with this core */
    const char *file_name;
    int attempted;              /* guarded by module_lock */
    const psm_backend_ops *ops; /* NULL until loaded */
    char failure[768];          /* why it could not be loaded */
} module_slot;

static module_slot module_slots[PSM_BACKEND_COUNT] = {
    [PSM_BACKEND_CUDA] = {PSM_HAVE_CUDA, "libpolysample-cuda.so", 0, NULL, ""},
    [PSM_BACKEND_HIP] = {PSM_HAVE_HIP, "libpolysample-hip.so", 0, NULL, ""},
    [PSM_BACKEND_OPENCL] = {PSM_HAVE_OPENCL, "libpolysample-opencl.so", 0, NULL, ""},
};
static pthread_mutex_t module_lock = PTHREAD_MUTEX_INITIALIZER;

#ifdef PSM_FAULT_INJECTION
static int fault_allocation(int device)
{
    return device ? psm_fault_device_allocation() : psm_fault_host_allocation();
}
#endif

static const psm_module_host module_host = {
    .api_version = PSM_MODULE_API_VERSION,
    .set_error = psm_set_error_message,
    .clear_error = psm_clear_error,
    .last_error = psm_last_error,
    .environment_of_creation = psm_environment_of_creation,
#ifdef PSM_FAULT_INJECTION
    .fault_allocation = fault_allocation,
#else
    .fault_allocation = NULL,
#endif
};

/* dir/file_name into path; 1 when the file exists. */
static int module_path(const char *dir, size_t dir_length, const char *file_name, char *path,
                       size_t path_size)
{
    if (dir_length == 0)
        return 0;
    int written = snprintf(path, path_size, "%.*s/%s", (int)dir_length, dir, file_name);
    return written > 0 && (size_t)written < path_size && access(path, F_OK) == 0;
}

/* The directory holding the core's code, for modules installed beside it. */
static size_t core_directory(char *dir, size_t dir_size)
{
    Dl_info info;
    if (!dladdr((const void *)&psm_registry_lookup, &info) || !info.dli_fname)
        return 0;
    const char *slash = strrchr(info.dli_fname, '/');
    if (!slash)
        return 0;
    size_t length = (size_t)(slash - info.dli_fname);
    if (length == 0 || length >= dir_size)
        return 0;
    memcpy(dir, info.dli_fname, length);
    dir[length] = '\0';
    return length;
}

static int find_module(const char *file_name, char *path, size_t path_size, char *searched,
                       size_t searched_size)
{
    const char *list = getenv("POLYSAMPLE_BACKEND_PATH");
    size_t used = 0;
    searched[0] = '\0';
    while (list && *list) {
        size_t length = strcspn(list, ":");
        if (module_path(list, length, file_name, path, path_size))
            return 1;
        if (length && used < searched_size)
            used += (size_t)snprintf(searched + used, searched_size - used, "%s%.*s",
                                     used ? ", " : "", (int)length, list);
        list += length + (list[length] == ':');
    }
    char dir[4096];
    size_t dir_length = core_directory(dir, sizeof dir);
    if (module_path(dir, dir_length, file_name, path, path_size))
        return 1;
    if (dir_length && used < searched_size)
        used += (size_t)snprintf(searched + used, searched_size - used, "%s%s",
                                 used ? ", " : "", dir);
    if (module_path(PSM_MODULE_DIR, strlen(PSM_MODULE_DIR), file_name, path, path_size))
        return 1;
    if (PSM_MODULE_DIR[0] && strcmp(PSM_MODULE_DIR, dir) != 0 && used < searched_size)
        snprintf(searched + used, searched_size - used, "%s%s", used ? ", " : "",
                 PSM_MODULE_DIR);
    return 0;
}

static void load_module(psm_backend backend, module_slot *slot)
{
    char path[4096], searched[512];
    if (!find_module(slot->file_name, path, sizeof path, searched, sizeof searched)) {
        snprintf(slot->failure, sizeof slot->failure, "module %s not found (looked in %.600s)",
                 slot->file_name, searched[0] ? searched : "no directory");
        return;
    }
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        const char *why = dlerror();
        snprintf(slot->failure, sizeof slot->failure, "cannot load %.400s: %.300s", path,
                 why ? why : "unknown reason");
        return;
    }
    psm_module_entry_fn entry = NULL;
    *(void **)&entry = dlsym(handle, PSM_MODULE_ENTRY_NAME);
    const psm_backend_ops *ops = entry ? entry(&module_host) : NULL;
    if (!ops || ops->api_version != PSM_BACKEND_API_VERSION || ops->id != backend) {
        snprintf(slot->failure, sizeof slot->failure,
                 "%.600s is not a polysample %s module of this version", path,
                 psm_backend_name(backend));
        dlclose(handle);
        return;
    }
    slot->ops = ops;
}

int psm_registry_built(psm_backend backend)
{
    if (backend == PSM_BACKEND_CPU)
        return 1;
    if ((int)backend <= PSM_BACKEND_CPU || (int)backend >= PSM_BACKEND_COUNT)
        return 0;
    return module_slots[backend].built;
}

const psm_backend_ops *psm_registry_lookup(psm_backend backend)
{
    return psm_registry_load(backend, NULL);
}

const psm_backend_ops *psm_registry_load(psm_backend backend, const char **failure)
{
    if (failure)
        *failure = "";
    if (backend == PSM_BACKEND_CPU)
        return &psm_cpu_ops;
    if (!psm_registry_built(backend)) {
        if (failure)
            *failure = "not built (toolchain missing or turned off at configure time)";
        return NULL;
    }
    module_slot *slot = &module_slots[backend];
    pthread_mutex_lock(&module_lock);
    if (!slot->attempted) {
        slot->attempted = 1;
        load_module(backend, slot);
    }
    pthread_mutex_unlock(&module_lock);
    if (!slot->ops && failure)
        *failure = slot->failure;
    return slot->ops;
}
