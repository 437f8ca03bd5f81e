#!/usr/bin/env bash
# gpu-check.sh: everything the GPU machine is needed for, in one call.
#
#   scripts/gpu-check.sh            (from the repository root)
#
# Steps (each runs even when an earlier one failed; each has a time limit so
# that the whole stays under about 9 minutes):
#   1. Check from the .deb files in .deps/ (dpkg -x into /tmp/checkprefix),
#      NVIDIA's OpenCL driver registered with the ICD loader
#   2. configure + build (ninja) with CUDA and OpenCL in build-gpu/
#   3. test_cuda (full size) and test_cuda_graph (sampling in a captured
#      CUDA graph), then ctest (every test program, every backend)
#   4. compute-sanitizer memcheck and racecheck on test_cuda
#      (POLYSAMPLE_TEST_BACKENDS=cuda, POLYSAMPLE_TEST_QUICK=1) and on
#      test_cuda_graph; then test_cuda_graph from a second, small build with
#      PSM_FAULT_INJECTION=ON (build-gpu-fault/: the core, the CUDA module
#      and that test only, for this GPU's architecture), which also counts
#      the device allocations of the captured call with a caller's workspace
#   5. polysample check --rows 101000 (at least 100,000 rows after rounding
#      to its cases), if the tool has the command
#   6. the benchmark: scripts/bench.sh (polysample bench on CUDA and on
#      OpenCL through NVIDIA's driver, and the PyTorch baseline) when present, else polysample bench --backend cuda
# GPU_CHECK_BENCH_BACKENDS picks step 6's backends (default cuda,opencl:0;
# "none" leaves the benchmark out);
# GPU_CHECK_CUDA_TESTS=0 leaves out steps 3a and 4 (test_cuda, test_cuda_graph,
# the sanitizers and the fault-injection build: for a run after changes
# outside the CUDA backend; ctest still runs both programs among the others);
# GPU_CHECK_GRAPH_COUNT=0 leaves out only the fault-injection build;
# GPU_CHECK_ROWS sets step 5's --rows (default 101000; fewer when another
# job shares the call's time limit, and then the summary says so).
# Full logs are kept in /tmp/gpu-check-logs and packed at the end into
# $OUT/logs.tgz (the device tool returns at most 8 files); $OUT/steps.log
# (each step's tail, written as it goes) and $OUT/summary.txt sit beside it.
# Without $OUT (a run by hand) they go to /tmp/gpu-check-out.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu-check-out}
LOGS=/tmp/gpu-check-logs
mkdir -p "$OUT" "$LOGS"
BUILD=$ROOT/build-gpu
BENCH_BACKENDS=${GPU_CHECK_BENCH_BACKENDS:-cuda,opencl:0}
START=$(date +%s)
declare -a STEP_NAMES STEP_RESULTS

# run_step NAME LIMIT_SECONDS LOGFILE COMMAND...: runs, logs, records status.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local begin=$(date +%s)
    echo "=== $name (limit ${limit}s) ===" | tee -a "$OUT/steps.log"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$log" 2>&1
    local rc=$?
    local took=$(($(date +%s) - begin))
    local result="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        result="TIMEOUT"
    elif [ $rc -eq 77 ]; then
        result="skipped"
    elif [ $rc -ne 0 ]; then
        result="FAILED rc=$rc"
    fi
    tail -n 25 "$LOGS/$log" >>"$OUT/steps.log"
    echo "--- $name: $result (${took}s)" | tee -a "$OUT/steps.log"
    STEP_NAMES+=("$name")
    STEP_RESULTS+=("$result (${took}s, log $log)")
}

skip_step() {
    STEP_NAMES+=("$1")
    STEP_RESULTS+=("not run: $2")
    echo "--- $1: not run: $2" | tee -a "$OUT/steps.log"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    nvcc --version 2>&1 | tail -1
    cmake --version | head -1
} >"$LOGS/machine.txt" 2>&1
cat "$LOGS/machine.txt"

# ---- 1. Check and OpenCL -------------------------------------------------
PREFIX=/tmp/checkprefix
mkdir -p "$PREFIX"
for deb in "$ROOT"/.deps/*.deb; do
    [ -f "$deb" ] && dpkg -x "$deb" "$PREFIX"
done
export PKG_CONFIG_PATH="$PREFIX/usr/lib/x86_64-linux-gnu/pkgconfig:${PKG_CONFIG_PATH:-}"
export CMAKE_PREFIX_PATH="$PREFIX/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export LD_LIBRARY_PATH="$PREFIX/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -d /etc/OpenCL/vendors ] && [ -w /etc/OpenCL/vendors ]; then
    echo libnvidia-opencl.so.1 >/etc/OpenCL/vendors/nvidia.icd
fi

# ---- 2. configure + build -------------------------------------------------
CONFIGURE=(cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release
           -DPSM_WITH_CUDA=ON -DPSM_WITH_OPENCL=ON)
# No HIP toolchain on the GPU machine.
CONFIGURE+=(-DPSM_WITH_HIP=OFF)
run_step configure 120 configure.log "${CONFIGURE[@]}"
run_step build 240 build.log cmake --build "$BUILD" -j 16
grep -E "polysample backends|Check|CUDA backend|OpenCL backend" "$LOGS/configure.log" | head -5

TEST_CUDA=$BUILD/tests/test_cuda
TEST_CUDA_GRAPH=$BUILD/tests/test_cuda_graph
CLI=$BUILD/cli/polysample

# ---- 3. tests --------------------------------------------------------------
CUDA_TESTS=${GPU_CHECK_CUDA_TESTS:-1}
if [ "$CUDA_TESTS" = 0 ]; then
    skip_step test_cuda "GPU_CHECK_CUDA_TESTS=0"
elif [ -x "$TEST_CUDA" ]; then
    run_step test_cuda 150 test_cuda.log env CK_VERBOSITY=normal "$TEST_CUDA"
else
    skip_step test_cuda "not built"
fi
if [ "$CUDA_TESTS" = 0 ]; then
    skip_step test_cuda_graph "GPU_CHECK_CUDA_TESTS=0"
elif [ -x "$TEST_CUDA_GRAPH" ]; then
    run_step test_cuda_graph 60 test_cuda_graph.log env CK_VERBOSITY=normal "$TEST_CUDA_GRAPH"
else
    skip_step test_cuda_graph "not built"
fi

# ---- 4. sanitizers ---------------------------------------------------------
if [ "$CUDA_TESTS" = 0 ]; then
    skip_step sanitizers "GPU_CHECK_CUDA_TESTS=0"
elif [ -x "$TEST_CUDA" ] && command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        run_step "sanitizer $tool" 75 "sanitizer_$tool.log" \
            env POLYSAMPLE_TEST_BACKENDS=cuda POLYSAMPLE_TEST_QUICK=1 \
            compute-sanitizer --tool "$tool" --error-exitcode 1 "$TEST_CUDA"
        if [ -x "$TEST_CUDA_GRAPH" ]; then
            run_step "sanitizer $tool (graph)" 60 "sanitizer_${tool}_graph.log" \
                compute-sanitizer --tool "$tool" --error-exitcode 1 "$TEST_CUDA_GRAPH"
        fi
    done
else
    skip_step sanitizers "no test_cuda or no compute-sanitizer"
fi

# ---- 4b. the graph test's allocation count (fault-injection build) --------
# Only a PSM_FAULT_INJECTION build has the counter of device allocations
# (core/alloc.h) that proves the captured call with a caller's workspace
# allocated nothing; the main build's run reports that check as a skip.
FAULT_BUILD=$ROOT/build-gpu-fault
# This GPU's architecture only ("9.0" -> 90-real), to keep the build short;
# the backend's default list where nvidia-smi cannot tell.
FAULT_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
FAULT_ARCH_FLAG=()
if [[ "$FAULT_ARCH" =~ ^[0-9]+$ ]]; then
    FAULT_ARCH_FLAG=(-DCMAKE_CUDA_ARCHITECTURES="$FAULT_ARCH-real")
fi
if [ "$CUDA_TESTS" = 0 ] || [ "${GPU_CHECK_GRAPH_COUNT:-1}" = 0 ]; then
    skip_step "graph allocation count" "GPU_CHECK_CUDA_TESTS=0 or GPU_CHECK_GRAPH_COUNT=0"
elif [ -x "$TEST_CUDA_GRAPH" ]; then
    run_step "graph allocation count" 180 graph_fault.log bash -c '
        set -e
        root=$1 build=$2
        shift 2
        cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPSM_FAULT_INJECTION=ON \
            -DPSM_WITH_CUDA=ON -DPSM_WITH_OPENCL=OFF -DPSM_WITH_HIP=OFF "$@"
        cmake --build "$build" -j 16 --target polysample-cuda test_cuda_graph
        env CK_VERBOSITY=normal "$build/tests/test_cuda_graph"' \
        _ "$ROOT" "$FAULT_BUILD" ${FAULT_ARCH_FLAG[@]+"${FAULT_ARCH_FLAG[@]}"}
else
    skip_step "graph allocation count" "test_cuda_graph not built"
fi

# ---- 6. benchmarks (before the slow suite: their figures matter most) -----
# scripts/bench.sh runs `polysample bench` on the backend AUTO picks (CUDA
# here) and the PyTorch baseline on the same cases; --no-install keeps it
# from reaching for a package mirror this machine cannot reach.
if [ "$BENCH_BACKENDS" = none ]; then
    skip_step bench "GPU_CHECK_BENCH_BACKENDS=none"
elif [ -x "$ROOT/scripts/bench.sh" ] && [ -x "$CLI" ]; then
    # opencl:0 is the first GPU of the OpenCL platforms: the H100 through
    # NVIDIA's driver (registered above); PoCL's CPU device comes after it.
    run_step "bench ($BENCH_BACKENDS, torch)" 300 bench.log env BUILD_DIR="$BUILD" \
        "$ROOT/scripts/bench.sh" --no-install --backend "$BENCH_BACKENDS"
elif [ -x "$CLI" ]; then
    run_step "bench cuda" 120 bench.log "$CLI" bench --backend cuda
else
    skip_step bench "no polysample tool"
fi

# ---- 3b. the whole suite and 5. the tool's check ---------------------------
ELAPSED=$(($(date +%s) - START))
SUITE_LIMIT=$((430 - ELAPSED))
[ $SUITE_LIMIT -lt 30 ] && SUITE_LIMIT=30
if [ -d "$BUILD/tests" ]; then
    run_step ctest "$SUITE_LIMIT" ctest.log \
        ctest --test-dir "$BUILD" --output-on-failure -j 8 --timeout "$SUITE_LIMIT"
else
    skip_step ctest "no test suite built"
fi
if [ -x "$CLI" ] && "$CLI" check --help >/dev/null 2>&1; then
    ELAPSED=$(($(date +%s) - START))
    CHECK_LIMIT=$((500 - ELAPSED))
    [ $CHECK_LIMIT -lt 20 ] && CHECK_LIMIT=20
    # PoCL 5.0 (this machine's) crashes in its default work-group method
    # (loopvec) on these kernels, with old and new sources alike; PoCL 3.1
    # (CI's) does not. Its cbs method runs them.
    run_step "polysample check (--rows ${GPU_CHECK_ROWS:-101000})" "$CHECK_LIMIT" check.log \
        env POCL_WORK_GROUP_METHOD=cbs "$CLI" check --rows "${GPU_CHECK_ROWS:-101000}"
else
    skip_step "polysample check" "the tool has no check command"
fi

# ---- table ------------------------------------------------------------------
{
    echo
    echo "== gpu-check summary ($(date -u +%FT%TZ), $(($(date +%s) - START)) s) =="
    sed -n 2,3p "$LOGS/machine.txt"
    for i in "${!STEP_NAMES[@]}"; do
        printf '%-22s %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}"
    done
    grep -hE "^summary:" "$LOGS"/test_cuda.log "$LOGS"/test_cuda_graph.log \
        "$LOGS"/graph_fault.log "$LOGS"/ctest.log 2>/dev/null | head -20
    grep -hE "consecutive steps repeat|^SKIP" "$LOGS"/test_cuda_graph.log \
        "$LOGS"/graph_fault.log 2>/dev/null | head -8
    grep -hE "tests passed|tests failed|\*\*\*Failed|Timeout" "$LOGS/ctest.log" 2>/dev/null | head -20
    grep -HE "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS"/sanitizer_*.log 2>/dev/null
    echo "-- bench --"
    grep -vE "^\s*$" "$LOGS/bench.log" 2>/dev/null | tail -75
} >"$LOGS/summary.txt"
cp "$LOGS/summary.txt" "$OUT/summary.txt"
tar -czf "$OUT/logs.tgz" -C "$LOGS" .
cat "$OUT/summary.txt"
