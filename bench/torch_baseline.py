#!/usr/bin/env python3
"""PyTorch baselines for `polysample bench`, timed the same way on a CUDA GPU.

Two pipelines on the same shapes, dtypes and settings as the bench's default
cases, on random logits ~ N(0, 2^2) resident on the GPU:
  - softmax_multinomial: softmax(logits / T) then torch.multinomial (plain,
    and min-p by zeroing probabilities below min_p * max before drawing);
  - sort_filter_multinomial: the sort-based top-k / top-p pipeline common in
    serving code: sort descending, mask beyond k, softmax, cumulative sum,
    mask the tail past p (keeping at least the top token), softmax,
    multinomial, map back through the sort indices.
Each case: warm-up, then the median of --repeat runs timed with CUDA events.
bf16 logits are converted to float32 inside the timed region, as a serving
sampler does. Prints JSON on stdout; scripts/bench.sh compares it with
polysample's CUDA numbers.
"""
import argparse
import json
import statistics
import sys

import torch

SETTINGS = {
    "plain": dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0),
    "topk_topp": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.0),
    "top_p": dict(temperature=0.8, top_k=0, top_p=0.9, min_p=0.0),
    "min_p": dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.05),
}


def default_cases(quick):
    """The default case list of `polysample bench` (cli/bench_cases.c), its
    normal-logits half."""
    cases = []
    for rows, vocab in ((10000, 32000), (2048, 151936), (256, 151936), (64, 128256)):
        if quick and rows >= 100:
            rows //= 10
        for dtype in ("f32", "bf16"):
            for setting in ("plain", "topk_topp", "top_p", "min_p"):
                if dtype != "f32" and setting in ("top_p", "min_p"):
                    continue
                cases.append((rows, vocab, dtype, setting))
    for setting in ("plain", "topk_topp"):
        cases.append((1, 151936, "f32", setting))
    return cases


def softmax_multinomial(logits, temperature, min_p):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if min_p > 0.0:
        top = probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < min_p * top, 0.0)
    return torch.multinomial(probs, 1)


def sort_filter_multinomial(logits, temperature, top_k, top_p):
    scaled = logits.float() / temperature
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    if 0 < top_k < sorted_logits.shape[-1]:
        sorted_logits[:, top_k:] = float("-inf")
    if top_p < 1.0:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        tail = mass_before >= top_p
        tail[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(tail, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    picked = torch.multinomial(probs, 1)
    return order.gather(-1, picked)


def time_case(rows, vocab, dtype, setting, repeat, generator):
    params = SETTINGS[setting]
    torch_dtype = torch.float32 if dtype == "f32" else torch.bfloat16
    logits = (torch.randn(rows, vocab, device="cuda", generator=generator) * 2.0).to(torch_dtype)
    if setting in ("plain", "min_p"):
        method = "softmax_multinomial"

        def run():
            return softmax_multinomial(logits, params["temperature"], params["min_p"])
    else:
        method = "sort_filter_multinomial"

        def run():
            return sort_filter_multinomial(logits, params["temperature"], params["top_k"],
                                           params["top_p"])
    run()
    torch.cuda.synchronize()
    times = []
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    for _ in range(repeat):
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    del logits
    torch.cuda.empty_cache()
    return dict(rows=rows, vocab=vocab, dtype=dtype, setting=setting, method=method,
                runs=repeat, median_ms=statistics.median(times), **params)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per case")
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        print("torch_baseline.py: no CUDA device", file=sys.stderr)
        return 1
    generator = torch.Generator(device="cuda")
    generator.manual_seed(1)
    results = [time_case(*case, arguments.repeat, generator)
               for case in default_cases(arguments.quick)]
    json.dump(dict(torch_version=torch.__version__, device=torch.cuda.get_device_name(),
                   results=results), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
