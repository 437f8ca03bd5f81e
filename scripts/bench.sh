#!/usr/bin/env bash
# Builds polysample (Release, into build/) and runs its benchmark.
#
#   scripts/bench.sh [--all] [--quick] [--no-install] [more `polysample bench` options]
#
# Environment: BUILD_DIR reuses an existing build (default: build/, made
# Release without tests when absent).
#
# Each step prints one line on stderr; apt's and the build's output go to
# ${BUILD_DIR}-logs/ (packages.log, bench-build.log), and a failed step
# shows the end of its log.
#
# Without --all it benchmarks the backend AUTO selects (POLYSAMPLE_BACKEND
# steers it); with --all, every available backend (the CPU one included, so
# the table has speedups over it). The table goes to stdout and the JSON to
# build/bench.json. When PyTorch with a CUDA GPU is present, the PyTorch
# baselines (bench/torch_baseline.py) run on the same cases and their ratio to
# polysample's CUDA times is printed. Missing Debian packages are installed
# first when running as root and building afresh, unless --no-install.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# BUILD_DIR: an existing build to reuse (it is built, not reconfigured).
build="${BUILD_DIR:-${root}/build}"

all=0
install=1
quick=()
passed=()
for argument in "$@"; do
  case "${argument}" in
    --all) all=1 ;;
    --no-install) install=0 ;;
    --quick) quick=(--quick); passed+=(--quick) ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) passed+=("${argument}") ;;
  esac
done

# Each step is one line on stderr; the output of apt and of the build goes to
# log files, whose end is shown when a step fails.
log_dir="${build}-logs"
say() { printf '== %s\n' "$*" >&2; }
# Runs a command with its output appended to a log; $1 says what it does, $2
# is the log.
step() {
  local what=$1 log=$2
  shift 2
  say "${what} ... (log: ${log})"
  printf '\n$ %s\n' "$*" >>"${log}"
  if "$@" >>"${log}" 2>&1; then
    return 0
  fi
  echo "bench.sh: ${what} failed; the end of ${log}:" >&2
  tail -n 20 "${log}" | sed 's/^/   | /' >&2
  return 1
}

# The same Debian packages as scripts/test.sh, installed when missing and root.
packages=(check pkg-config cmake build-essential pocl-opencl-icd ocl-icd-opencl-dev
          opencl-headers hipcc libamdhip64-dev)
# An existing build (BUILD_DIR) already has what it needs: nothing to install.
if [[ -f "${build}/CMakeCache.txt" ]]; then
  install=0
fi
if (( install )) && [[ "$(id -u)" == 0 ]] && command -v dpkg-query >/dev/null && command -v apt-get >/dev/null; then
  missing=()
  for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${package}" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("${package}")
    fi
  done
  if (( ${#missing[@]} )); then
    mkdir -p "${log_dir}"
    # A machine without a package mirror still runs the benchmark with what
    # it has: a backend whose toolchain is missing is simply left out.
    if ! { step "packages: updating the package lists" "${log_dir}/packages.log" \
             timeout 300 apt-get update &&
           step "packages: installing ${missing[*]}" "${log_dir}/packages.log" \
             env DEBIAN_FRONTEND=noninteractive timeout 900 \
             apt-get install -y --no-install-recommends "${missing[@]}"; }; then
      say "packages: continuing without ${missing[*]}"
    fi
  fi
fi

mkdir -p "${log_dir}"
build_log="${log_dir}/bench-build.log"
: >"${build_log}"
if [[ ! -f "${build}/CMakeCache.txt" ]]; then
  step "configure (Release, ${build})" "${build_log}" \
    cmake -S "${root}" -B "${build}" -DCMAKE_BUILD_TYPE=Release -DPSM_BUILD_TESTS=OFF || exit 1
fi
step "build polysample" "${build_log}" \
  cmake --build "${build}" --target polysample_cli --parallel "$(nproc 2>/dev/null || echo 2)" ||
  exit 1

backend_option=(--backend auto)
if (( all )); then
  backend_option=()
fi
for argument in "${passed[@]}"; do
  case "${argument}" in
    --backend|--backend=*) backend_option=() ;; # the caller names the backends
  esac
done
json="${build}/bench.json"
"${build}/cli/polysample" info
echo
# On a terminal, polysample bench names each case on stderr as it starts.
say "polysample bench ${backend_option[*]} ${passed[*]}"
status=0
"${build}/cli/polysample" bench "${backend_option[@]}" "${passed[@]}" "--json=${json}" || status=$?
echo
echo "JSON results: ${json}"

# Where CUDA and OpenCL both ran (OpenCL on the same GPU through its vendor
# driver), the ratio OpenCL time / CUDA time per case.
python3 - "${json}" <<'PY'
import json
import sys

results = [r for r in json.load(open(sys.argv[1]))["results"] if "median_ms" in r]
by_case = {}
for r in results:
    by_case.setdefault((r["rows"], r["vocab"], r["distribution"], r["dtype"], r["setting"]),
                       {})[r["backend"]] = r
pairs = [(case, b["cuda"], b[name]) for case, b in by_case.items() if "cuda" in b
         for name in b if name.startswith("opencl")]
if pairs:
    print("OpenCL vs CUDA on the same run (ratio = OpenCL time / CUDA time):")
    print(f"{'rows':>6} {'vocab':>7} {'logits':6} {'dtype':5} {'setting':9} {'cuda_ms':>9} "
          f"{'opencl_ms':>10} {'ratio':>6}")
    for (rows, vocab, distribution, dtype, setting), cuda, opencl in pairs:
        print(f"{rows:6d} {vocab:7d} {distribution:6} {dtype:5} {setting:9} {cuda['median_ms']:9.3f} "
              f"{opencl['median_ms']:10.3f} {opencl['median_ms'] / cuda['median_ms']:6.2f}")
PY

if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  torch_json="${build}/bench_torch.json"
  echo "PyTorch baselines (bench/torch_baseline.py) ..."
  python3 "${root}/bench/torch_baseline.py" "${quick[@]}" > "${torch_json}"
  python3 - "${json}" "${torch_json}" <<'PY'
import json
import sys

ours = json.load(open(sys.argv[1]))["results"]
theirs = json.load(open(sys.argv[2]))
# The baseline draws N(0, 2^2) logits: it is compared with the normal cases.
cuda = {(r["rows"], r["vocab"], r["dtype"], r["setting"]): r for r in ours
        if r["backend"] == "cuda" and r["distribution"] == "normal" and "median_ms" in r}
print(f"PyTorch {theirs['torch_version']} on {theirs['device']} vs polysample CUDA "
      "(ratio = PyTorch time / polysample time):")
print(f"{'rows':>6} {'vocab':>7} {'dtype':5} {'setting':9} {'method':24} "
      f"{'torch_ms':>9} {'polysample_ms':>13} {'ratio':>6}")
for r in theirs["results"]:
    key = (r["rows"], r["vocab"], r["dtype"], r["setting"])
    mine = cuda.get(key)
    ratio = f"{r['median_ms'] / mine['median_ms']:6.2f}" if mine else "     -"
    mine_ms = f"{mine['median_ms']:13.3f}" if mine else f"{'-':>13}"
    print(f"{r['rows']:6d} {r['vocab']:7d} {r['dtype']:5} {r['setting']:9} {r['method']:24} "
          f"{r['median_ms']:9.3f} {mine_ms} {ratio}")
if not cuda:
    print("(no polysample CUDA results in this run to compare with)")
PY
else
  echo "PyTorch with a CUDA GPU not found: no PyTorch baseline."
fi
exit "${status}"
