/* environment.c: reading and parsing polysample's environment variables. */
#include "environment.h"

#include "error.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static const char *const backend_names[PSM_BACKEND_COUNT] = {"auto", "cpu", "cuda", "hip",
                                                             "opencl"};

const char *psm_backend_name(psm_backend backend)
{
    if ((int)backend < 0 || (int)backend >= PSM_BACKEND_COUNT)
        return "unknown";
    return backend_names[backend];
}

psm_status psm_parse_backend_spec(const char *spec, psm_backend *backend, int *device_index)
{
    const char *colon = strchr(spec, ':');
    size_t name_length = colon ? (size_t)(colon - spec) : strlen(spec);
    int found = -1;
    for (int candidate = 0; candidate < PSM_BACKEND_COUNT; ++candidate) {
        if (strlen(backend_names[candidate]) == name_length &&
            strncmp(spec, backend_names[candidate], name_length) == 0)
            found = candidate;
    }
    if (found < 0)
        return psm_set_error(PSM_ERR_ENVIRONMENT,
                             "unknown backend '%.*s' in '%s' (expected auto, cpu, cuda, hip "
                             "or opencl, optionally followed by :N)",
                             (int)name_length, spec, spec);
    *device_index = -1;
    if (colon) {
        /* Decimal digits only: no sign, spaces or 0x (as the tool's options). */
        const char *digits = colon + 1;
        size_t digit_count = strspn(digits, "0123456789");
        char *end = NULL;
        errno = 0;
        long index = strtol(digits, &end, 10);
        if (digit_count == 0 || digits[digit_count] != '\0' || *end != '\0' || errno != 0 ||
            index > 1000000)
            return psm_set_error(PSM_ERR_ENVIRONMENT,
                                 "bad device index '%s' in '%s' (expected a number >= 0)",
                                 colon + 1, spec);
        *device_index = (int)index;
    }
    *backend = (psm_backend)found;
    return PSM_OK;
}

psm_status psm_environment_read(psm_environment *environment, int read_backend)
{
    memset(environment, 0, sizeof *environment);
    environment->device_index = -1;
    environment->backend = PSM_BACKEND_AUTO;
    const char *source_dir = getenv("POLYSAMPLE_OPENCL_SOURCE_DIR");
    environment->opencl_source_dir = (source_dir && source_dir[0]) ? source_dir : NULL;
    /* A backend named in the options is the caller's choice: the variable is
     * not read at all then, so a stale or malformed value cannot break it. */
    const char *spec = read_backend ? getenv("POLYSAMPLE_BACKEND") : NULL;
    if (!spec || !spec[0])
        return PSM_OK;
    psm_status status =
        psm_parse_backend_spec(spec, &environment->backend, &environment->device_index);
    if (status != PSM_OK) {
        char detail[512];
        strncpy(detail, psm_last_error(), sizeof detail - 1);
        detail[sizeof detail - 1] = '\0';
        return psm_set_error(status, "POLYSAMPLE_BACKEND: %s", detail);
    }
    environment->backend_set = 1;
    return PSM_OK;
}
