#!/usr/bin/env bash
# The Python package's tests (CI): a venv under the build directory, NumPy,
# pytest and PyTorch from PyPI when missing, the package built from this
# checkout with the GPU backends off (they are compiled by the C build
# already; here they would only cost time) and, with PyTorch, with the torch
# ops' C++ kernels (below), then pytest.
#
# usage: python/run-tests.sh [BUILD_DIR]
#   BUILD_DIR (or $POLYSAMPLE_BUILD_DIR, default build): the C build whose
#   cli/polysample the identity tests compare with; the venv and the
#   package's own build directory are kept under it between runs.
# POLYSAMPLE_TEST_BACKENDS (default cpu) picks the backends, as for the C
# suite, e.g. cpu,opencl for PoCL too. Prints one summary line, which says
# which kernels the torch ops ran; exits non-zero when a test fails or the
# package does not build.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-${POLYSAMPLE_BUILD_DIR:-build}}
mkdir -p "$build"
build=$(cd "$build" && pwd)
venv=$build/python-venv
log=$build/python-tests.log

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import numpy, pytest" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet numpy pytest
fi
# PyTorch (PyPI's wheel; its CUDA libraries are not used on a machine
# without a GPU) for the torch ops' tests on CPU tensors: opcheck,
# torch.compile, identity with the array API. POLYSAMPLE_TEST_TORCH=0 skips
# the install; without torch those tests skip with their reason.
if [ "${POLYSAMPLE_TEST_TORCH:-1}" != 0 ] && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet torch >"$build/torch-install.log" 2>&1 ||
    echo "python tests: PyTorch did not install from PyPI (log: $build/torch-install.log); its tests skip"
fi
# The torch ops' C++ kernels (polysample._torch_ops) are built against the
# venv's torch, which pip's isolated build environment cannot see: with
# torch in the venv the package is built without isolation, scikit-build-core
# and nanobind installed into the venv from PyPI. Should that fail, the
# package is built as without torch (the ops then run their Python kernels
# and the C++ kernels' tests skip, saying why), and this says so;
# POLYSAMPLE_REQUIRE_TORCH_OPS=1 makes it a failure instead.
# POLYSAMPLE_TORCH_OPS_BUILD=0 skips the attempt.
built=0
if [ "${POLYSAMPLE_TORCH_OPS_BUILD:-1}" != 0 ] && "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if ! "$venv/bin/python" -c "import scikit_build_core, nanobind" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet "scikit-build-core>=0.10" "nanobind>=2.0" \
      >"$build/python-build-tools.log" 2>&1 || true
  fi
  if "$venv/bin/python" -m pip install --quiet --no-build-isolation "$repo" \
      -C build-dir="$build/python-build-torch" \
      -C cmake.define.PSM_WITH_CUDA=OFF -C cmake.define.PSM_WITH_HIP=OFF \
      -C cmake.define.PSM_PYTHON_TORCH_OPS=ON \
      >"$build/python-install.log" 2>&1; then
    built=1
  else
    tail -n 30 "$build/python-install.log"
    echo "python tests: the package did not build with the torch ops' C++ kernels" \
         "(log: $build/python-install.log); building it without them"
    if [ "${POLYSAMPLE_REQUIRE_TORCH_OPS:-0}" = 1 ]; then
      exit 1
    fi
  fi
fi
if [ "$built" = 0 ] && ! "$venv/bin/python" -m pip install --quiet "$repo" \
    -C build-dir="$build/python-build" \
    -C cmake.define.PSM_WITH_CUDA=OFF -C cmake.define.PSM_WITH_HIP=OFF \
    -C cmake.define.PSM_PYTHON_TORCH_OPS=OFF \
    >"$build/python-install.log" 2>&1; then
  tail -n 30 "$build/python-install.log"
  echo "python tests: the package did not build (log: $build/python-install.log)"
  exit 1
fi

# Which kernels the torch ops run, for the summary line.
kernels="no PyTorch"
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  kernels="torch ops' kernels: $(cd "$repo/python/tests" && "$venv/bin/python" -c \
    "import polysample.torch as t; print(t.KERNELS + (f' ({t.KERNELS_REASON})' if t.KERNELS_REASON else ''))" \
    2>&1 | tail -n 1)"
fi
if [ -x "$build/cli/polysample" ]; then
  export POLYSAMPLE_CLI=$build/cli/polysample
fi
status=0
# From the tests' folder, so that `import polysample` is the installed
# package, not the sources in python/polysample.
(cd "$repo/python/tests" && "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider) \
  2>&1 | tee "$log" || status=$?
summary=$(grep -E "(passed|failed|error|skipped)" "$log" | tail -n 1)
echo "python tests: ${summary:-no pytest summary} (backends ${POLYSAMPLE_TEST_BACKENDS:-cpu};" \
     "$kernels)"
exit "$status"
