#!/usr/bin/env bash
# The Python package on the GPU machine: build, pytest with the CUDA tests,
# the benchmark plot, the overhead figures and the decode-loop example (with
# its step captured in a CUDA graph and replayed, positions on the device).
#
# usage: python/gpu-tests.sh OUT_DIR [BUILD_DIR]
#
# Expects a Python with torch (CUDA), numpy, pytest, nanobind and
# matplotlib first on PATH; scikit-build-core is not needed: the extensions
# (with the torch ops' C++ kernels, built against that torch) are built with
# plain CMake (PSM_BUILD_PYTHON=ON, the same python/
# CMakeLists.txt that `pip install .` uses) and the package is laid out by
# `cmake --install` (components runtime and python) into BUILD_DIR/stage,
# which goes on PYTHONPATH.
#
# Writes into OUT_DIR: pytest.txt, bench.txt, bench.json, bench.png,
# overhead.json, decode_loop.txt. Exits non-zero if a test or the
# benchmark fails.
set -euo pipefail
out=${1:?usage: python/gpu-tests.sh OUT_DIR [BUILD_DIR]}
repo=$(cd "$(dirname "$0")/.." && pwd)
build=${2:-$repo/build-python-gpu}
mkdir -p "$out" "$build"
out=$(cd "$out" && pwd)
build=$(cd "$build" && pwd)
python=$(command -v python3)
jobs=$(nproc 2>/dev/null || echo 4)

python3 -c "import torch, numpy, pytest, nanobind, matplotlib" || {
  echo "gpu-tests: needs torch, numpy, pytest, nanobind and matplotlib in $python"; exit 1; }

configure() {
  cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPSM_BUILD_PYTHON=ON \
    -DPSM_BUILD_TESTS=OFF -DPSM_WITH_HIP=OFF -DPython_EXECUTABLE="$python" \
    -DCMAKE_INSTALL_LIBDIR=polysample -DPSM_PYTHON_PACKAGE_DIR=polysample \
    -DPSM_PYTHON_TORCH_OPS="$1" >"$build/configure.log"
}
# The torch ops' C++ kernels (polysample._torch_ops) against this Python's
# torch; should they not build, the rest is built and tested without them
# (the ops then run their Python kernels; the C++ kernels' tests skip).
if ! { configure ON && cmake --build "$build" --parallel "$jobs" >"$build/build.log" 2>&1; }; then
  tail -n 40 "$build/build.log" 2>/dev/null || true
  echo "gpu-tests: the torch ops' C++ kernels did not build (log: $build/build.log);" \
       "going on without them"
  configure OFF
  rm -f "$build"/python/_torch_ops*.so
  cmake --build "$build" --parallel "$jobs" >"$build/build-without-torch-ops.log" 2>&1 || {
    tail -n 40 "$build/build-without-torch-ops.log"; exit 1; }
fi
rm -rf "$build/stage"
for component in runtime python; do
  cmake --install "$build" --component "$component" --prefix "$build/stage" >/dev/null
done
export PYTHONPATH=$build/stage${PYTHONPATH:+:$PYTHONPATH}
if [ -x "$build/cli/polysample" ]; then
  export POLYSAMPLE_CLI=$build/cli/polysample
fi
export POLYSAMPLE_TEST_BACKENDS=${POLYSAMPLE_TEST_BACKENDS:-cpu,cuda}

status=0
(cd "$repo/python/tests" && python3 -m pytest -q -rs -p no:cacheprovider) 2>&1 \
  | tee "$out/pytest.txt" || status=$?
(cd "$out" && python3 -m polysample.bench --device cuda --out "$out") 2>&1 \
  | tee "$out/bench.txt" || status=$?
python3 "$repo/python/examples/decode_loop.py" --device cuda --steps 8 --graph 2>&1 \
  | tee "$out/decode_loop.txt" || status=$?
summary=$(grep -E "(passed|failed|error)" "$out/pytest.txt" | tail -n 1)
kernels=$(python3 -c "import polysample.torch as t; print(t.KERNELS + (f' ({t.KERNELS_REASON})' if t.KERNELS_REASON else ''))" 2>&1 | tail -n 1)
echo "python gpu tests: ${summary:-no pytest summary}; torch ops' kernels: $kernels;" \
     "bench and overhead in $out"
exit "$status"
