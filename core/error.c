/* error.c: the thread-local message behind psm_last_error(). */
#include "error.h"

#include <stdarg.h>
#include <stdio.h>

#define PSM_ERROR_MESSAGE_SIZE 4096

static _Thread_local char last_error_message[PSM_ERROR_MESSAGE_SIZE];

psm_status psm_set_error(psm_status status, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(last_error_message, sizeof last_error_message, format, args);
    va_end(args);
    return status;
}

psm_status psm_set_error_message(psm_status status, const char *message)
{
    snprintf(last_error_message, sizeof last_error_message, "%s", message);
    return status;
}

void psm_clear_error(void)
{
    last_error_message[0] = '\0';
}

const char *psm_last_error(void)
{
    return last_error_message;
}

const char *psm_status_string(psm_status status)
{
    switch (status) {
    case PSM_OK: return "success";
    case PSM_ERR_INVALID_ARGUMENT: return "invalid argument";
    case PSM_ERR_INVALID_PARAMETER: return "sampling parameter out of range";
    case PSM_ERR_UNSUPPORTED: return "not supported by this backend";
    case PSM_ERR_BACKEND_NOT_COMPILED: return "backend not compiled in";
    case PSM_ERR_NO_DEVICE: return "no usable device for this backend";
    case PSM_ERR_DRIVER: return "driver or runtime error";
    case PSM_ERR_OUT_OF_MEMORY: return "out of memory";
    case PSM_ERR_BAD_ROW: return "a row has a NaN or +inf logit, or no finite logit";
    case PSM_ERR_WRONG_BACKEND: return "memory belongs to another backend";
    case PSM_ERR_ENVIRONMENT: return "bad environment variable";
    case PSM_ERR_INTERNAL: return "internal error (a bug in polysample)";
    }
    return "unknown status";
}
