#!/usr/bin/env bash
# ThreadSanitizer build of the core and CPU backend, and its tests.
#
#   fuzz/tsan.sh <build dir>
#
# OpenMP: GCC's libgomp is not instrumented, so TSan cannot see the
# synchronisation at its barriers and reports the CPU backend's per-thread
# scratch, written by workers and read after the region, as races. Instead
# of hiding those (OMP_NUM_THREADS=1 would also hide the backend's real
# parallel paths), this build uses clang with LLVM's OpenMP runtime (libomp)
# and its TSan annotation tool Archer (libarcher, loaded via
# OMP_TOOL_LIBRARIES), which tells TSan about every OpenMP barrier, so the
# parallel regions run with their usual thread counts and are checked.
# The core is built static (clang links the TSan runtime into programs only).
# GPU backends are off: their runtimes are not instrumented.
#
# Runs test_threads (many threads, own contexts, first module load),
# test_determinism (CPU thread counts), test_validation and test_semantics
# with POLYSAMPLE_TEST_QUICK=1 on the CPU backend. Exits non-zero on a
# build failure, a test failure or any TSan report.
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 <build dir>" >&2
    exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$1
cc=${TSAN_CC:-clang}
# LLVM's library directory (libomp, libarcher): two levels above clang's
# resource directory (<llvm>/lib/clang/<version>).
llvm_lib=$(cd "$($cc -print-resource-dir)/../.." 2>/dev/null && pwd)
archer=$llvm_lib/libarcher.so
if [[ ! -e $archer ]]; then
    echo "tsan: FAILED: $cc has no libarcher.so (LLVM's OpenMP TSan tool; Debian: libomp-dev)" >&2
    exit 1
fi
jobs=${JOBS:-2}
flags="-fsanitize=thread -g -O1 -fno-omit-frame-pointer"
echo "== tsan: configure and build ($build)"
if ! cmake -S "$repo" -B "$build" -DCMAKE_C_COMPILER="$cc" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_C_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread" \
        -DBUILD_SHARED_LIBS=OFF -DPSM_WITH_CUDA=OFF -DPSM_WITH_HIP=OFF -DPSM_WITH_OPENCL=OFF \
        -DPSM_BUILD_CLI=OFF >"$build.configure.log" 2>&1 ||
   ! cmake --build "$build" --parallel "$jobs" --target test_threads test_determinism \
        test_validation test_semantics >"$build.build.log" 2>&1; then
    tail -n 30 "$build.configure.log" "$build.build.log" 2>/dev/null >&2
    echo "tsan: FAILED to build" >&2
    exit 1
fi

export OMP_TOOL_LIBRARIES=$archer
export ARCHER_OPTIONS=${ARCHER_OPTIONS:-verbose=0}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=0:second_deadlock_stack=1:suppressions=$repo/fuzz/tsan.supp}
export POLYSAMPLE_TEST_BACKENDS=cpu POLYSAMPLE_TEST_QUICK=1
failed=0
summary=()
for test in test_threads test_determinism test_validation test_semantics; do
    log=$build/$test.tsan.log
    "$build/tests/$test" >"$log" 2>&1
    status=$?
    reports=$(grep -c 'WARNING: ThreadSanitizer' "$log")
    if (( status != 0 || reports > 0 )); then
        failed=1
        grep -A 30 -m 3 'WARNING: ThreadSanitizer' "$log" >&2 || tail -n 20 "$log" >&2
    fi
    summary+=("$test: exit $status, $reports TSan report(s); $(grep -h '^summary:' "$log" | sed 's/^summary: //')")
done
for line in "${summary[@]}"; do
    printf 'tsan summary: %s\n' "$line"
done
if (( failed )); then
    echo "tsan: FAILED (logs: $build/*.tsan.log)" >&2
    exit 1
fi
