#!/usr/bin/env bash
# Runs `cargo test --offline` for the Rust crates (polysample-sys and
# polysample: unit, integration, layout and doc tests; examples are built)
# against an already-built library, and prints one summary line.
#
#   bindings/rust/run-tests.sh BUILD_DIR
#
# BUILD_DIR holds libpolysample.so (a CMake build directory); Cargo's output
# goes to BUILD_DIR/rust-target. POLYSAMPLE_TEST_BACKENDS picks the backends
# (default: cpu). Exits non-zero when a test fails or nothing could run.
set -u -o pipefail

bindings_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repository="$(cd "$bindings_dir/../.." && pwd)"

if [ $# -ne 1 ]; then
    echo "usage: $0 BUILD_DIR   (the directory holding libpolysample.so)" >&2
    exit 2
fi
build_dir="$(cd "$1" 2>/dev/null && pwd)" || { echo "rust: FAIL: no directory $1" >&2; exit 1; }
if [ ! -e "$build_dir/libpolysample.so" ]; then
    echo "rust: FAIL: $build_dir has no libpolysample.so; build the library first" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "rust: FAIL: cargo is not installed" >&2
    exit 1
fi

export POLYSAMPLE_LIB_DIR="$build_dir"
export POLYSAMPLE_INCLUDE_DIR="$repository/include"
export CARGO_TARGET_DIR="$build_dir/rust-target"
if [ -z "${POLYSAMPLE_CLI:-}" ] && [ -x "$build_dir/cli/polysample" ]; then
    export POLYSAMPLE_CLI="$build_dir/cli/polysample"
fi
mkdir -p "$CARGO_TARGET_DIR"
log="$CARGO_TARGET_DIR/test.log"

start=$(date +%s)
cargo test --offline --no-fail-fast --workspace --manifest-path "$bindings_dir/Cargo.toml" 2>&1 | tee "$log"
status=$?
seconds=$(( $(date +%s) - start ))

# "test result: ok. 17 passed; 0 failed; 0 ignored; ..." once per test binary
# and once for the doc tests; SKIP lines come from tests/common/mod.rs.
read -r passed failed ignored < <(awk '/^test result:/ {
        for (i = 1; i <= NF; ++i) {
            if ($(i + 1) ~ /^passed/) p += $i
            if ($(i + 1) ~ /^failed/) f += $i
            if ($(i + 1) ~ /^ignored/) g += $i
        }
    } END { print p + 0, f + 0, g + 0 }' "$log")
# A SKIP line can land after a test's name on the same line.
skipped=$(grep -o 'SKIP [^:]*: ' "$log" | wc -l)
backends="${POLYSAMPLE_TEST_BACKENDS:-cpu}"

if [ "$status" -eq 0 ] && [ "$passed" -gt 0 ]; then
    echo "rust: PASS: $passed passed, $failed failed, $ignored ignored, $skipped skipped (backends: $backends) in ${seconds}s"
    exit 0
fi
echo "rust: FAIL (cargo exit $status): $passed passed, $failed failed, $ignored ignored, $skipped skipped (backends: $backends); log in $log"
exit 1
