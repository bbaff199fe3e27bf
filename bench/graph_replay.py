"""A ResBMBoundary training step (forward and backward, stochastic codecs) run
back to back: eager calls against the replay of a CUDA graph captured once.

Eager steps on a GPU are host-bound (on an H200's host up to N=16384 at d=4096:
bench/README.md, "Where the GPU host's time goes"); a graph replays the kernels
without the Python, dispatch and launch work, and since session 33 draws new
stochastic rounding at every replay (the kernels read the module's call counter
on the device). Prints, per token count, the wall time per step of ``--steps``
steps in a row (best of ``--repeat``, synchronised at both ends) each way, and
checks first that a replay equals the eager step of the same count; then the
same steps under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs made
by inductor), with the CUDA graph skips inductor counted.

    python bench/graph_replay.py --backend triton --tokens 256,4096,16384

Without a GPU it times the eager steps only (a dry run of this script).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import counters

from resbm_kernels import GRAD_INT8, Codec, ResBMBoundary, use_backend


def step(boundary, x, grad_h, leaves):
    for t in leaves:
        t.grad = None
    h = boundary(x)
    h.backward(grad_h)
    # detached: a kept autograd graph would keep the leaves' AccumulateGrad nodes, made on the
    # stream of the step that built it, alive into later steps on another stream (the eager
    # steps after the capture): torch warns of a stream mismatch that may cost a synchronisation
    # (on an H200, 2026-11-28, eager steps timed so took 1.1-1.5x those of a run without a capture)
    return [h.detach(), *(t.grad for t in leaves)]


def _seconds_per_step(run, steps: int, repeat: int, device) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def step_inputs(tokens: int, d: int, k: int, device) -> tuple:
    """(boundary, x, grad_h, leaves) of :func:`step`: a bfloat16 boundary with
    RMSNorm, an int4 (groups of 16) stochastic forward codec and int8 stochastic
    gradients, x and the weights the leaves."""
    torch.manual_seed(tokens)
    boundary = ResBMBoundary(d, k, codec=Codec(bits=4, group_size=16, rounding="stochastic"), grad_codec=GRAD_INT8,
                             device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_h = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    return boundary, x, grad_h, (x, *boundary.parameters())


def measure(tokens: int, d: int, k: int, steps: int, repeat: int, device) -> dict:
    boundary, x, grad_h, leaves = step_inputs(tokens, d, k, device)
    row = dict(tokens=tokens, d=d, k=k, eager_us=None, graph_us=None, compiled_us=None, cudagraph_skips=None)
    if device.type != "cuda":
        row["eager_us"] = 1e6 * _seconds_per_step(lambda: step(boundary, x, grad_h, leaves), steps, repeat, device)
        return row
    side = torch.cuda.Stream(device)  # warm-up (compilation, autotuning) on a side stream, as torch advises
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step(boundary, x, grad_h, leaves)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    start = boundary.calls
    with torch.cuda.graph(graph):
        captured = step(boundary, x, grad_h, leaves)
    graph.replay()
    replayed = [t.clone() for t in captured]
    boundary.calls = start
    eager = step(boundary, x, grad_h, leaves)
    if not all(torch.equal(a, b) for a, b in zip(replayed, eager)):
        raise AssertionError(f"N={tokens}: a replay differs from the eager step of the same count")
    row["eager_us"] = 1e6 * _seconds_per_step(lambda: step(boundary, x, grad_h, leaves), steps, repeat, device)
    row["graph_us"] = 1e6 * _seconds_per_step(graph.replay, steps, repeat, device)
    compiled = torch.compile(boundary, mode="reduce-overhead")
    skips = counters["inductor"]["cudagraph_skips"]
    for _ in range(3):  # compilation, then cudagraph trees' recording
        step(compiled, x, grad_h, leaves)
    row["compiled_us"] = 1e6 * _seconds_per_step(lambda: step(compiled, x, grad_h, leaves), steps, repeat, device)
    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto", help="auto, triton, cuda or reference (eager only)")
    p.add_argument("--tokens", default="256,4096,16384", help="comma-separated token counts N")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, backend "
          f"{args.backend}, d={args.d}, k={args.k}, int4/g16 stochastic forward, int8 stochastic gradients")
    with use_backend(args.backend):
        for n in (int(t) for t in args.tokens.split(",")):
            row = measure(n, args.d, args.k, args.steps, args.repeat, device)
            graph = "" if row["graph_us"] is None else (
                f", graph replay {row['graph_us']:.1f} us ({row['eager_us'] / row['graph_us']:.2f}x), "
                f"reduce-overhead {row['compiled_us']:.1f} us ({row['cudagraph_skips']} cudagraph skips)")
            print(f"N={n}: eager {row['eager_us']:.1f} us a step{graph}", flush=True)


if __name__ == "__main__":
    main()
