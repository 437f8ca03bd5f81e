/*
 * module.h: how the core loads a GPU backend at run time.
 *
 * The core library (core/ and the CPU backend) needs only libc, libm and
 * OpenMP. Each GPU backend is a separate shared module, libpolysample-<name>.so,
 * linked against its vendor runtime; the core dlopens it the first time a
 * context or a query needs that backend, so a machine without the runtime
 * loses only that backend, with the loader's reason, never the library.
 *
 * A module exports one symbol, PSM_MODULE_ENTRY_NAME. The core calls it with
 * a psm_module_host (the services a backend needs from the core: the
 * thread-local error message, the environment read at context creation and,
 * in test builds, the allocation-failure hook),
 * and gets the backend's psm_backend_ops. Modules are never unloaded.
 */
#ifndef PSM_MODULE_H
#define PSM_MODULE_H

#include "backend.h"
#include "environment.h"

#define PSM_MODULE_API_VERSION 2
#define PSM_MODULE_ENTRY_NAME "psm_backend_module_entry"

typedef struct psm_module_host {
    int api_version;
    psm_status (*set_error)(psm_status status, const char *message);
    void (*clear_error)(void);
    const char *(*last_error)(void);
    const psm_environment *(*environment_of_creation)(void);
    /* Test builds (PSM_FAULT_INJECTION, core/alloc.h): 1 when this host
     * (device = 0) or device (device = 1) allocation of the calling thread
     * is the one armed to fail. NULL in every other build. */
    int (*fault_allocation)(int device);
} psm_module_host;

typedef const psm_backend_ops *(*psm_module_entry_fn)(const psm_module_host *host);

/* In a module (core/module_client.c): keeps host for psm_set_error and
 * friends; returns 0 when the host speaks another module API version. */
int psm_module_client_attach(const psm_module_host *host);

/* Defines a module's entry point, returning ops. The only symbol a module
 * exports (each module's link uses core/module.map). */
#define PSM_DEFINE_BACKEND_MODULE(ops)                                                       \
    __attribute__((visibility("default"))) const psm_backend_ops *psm_backend_module_entry(  \
        const psm_module_host *host);                                                        \
    const psm_backend_ops *psm_backend_module_entry(const psm_module_host *host)             \
    {                                                                                        \
        return psm_module_client_attach(host) ? &(ops) : NULL;                               \
    }

#endif /* PSM_MODULE_H */
