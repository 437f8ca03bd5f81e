/*
 * environment.h: the one place polysample reads environment variables.
 * Each is read once per context, at psm_context_create (see README).
 *
 *   POLYSAMPLE_BACKEND             cpu | cuda | hip | opencl, optionally ":N"
 *                                  for a device index; consulted by AUTO only.
 *   POLYSAMPLE_OPENCL_SOURCE_DIR   development mode: the OpenCL backend reads
 *                                  its kernel sources from this source tree
 *                                  instead of the copies embedded at build time.
 */
#ifndef PSM_ENVIRONMENT_H
#define PSM_ENVIRONMENT_H

#include "polysample.h"

typedef struct psm_environment {
    int backend_set;          /* POLYSAMPLE_BACKEND present and non-empty */
    psm_backend backend;
    int device_index;         /* -1 when no ":N" */
    const char *opencl_source_dir; /* NULL when unset */
} psm_environment;

/* Reads the variables; POLYSAMPLE_BACKEND only when read_backend is nonzero
 * (the options ask for AUTO). PSM_ERR_ENVIRONMENT (with a message) when it
 * cannot be parsed. */
psm_status psm_environment_read(psm_environment *environment, int read_backend);

/* Parses "name" or "name:N"; shared by the environment and the CLI's
 * --backend through psm_backend_from_name below. */
psm_status psm_parse_backend_spec(const char *spec, psm_backend *backend, int *device_index);

/* The environment read for the context being created, for a backend's
 * create function (e.g. the OpenCL development mode); NULL elsewhere. */
const psm_environment *psm_environment_of_creation(void);

#endif /* PSM_ENVIRONMENT_H */
