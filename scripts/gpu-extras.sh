#!/usr/bin/env bash
# gpu-extras.sh: the GPU machine's runs for the bindings and the soak, after
# scripts/gpu-check.sh has built build-gpu/ in the same session (it builds
# it otherwise).
#
#   scripts/gpu-extras.sh [SOAK_MINUTES]     (from the repository root)
#
# Steps, each with a time limit, each run even when an earlier one failed:
#   1. the Rust example that samples from a CUDA buffer (its binary built on
#      the development machine, where cargo is, and carried in .carry/)
#   2. fuzz/gpu-soak.sh: mixed calls checked against the CPU backend, part
#      of them under compute-sanitizer memcheck
#   3. python/gpu-tests.sh: pytest with the CUDA tests, the benchmark plot,
#      the overhead figures and the decode-loop example (last: the longest,
#      so that a call cut short by its time limit still has the others)
# Output: $OUT/extras.log (every step's tail) and the Python files
# (bench.png, bench.json, overhead.json, pytest.txt) in $OUT.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu-extras-out}
BUILD=$ROOT/build-gpu
SOAK_MINUTES=${1:-3}
mkdir -p "$OUT"
log=$OUT/extras.log
# Each step's whole output, outside $OUT: the device tool brings back only a
# few files, which should be the logs and the Python results.
STEP=$(mktemp)

step() {
    local name=$1 limit=$2
    shift 2
    local begin=$(date +%s) rc=0
    echo "=== $name (limit ${limit}s)" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >"$STEP" 2>&1 || rc=$?
    tail -n 40 "$STEP" >>"$log"
    echo "--- $name: rc=$rc ($(($(date +%s) - begin))s)" | tee -a "$log"
}

# Check from .deps/ (as gpu-check.sh), for the soak program's build.
PREFIX=/tmp/checkprefix
mkdir -p "$PREFIX"
for deb in "$ROOT"/.deps/*.deb; do [ -f "$deb" ] && dpkg -x "$deb" "$PREFIX"; done
export PKG_CONFIG_PATH="$PREFIX/usr/lib/x86_64-linux-gnu/pkgconfig:${PKG_CONFIG_PATH:-}"
export CMAKE_PREFIX_PATH="$PREFIX/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export LD_LIBRARY_PATH="$PREFIX/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ ! -x "$BUILD/tests/polysample_soak" ]; then
    ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
    ARCH_FLAG=""
    [[ "$ARCH" =~ ^[0-9]+$ ]] && ARCH_FLAG="-DCMAKE_CUDA_ARCHITECTURES=$ARCH-real"
    step "build" 240 bash -c "cmake -S '$ROOT' -B '$BUILD' -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DPSM_WITH_HIP=OFF $ARCH_FLAG && cmake --build '$BUILD' -j 16"
fi

if [ -x "$ROOT/.carry/cuda_buffer" ]; then
    step "rust cuda_buffer example" 120 env LD_LIBRARY_PATH="$BUILD" "$ROOT/.carry/cuda_buffer"
else
    echo "--- rust cuda_buffer example: not run (no .carry/cuda_buffer)" | tee -a "$log"
fi

if [ -x "$ROOT/fuzz/gpu-soak.sh" ]; then
    step "soak" $((SOAK_MINUTES * 60 + 150)) "$ROOT/fuzz/gpu-soak.sh" "$BUILD" "$SOAK_MINUTES"
    grep -v '^=========' "$STEP" >"$OUT/soak.txt"
fi

step "python gpu tests" 330 "$ROOT/python/gpu-tests.sh" "$OUT" "$ROOT/build-python-gpu"

cat "$log"
