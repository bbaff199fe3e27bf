"""Random cases: the four passes of each fast backend against the reference on
shapes, codecs and options drawn by hypothesis, beside the fixed cases of
test_triton_backend.py and test_cuda_backend.py.

Each example draws N (0, the block edges 1/63/64/65/127/128/129, or any up to
300), k up to 256 (any multiple of 16, not only powers of two: the fixed
Triton cases stop at k=48), d a multiple of k up to 512, a forward and a
gradient codec (any bits, group, scale dtype and rounding the backend accepts), the activations' dtype, the decoder weight's and the output's
dtype, RMSNorm, a residual, a row stride wider than d, ``out=`` buffers and a
seed offset (none, or any int64: the sum wraps modulo 2**64), then checks every pass as the fixed tests do: payloads of exact inputs byte for
byte, the rest within the tolerances of the dtypes involved. Fresh outputs are
poisoned. Without a GPU the Triton kernels run under the interpreter and the
CUDA kernels on the emulator (both projections of the emulator's sm_90 path:
wgmma and mma.sync). ``RESBM_RANDOM_CASES=<n>`` sets the number of examples
(a longer campaign).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resbm_kernels import ops
from resbm_kernels.backends import reference as ref
from resbm_kernels.backends import use_backend
from resbm_kernels.codec import HEADER_BYTES, Codec
from helpers import CUDA_KERNELS_DEVICE, emulate_cuda_without_gpu, needs_cuda_kernels, to_device, use_projection
from helpers import as_int64, exact, normal, poison_fast_outputs, rel_err, rel_tol

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EXAMPLES = int(os.environ.get("RESBM_RANDOM_CASES", "0")) or None
# (backend, projection of the CUDA kernels) -> examples per run: the interpreter's cost per
# example is about 2 s, the emulator's about 0.3 s; on a GPU Triton compiles each new
# combination of its kernels' constexprs (codec, k padding, flags: 1-3 s each), so fewer there
BACKENDS = {("triton", None): 10, ("cuda", "wgmma"): 15, ("cuda", "mma_sync"): 15}
TRITON_GPU_EXAMPLES = 4


def fast_backend(backend: str):
    """(device, call): ``call(fn, *args, **kwargs)`` runs an op on ``backend`` with
    the tensor arguments on ``device`` (the GPU, else the CPU: interpreter or
    emulator) and returns its tensors on the CPU."""
    device = CUDA_KERNELS_DEVICE if backend == "cuda" else ("cuda" if torch.cuda.is_available() else "cpu")

    def call(fn, *args, **kwargs):
        with use_backend(backend):
            out = fn(*to_device(args, device), **to_device(kwargs, device))
        return to_device(out, "cpu")

    return device, call


@st.composite
def codecs(draw, k: int, any_group: bool):
    """A codec for k values; the Triton kernels take power-of-two groups only."""
    bits = draw(st.sampled_from([16, 8, 4, 2]))
    if bits == 16:
        return Codec(bits=16)
    groups = [g for g in range(1, k + 1) if k % g == 0 and g * bits % 8 == 0 and (any_group or g & (g - 1) == 0)]
    return Codec(bits=bits, group_size=draw(st.sampled_from([None, *groups])),
                 scale_dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])),
                 rounding=draw(st.sampled_from(["nearest", "stochastic"])))


@st.composite
def cases(draw, any_group: bool):
    k = 16 * draw(st.integers(1, 16))
    d = k * draw(st.integers(1, 512 // k))
    return dict(
        n=draw(st.one_of(st.sampled_from([0, 1, 63, 64, 65, 127, 128, 129]), st.integers(1, 300))),
        d=d, k=k, codec=draw(codecs(k, any_group)), grad_codec=draw(codecs(k, any_group)),
        dtype=draw(st.sampled_from(DTYPES)), w_d_dtype=draw(st.sampled_from(DTYPES)),
        out_dtype=draw(st.sampled_from(DTYPES)), norm=draw(st.booleans()), residual=draw(st.booleans()),
        row_pad=draw(st.sampled_from([0, 16, 48])), use_out=draw(st.booleans()), seed=draw(st.integers(0, 2**40)),
        offset=draw(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))),
    )


def _rows(t: torch.Tensor, pad: int, device) -> torch.Tensor:
    """t on ``device`` as a column slice of a NaN-filled tensor ``pad`` columns
    wider (row stride > d)."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype, device=device)
    wide[:, : t.shape[1]] = t.to(device)
    return wide[:, : t.shape[1]]


def _payload_steps(p, q, codec: Codec, n: int, k: int, dtype) -> float:
    """Largest difference of two payloads' values, in units of the larger of one
    quantization step and one rounding (in ``dtype``, and to bf16 for bits=16)
    of the row's largest value: the two z may differ by the input's rounding,
    and each value is within a step of its z."""
    assert torch.equal(p[:HEADER_BYTES], q[:HEADER_BYTES]), "headers differ"
    if n == 0:
        return 0.0 if torch.equal(p, q) else float("inf")
    a, b = (ref.read_payload(t, codec, n, k, torch.float32) for t in (p, q))
    assert torch.isfinite(a).all(), "non-finite values"
    row_max = torch.maximum(a.abs().amax(1, keepdim=True), b.abs().amax(1, keepdim=True))
    rounding = row_max * max(rel_tol(dtype), 2.0**-7)
    units = (a - b).abs() / rounding.clamp_min(1e-30)
    if codec.quantized:  # (the larger unit: the smaller count)
        units = torch.minimum(units, ref.payload_steps(p, q, codec, n, k))
    return units.max().item()


def _assert_close(got, want, tol, what):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {got.shape}"
    assert torch.isfinite(got).all(), f"{what}: non-finite (unwritten?) elements"
    if want.numel():
        assert rel_err(got, want) <= tol, f"{what}: relative error {rel_err(got, want):.3g} > {tol:.3g}"


def check_case(c: dict, device, call) -> None:
    """Every pass of case ``c`` on a fast backend (``call``, tensors on ``device``,
    see :func:`fast_backend`) against the reference (on the CPU)."""
    n, d, k, dtype, pad = c["n"], c["d"], c["k"], c["dtype"], c["row_pad"]
    codec, grad_codec, seed = c["codec"], c["grad_codec"], c["seed"]
    gen = torch.Generator().manual_seed(seed % 2**31)

    def out_buffer(code):
        return torch.full((code.payload_bytes(n, k),), 0xAB, dtype=torch.uint8) if c["use_out"] else None

    def seeds(base: int) -> tuple[int, dict]:
        """(the reference's int seed, the fast call's seed arguments): with an
        offset, the fast backend adds it on the device (modulo 2**64)."""
        if c["offset"] is None:
            return base, {}
        return as_int64(base + c["offset"]), dict(seed_offset=torch.tensor(c["offset"]))

    # encode forward, exact inputs: z is exact in any summation order, the payload identical
    x = exact(n, d, dtype=dtype, gen=gen)
    w_e = exact(k, d, dtype=dtype, scale=1 / 16, gen=gen)
    ref_seed, offset = seeds(seed)
    want = ops.encode(x, w_e, codec, seed=ref_seed)
    got = call(ops.encode, _rows(x, pad, device), w_e, codec, seed=seed, out=out_buffer(codec), **offset)
    assert torch.equal(got, want), f"encode: {(got != want).sum().item()} payload bytes differ"

    # encode forward through RMSNorm (with its row statistics), random inputs
    x = normal(n, d, dtype=dtype, gen=gen)
    w_e = normal(k, d, dtype=dtype, scale=d**-0.5, gen=gen)
    gamma = normal(d, dtype=dtype, scale=0.2, gen=gen).add_(1.0) if c["norm"] else None
    extra = dict(return_row_stats=True) if c["norm"] else {}
    want = ops.encode(x, w_e, codec, norm_weight=gamma, seed=ref_seed, **extra)
    got = call(ops.encode, _rows(x, pad, device), w_e, codec, norm_weight=gamma, seed=seed, **extra, **offset)
    stats = None
    if c["norm"]:
        (got, stats), (want, want_stats) = got, want
        _assert_close(stats[:, :k], want_stats[:, :k], rel_tol(dtype), "row statistics: projection")
        _assert_close(stats[:, k], want_stats[:, k], rel_tol(torch.float32), "row statistics: 1/rms")
    steps = _payload_steps(got, want, codec, n, k, dtype)
    assert steps <= 1.5, f"encode with norm={c['norm']}: values differ by {steps:.3g} steps"

    # decode forward
    payload = ref.write_payload(normal(n, k, dtype=torch.float32, gen=gen), codec, 0)
    w_d = normal(d, k, dtype=dtype, scale=k**-0.5, gen=gen)
    residual = normal(n, d, dtype=c["out_dtype"], gen=gen) if c["residual"] else None
    want = ops.decode(payload, w_d, codec, n, residual=residual, out_dtype=c["out_dtype"])
    got = call(ops.decode, payload, w_d, codec, n, residual=residual, out_dtype=c["out_dtype"])
    _assert_close(got, want, 2 * max(rel_tol(dtype), rel_tol(c["out_dtype"])), "decode")

    # decode backward, exact grad_h and w_d: the gradient payload identical
    grad_h = exact(n, d, dtype=dtype, gen=gen)
    w_d = exact(d, k, dtype=c["w_d_dtype"], scale=1 / 16, gen=gen)
    ref_seed, offset = seeds(seed + 1)
    want = ops.decode_backward(grad_h, payload, w_d, codec, grad_codec, grad_seed=ref_seed)
    got = call(ops.decode_backward, _rows(grad_h, pad, device), payload, w_d, codec, grad_codec,
               grad_seed=seed + 1, out=out_buffer(grad_codec), **offset)
    assert torch.equal(got[0], want[0]), f"decode backward: {(got[0] != want[0]).sum().item()} payload bytes differ"
    _assert_close(got[1], want[1], 2 * max(rel_tol(dtype), rel_tol(c["w_d_dtype"])), "decode backward: grad w_d")

    # encode backward, random inputs, given encode forward's row statistics with the norm
    grad_payload = ref.write_payload(normal(n, k, dtype=torch.float32, gen=gen), grad_codec, 0)
    want = ops.encode_backward(grad_payload, x, w_e, grad_codec, norm_weight=gamma)
    got = call(ops.encode_backward, grad_payload, _rows(x, pad, device), w_e, grad_codec, norm_weight=gamma,
               row_stats=stats)
    for name, g, w, tol in zip(("grad_x", "grad_w_e", "grad_norm_weight"), got, want, (2, 4, 4)):
        if w is None:
            assert g is None, f"encode backward: {name} should be None"
        else:
            _assert_close(g, w, tol * rel_tol(dtype), f"encode backward: {name}")


@pytest.mark.parametrize("backend, projection", [
    pytest.param(backend, projection, id=backend + (f"-{projection}" if projection else ""),
                 marks=[needs_cuda_kernels] if backend == "cuda" else [])
    for backend, projection in BACKENDS])
def test_random_cases(backend, projection, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    else:
        emulate_cuda_without_gpu(monkeypatch)
        use_projection(monkeypatch, projection)
    poison_fast_outputs(monkeypatch)  # (for the whole test: every example's outputs start poisoned)
    device, call = fast_backend(backend)

    examples = TRITON_GPU_EXAMPLES if backend == "triton" and device == "cuda" else BACKENDS[backend, projection]

    @settings(max_examples=EXAMPLES or examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases(any_group=backend == "cuda"))
    def check(case):
        check_case(case, device, call)

    check()
