#!/usr/bin/env bash
# gpu-perf.sh: the narrow GPU call for kernel work: tests, agreement, bench
# and a kernel profile, in one call of a few minutes.
#
#   scripts/gpu-perf.sh            (from the repository root)
#
# BUILD_DIR: an already built tree (for instance one built on another x86-64
# machine and carried along; its libpolysample is found through
# LD_LIBRARY_PATH); without it, build-perf/ is configured (Release, CUDA
# for sm_90 only, no OpenCL) and built here. Check comes from .deps/*.deb as
# in gpu-check.sh. Logs go to $OUT (default /tmp/gpu-perf-out):
# resources.txt (ptxas report, SASS counts), test_cuda.log,
# sanitizers.log, check.log, bench.log, ncu.log.gz, ncu_short.txt, summary.txt and, with
# WITH_TORCH=1, torch.json (the PyTorch baselines).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu-perf-out}
BUILD=${BUILD_DIR:-$ROOT/build-perf}
mkdir -p "$OUT"
START=$(date +%s)
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader; } 2>&1 |
    tee -a "$OUT/summary.txt"

PREFIX=/tmp/checkprefix
mkdir -p "$PREFIX"
for deb in "$ROOT"/.deps/*.deb; do [ -f "$deb" ] && dpkg -x "$deb" "$PREFIX"; done
export PKG_CONFIG_PATH="$PREFIX/usr/lib/x86_64-linux-gnu/pkgconfig:${PKG_CONFIG_PATH:-}"
export CMAKE_PREFIX_PATH="$PREFIX/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export LD_LIBRARY_PATH="$BUILD:$PREFIX/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ ! -x "$BUILD/tests/test_cuda" ]; then
    cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPSM_WITH_CUDA=ON \
        -DPSM_WITH_OPENCL=OFF -DPSM_WITH_HIP=OFF -DCMAKE_CUDA_ARCHITECTURES=90-real \
        >"$OUT/build.log" 2>&1 && cmake --build "$BUILD" -j 16 >>"$OUT/build.log" 2>&1
    summary "build: rc=$?"
fi
CLI=$BUILD/cli/polysample

# Resource report and per-kernel SASS counts.
{
    nvcc -arch=sm_90 -std=c++17 -fmad=false -Xptxas -v -I"$ROOT/include" -I"$ROOT/core" \
        -I"$ROOT/kernels" -I"$ROOT/backends/cuda" -c "$ROOT/backends/cuda/psm_gpu_backend.cu" -o /tmp/psm_perf.o 2>&1 |
        grep -E "Compiling entry|Used|spill"
    cuobjdump -sass /tmp/psm_perf.o >/tmp/psm_perf.sass 2>&1
    echo "SASS instructions per kernel (all / F2I / ATOMS / LDG.E.128):"
    awk '/Function :/{name=$3} /\/\*[0-9a-f]{4}\*\//{n[name]++} /F2I/{f[name]++} /ATOMS/{a[name]++}
         /LDG.E.128/{l[name]++} END{for (k in n) printf "%s %d %d %d %d\n", k, n[k], f[k], a[k], l[k]}' \
        /tmp/psm_perf.sass | sort
} >"$OUT/resources.txt" 2>&1

step() { # name limit log command...
    local name=$1 limit=$2 log=$3
    shift 3
    local begin=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$log" 2>&1
    summary "$name: rc=$? ($(($(date +%s) - begin)) s)"
    grep -E "^summary:|ERROR SUMMARY|RACECHECK SUMMARY|agreement|FAIL|disagree" "$OUT/$log" |
        head -8 | tee -a "$OUT/summary.txt"
}
step test_cuda 150 test_cuda.log env CK_VERBOSITY=normal "$BUILD/tests/test_cuda"
for tool in memcheck racecheck; do
    step "sanitizer $tool" 90 "sanitizer_$tool.log" env POLYSAMPLE_TEST_BACKENDS=cuda \
        POLYSAMPLE_TEST_QUICK=1 compute-sanitizer --tool "$tool" --error-exitcode 1 "$BUILD/tests/test_cuda"
done
cat "$OUT"/sanitizer_*.log >"$OUT/sanitizers.log" && rm -f "$OUT"/sanitizer_*.log
step "check ${CHECK_ROWS:-20000} rows" 150 check.log "$CLI" check --rows "${CHECK_ROWS:-20000}" --draws 0
step bench 200 bench.log "$CLI" bench --backend cuda
sed -n '/^backend/,/^$/p' "$OUT/bench.log" | tee -a "$OUT/summary.txt"

# The PyTorch baselines on the same cases (bench/torch_baseline.py), if asked.
if [ -n "${WITH_TORCH:-}" ]; then
    timeout 120 python3 "$ROOT/bench/torch_baseline.py" >"$OUT/torch.json" 2>"$OUT/torch.err"
    summary "torch baseline: rc=$?"
fi

# Kernel profile: the first tile and row launches of one call per case.
: >"$OUT/ncu.log"
for case in "f32 plain 2000 32000" "bf16 plain 2000 32000" "f32 topk_topp 2000 32000" \
            "f32 top_p 2000 32000" "f32 min_p 2000 32000" "f32 plain 1 151936" "f32 topk_topp 1 151936"; do
    set -- $case
    echo "=== $case ===" >>"$OUT/ncu.log"
    timeout 90 ncu --clock-control none -k regex:'psm_gpu_(tile|row)_kernel' -c 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        "$CLI" bench --backend cuda --distribution normal --dtype "$1" --setting "$2" --rows "$3" \
        --vocab "$4" --repeat 1 \
        >>"$OUT/ncu.log" 2>&1
done
grep -E "^===|psm_gpu_|Duration|DRAM Throughput|Compute \(SM\) Throughput|Occupancy|Registers Per|Block Limit|Grid Size|Block Size|Stall|Warp Cycles Per Issued|Shared Memory Configuration Size|Dynamic Shared|Static Shared" \
    "$OUT/ncu.log" | sed 's/  */ /g' >"$OUT/ncu_short.txt"
gzip -f "$OUT/ncu.log"
summary "total $(($(date +%s) - START)) s"
