/* opencl_ptx.c: register caps added to PTX text (see opencl_ptx.h). */
#include "opencl_ptx.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* psm_row_filter is latency-bound at large batches (a group of 256 items per
 * row, local atomics and list searches): at 48 registers five such groups
 * fit on an H100 multiprocessor, at 40 six. Capped, it spills 48 bytes and
 * is still 1.23x faster at 2,048 x 151,936 (bench/RESULTS.md, "Fourteenth
 * session"). */
static const struct {
    const char *kernel;
    int max_registers;
} register_caps[] = {{"psm_row_filter", 40}};

#define CAP_COUNT (sizeof register_caps / sizeof register_caps[0])

unsigned char *opencl_ptx_with_register_caps(const unsigned char *bytes, size_t size,
                                             size_t *size_out)
{
    if (!bytes || size == 0 || !memchr(bytes, '\0', size))
        return NULL; /* not NUL-terminated text */
    const char *text = (const char *)bytes;
    if (!strstr(text, ".version ") || !strstr(text, ".target sm_"))
        return NULL;
    /* Each cap goes just before its kernel's body ("{" on a line of its
     * own, after the parameter list and directives such as .reqntid). */
    size_t insert_at[CAP_COUNT];
    char directive[CAP_COUNT][32];
    size_t caps = 0, added = 0;
    for (size_t c = 0; c < CAP_COUNT; ++c) {
        char entry[96];
        snprintf(entry, sizeof entry, ".entry %s(", register_caps[c].kernel);
        const char *start = strstr(text, entry);
        const char *body = start ? strstr(start, "\n{") : NULL;
        if (!body)
            continue;
        const char *existing = strstr(start, ".maxnreg");
        if (existing && existing < body)
            continue;
        insert_at[caps] = (size_t)(body - text);
        snprintf(directive[caps], sizeof directive[caps], "\n.maxnreg %d",
                 register_caps[c].max_registers);
        added += strlen(directive[caps]);
        ++caps;
    }
    if (caps == 0)
        return NULL;
    unsigned char *patched = malloc(size + added);
    if (!patched)
        return NULL;
    size_t from = 0, to = 0;
    for (size_t done = 0; done < caps; ++done) {
        size_t next = 0; /* the earliest insertion point left */
        for (size_t c = 1; c < caps; ++c)
            if (insert_at[c] < insert_at[next])
                next = c;
        memcpy(patched + to, bytes + from, insert_at[next] - from);
        to += insert_at[next] - from;
        from = insert_at[next];
        const size_t length = strlen(directive[next]);
        memcpy(patched + to, directive[next], length);
        to += length;
        insert_at[next] = (size_t)-1;
    }
    memcpy(patched + to, bytes + from, size - from);
    *size_out = size + added;
    return patched;
}
