// names.h: what both extension modules (core.cpp, torch_ops.cpp) put in
// their messages, so that the two paths raise the same text: status names
// (polysample.Error's status), the element kinds the calls accept, and the
// check of a host list's offsets.
#ifndef POLYSAMPLE_PYTHON_NAMES_H
#define POLYSAMPLE_PYTHON_NAMES_H

#include <polysample.h>

#include <cstdint>
#include <string>

namespace polysample_python {

// Element kinds; the numbers are also the `kind` field of a RawArray tuple
// (polysample/_frameworks.py keeps the same table).
enum Kind : int { kind_f32 = 0, kind_f16 = 1, kind_bf16 = 2, kind_i32 = 3, kind_i64 = 4,
                  kind_u64 = 5, kind_u32 = 6, kind_u8 = 7, kind_other = -1 };

inline const char *kind_name(int kind)
{
    switch (kind) {
    case kind_f32: return "float32";
    case kind_f16: return "float16";
    case kind_bf16: return "bfloat16";
    case kind_i32: return "int32";
    case kind_i64: return "int64";
    case kind_u64: return "uint64";
    case kind_u32: return "uint32";
    case kind_u8: return "uint8";
    }
    return "an unsupported dtype";
}

inline const char *status_name(psm_status status)
{
    switch (status) {
    case PSM_OK: return "OK";
    case PSM_ERR_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case PSM_ERR_INVALID_PARAMETER: return "INVALID_PARAMETER";
    case PSM_ERR_UNSUPPORTED: return "UNSUPPORTED";
    case PSM_ERR_BACKEND_NOT_COMPILED: return "BACKEND_NOT_COMPILED";
    case PSM_ERR_NO_DEVICE: return "NO_DEVICE";
    case PSM_ERR_DRIVER: return "DRIVER";
    case PSM_ERR_OUT_OF_MEMORY: return "OUT_OF_MEMORY";
    case PSM_ERR_BAD_ROW: return "BAD_ROW";
    case PSM_ERR_WRONG_BACKEND: return "WRONG_BACKEND";
    case PSM_ERR_ENVIRONMENT: return "ENVIRONMENT";
    case PSM_ERR_INTERNAL: return "INTERNAL";
    }
    return "UNKNOWN";
}

// A host list's offsets (rows + 1 of them) against its entries: "" when
// every offset is within [0, entries], else the message the call fails with.
inline std::string list_offsets_problem(const int64_t *offset, int64_t rows, int64_t entries,
                                        const std::string &name)
{
    for (int64_t r = 0; r <= rows; ++r)
        if (offset[r] < 0 || offset[r] > entries)
            return name + " offsets[" + std::to_string(r) + "] is " + std::to_string(offset[r]) +
                   "; the lists hold " + std::to_string(entries) + " entries";
    return "";
}

} // namespace polysample_python

#endif
