"""Host time per call of the four passes, on the CPU, with the kernel launches
replaced by no-ops: the Python side of a call (op dispatch, argument checks,
backend choice, output allocation, launch arguments), which a GPU pays on its
host whatever the kernels take (bench/README.md, "Host time").

Not a timing of any kernel, nor of Triton's launcher (the kernel function's
``run``; its autotuner and heuristics layers are timed) or the CUDA driver:
the point is to compare commits on any machine, a GPU-less one included. Each
backend runs on CPU tensors (the Triton one needs ``TRITON_INTERPRET=1``, the
CUDA one the emulator library ``libresbm_cuda_emu``, whose size queries it
still asks). The ops check the header of each payload they read from CPU
tensors (on a GPU they do not: a device sync); that check is included.
``--gpu-configs`` gives the Triton autotuners their GPU config sets instead of
the interpreter's one config (several configs take another path through the
autotuner, as on a GPU). Reports the best of ``--repeat`` medians of
``--calls`` calls, in microseconds, for the public op (``resbm_kernels.ops``)
and for the backend's function alone; then a whole training step of a
ResBMBoundary (graph_replay.py's: forward and backward, stochastic codecs),
whose host time also counts autograd, the module and the boundary op (on the
CPU without the header check: the stubbed kernels write no header to read).

    TRITON_INTERPRET=1 python bench/host_overhead.py --backends triton,cuda --gpu-configs

On a GPU machine, ``--device cuda`` times the same calls with their real
launches (inputs on the GPU; the default shape keeps each call's device work
far below its host time, so the launch queue never fills and the numbers are
the host's): the difference from a stubbed run on the same host is what the
launches themselves cost there (Triton's launcher, the CUDA driver).
``--profile N`` also runs each pass's public op under cProfile and prints the N
functions with the most time of their own, per call: where the host time goes.

    python bench/host_overhead.py --device cuda --profile 15
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import time

import torch

import graph_replay
from resbm_kernels import checks, ops
from resbm_kernels.backends import _load, use_backend
from resbm_kernels.codec import Codec


_ABSENT = object()


def _jit_function(kernel):
    """The Triton kernel function under its autotuner and heuristics (which stay timed)."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def launch_targets(backend: str, module) -> list:
    """(object, attribute) pairs through which ``backend`` launches its kernels:
    the CUDA library's calls; the Triton kernel functions themselves, under the
    autotuner and heuristics layers (Python a GPU runs too)."""
    if backend == "cuda":
        return [(module, "_call")]
    kernels = [*module.KERNELS.values(), module.finish_rows_kernel, module.finish_weight_grad_kernel]
    return [(_jit_function(kernel), "run") for kernel in kernels]


@contextlib.contextmanager
def gpu_autotune_sets(module):
    """The Triton kernels' GPU autotune sets in place of the interpreter's one
    config, pruned to the first launchable one (as RESBM_TRITON_AUTOTUNE=0): each
    key is tuned at its first call, later calls take the autotuner's path for a
    tuned key, as on a GPU; the timing of that one config, which Triton 3.6 does
    (3.8 skips it), is stubbed. Only with the launches stubbed: the GPU configs
    are not meant for the interpreter."""
    from resbm_kernels.backends.triton import configs

    saved = [(tuner, tuner.configs, tuner.cache) for tuner in module.KERNELS.values()]
    autotune = configs.AUTOTUNE
    try:
        configs.AUTOTUNE = False
        for name, tuner in module.KERNELS.items():
            tuner.configs = configs.gpu_configs(configs.GPU_TABLES[name])
            tuner.cache = {}
            tuner._bench = lambda *args, config, **meta: [0.0]
        yield
    finally:
        configs.AUTOTUNE = autotune
        for tuner, tuned, cache in saved:
            tuner.configs, tuner.cache = tuned, cache
            vars(tuner).pop("_bench", None)  # the class's again


@contextlib.contextmanager
def stubbed_launches(backend: str, module):
    """The backend's kernel launches replaced by no-ops inside the block."""
    targets = launch_targets(backend, module)
    saved = [(obj, name, vars(obj).get(name, _ABSENT)) for obj, name in targets]
    try:
        for obj, name in targets:
            setattr(obj, name, lambda *args, **kwargs: None)
        yield
    finally:  # as before: a kernel's run is its class's (an attribute left here would hide the class's)
        for obj, name, value in saved:
            if value is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


@contextlib.contextmanager
def payload_headers_unread():
    """The ops' CPU-only check of each payload's header off inside the block, as
    on a GPU: with the launches stubbed no kernel writes the header the next pass reads."""
    saved = checks._is_fake
    try:
        checks._is_fake = lambda t: True
        yield
    finally:
        checks._is_fake = saved


def _calls(module, n: int, d: int, k: int, dtype, device="cpu"):
    """{pass: (public op call, backend function call)} on fresh inputs on ``device``."""
    gen = torch.Generator().manual_seed(0)
    x, grad_h = (torch.randn(n, d, generator=gen).to(device, dtype) for _ in range(2))
    w_e = (torch.randn(k, d, generator=gen) / d**0.5).to(device, dtype)
    w_d = (torch.randn(d, k, generator=gen) / k**0.5).to(device, dtype)
    gamma = torch.ones(d, dtype=dtype, device=device)
    codec, grad_codec = Codec(bits=8), Codec(bits=8, rounding="stochastic")
    with use_backend("reference"):  # real payloads and row statistics to read
        payload, stats = ops.encode(x, w_e, codec, norm_weight=gamma, return_row_stats=True)
        grad_payload = ops.encode(grad_h, w_e, grad_codec)
    return {
        "encode_forward": (lambda: ops.encode(x, w_e, codec, norm_weight=gamma, return_row_stats=True),
                           lambda: module.encode_forward(x, w_e, gamma, 1e-6, codec, 0, row_stats=stats)),
        "decode_forward": (lambda: ops.decode(payload, w_d, codec, n, out_dtype=dtype),
                           lambda: module.decode_forward(payload, w_d, None, codec, n, dtype)),
        "decode_backward": (lambda: ops.decode_backward(grad_h, payload, w_d, codec, grad_codec, grad_seed=1),
                            lambda: module.decode_backward(grad_h, payload, w_d, codec, grad_codec, 1)),
        "encode_backward": (lambda: ops.encode_backward(grad_payload, x, w_e, grad_codec, norm_weight=gamma,
                                                        row_stats=stats),
                            lambda: module.encode_backward(grad_payload, x, w_e, gamma, 1e-6, grad_codec,
                                                           row_stats=stats)),
    }


def host_us(call, calls: int, repeat: int) -> float:
    """Best of ``repeat`` medians of ``calls`` timed calls, in microseconds."""
    call()
    medians = []
    for _ in range(repeat):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return min(medians) * 1e6


def profile_lines(call, calls: int, top: int) -> list[str]:
    """The ``top`` functions with the most time of their own over ``calls``
    calls under cProfile, in microseconds per call (cProfile's own cost per
    Python-level call inflates those, not the C calls they make)."""
    call()
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [call() for _ in range(calls)])
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive calls, own s, total s, callers)}
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [f"    {own / calls * 1e6:8.1f} us own  {total / calls * 1e6:8.1f} us total  {n / calls:5.1f}x  "
            f"{os.path.basename(file)}:{line}({func})" for (file, line, func), (n, _, own, total, _) in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--N", type=int, default=16384)
    parser.add_argument("--d", type=int, default=64, help="small: the CPU allocates the outputs for real")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gpu-configs", action="store_true", help="the Triton autotuners' GPU config sets")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: inputs on the GPU and real launches (no stubs)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also profile each pass's public op: its TOP functions by own time")
    args = parser.parse_args(argv)
    unknown = set(args.backends.split(",")) - {"triton", "cuda"}
    if unknown:
        parser.error(f"--backends: {', '.join(sorted(unknown))} (the kernel backends are triton and cuda)")
    real = args.device == "cuda"
    if real and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")
    if real and args.gpu_configs:
        parser.error("--gpu-configs is for the CPU (on a GPU the autotuners have their GPU sets)")
    if not real:
        os.environ.setdefault("RESBM_CUDA_EMULATE", "1")  # the CUDA backend on CPU tensors
    configs = "GPU autotune sets" if args.gpu_configs or real else "one config per kernel"
    launches = f"real launches on {torch.cuda.get_device_name()}" if real else "launches stubbed"
    print(f"host time per call, us (median; {launches}; N={args.N} d={args.d} k={args.k} bf16 int8; "
          f"Triton: {configs})")
    print(f"{'backend':8s} {'pass':16s} {'public op':>10s} {'backend fn':>11s}")
    profiles = []
    for backend in args.backends.split(","):
        module, why = _load(backend)
        if module is None or not module.supports(args.device):
            needs = "a library built for this GPU" if real else "TRITON_INTERPRET=1 / the emulator library on the CPU"
            print(f"{backend:8s} skipped: {why or 'needs ' + needs}")
            continue
        tables = gpu_autotune_sets(module) if backend == "triton" and args.gpu_configs else contextlib.nullcontext()
        stubs = contextlib.nullcontext() if real else stubbed_launches(backend, module)
        with stubs, tables, use_backend(backend):
            for name, (public, direct) in _calls(module, args.N, args.d, args.k, torch.bfloat16, args.device).items():
                print(f"{backend:8s} {name:16s} {host_us(public, args.calls, args.repeat):10.1f} "
                      f"{host_us(direct, args.calls, args.repeat):11.1f}")
                if args.profile:
                    profiles += [f"{backend} {name}, public op:", *profile_lines(public, args.calls, args.profile)]
            step_inputs = graph_replay.step_inputs(args.N, args.d, args.k, torch.device(args.device))
            with contextlib.nullcontext() if real else payload_headers_unread():
                run_step = lambda: graph_replay.step(*step_inputs)  # noqa: E731
                print(f"{backend:8s} {'boundary step':16s} {host_us(run_step, args.calls, args.repeat):10.1f} "
                      f"{'-':>11s}")
                if args.profile:
                    profiles += [f"{backend} boundary step:", *profile_lines(run_step, args.calls, args.profile)]
            if real:
                torch.cuda.synchronize()  # the launches' errors, if any, here
    if profiles:
        print("\nown time per call under cProfile, top functions:")
        print("\n".join(profiles))


if __name__ == "__main__":
    main()
