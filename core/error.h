/*
 * error.h: the thread-local detailed message behind psm_last_error().
 * Every failing path in core/ and backends/ goes through psm_set_error, so a
 * status always comes with a message naming what was wrong.
 */
#ifndef PSM_ERROR_H
#define PSM_ERROR_H

#include "polysample.h"

#if defined(__GNUC__)
#define PSM_PRINTF_LIKE(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define PSM_PRINTF_LIKE(fmt, args)
#endif

/* Records the message for this thread and returns status, so that
 * `return psm_set_error(PSM_ERR_..., "...", ...);` reads as one step. */
psm_status psm_set_error(psm_status status, const char *format, ...) PSM_PRINTF_LIKE(2, 3);
/* The same with a finished message (a backend module's, core/module.h). */
psm_status psm_set_error_message(psm_status status, const char *message);
void psm_clear_error(void);

#endif /* PSM_ERROR_H */
