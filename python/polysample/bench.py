"""python -m polysample.bench: polysample against PyTorch's own sampling.

For each vocabulary (32,000 and 151,936) and batch size, on float32 logits
~ N(0, 2^2) resident on the device, it times:
  - polysample, plain (temperature 0.8) and top-k 50 + top-p 0.9;
  - PyTorch, plain: softmax(logits / T) then torch.multinomial;
  - PyTorch, top-k + top-p: the sort-based pipeline of serving code (sort,
    mask past k, softmax, cumulative sum, mask past p, multinomial, map
    back through the sort order);
  - the one-read floor: a sum over the logits (torch.sum; NumPy's when
    PyTorch is missing), the least time any sampler that reads its input
    once can take, measured in the same run.
CUDA times are CUDA-event medians; CPU times are wall-clock medians.

It also measures the Python-to-launch overhead at batch 1: the host time of
one Python call (polysample.torch.sample through the dispatcher, and
polysample.sample; on the CPU, on a NumPy array and, with PyTorch, on a CPU
tensor) against the host time of one psm_sample call on the same context
and arrays, timed in C inside the extension (Context.time_sample), and
says whether the torch ops ran their C++ kernels (polysample._torch_ops).
Every call is timed alone, with a synchronisation every 32 calls outside
the timed part so that the device queue stays short; medians are reported.

Writes bench.json, overhead.json and bench.png (matplotlib) into --out and
prints the tables.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import polysample

try:
    import torch
except ImportError:
    torch = None

VOCABS = (32_000, 151_936)
SETTINGS = {
    "plain": dict(temperature=0.8),
    "topk_topp": dict(temperature=0.8, top_k=50, top_p=0.9),
}
SYNC_EVERY = 32


def torch_plain(logits, temperature):
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1)


def torch_sort_top_k_top_p(logits, temperature, top_k, top_p):
    sorted_logits, order = (logits / temperature).sort(dim=-1, descending=True)
    sorted_logits[:, top_k:] = float("-inf")
    probs = torch.softmax(sorted_logits, dim=-1)
    outside = probs.cumsum(dim=-1) - probs > top_p  # mass before a token already reaches p
    probs = probs.masked_fill(outside, 0.0)
    picked = torch.multinomial(probs, 1)
    return order.gather(-1, picked)


class Timer:
    """Median time of fn() after warm-up: CUDA events or the wall clock."""

    def __init__(self, device, repeat):
        self.device, self.repeat = device, repeat

    def __call__(self, fn):
        for _ in range(3):
            fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(self.repeat):
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) * 1e-3)
            return statistics.median(times)
        times = []
        for _ in range(self.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def make_logits(rows, vocab, device):
    if torch is not None:
        generator = torch.Generator().manual_seed(rows * 7 + vocab)
        values = torch.randn(rows, vocab, generator=generator) * 2
        return values.to(device)
    return (np.random.default_rng(rows * 7 + vocab).normal(0, 2, size=(rows, vocab))
            .astype(np.float32))


def run_throughput(device, batches, vocabs, repeat):
    timer = Timer(device, repeat)
    rows_out = []
    for vocab in vocabs:
        for batch in batches:
            logits = make_logits(batch, vocab, device)
            entry = dict(vocab=vocab, batch=batch, bytes=batch * vocab * 4)
            entry["floor"] = timer(lambda: logits.sum())
            sampler = polysample.sample if torch is None else polysample.torch.sample
            for name, setting in SETTINGS.items():
                entry[f"polysample_{name}"] = timer(lambda: sampler(logits, seed=1, **setting))
            if torch is not None:
                entry["torch_plain"] = timer(lambda: torch_plain(logits, 0.8))
                entry["torch_topk_topp"] = timer(
                    lambda: torch_sort_top_k_top_p(logits, 0.8, 50, 0.9))
            rows_out.append(entry)
            print(format_row(entry), flush=True)
    return rows_out


COLUMNS = ("floor", "polysample_plain", "torch_plain", "polysample_topk_topp",
           "torch_topk_topp")


def format_header():
    names = " | ".join(f"{c} (us)" for c in COLUMNS)
    return f"| vocab | batch | {names} |\n|" + " --- |" * (2 + len(COLUMNS))


def format_row(entry):
    cells = []
    for column in COLUMNS:
        value = entry.get(column)
        cells.append("-" if value is None else f"{value * 1e6:.1f}")
    return f"| {entry['vocab']} | {entry['batch']} | " + " | ".join(cells) + " |"


def host_call_times(fn, synchronize, repeats):
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if (i + 1) % SYNC_EVERY == 0:
            synchronize()
    synchronize()
    return times


def run_overhead(device, vocab, repeats):
    """Batch 1: Python call host time against the C call's host time."""
    result = dict(device=device, vocab=vocab, batch=1, repeats=repeats)
    if device == "cuda":
        import polysample.torch as pst
        logits = make_logits(1, vocab, "cuda")
        tokens = torch.empty((1, 1), dtype=torch.int32, device="cuda")
        context = pst._context_for(logits.device, None)
        sync = torch.cuda.synchronize
        pst.sample(logits)
        c_times = context.time_sample(pst._raw(logits), pst._raw(tokens), 3, SYNC_EVERY)
        c_times = context.time_sample(pst._raw(logits), pst._raw(tokens), repeats, SYNC_EVERY)
        python_calls = {
            "polysample.torch.sample": lambda: pst.sample(logits),
            "polysample.sample": lambda: polysample.sample(logits),
        }
        result["context"] = "CUDA, torch's current stream"
    else:
        logits = np.asarray(make_logits(1, vocab, "cpu"))
        tokens = np.empty((1, 1), dtype=np.int32)
        context = polysample._default_context("cpu")._context
        sync = context.synchronize
        c_times = context.time_sample(logits, tokens, repeats, SYNC_EVERY)
        python_calls = {"polysample.sample": lambda: polysample.sample(logits)}
        if torch is not None:
            import polysample.torch as pst
            tensor = torch.from_numpy(logits)
            python_calls["polysample.torch.sample (CPU tensor)"] = lambda: pst.sample(tensor)
            python_calls["polysample.sample (CPU tensor)"] = lambda: polysample.sample(tensor)
        result["context"] = "CPU backend (the call does the sampling itself)"
    if torch is not None:
        import polysample.torch as pst
        result["torch_kernels"] = pst.KERNELS
        result["torch_kernels_reason"] = pst.KERNELS_REASON
    result["c_call_us"] = statistics.median(c_times) * 1e6
    result["python_calls"] = {}
    for name, call in python_calls.items():
        for _ in range(50):
            call()
        median = statistics.median(host_call_times(call, sync, repeats)) * 1e6
        result["python_calls"][name] = dict(call_us=median,
                                            overhead_us=median - result["c_call_us"])
    return result


def plot(rows, device, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted({r["vocab"] for r in rows})
    figure, axes = plt.subplots(len(SETTINGS), len(vocabs),
                                figsize=(6 * len(vocabs), 4.2 * len(SETTINGS)), squeeze=False)
    labels = {"plain": "plain (T=0.8)", "topk_topp": "top-k 50 + top-p 0.9"}
    torch_labels = {"plain": "PyTorch softmax + multinomial",
                    "topk_topp": "PyTorch sort-based top-k/top-p"}
    for column, vocab in enumerate(vocabs):
        mine = [r for r in rows if r["vocab"] == vocab]
        batches = [r["batch"] for r in mine]
        for row_index, setting in enumerate(SETTINGS):
            ax = axes[row_index][column]
            ax.plot(batches, [r[f"polysample_{setting}"] * 1e6 for r in mine], "o-",
                    label="polysample")
            if mine[0].get(f"torch_{setting}") is not None:
                ax.plot(batches, [r[f"torch_{setting}"] * 1e6 for r in mine], "s-",
                        label=torch_labels[setting])
            ax.plot(batches, [r["floor"] * 1e6 for r in mine], "k--",
                    label="one-read floor (sum over the logits)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch (rows)")
            ax.set_ylabel("time (us)")
            ax.set_title(f"vocab {vocab:,}, {labels[setting]}, {device}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return polysample._default_context("cpu").device_name


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m polysample.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batches", default=None,
                        help="comma list (default: 1..1024 on cuda, 1..64 on cpu)")
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per point (default 50 on cuda, 10 on cpu)")
    parser.add_argument("--overhead-repeats", type=int, default=2000)
    parser.add_argument("--out", default=".", help="folder for bench.png, bench.json, "
                                                   "overhead.json")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    if args.device == "cuda" and (torch is None or not torch.cuda.is_available()):
        parser.error("--device cuda needs PyTorch with a CUDA device")
    if torch is not None:
        import polysample.torch  # noqa: F401  (registers the ops)
    cuda = args.device == "cuda"
    batches = [int(b) for b in (args.batches or
                                ("1,4,16,64,256,1024" if cuda else "1,4,16,64")).split(",")]
    vocabs = [int(v) for v in args.vocabs.split(",")]
    repeat = args.repeat or (50 if cuda else 10)
    os.makedirs(args.out, exist_ok=True)

    name = device_name(args.device)
    print(f"polysample {polysample.__version__} on {name}"
          f"{'' if torch is None else f', PyTorch {torch.__version__}'}")
    print(format_header())
    rows = run_throughput(args.device, batches, vocabs, repeat)
    overhead = run_overhead(args.device, vocabs[0], args.overhead_repeats)
    overhead["device_name"] = name
    print(f"\nPython-to-launch overhead, batch 1, vocab {overhead['vocab']} "
          f"({overhead['context']}): C call {overhead['c_call_us']:.2f} us (median host time)")
    if "torch_kernels" in overhead:
        reason = overhead["torch_kernels_reason"]
        print(f"  torch ops' kernels: {overhead['torch_kernels']}"
              f"{'' if reason is None else f' ({reason})'}")
    for call, figures in overhead["python_calls"].items():
        print(f"  {call}: {figures['call_us']:.2f} us, "
              f"{figures['overhead_us']:+.2f} us over the C call")

    with open(os.path.join(args.out, "bench.json"), "w") as handle:
        json.dump(dict(device=args.device, device_name=name, rows=rows), handle, indent=1)
    with open(os.path.join(args.out, "overhead.json"), "w") as handle:
        json.dump(overhead, handle, indent=1)
    if not args.no_plot:
        path = os.path.join(args.out, "bench.png")
        plot(rows, name, path)
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
