#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (-fsanitize=fuzzer,address,undefined;
# the library sources they exercise are compiled into each target with the
# same instrumentation) and runs each for a bounded time, starting from its
# seed corpus in fuzz/corpus/<target>/ (which holds every crash reproducer
# found so far, so each run replays them first).
#
#   fuzz/run.sh <work dir> [build dir]
#
# <work dir>   binaries, the growing corpora (<work dir>/corpus/<target>) and
#              crash artifacts (<work dir>/crashes/<target>/); reused between runs.
# [build dir]  a polysample build holding libpolysample-opencl.so (default:
#              $POLYSAMPLE_BUILD_DIR): the differential target then compares
#              CPU tokens with OpenCL's (on PoCL). Without one, or when the
#              OpenCL backend is not available, that comparison is off (said
#              in the summary line).
#
# Environment:
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_TARGETS   space-separated subset (default: npy api differential)
#   FUZZ_OPENCL=0  leave the OpenCL comparison out
#   CC             clang (default: clang)
#
# Prints one line per target (executions, new crashes) and exits non-zero
# when a build fails or any target crashed.
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 <work dir> [build dir]" >&2
    exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mkdir -p "$1" && cd "$1" && pwd)
build_dir=${2:-${POLYSAMPLE_BUILD_DIR:-}}
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-npy api differential}
cc=${CC:-clang}
if [[ $cc != *clang* ]]; then
    cc=clang # libFuzzer needs clang whatever CC the caller's build used
fi

say() { printf '== fuzz: %s\n' "$*"; }

if ! command -v "$cc" >/dev/null 2>&1; then
    echo "fuzz: FAILED: $cc not found (libFuzzer needs clang and libclang-rt-dev)" >&2
    exit 1
fi

# ---- build ---------------------------------------------------------------------
bin=$work/bin
mkdir -p "$bin"
sanitize=(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
common=(-g -O1 -std=c11 -ffp-contract=off -fopenmp -Wall -Wextra -Wno-pass-failed
        -I"$repo/include" -I"$repo/core" -I"$repo/backends/cpu" -I"$repo/cli" -I"$repo/tests" -I"$repo/reference"
        -I"$repo/fuzz" -DPSM_HAVE_OPENCL=1 '-DPSM_MODULE_DIR=""')
# The core library's sources, read from its add_library in CMakeLists.txt so
# that a new source file cannot be missed here.
mapfile -t library < <(sed -n '/^add_library(polysample$/,/)/{s/^ *\([a-z_/]*\.c\))\{0,1\}$/\1/p}' \
    "$repo/CMakeLists.txt")
if [ ${#library[@]} -lt 10 ]; then
    echo "fuzz: could not read the core's sources from CMakeLists.txt" >&2
    exit 1
fi
# clang's -fopenmp links LLVM's libomp, which lives in LLVM's library
# directory, two levels above clang's resource directory.
omp_rpath=-Wl,-rpath,$(cd "$($cc -print-resource-dir)/../.." && pwd)

sources_of() {
    case $1 in
    npy) echo "fuzz/fuzz_npy.c cli/npy.c cli/processing_files.c cli/cli_util.c ${library[*]}" ;;
    api) echo "fuzz/fuzz_api.c ${library[*]}" ;;
    differential) echo "fuzz/fuzz_differential.c fuzz/contract_model.c reference/psm_reference.c ${library[*]}" ;;
    esac
}

build_failed=0
for target in $targets; do
    output=$bin/fuzz_$target
    read -r -a sources <<<"$(sources_of "$target")"
    if [[ ${#sources[@]} -eq 0 ]]; then
        echo "fuzz: unknown target '$target' (expected npy, api, differential)" >&2
        exit 2
    fi
    # Rebuild only when a source or header is newer than the binary.
    if [[ -x $output ]] && [[ -z $(find "$repo/fuzz" "$repo/core" "$repo/backends/cpu" \
            "$repo/cli/npy.c" "$repo/cli/npy.h" "$repo/cli/processing_files.c" \
            "$repo/cli/processing_files.h" "$repo/cli/cli_util.c" "$repo/reference" "$repo/include" \
            -newer "$output" -type f 2>/dev/null | head -n 1) ]]; then
        continue
    fi
    say "building fuzz_$target"
    if ! (cd "$repo" && "$cc" "${common[@]}" "${sanitize[@]}" -fsanitize=fuzzer \
            "${sources[@]}" -o "$output" -lm -ldl -lpthread "$omp_rpath") >"$bin/build_$target.log" 2>&1; then
        cat "$bin/build_$target.log" >&2
        echo "fuzz: FAILED to build fuzz_$target" >&2
        build_failed=1
    fi
done
(( build_failed == 0 )) || exit 1

# ---- run -----------------------------------------------------------------------
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# PoCL and its LLVM keep process-lifetime allocations (tests/lsan.supp).
export LSAN_OPTIONS=suppressions=$repo/tests/lsan.supp:print_suppressions=0
if [[ -n $build_dir && -e $build_dir/libpolysample-opencl.so ]]; then
    export POLYSAMPLE_BACKEND_PATH=$build_dir
elif [[ -n $build_dir ]]; then
    say "no libpolysample-opencl.so in $build_dir: the OpenCL comparison is off"
fi

crashed=0
summaries=()
for target in $targets; do
    corpus=$work/corpus/$target
    artifacts=$work/crashes/$target
    mkdir -p "$corpus" "$artifacts"
    before=$(find "$artifacts" -type f | wc -l)
    log=$work/fuzz_$target.log
    say "running fuzz_$target for ${seconds}s"
    # New inputs go to the work corpus; the repository's seeds are read only.
    "$bin/fuzz_$target" -max_total_time="$seconds" -print_final_stats=1 -timeout=30 \
        -rss_limit_mb=4096 -artifact_prefix="$artifacts/" \
        "$corpus" "$repo/fuzz/corpus/$target" >"$log" 2>&1
    status=$?
    after=$(find "$artifacts" -type f | wc -l)
    executed=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | sed 's/cov: //')
    extra=""
    if [[ $target == differential ]]; then
        extra="; $(grep -o 'OpenCL comparison o[nf]*' "$log" | head -n 1 || true)"
    fi
    new=$((after - before))
    if (( status != 0 || new > 0 )); then
        crashed=1
        grep -E -m 20 'ERROR|differential:|api:|npy:|SUMMARY|Test unit written' "$log" >&2 || tail -n 30 "$log" >&2
    fi
    summaries+=("fuzz_$target: ${executed:-0} executions in ${seconds}s, coverage ${coverage:-?}, $new new crash(es), exit $status$extra (log: $log)")
done

for line in "${summaries[@]}"; do
    printf 'fuzz summary: %s\n' "$line"
done
if (( crashed )); then
    echo "fuzz: FAILED: a target crashed; reproducers are under $work/crashes/" >&2
    exit 1
fi
