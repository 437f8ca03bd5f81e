/* module_client.c: a backend module's side of core/error.h and
 * core/environment.h, forwarded to the core that loaded it (core/module.h),
 * so that a module's messages reach the caller's psm_last_error(). */
#include "alloc.h"
#include "error.h"
#include "module.h"

#include <stdarg.h>
#include <stdio.h>

/* Set once, by the entry point, before any other call into the module. */
static const psm_module_host *module_host;

int psm_module_client_attach(const psm_module_host *host)
{
    if (!host || host->api_version != PSM_MODULE_API_VERSION)
        return 0;
    module_host = host;
    return 1;
}

psm_status psm_set_error(psm_status status, const char *format, ...)
{
    char message[4096];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    return module_host->set_error(status, message);
}

void psm_clear_error(void)
{
    module_host->clear_error();
}

const char *psm_last_error(void)
{
    return module_host->last_error();
}

const psm_environment *psm_environment_of_creation(void)
{
    return module_host->environment_of_creation();
}

#ifdef PSM_FAULT_INJECTION
/* A module built for fault injection needs a core that was too. */
int psm_fault_host_allocation(void)
{
    return module_host->fault_allocation ? module_host->fault_allocation(0) : 0;
}

int psm_fault_device_allocation(void)
{
    return module_host->fault_allocation ? module_host->fault_allocation(1) : 0;
}
#endif
