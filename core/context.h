/* context.h: what a psm_context holds (core-private). */
#ifndef PSM_CONTEXT_H
#define PSM_CONTEXT_H

#include "backend.h"

struct psm_context {
    psm_backend backend;
    const psm_backend_ops *ops;
    void *state;               /* the backend's own */
    int check_rows;
    char device_name[256];
    char selection_reason[2048];
};

#endif /* PSM_CONTEXT_H */
