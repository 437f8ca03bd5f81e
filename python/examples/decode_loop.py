"""A decode loop whose sampling step is polysample instead of softmax +
torch.multinomial.

A toy "model" (an embedding and a projection to the vocabulary) stands in
for a language model; what matters is the step marked below. The usual
step

    probs = torch.softmax(logits / temperature, dim=-1)
    next_tokens = torch.multinomial(probs, 1)

becomes one call that also applies top-k/top-p, draws tokens that are the
same on every backend, and runs on torch's current stream:

    next_tokens = polysample.torch.sample(logits, temperature=..., top_p=...,
                                          seed_per_row=request_seeds, offset=step)

With --graph (CUDA), the whole step (model, sampling, and advancing each
sequence's position) is captured once in a CUDA graph and replayed per
token. The positions live on the device (offset_per_row) and are read when
the sampling kernels run, so each replay draws anew; the sampler's
workspace comes from torch's allocator, i.e. the graph's pool:

    positions = torch.zeros(batch, dtype=torch.int64, device="cuda")
    with torch.cuda.graph(graph):
        next_tokens = pst.sample(model(tokens), ..., seed_per_row=request_seeds,
                                 offset_per_row=positions)
        tokens.copy_(next_tokens[:, 0])
        positions.add_(1)            # the next step's position, inside the graph
    for step in range(steps):
        graph.replay()

Run: python decode_loop.py [--device cuda] [--steps 32] [--compile] [--graph]
"""
import argparse

import torch

import polysample.torch as pst


class ToyModel(torch.nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.project = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.project(torch.tanh(self.embed(tokens)))  # (batch, vocab) logits


def decode(model, prompt, steps, request_seeds, use_polysample):
    tokens = prompt
    generated = []
    for step in range(steps):
        logits = model(tokens)
        if use_polysample:
            # Sampling step: one call, per-request seeds, the step as offset.
            next_tokens = pst.sample(logits, temperature=0.8, top_k=50, top_p=0.9,
                                     seed_per_row=request_seeds, offset=step)
        else:
            probs = torch.softmax(logits / 0.8, dim=-1)
            next_tokens = torch.multinomial(probs, 1)
        tokens = next_tokens[:, 0].long()
        generated.append(tokens)
    return torch.stack(generated, dim=1)


def decode_in_a_graph(model, prompt, steps, request_seeds):
    """The polysample decode loop, its step captured once and replayed."""
    tokens = prompt.clone()
    positions = torch.zeros_like(request_seeds)

    def step():
        next_tokens = pst.sample(model(tokens), temperature=0.8, top_k=50, top_p=0.9,
                                 seed_per_row=request_seeds, offset_per_row=positions)
        tokens.copy_(next_tokens[:, 0])
        positions.add_(1)

    # Warm up on a side stream (as torch.cuda.graph asks), then start over.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    tokens.copy_(prompt)
    positions.zero_()
    generated = []
    for _ in range(steps):
        graph.replay()
        generated.append(tokens.clone())
    return torch.stack(generated, dim=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model and the sampling step together")
    parser.add_argument("--graph", action="store_true",
                        help="also capture the step in a CUDA graph and replay it (CUDA only)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ToyModel(args.vocab, 256).to(args.device).eval()
    prompt = torch.randint(0, args.vocab, (args.batch,), device=args.device)
    request_seeds = torch.arange(1000, 1000 + args.batch, dtype=torch.int64,
                                 device=args.device)
    if args.compile:
        model = torch.compile(model)
    with torch.no_grad():
        first = decode(model, prompt, args.steps, request_seeds, use_polysample=True)
        again = decode(model, prompt, args.steps, request_seeds, use_polysample=True)
        baseline = decode(model, prompt, args.steps, request_seeds, use_polysample=False)
    print("polysample tokens (per request):")
    for row in first.tolist():
        print("  ", row)
    print("same seeds, same tokens:", torch.equal(first, again))
    if args.graph:
        with torch.no_grad():
            replayed = decode_in_a_graph(model, prompt, args.steps, request_seeds)
        same = torch.equal(replayed, first)
        print("CUDA graph replays, positions advanced on the device, equal the eager loop:",
              same)
        if not same:
            raise SystemExit("the replayed graph drew other tokens than the eager loop")
    print("softmax + multinomial tokens (torch's generator):", baseline[0].tolist())


if __name__ == "__main__":
    main()
