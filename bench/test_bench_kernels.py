"""Kernel benchmarks: the four fused passes on every backend that is present.

Backends: ``eager`` (the reference, through the public ops), ``compile``
(``torch.compile`` of the reference math, see compiled.py), ``triton`` and
``cuda`` (through the public ops with ``use_backend``). A backend is timed
when ``resbm_kernels.backends._load(name)`` imports it and
``supports(device)`` is true; otherwise the item is skipped with the reason.
The Triton interpreter is never benchmarked.

Shapes, bf16 activations and weights, RMSNorm on, no residual; as in
training, encode forward returns the row statistics (``return_row_stats``)
and encode backward is given them (the torch.compile baseline neither
returns nor uses them):

- GPU (``--resbm-grid full``): N in {4096, 16384, 65536}, d in {2048, 4096,
  8192}, k in {d/128, d/64, d/32}, bits in {16, 8, 4}; torch.compile at N=16384
  only unless ``--resbm-compile all`` (every shape compiles for seconds).
- CPU (``--resbm-grid cpu``, ids tagged ``cpu``): N=2048, d=2048, k in {16,
  64}, bits in {16, 8, 4}; eager and torch.compile only.

Codecs: forward ``Codec(bits)`` (one bf16 scale per token, round to nearest
even); gradient ``Codec(bits, rounding="stochastic")``; bits=16 is bf16
passthrough. decode_backward decodes a forward payload of the same bits.

Per item (extra_info): median time, the bytes the pass must move at least
(each input read once, each output written once -- the roofline), achieved
GB/s, fraction of the device-to-device copy bandwidth measured in the same
session, the same fraction over the bytes the Triton/CUDA kernels move by
design (``design_bytes``: some backward passes re-read their big input),
TFLOP/s, the error against the eager reference (relative L2; a quantized
payload's also in quantization steps), on a GPU the NVML
telemetry read just after timing, and for the kernel backends on a GPU the
host time per call (``host_median_s``, measured while the GPU is kept busy;
above the device time the item is ``host_bound``). Speedups over eager and torch.compile
are filled in by conftest.py once all items have run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import zlib

import pytest
import torch

import benchlib
from benchlib import REPLAY
from resbm_kernels import checks, ops
from resbm_kernels.backends import _load, use_backend
from resbm_kernels.backends import reference as R
from resbm_kernels.codec import Codec

PASSES = ("encode_forward", "decode_forward", "decode_backward", "encode_backward")
BACKENDS = ("eager", "compile", "triton", "cuda")
FUSED = ("triton", "cuda")  # the project's own kernels (the others are baselines)
GRIDS = {
    "full": dict(N=(4096, 16384, 65536), d=(2048, 4096, 8192), ratio=(128, 64, 32), bits=(16, 8, 4)),
    "cpu": dict(N=(2048,), d=(2048,), ratio=(128, 32), bits=(16, 8, 4)),
}
COMPILE_SLICE_N = 16384
TARGET_N, TARGET_D = 16384, 4096  # the kernels' bandwidth target shapes (with every k and bits of the grid)
EPS = 1e-6
DTYPE = torch.bfloat16
BITS = (16, 8, 4)  # the payload widths benchmarked
# Agreement with the eager reference, checked before an item is timed (:func:`_disagreement`).
# Float results (decode forward's h, the gradients, the row statistics, bf16 payloads decoded):
# relative L2 error up to FLOAT_TOLERANCE (bf16 rounding in another order: at most 2.7e-3 on the
# H100 and H200 of 2026-11-27/28). Quantized payloads, in quantization steps (the larger of the
# two scales): every value within MAX_STEPS (as tests/helpers.assert_close_payload) and on average
# within MEAN_STEPS: encode forward rounds the RMSNorm-folded weight to bf16, so some codes sit
# one step from eager's (int8: 6 %, a mean of 0.06 steps; interpreter, N=256, d=512, k=64), where
# a kernel one step off everywhere is at 1 (bench/README.md, "Correct first").
FLOAT_TOLERANCE, MAX_STEPS, MEAN_STEPS = 1e-2, 1.5, 0.25


@dataclasses.dataclass(frozen=True)
class KernelCase:
    pass_: str
    backend: str
    N: int
    d: int
    k: int
    bits: int
    grid: str

    @property
    def id(self) -> str:
        tag = "-cpu" if self.grid == "cpu" else ""
        return f"{self.pass_}-{self.backend}-N{self.N}-d{self.d}-k{self.k}-bits{self.bits}{tag}"

    @property
    def priority(self):
        """Run order, so that a time budget cuts the least important items:
        first the kernel backends and eager at the target shapes (N=16384,
        d=4096, k in {32, 64, 128}, bits in {16, 8, 4}: the >= 90 % of copy
        bandwidth target), then their torch.compile baseline (seconds of
        compilation per item), then the rest of the grid: d=4096 (the paper's
        width), the 128x ratio, int8, N=16384 first, all backends of a shape
        together."""
        order = lambda value, seq: seq.index(value) if value in seq else len(seq)  # noqa: E731
        target = self.N == TARGET_N and self.d == TARGET_D
        tier = (0 if self.backend != "compile" else 1) if target else 2
        return (tier, order(self.d, (4096, 8192, 2048)), order(self.d // self.k, (128, 32, 64)),
                order(self.bits, (8, 16, 4)), order(self.N, (16384, 65536, 4096)),
                PASSES.index(self.pass_), BACKENDS.index(self.backend))


def _grid_name(config) -> str:
    name = config.getoption("--resbm-grid")
    if name == "auto":
        return "full" if torch.cuda.is_available() else "cpu"
    return name


def pytest_generate_tests(metafunc):
    if "kcase" not in metafunc.fixturenames:
        return
    grid = _grid_name(metafunc.config)
    g = GRIDS[grid]
    cases = [KernelCase(p, b, n, d, d // r, bits, grid)
             for p in PASSES for b in BACKENDS for n in g["N"] for d in g["d"] for r in g["ratio"] for bits in g["bits"]]
    metafunc.parametrize("kcase", cases, ids=[c.id for c in cases])


# ---- backends -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def compiled_reference():
    from compiled import CompiledReference

    return CompiledReference()


def _skip_reason(case: KernelCase, dev, config) -> str | None:
    if case.backend == "compile":
        mode = config.getoption("--resbm-compile")
        if mode == "none":
            return "torch.compile baseline disabled (--resbm-compile none)"
        if mode == "slice" and benchlib.is_gpu(dev) and case.N != COMPILE_SLICE_N:
            return (f"torch.compile baseline is timed at N={COMPILE_SLICE_N} only on the GPU (every shape "
                    "compiles for seconds); --resbm-compile all times every N")
        return None
    if case.backend == "eager":
        return None
    if case.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the Triton interpreter is not benchmarked"
    module, why = _load(case.backend)
    if module is None:
        return f"backend {case.backend!r} is not available: {why}"
    if not module.supports(dev):
        return (f"backend {case.backend!r} does not support {dev} (no CUDA device here; "
                "GPU backends are benchmarked on a GPU only)")
    return None


# ---- inputs, roofline bytes, checks ---------------------------------------------------


@functools.lru_cache(maxsize=None)
def _codecs(bits: int):
    """(forward codec, gradient codec); cached so compiled code sees the same objects."""
    return Codec(bits=bits), Codec(bits=bits, rounding="stochastic")


def _inputs(case: KernelCase, dev, sets: int, gen: torch.Generator):
    n, d, k = case.N, case.d, case.k
    codec, grad_codec = _codecs(case.bits)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * scale).to(DTYPE)

    w = dict(w_e=randn(k, d, scale=d ** -0.5), w_d=randn(d, k, scale=k ** -0.5),
             gamma=(1.0 + 0.1 * torch.randn(d, generator=gen, device=dev)).to(DTYPE))
    per_set = []
    for _ in range(sets):
        s = {}
        if case.pass_ in ("encode_forward", "encode_backward"):
            s["x"] = randn(n, d)
        if case.pass_ in ("decode_forward", "decode_backward"):
            s["payload"] = R.write_payload(torch.randn(n, k, generator=gen, device=dev), codec, 0)
        if case.pass_ == "decode_backward":
            s["grad_h"] = randn(n, d, scale=1e-2)
        if case.pass_ == "encode_backward":
            s["grad_payload"] = R.write_payload(torch.randn(n, k, generator=gen, device=dev) * 1e-2, grad_codec, 0)
            s["row_stats"] = torch.empty(n, k + 1, device=dev)
            R.encode_forward(s["x"], w["w_e"], w["gamma"], EPS, codec, 0, row_stats=s["row_stats"])
        per_set.append(s)
    return w, per_set


def _set_bytes(case: KernelCase) -> int:
    """Bytes of one rotating input set (what must not stay in cache)."""
    n, d, k = case.N, case.d, case.k
    codec, grad_codec = _codecs(case.bits)
    big = n * d * 2
    return {"encode_forward": big, "decode_forward": codec.payload_bytes(n, k),
            "decode_backward": big + codec.payload_bytes(n, k),
            "encode_backward": big + grad_codec.payload_bytes(n, k) + _stats_bytes(case)}[case.pass_]


def _stats_bytes(case: KernelCase) -> int:
    """The RMSNorm row statistics: (N, k+1) float32."""
    return case.N * (case.k + 1) * 4


def roofline(case: KernelCase) -> tuple[int, int]:
    """(bytes, flops): every input read once and every output written once;
    2*N*d*k FLOP per projection (backward passes also form a weight gradient)."""
    n, d, k = case.N, case.d, case.k
    codec, grad_codec = _codecs(case.bits)
    big, wts, vec = n * d * 2, d * k * 2, d * 2
    p, gp, st = codec.payload_bytes(n, k), grad_codec.payload_bytes(n, k), _stats_bytes(case)
    proj = 2 * n * d * k
    return {
        "encode_forward": (big + wts + vec + p + st, proj),                  # x, W_e, gamma -> payload, row stats
        "decode_forward": (p + wts + big, proj),                             # payload, W_d -> h
        "decode_backward": (big + p + wts + gp + wts, 2 * proj),              # grad_h, payload, W_d -> g-payload, dW_d
        # g-payload, x, W_e, gamma, row stats -> dx, dW_e, dgamma
        "encode_backward": (gp + big + wts + vec + st + big + wts + vec, 2 * proj),
    }[case.pass_]


def design_bytes(case: KernelCase) -> int | None:
    """Bytes the Triton and CUDA kernels move by design (None for the other
    backends): the roofline, plus the backward passes' second read of their big
    input (grad_h, x: the weight gradient is a pass of its own; encode backward
    runs through RMSNorm here, where grad_x reads x too). Triton's (N, k)
    GEMM operand Z (bf16) is also written and read once by both backward
    passes. Not counted: the
    weight gradients' fp32 partials, one (k, d) per row split, written and
    summed (up to 8 splits: 32 MB at N=16384, d=4096, k=128, next to 268 MB
    of roofline; small enough to stay in L2, so counting them could flatter).
    With RESBM_TRITON_FUSED_WGRAD=1 Triton's second read is meant to come from
    L2, so it is not counted (nor are its chunks' partials, one per 16 MiB)."""
    if case.backend not in FUSED:
        return None
    big = case.N * case.d * 2
    backward = case.pass_ in ("decode_backward", "encode_backward")
    extra = big if backward and not (case.backend == "triton" and _triton_fused_wgrad()) else 0
    if case.backend == "triton" and backward:
        extra += 2 * case.N * case.k * 2
    return roofline(case)[0] + extra


def _triton_fused_wgrad() -> bool:
    from resbm_kernels.backends.triton import FUSED_WGRAD_SWITCH

    return checks.switch(FUSED_WGRAD_SWITCH)


def _call(case: KernelCase, compiled, w, s):
    codec, grad_codec = _codecs(case.bits)
    n = case.N
    if compiled is not None:
        if case.pass_ == "encode_forward":
            return compiled.encode_forward(s["x"], w["w_e"], w["gamma"], EPS, codec, 0)
        if case.pass_ == "decode_forward":
            return compiled.decode_forward(s["payload"], w["w_d"], None, codec, n, DTYPE)
        if case.pass_ == "decode_backward":
            return compiled.decode_backward(s["grad_h"], s["payload"], w["w_d"], codec, grad_codec, 1)
        return compiled.encode_backward(s["grad_payload"], s["x"], w["w_e"], w["gamma"], EPS, grad_codec)
    if case.pass_ == "encode_forward":
        return ops.encode(s["x"], w["w_e"], codec, norm_weight=w["gamma"], eps=EPS, seed=0, return_row_stats=True)
    if case.pass_ == "decode_forward":
        return ops.decode(s["payload"], w["w_d"], codec, n, out_dtype=DTYPE)
    if case.pass_ == "decode_backward":
        return ops.decode_backward(s["grad_h"], s["payload"], w["w_d"], codec, grad_codec, grad_seed=1)
    return ops.encode_backward(s["grad_payload"], s["x"], w["w_e"], grad_codec, norm_weight=w["gamma"], eps=EPS,
                               row_stats=s["row_stats"])


def _comparable(case: KernelCase, out):
    """Float tensors that stand for a pass's result (payloads decoded; encode
    forward's row statistics where it returned them, not the compiled baseline,
    as the projection and 1/rms, so that an error says which one is off)."""
    codec, grad_codec = _codecs(case.bits)
    n, k = case.N, case.k
    if case.pass_ == "encode_forward":
        payload, *stats = out if isinstance(out, tuple) else (out,)
        stats = [part for s in stats for part in (s[:, :k], s[:, k:])]
        return [R.read_payload(payload, codec, n, k, torch.float32), *stats]
    if case.pass_ == "decode_forward":
        return [out]
    if case.pass_ == "decode_backward":
        return [R.read_payload(out[0], grad_codec, n, k, torch.float32), out[1]]
    return [t for t in out if t is not None]


def _triton_autotuners() -> dict:
    """The Triton backend's autotuned kernels by name (empty without Triton)."""
    module, _ = _load("triton")
    return module.KERNELS if module is not None else {}


def _configs_used(tuners: dict) -> dict:
    """The launch config each kernel last ran with (autotuned, or the first
    launchable one under RESBM_TRITON_AUTOTUNE=0), for kernels that ran since
    their ``best_config`` was cleared."""
    used = {}
    for name, tuner in tuners.items():
        c = getattr(tuner, "best_config", None)
        if c is not None:
            kw = c.kwargs
            used[name] = f"BLOCK_N={kw.get('BLOCK_N')} BLOCK_D={kw.get('BLOCK_D')} warps={c.num_warps} " \
                         f"stages={c.num_stages}" + (f" maxnreg={c.maxnreg}" if c.maxnreg else "") + \
                         (f" D_SPLIT={kw['D_SPLIT']}" if kw.get("D_SPLIT", 1) > 1 else "")
    return used


def _payload_codec(case: KernelCase):
    """The codec of the quantized payload a pass writes (encode forward,
    decode backward; the first of its outputs), else None."""
    codec, grad_codec = _codecs(case.bits)
    codec = {"encode_forward": codec, "decode_backward": grad_codec}.get(case.pass_)
    return codec if codec is not None and codec.quantized else None


def _payload_steps(case: KernelCase, codec, got, ref) -> tuple[float, float]:
    """(largest, mean) distance of two payloads' dequantized values, in steps of
    the larger of their two scales (a non-finite value or scale gives NaN)."""
    steps = R.payload_steps(got, ref, codec, case.N, case.k)
    return steps.max().item(), steps.mean().item()


def _disagreement(case: KernelCase, got_out, ref_out) -> tuple[dict, str | None]:
    """How far a pass's outputs are from the reference's outputs on the same
    inputs, and why that is too far (None if it is not; see FLOAT_TOLERANCE).
    The dict: ``rel_errs`` (relative L2 error per :func:`_comparable` output,
    payloads decoded), ``rel_err`` (their largest), and for a quantized
    payload ``steps_max`` / ``steps_mean``."""
    got, ref = _comparable(case, got_out), _comparable(case, ref_out)
    errs = [_rel_err([a], [b]) for a, b in zip(got, ref)]
    found = dict(rel_errs=errs, rel_err=max(errs))
    codec = _payload_codec(case)
    floats = errs[1:] if codec else errs
    if not all(e <= FLOAT_TOLERANCE for e in floats):  # (NaN fails)
        return found, f"relative errors {', '.join(f'{e:.3g}' for e in errs)} vs the reference (per output)"
    if codec:
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        found["steps_max"], found["steps_mean"] = _payload_steps(case, codec, first(got_out), first(ref_out))
        if not (found["steps_max"] <= MAX_STEPS and found["steps_mean"] <= MEAN_STEPS):
            return found, (f"payload values {found['steps_max']:.3g} quantization steps from the reference's at most, "
                           f"{found['steps_mean']:.3g} on average (allowed: {MAX_STEPS}, {MEAN_STEPS})")
    return found, None


def _same_bits(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _rel_err(got, ref) -> float:
    errs = []
    for a, b in zip(got, ref):
        a, b = a.float(), b.float()
        if not torch.isfinite(a).all():
            return float("nan")
        errs.append(((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return max(errs)


# ---- the benchmark -----------------------------------------------------------------------


@pytest.mark.benchmark(timer=REPLAY)
def test_kernel(benchmark, kcase: KernelCase, bench_device, copy_bw, matmul_rate, request):
    dev = bench_device
    reason = _skip_reason(kcase, dev, request.config)
    if reason:
        pytest.skip(reason)
    compiled = request.getfixturevalue("compiled_reference") if kcase.backend == "compile" else None
    # the public ops on the named backend; torch.compile calls its compiled passes directly
    backend_name = {"eager": "reference", "compile": None}.get(kcase.backend, kcase.backend)
    benchmark.group = f"kernels {kcase.pass_} d={kcase.d} k={kcase.k} bits={kcase.bits}"

    gpu = benchlib.is_gpu(dev)
    sets = benchlib.rotation(_set_bytes(kcase), dev)
    seed = zlib.crc32(f"{kcase.pass_}{kcase.N}{kcase.d}{kcase.k}{kcase.bits}".encode())
    gen = torch.Generator(device=dev).manual_seed(seed)
    w, per_set = _inputs(kcase, dev, sets, gen)

    warmup = 3 if gpu else 1
    tuners = _triton_autotuners() if kcase.backend == "triton" else {}
    for tuner in tuners.values():
        tuner.best_config = None  # set again by each kernel this pass launches
    with use_backend(backend_name) if backend_name else contextlib.nullcontext():
        call = lambda i: _call(kcase, compiled, w, per_set[i % sets])  # noqa: E731
        # correctness first: the backend's result against the eager reference
        got = call(0)
        if kcase.backend == "eager":
            agreement = dict(rel_err=0.0)
        else:
            with use_backend("reference"):
                ref = _call(kcase, None, w, per_set[0])
            agreement, problem = _disagreement(kcase, got, ref)
            del ref
            assert problem is None, f"{kcase.id}: {problem}"
        if kcase.backend in FUSED:  # the fused kernels are deterministic: a race shows here
            assert _same_bits(_comparable(kcase, got), _comparable(kcase, call(0))), (
                f"{kcase.id}: two calls on the same inputs differ")
        del got
        reps, est = benchlib.adaptive_reps(call, dev, target_s=0.25 if gpu else 0.5,
                                           lo=10 if gpu else 3, hi=100 if gpu else 10, warmup=warmup)
        times = benchlib.time_calls(call, dev, warmup=0, reps=reps)
        host = benchlib.host_times(call, dev) if kcase.backend in FUSED else None

    stats = benchlib.summary(times)
    host_s = statistics.median(host) if host else None
    nbytes, flops = roofline(kcase)
    copy_s = benchlib.same_size_copy_s(nbytes, dev)
    compute_s = flops / (matmul_rate["matmul_TFLOPS"] * 1e12)  # the pass's GEMMs at the measured matmul rate
    design = design_bytes(kcase)
    gbps = nbytes / stats["median_s"] / 1e9
    codec, grad_codec = _codecs(kcase.bits)
    benchmark.extra_info.update(
        suite="kernels", grid=kcase.grid, device=str(dev), timer="cuda-events" if gpu else "perf_counter",
        **{"pass": kcase.pass_}, backend=kcase.backend, N=kcase.N, d=kcase.d, k=kcase.k, bits=kcase.bits,
        dtype="bfloat16", codec=codec.spec, grad_codec=grad_codec.spec,
        rotation_sets=sets, untimed_calls=warmup + 2, **stats,
        bytes_moved=nbytes, flops=flops, GBps=gbps, tflops=flops / stats["median_s"] / 1e12,
        copy_GBps=copy_bw["copy_GBps"], frac_copy_bw=gbps / copy_bw["copy_GBps"],
        design_bytes=design, frac_copy_bw_design=design / stats["median_s"] / 1e9 / copy_bw["copy_GBps"]
        if design else None,
        # against a copy of the same bytes (launch and ramp included): how far from the memory limit at this size
        same_size_copy_s=copy_s, frac_same_size_copy=copy_s / stats["median_s"],
        # the roofline with both sides: the slower of moving the bytes and doing the FLOPs
        matmul_TFLOPS=matmul_rate["matmul_TFLOPS"], compute_floor_s=compute_s,
        frac_roofline=max(copy_s, compute_s) / stats["median_s"],
        max_rel_err_vs_eager=agreement["rel_err"],
        max_steps_vs_eager=agreement.get("steps_max"), mean_steps_vs_eager=agreement.get("steps_mean"),
        # host time per call (GPU busy): above median_s, a training loop calling the pass back to back
        # waits on Python and launches, not on the kernels
        host_median_s=host_s, host_bound=None if host_s is None else host_s > stats["median_s"],
        **({"triton_configs": _configs_used(tuners)} if tuners else {}),
        **benchlib.telemetry(dev),
    )
    benchlib.record(benchmark, times)
