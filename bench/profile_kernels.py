"""One call of each fused pass per kernel backend, for a profiler (Nsight Compute).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section WarpStateStats --csv --page details python bench/profile_kernels.py

Every pass and backend is first run (and checked against the reference) with
the profiler off, so compilation, autotuning and the reference run are not
captured; then each runs once between ``cudaProfilerStart`` and
``cudaProfilerStop``, in a range named after it (``--profile-from-start off``
makes ncu see only those launches). Inputs are those of the kernel benchmarks
(bench/test_bench_kernels.py), default shape N=16384, d=4096, k=128, int8
(``--k 32,128`` profiles each k).
bench/gpu_session.sh runs it in its ``profile`` phase.

Without a GPU it still runs the Triton kernels under ``TRITON_INTERPRET=1``
on the CPU (small shapes), to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_bench_kernels import BITS, PASSES, KernelCase, _call, _disagreement, _inputs  # noqa: E402

from resbm_kernels.backends import _load, use_backend  # noqa: E402


def available_backends(dev, wanted) -> list[str]:
    names = []
    for name in ("triton", "cuda"):
        if name not in wanted:
            continue
        module, why = _load(name)
        if module is not None and module.supports(dev):
            names.append(name)
        else:
            print(f"backend {name}: not profiled ({why or f'does not support {dev}'})", flush=True)
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--N", type=int, default=16384)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--k", type=lambda v: [int(x) for x in v.split(",")], default=[128], help="comma-separated")
    parser.add_argument("--backends", default="triton,cuda", help="comma-separated subset of triton,cuda")
    parser.add_argument("--bits", type=int, default=8, choices=BITS)
    parser.add_argument("--passes", default=",".join(PASSES), help="comma-separated subset of " + ",".join(PASSES))
    args = parser.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    passes = [p for p in args.passes.split(",") if p]
    unknown = sorted(set(passes) - set(PASSES))
    if unknown:
        parser.error(f"unknown passes {unknown}; choose from {PASSES}")
    gen = torch.Generator(device=dev).manual_seed(0)
    runs = []  # (label, backend, call)
    failed = False
    for backend, k in itertools.product(available_backends(dev, args.backends.split(",")), args.k):
        for pass_ in passes:
            case = KernelCase(pass_, backend, args.N, args.d, k, args.bits, "profile")
            w, (s,) = _inputs(case, dev, 1, gen)
            with use_backend(backend):
                got = _call(case, None, w, s)  # compiles / autotunes, unprofiled
                _call(case, None, w, s)
            with use_backend("reference"):
                want = _call(case, None, w, s)
            found, problem = _disagreement(case, got, want)
            failed |= problem is not None
            print(f"{case.id}: rel_err vs reference {found['rel_err']:.2e} {problem or 'ok'}", flush=True)
            runs.append((case.id, backend, lambda case=case, w=w, s=s: _call(case, None, w, s)))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
    for label, backend, call in runs:
        with use_backend(backend), torch.cuda.nvtx.range(label) if dev.type == "cuda" else contextlib.nullcontext():
            call()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {len(runs)} calls on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev}")
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
