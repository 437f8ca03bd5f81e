#!/usr/bin/env bash
# The test command (README; CI runs it): builds polysample with its Check
# suite and runs it, then the Rust and Python bindings' tests against that
# build, then builds and runs the whole suite again under
# AddressSanitizer + UndefinedBehaviorSanitizer, then the OpenCL tests
# again with the backend forced onto its large-vocabulary paths (the radix
# narrowing, then the gap bins' list), then the
# fuzzers and the ThreadSanitizer run, and prints a summary: per build, the ctest result, the backends that ran, and every
# skipped test grouped by backend and reason.
# As root, missing Debian packages are installed first (apt's output goes to
# $BUILD_DIR-logs/packages.log).
# Exits non-zero when any build or test fails.
#
# Environment:
#   BUILD_DIR                 build directory prefix (default <repo>/build): the
#                             release build goes to $BUILD_DIR, the sanitizer
#                             build to $BUILD_DIR-asan
#   JOBS                      parallel build jobs (default: all cores)
#   PSM_SKIP_SANITIZER=1      skip the sanitizer build (e.g. on the GPU machine)
#   PSM_SKIP_OPENCL_GLOBAL=1  skip the OpenCL global-path builds ($BUILD_DIR-opencl-global,
#                             $BUILD_DIR-opencl-bins)
#   PSM_SKIP_FUZZ=1           skip the fuzzers ($BUILD_DIR-fuzz) and the TSan build ($BUILD_DIR-tsan)
#   FUZZ_SECONDS              seconds per fuzz target (default 60)
#   POLYSAMPLE_TEST_BACKENDS  which backends the tests run, e.g. "cpu,opencl"
#                             (tests/harness.h); default: every available one
#   CMAKE_PREFIX_PATH         where to find Check when it is not installed
#                             system-wide (tests/CMakeLists.txt)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${BUILD_DIR:-$repo/build}
asan_dir=$build_dir-asan
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}

say() { printf '== %s\n' "$*"; }

# ---- packages ----------------------------------------------------------------
# Needed to build and test at all, and the toolchains of the optional
# backends (OpenCL on PoCL's CPU device, HIP). As root, missing ones are
# installed, with apt's output in $log_dir/packages.log and one line per step
# here; an optional one that cannot be installed only turns its backend off.
# clang, its libFuzzer runtime and LLVM's OpenMP (with its TSan tool Archer)
# build the fuzzers and the ThreadSanitizer run (fuzz/run.sh, fuzz/tsan.sh);
# python3-venv makes the Python tests' environment.
required_packages=(check pkg-config cmake build-essential clang libclang-rt-14-dev libomp-dev
                   python3-venv)
optional_packages=(pocl-opencl-icd ocl-icd-opencl-dev opencl-headers hipcc libamdhip64-dev)
log_dir=$build_dir-logs
package_log=$log_dir/packages.log

missing_packages() {
    local package
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || printf '%s\n' "$package"
    done
}

# Runs one apt-get step with its output appended to the package log; on
# failure the log's tail is shown. $1 says what the step does.
apt_step() {
    local what=$1
    shift
    say "packages: $what ... (log: $package_log)"
    printf '\n$ apt-get %s\n' "$*" >>"$package_log"
    if apt-get "$@" >>"$package_log" 2>&1; then
        return 0
    fi
    printf '   apt-get %s failed; the end of %s:\n' "$1" "$package_log"
    tail -n 5 "$package_log" | sed 's/^/   | /'
    return 1
}

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    mapfile -t missing_required < <(missing_packages "${required_packages[@]}")
    mapfile -t missing_optional < <(missing_packages "${optional_packages[@]}")
    if (( ${#missing_required[@]} + ${#missing_optional[@]} > 0 )); then
        export DEBIAN_FRONTEND=noninteractive
        mkdir -p "$log_dir"
        : >"$package_log"
        apt_step "updating the package lists" update || true
        if (( ${#missing_required[@]} > 0 )); then
            apt_step "installing ${missing_required[*]} (required)" \
                install -y --no-install-recommends "${missing_required[@]}" || exit 1
        fi
        for package in "${missing_optional[@]}"; do
            apt_step "installing $package (optional)" \
                install -y --no-install-recommends "$package" ||
                say "packages: $package not installed; its backend stays off"
        done
    fi
else
    # Not root (or not Debian): say which optional backends will be off.
    command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]] ||
        say "CUDA backend will be off: no nvcc"
    command -v hipcc >/dev/null 2>&1 || say "HIP backend will be off: no hipcc"
    if [[ ! -e /usr/include/CL/cl.h ]]; then
        say "OpenCL backend will be off: no OpenCL headers (opencl-headers)"
    elif ! ls /etc/OpenCL/vendors/*.icd >/dev/null 2>&1; then
        say "OpenCL tests will be skipped: no OpenCL driver (e.g. pocl-opencl-icd)"
    fi
    pkg-config --exists check 2>/dev/null || [[ -n ${CMAKE_PREFIX_PATH:-} ]] ||
        say "Check (libcheck) not found: install 'check' or set CMAKE_PREFIX_PATH"
fi

# ---- build and test ------------------------------------------------------------

failures=()
summaries=()

# Builds into $1 with the remaining arguments as CMake options, then runs ctest
# there (with the environment already exported). $label names the stage.
build_and_test() {
    local label=$1 dir=$2
    shift 2
    say "$label: configure ($dir)"
    if ! cmake -S "$repo" -B "$dir" "$@"; then
        failures+=("$label: configure failed")
        return
    fi
    say "$label: build"
    if ! cmake --build "$dir" --parallel "$jobs"; then
        failures+=("$label: build failed")
        return
    fi
    local listed
    listed=$(cd "$dir" && ctest -N ${ctest_select:+-R "$ctest_select"} |
        sed -n 's/^Total Tests: *//p')
    if [[ -z $listed || $listed -eq 0 ]]; then
        failures+=("$label: no tests were registered (is Check installed?)")
        return
    fi
    say "$label: ctest ($listed test programs)"
    local log=$dir/ctest-output.txt status=0
    (cd "$dir" && ctest --output-on-failure ${ctest_select:+-R "$ctest_select"}) 2>&1 |
        tee "$log" || status=$?
    (( status == 0 )) || failures+=("$label: ctest failed (see $log)")

    # Each test program prints "summary: <name>: N run, F failed, S skipped;
    # backends run: a,b" and a "SKIP [backend] test: reason" line per skip
    # (tests/harness.c); ctest keeps all output here.
    local detail=$dir/Testing/Temporary/LastTest.log
    local passed backends
    passed=$(grep -E '[0-9]+% tests passed' "$log" | tail -n 1 || true)
    backends=$(grep -ho 'backends run: [a-z,]*' "$detail" 2>/dev/null |
        sed 's/backends run: //' | tr ',' '\n' | grep -v -e '^none$' -e '^$' | sort -u |
        paste -sd, - || true)
    summaries+=("$label: ${passed:-no ctest result}; backends run: ${backends:-none}")
    summaries+=("$(skip_report "$detail")")
}

# The skips in a ctest log, grouped by backend and reason, largest group
# first, each with its count in words and the tests it covers by program:
#
#   28 skipped: 27 backend/test pairs and 1 test that needs no backend, for 2 reasons:
#     27 on cuda, which is not available here: no CUDA device: ...
#        test_validation: bad_pointers_and_shapes, ...
#     1 common test: every backend is compiled in
#        test_validation: named_backend_not_compiled
skip_report() {
    local detail=$1
    if [[ ! -f $detail ]]; then
        printf '  no test log (%s), so no skip report' "$detail"
        return
    fi
    awk -v selection="${POLYSAMPLE_TEST_BACKENDS:-}" '
        function wrap(prefix, text,    line, word, count, i, words) {
            count = split(text, words, " ")
            line = prefix
            for (i = 1; i <= count; ++i) {
                word = words[i]
                if (length(line) + 1 + length(word) > 96 && line != prefix) {
                    out = out "\n" line
                    line = sprintf("%" length(prefix) "s", "") " " word
                } else {
                    line = line " " word
                }
            }
            out = out "\n" line
        }
        function words_for(scope, reason, n) {
            if (reason == "not listed in POLYSAMPLE_TEST_BACKENDS")
                return "on " scope ", left out by POLYSAMPLE_TEST_BACKENDS=" selection
            if (reason == "not compiled in")
                return "on " scope ", which is not compiled into this build"
            if (reason ~ /^not available: /)
                return "on " scope ", which is not available here: " \
                       substr(reason, length("not available: ") + 1)
            if (scope == "common")
                return "common test" (n == 1 ? "" : "s") ": " reason
            return "on " scope ": " reason
        }
        /^[0-9]+\/[0-9]+ Testing: / { program = $3; next }
        /^SKIP \[[^]]*\] [^:]*: / {
            rest = substr($0, 7)
            scope = substr(rest, 1, index(rest, "]") - 1)
            rest = substr(rest, index(rest, "]") + 2)
            name = substr(rest, 1, index(rest, ": ") - 1)
            reason = substr(rest, index(rest, ": ") + 2)
            key = scope SUBSEP reason
            if (!(key in count)) {
                groups[++group_count] = key
                group_scope[key] = scope
                group_reason[key] = reason
            }
            count[key]++
            if (!((key, program) in names))
                programs[key] = programs[key] SUBSEP program
            names[key, program] = names[key, program] (names[key, program] == "" ? "" : ",") name
            total++
            common += scope == "common"
            next
        }
        /^skipped: [0-9]+$/ { declared += $2 }
        END {
            if (total == 0) {
                printf "  nothing skipped"
                exit
            }
            pairs = total - common
            out = sprintf("  %d skipped: %d backend/test pair%s%s, for %d reason%s:", total,
                          pairs, pairs == 1 ? "" : "s",
                          common ? sprintf(" and %d test%s that need%s no backend", common,
                                           common == 1 ? "" : "s", common == 1 ? "s" : "") : "",
                          group_count, group_count == 1 ? "" : "s")
            # Largest group first (a selection sort; there are few groups).
            for (i = 1; i <= group_count; ++i)
                for (j = i + 1; j <= group_count; ++j)
                    if (count[groups[j]] > count[groups[i]]) {
                        kept = groups[i]; groups[i] = groups[j]; groups[j] = kept
                    }
            for (i = 1; i <= group_count; ++i) {
                key = groups[i]
                out = out sprintf("\n    %d %s", count[key],
                                  words_for(group_scope[key], group_reason[key], count[key]))
                listed = split(substr(programs[key], 2), in_order, SUBSEP)
                for (p = 1; p <= listed; ++p) {
                    list = names[key, in_order[p]]
                    gsub(/,/, ", ", list)
                    wrap("       " in_order[p] ":", list)
                }
            }
            if (declared != total)
                out = out sprintf("\n    (the programs counted %d skips; %d SKIP lines were found)",
                                  declared, total)
            printf "%s", out
        }' "$detail"
}

build_and_test "release" "$build_dir" -DCMAKE_BUILD_TYPE=Release

# run_script LABEL COMMAND...: a self-contained test script (it prints its
# own summary: "<label> summary:" lines, or one line last); its output goes
# to $log_dir/<label>.log.
run_script() {
    local label=$1
    shift
    local log=$log_dir/$label.log status=0
    mkdir -p "$log_dir"
    say "$label: $* (log: $log)"
    "$@" >"$log" 2>&1 || status=$?
    # Its "<label> summary: ..." lines (one per fuzz target or TSan
    # program), else its last line.
    local result
    result=$(sed -n "s/^$label summary: //p" "$log")
    [[ -n $result ]] || result=$(tail -n 1 "$log" | sed "s/^$label: //")
    printf '%s\n' "$result" | sed 's/^/   /'
    summaries+=("$label: $(printf '%s\n' "$result" | sed '2,$s/^/  /')")
    if (( status != 0 )); then
        tail -n 30 "$log" | sed 's/^/   | /'
        failures+=("$label: exit status $status (see $log)")
    fi
}

# The language bindings against the release build: the CPU backend, and
# OpenCL on PoCL where it is there (unless POLYSAMPLE_TEST_BACKENDS says).
binding_backends=${POLYSAMPLE_TEST_BACKENDS:-cpu}
if [[ -z ${POLYSAMPLE_TEST_BACKENDS:-} && -e $build_dir/libpolysample-opencl.so ]] &&
    ls /etc/OpenCL/vendors/*.icd >/dev/null 2>&1; then
    binding_backends=cpu,opencl
fi
if [[ -e $build_dir/libpolysample.so ]]; then
    POLYSAMPLE_TEST_BACKENDS=$binding_backends run_script rust \
        "$repo/bindings/rust/run-tests.sh" "$build_dir"
    POLYSAMPLE_TEST_BACKENDS=$binding_backends run_script python \
        "$repo/python/run-tests.sh" "$build_dir"
else
    failures+=("bindings: not run, the release build made no libpolysample.so")
fi

if [[ ${PSM_SKIP_SANITIZER:-0} == 1 ]]; then
    summaries+=("sanitizer: skipped (PSM_SKIP_SANITIZER=1)")
else
    # GPU backends are off here: their runtimes are not built with the
    # sanitizers and the GPU machine runs them in the release build. OpenCL
    # stays on, on PoCL's CPU device. Smaller problem sizes keep this under
    # ten minutes (the chi-square tests keep their 10^6 draws).
    export POLYSAMPLE_TEST_QUICK=1
    # use_sigaltstack=0: PoCL's LLVM gives a thread that compiles kernels a
    # signal stack of its own (malloc'd, MINSIGSTKSZ + 64 KiB) where
    # AddressSanitizer's is smaller, which it is on CPUs with a large
    # signal frame (MINSIGSTKSZ follows the CPU's register state); at that
    # thread's exit AddressSanitizer then unmaps LLVM's heap block as if it
    # were its own stack and aborts ("unable to unmap"; test_threads, whose
    # threads build the OpenCL program at once). Without its own signal
    # stack it leaves every thread's alone.
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:strict_string_checks=1:use_sigaltstack=0}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
    # Allocation-failure injection is compiled into this build only, so that
    # test_fault_injection runs where LeakSanitizer watches it.
    build_and_test "sanitizer" "$asan_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPSM_SANITIZE=ON \
        -DPSM_FAULT_INJECTION=ON -DPSM_WITH_CUDA=OFF -DPSM_WITH_HIP=OFF
fi

# The OpenCL backend's large-vocabulary path on the CPU device too: PoCL's
# local memory holds whole rows of most test vocabularies, so this variant
# forces every filtered row onto the global path with a 64-key candidate
# list (the radix narrowing, the list searches and their fallbacks).
if [[ ${PSM_SKIP_OPENCL_GLOBAL:-0} == 1 ]]; then
    summaries+=("opencl-global: skipped (PSM_SKIP_OPENCL_GLOBAL=1)")
elif [[ -n ${POLYSAMPLE_TEST_BACKENDS:-} && ,$POLYSAMPLE_TEST_BACKENDS, != *,opencl,* ]]; then
    summaries+=("opencl-global: skipped (POLYSAMPLE_TEST_BACKENDS leaves out opencl)")
else
    export POLYSAMPLE_TEST_QUICK=0
    POLYSAMPLE_TEST_BACKENDS=opencl build_and_test "opencl-global" "$build_dir-opencl-global" \
        -DCMAKE_BUILD_TYPE=Release -DPSM_WITH_CUDA=OFF -DPSM_WITH_HIP=OFF \
        -DPSM_OPENCL_TEST_LIST_BYTES=512
    # ... and with a 2,048-key list, the gap-bin path (psm_bin_collect: top-p
    # alone, the row filter's top-k), which NVIDIA's OpenCL takes at large
    # vocabularies and the 64-key list above never reaches (the bins need
    # 1,536 keys); the filtered-sampling tests only.
    ctest_select="test_kept_sets|test_semantics|test_chisquare|test_determinism|test_dtypes" \
        POLYSAMPLE_TEST_BACKENDS=opencl build_and_test "opencl-bins" "$build_dir-opencl-bins" \
        -DCMAKE_BUILD_TYPE=Release -DPSM_WITH_CUDA=OFF -DPSM_WITH_HIP=OFF \
        -DPSM_OPENCL_TEST_LIST_BYTES=16384
fi

# The attacks (docs/RELIABILITY.md): each libFuzzer target for a bounded time
# (FUZZ_SECONDS, default 60), then the ThreadSanitizer build of the CPU
# backend's tests. PSM_SKIP_FUZZ=1 leaves both out.
if [[ ${PSM_SKIP_FUZZ:-0} == 1 ]]; then
    summaries+=("fuzz and tsan: skipped (PSM_SKIP_FUZZ=1)")
else
    run_script fuzz "$repo/fuzz/run.sh" "$build_dir-fuzz" "$build_dir"
    run_script tsan "$repo/fuzz/tsan.sh" "$build_dir-tsan"
fi

say "summary"
for line in "${summaries[@]}"; do
    printf '%s\n' "$line" | sed 's/^/   /'
done
if (( ${#failures[@]} > 0 )); then
    for line in "${failures[@]}"; do
        printf '   FAILED %s\n' "$line"
    done
    exit 1
fi
printf '   all passed\n'
