#!/usr/bin/env bash
# gpu-compare.sh: `polysample bench` of two source trees in one GPU-machine
# call, for changes that must not slow the kernels (issue 11's 3% gate).
#
#   scripts/gpu-compare.sh BASE.tar [BENCH OPTIONS...]   (from the repository root)
#
# BASE.tar is `git archive` of the base commit, made on the development
# machine and carried (e.g. .carry/base.tar, git-ignored). The working tree
# is the candidate. Both are built alike (Release, OpenCL on, CUDA for this
# GPU's architecture only when a bench option names cuda), then benchmarked
# in alternating rounds (base, candidate, base, candidate) so that clock
# drift and warm-up land on both; a case's figure is its lower median of the
# two rounds. BENCH OPTIONS
# default to `--backend cuda,opencl:0`. COMPARE_BENCH_LIMIT (seconds, default
# 110) bounds each of the four bench runs, so that the call fits the device
# tool's 10 minutes with the builds.
# Output in $OUT: bench-{base,candidate}-{1,2}.json, compare.txt (every case:
# base ms, candidate ms, candidate / base) and build logs.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu-compare-out}
mkdir -p "$OUT"
BASE_TAR=${1:?usage: scripts/gpu-compare.sh BASE.tar [BENCH OPTIONS...]}
shift
BENCH_OPTIONS=("$@")
[ ${#BENCH_OPTIONS[@]} -eq 0 ] && BENCH_OPTIONS=(--backend cuda,opencl:0)

BASE_SRC=/tmp/compare-base-src
rm -rf "$BASE_SRC" && mkdir -p "$BASE_SRC" && tar -xf "$BASE_TAR" -C "$BASE_SRC" || exit 1
# A tar from git archive carries its commit's file times, which may be older
# than a base build left by an earlier compare: ninja would keep that build.
# The build is kept only for the same tar.
BASE_SUM=$(sha256sum "$BASE_TAR" | cut -d' ' -f1)
if [ "$(cat /tmp/compare-build-base/base-tar.sha256 2>/dev/null)" != "$BASE_SUM" ]; then
    rm -rf /tmp/compare-build-base
fi
if [ -d /etc/OpenCL/vendors ] && [ -w /etc/OpenCL/vendors ]; then
    echo libnvidia-opencl.so.1 >/etc/OpenCL/vendors/nvidia.icd
fi
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
ARCH_FLAG=()
[[ "$ARCH" =~ ^[0-9]+$ ]] && ARCH_FLAG=(-DCMAKE_CUDA_ARCHITECTURES="$ARCH-real")

# The CUDA backend is the slowest to build: left out when no bench option
# names it (e.g. --backend opencl:0).
WITH_CUDA=OFF
TARGETS=(polysample_cli polysample-opencl)
case " ${BENCH_OPTIONS[*]} " in
    *cuda*) WITH_CUDA=ON; TARGETS+=(polysample-cuda) ;;
esac
build() { # build NAME SOURCE
    local build_dir=/tmp/compare-build-$1
    cmake -S "$2" -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPSM_WITH_CUDA=$WITH_CUDA \
        -DPSM_WITH_OPENCL=ON -DPSM_WITH_HIP=OFF -DPSM_BUILD_TESTS=OFF "${ARCH_FLAG[@]}" \
        >"$OUT/build-$1.log" 2>&1 &&
        cmake --build "$build_dir" -j 8 --target "${TARGETS[@]}" \
            >>"$OUT/build-$1.log" 2>&1
    echo "build $1: rc=$?"
}
build base "$BASE_SRC" &
build candidate "$ROOT" &
wait
[ -d /tmp/compare-build-base ] && echo "$BASE_SUM" >/tmp/compare-build-base/base-tar.sha256

for round in 1 2; do
    for tree in base candidate; do
        cli=/tmp/compare-build-$tree/cli/polysample
        [ -x "$cli" ] || continue
        timeout "${COMPARE_BENCH_LIMIT:-110}" "$cli" bench "${BENCH_OPTIONS[@]}" --json="$OUT/bench-$tree-$round.json" \
            >"$OUT/bench-$tree-$round.txt" 2>&1
        echo "bench $tree round $round: rc=$?"
    done
done

python3 - "$OUT" <<'EOF' | tee "$OUT/compare.txt"
import json, os, sys
out = sys.argv[1]
def load(tree):
    figures = {}
    for round_ in (1, 2):
        path = os.path.join(out, f"bench-{tree}-{round_}.json")
        if not os.path.exists(path):
            continue
        for r in json.load(open(path))["results"]:
            if r.get("median_ms") is None:
                continue
            key = (r["backend"], r["rows"], r["vocab"], r["dtype"], r["setting"], r["distribution"])
            figures.setdefault(key, []).append(r["median_ms"])
    return {k: sorted(v)[0] for k, v in figures.items()}
base, candidate = load("base"), load("candidate")
worst = {}
print(f"{'backend':8} {'rows':>6} {'vocab':>7} {'dtype':5} {'setting':10} {'dist':6} "
      f"{'base ms':>9} {'cand ms':>9} {'cand/base':>9}")
for key in sorted(base):
    if key not in candidate:
        continue
    ratio = candidate[key] / base[key]
    worst[key[0]] = max(worst.get(key[0], 0), ratio)
    print(f"{key[0]:8} {key[1]:>6} {key[2]:>7} {key[3]:5} {key[4]:10} {key[5]:6} "
          f"{base[key]:9.4f} {candidate[key]:9.4f} {ratio:9.3f}")
for backend, ratio in sorted(worst.items()):
    print(f"worst candidate/base on {backend}: {ratio:.3f}")
EOF
