#!/usr/bin/env bash
# The GPU soak, for the GPU machine: polysample_soak (tests/soak.c) for
# <minutes> of mixed calls on the CUDA backend checked against the CPU
# backend, then a shorter part under compute-sanitizer's memcheck (with
# smaller vocabularies, since memcheck slows kernels down by 10-100x).
#
#   fuzz/gpu-soak.sh <build dir> <minutes>
#
# <build dir>: a build with the CUDA backend and the test suite
# (polysample_soak is built when CUDA is; -DPSM_WITH_HIP=OFF is fine).
# Environment: SOAK_SEED (default 2024), SOAK_MEMCHECK_MINUTES (default:
# a quarter of <minutes>, at most 5; 0 leaves memcheck out).
# Prints the soak's summary lines; exits non-zero on any mismatch or
# memcheck error.
set -uo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 <build dir> <minutes>" >&2
    exit 2
fi
build=$(cd "$1" && pwd)
minutes=$2
seed=${SOAK_SEED:-2024}
soak=$build/tests/polysample_soak
if [[ ! -x $soak ]]; then
    echo "gpu-soak: FAILED: $soak not found (configure with the CUDA backend and tests)" >&2
    exit 1
fi
export POLYSAMPLE_BACKEND_PATH=$build
memcheck_minutes=${SOAK_MEMCHECK_MINUTES:-$(awk -v m="$minutes" 'BEGIN { q = m / 4; print (q > 5 ? 5 : q) }')}

failed=0
echo "== gpu-soak: $minutes min of mixed calls (seed $seed)"
"$soak" "$minutes" --seed "$seed" 2>&1 | tee "$build/gpu-soak.log"
status=${PIPESTATUS[0]}
if (( status == 77 )); then
    echo "gpu-soak: FAILED: no CUDA device here" >&2
    exit 1
fi
(( status == 0 )) || failed=1

if awk -v m="$memcheck_minutes" 'BEGIN { exit !(m > 0) }'; then
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [[ ! -x $sanitizer ]]; then
        echo "gpu-soak: FAILED: compute-sanitizer not found" >&2
        failed=1
    else
        echo "== gpu-soak: $memcheck_minutes min under compute-sanitizer memcheck (vocab <= 32000)"
        # API errors are not reported: the soak's impossible reserves make
        # cudaMalloc fail on purpose (the library answers
        # PSM_ERR_OUT_OF_MEMORY, which the soak checks), and memcheck
        # would count each as an error.
        "$sanitizer" --tool memcheck --leak-check full --report-api-errors no --error-exitcode 3 \
            "$soak" "$memcheck_minutes" --seed $((seed + 1)) --max-vocab 32000 2>&1 |
            tee "$build/gpu-soak-memcheck.log" | grep -E 'soak|ERROR SUMMARY|=========.*(Invalid|error)' 
        (( PIPESTATUS[0] == 0 )) || failed=1
    fi
fi
if (( failed )); then
    echo "gpu-soak: FAILED (logs: $build/gpu-soak.log, $build/gpu-soak-memcheck.log)" >&2
    exit 1
fi
echo "gpu-soak: passed"
