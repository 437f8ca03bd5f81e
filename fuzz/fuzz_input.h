/*
 * fuzz_input.h: reads typed values from a fuzzer's input bytes. Past the
 * end every read gives 0, so any input decodes to something.
 */
#ifndef PSM_FUZZ_INPUT_H
#define PSM_FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct fuzz_input {
    const uint8_t *data;
    size_t size;
    size_t at;
} fuzz_input;

static inline fuzz_input fuzz_input_make(const uint8_t *data, size_t size)
{
    fuzz_input input = {data, size, 0};
    return input;
}

static inline void fuzz_read(fuzz_input *input, void *out, size_t bytes)
{
    size_t left = input->size - input->at;
    size_t taken = bytes < left ? bytes : left;
    memset(out, 0, bytes);
    memcpy(out, input->data + input->at, taken);
    input->at += taken;
}

static inline uint8_t fuzz_u8(fuzz_input *input)
{
    uint8_t value;
    fuzz_read(input, &value, sizeof value);
    return value;
}

static inline uint16_t fuzz_u16(fuzz_input *input)
{
    uint16_t value;
    fuzz_read(input, &value, sizeof value);
    return value;
}

static inline uint32_t fuzz_u32(fuzz_input *input)
{
    uint32_t value;
    fuzz_read(input, &value, sizeof value);
    return value;
}

static inline uint64_t fuzz_u64(fuzz_input *input)
{
    uint64_t value;
    fuzz_read(input, &value, sizeof value);
    return value;
}

static inline float fuzz_raw_float(fuzz_input *input)
{
    float value;
    fuzz_read(input, &value, sizeof value);
    return value;
}

/* An integer in [low, high]. */
static inline int64_t fuzz_range(fuzz_input *input, int64_t low, int64_t high)
{
    uint64_t span = (uint64_t)(high - low) + 1;
    return low + (int64_t)(fuzz_u32(input) % span);
}

#endif /* PSM_FUZZ_INPUT_H */
