"""The ops (reference backend) against explicit formulas, gradients, opcheck
and torch.compile."""

import contextlib
import importlib.util
import os
import pathlib
import re

import pytest
import torch

from helpers import CUDA_KERNELS_DEVICE, check_boundary_under_autocast, emulate_cuda_without_gpu, needs_cuda_kernels
from helpers import check_seed_offset_is_read_on_the_device
from helpers import randn, tolerance
from resbm_kernels import ops
from resbm_kernels.backends import reference, use_backend
from resbm_kernels.codec import BF16, GRAD_INT8, INT4, INT8, Codec, payload_views

N, D, K = 24, 128, 32
ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS = 1e-6
CODECS = [BF16, INT8, INT4, Codec(bits=2, group_size=8), Codec(bits=8, group_size=8, rounding="stochastic")]


@pytest.fixture(autouse=True)
def _reference_backend():
    with use_backend("reference"):
        yield


def make(dtype=torch.float64, seed=0, n=N, d=D, k=K):
    x = randn(n, d, seed=seed, scale=torch.logspace(-1, 1, n)[:, None]).to(dtype)
    w_e = (randn(k, d, seed=seed + 1) / d**0.5).to(dtype)
    w_d = (randn(d, k, seed=seed + 2) / k**0.5).to(dtype)
    gamma = (1 + 0.1 * randn(d, seed=seed + 3)).to(dtype)
    residual = randn(n, d, seed=seed + 4).to(dtype)
    return x, w_e, w_d, gamma, residual


def explicit_z(x, w_e, gamma):
    """DESIGN.md: z = RMSNorm(x) W_e^T + x[:, :k] (no norm when gamma is None)."""
    x = x.double()
    u = x
    if gamma is not None:
        u = x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * gamma.double()
    return u @ w_e.double().T + x[:, : w_e.shape[0]]


def pad(z, d):
    return torch.nn.functional.pad(z, (0, d - z.shape[1]))


def read(payload, codec, n, k):
    return reference.read_payload(payload, codec, n, k, torch.float64)


def assert_holds(payload, z, codec):
    """The payload holds z (N, k) as its codec says: bf16 values rounded once;
    else each group's scale absmax / qmax rounded once to the scale dtype, and
    each value within half that scale of z (a whole one when stochastic), plus
    what lies past the largest code where the scale rounded down. (The
    reference quantizes z in float32: 2**-20 of a group's range of slack.)"""
    n, k = z.shape
    zhat = read(payload, codec, n, k)
    if not codec.quantized:
        assert ((zhat - z).abs() <= z.abs() * 2**-8 + 1e-30).all()
        return
    g = codec.group(k)
    want = z.abs().view(n, k // g, g).amax(-1) / codec.qmax
    scale = payload_views(payload, codec, n, k)[1].double()
    assert ((scale - want).abs() <= want * (torch.finfo(codec.scale_dtype).eps / 2 + 2**-20)).all()
    s = scale.repeat_interleave(g, dim=1)
    past = (z.abs() - codec.qmax * s).clamp_min(0)
    frac = 1.0 if codec.stochastic else 0.5
    assert ((zhat - z).abs() <= s * (frac + codec.qmax * 2**-20) + past + 1e-12).all()


# ---- the four passes against the formulas ----------------------------------------

@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("norm", [True, False])
def test_encode_forward(codec, norm):
    x, w_e, _, gamma, _ = make()
    gamma = gamma if norm else None
    payload = ops.encode(x, w_e, codec, norm_weight=gamma, eps=EPS, seed=3)
    z = explicit_z(x, w_e, gamma)
    assert_holds(payload, z, codec)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encode_forward_row_stats(dtype):
    """return_row_stats: [RMSNorm(x) W_e^T | 1/rms(x)] as float32 from the
    formula (the same payload as without), also into an out buffer."""
    x, w_e, _, gamma, _ = make(dtype)
    payload, stats = ops.encode(x, w_e, INT8, norm_weight=gamma, eps=EPS, seed=3, return_row_stats=True)
    assert torch.equal(payload, ops.encode(x, w_e, INT8, norm_weight=gamma, eps=EPS, seed=3))
    xd = x.double()
    r = 1 / torch.sqrt((xd * xd).mean(-1) + EPS)
    assert stats.dtype == torch.float32 and stats.shape == (N, K + 1)
    torch.testing.assert_close(stats[:, K].double(), r, rtol=1e-6, atol=0)
    proj = explicit_z(x, w_e, gamma) - xd[:, :K]
    torch.testing.assert_close(stats[:, :K].double(), proj, rtol=1e-5, atol=1e-5 * proj.abs().max().item())
    out = torch.full_like(payload, 0xAB)
    payload_out, stats_out = ops.encode(x, w_e, INT8, norm_weight=gamma, eps=EPS, seed=3, out=out,
                                        return_row_stats=True)
    assert payload_out is out and torch.equal(out, payload) and torch.equal(stats_out, stats)


def test_boundary_keeps_row_stats_only_for_a_backward(monkeypatch):
    """ops.boundary asks encode forward for the row statistics only when a
    backward can follow (grad mode on and an input that requires grad)."""
    asked = []
    real = reference.encode_forward

    def spy(*args, row_stats=None, **kwargs):
        asked.append(row_stats is not None)
        return real(*args, row_stats=row_stats, **kwargs)

    monkeypatch.setattr(reference, "encode_forward", spy)
    x, w_e, w_d, gamma, _ = (t.float() for t in make())
    with torch.no_grad():
        ops.boundary(x.clone().requires_grad_(), w_e, w_d, INT8, GRAD_INT8, norm_weight=gamma)
    ops.boundary(x, w_e, w_d, INT8, GRAD_INT8, norm_weight=gamma)
    h, _ = ops.boundary(x.clone().requires_grad_(), w_e, w_d, INT8, GRAD_INT8, norm_weight=gamma)
    h.sum().backward()
    assert asked == [False, False, True]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("with_residual", [True, False])
def test_decode_forward(codec, with_residual):
    _, _, w_d, _, residual = make()
    payload = reference.write_payload(randn(N, K, seed=9), codec, seed=0)
    zhat = read(payload, codec, N, K)
    r = residual if with_residual else None
    h = ops.decode(payload, w_d, codec, N, residual=r)
    expected = zhat @ w_d.T + pad(zhat, D) + (residual if with_residual else 0)
    torch.testing.assert_close(h, expected, **tolerance(torch.float64, K))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("grad_codec", [BF16, GRAD_INT8, Codec(bits=4, group_size=16, rounding="stochastic")])
def test_decode_backward(codec, grad_codec):
    _, _, w_d, _, _ = make()
    grad_h = randn(N, D, seed=11).double()
    payload = reference.write_payload(randn(N, K, seed=9), codec, seed=0)
    grad_payload, grad_w_d = ops.decode_backward(grad_h, payload, w_d, codec, grad_codec, grad_seed=5)
    g_z = grad_h @ w_d + grad_h[:, :K]
    assert_holds(grad_payload, g_z, grad_codec)
    torch.testing.assert_close(grad_w_d, grad_h.T @ read(payload, codec, N, K), **tolerance(torch.float64, N))


@pytest.mark.parametrize("grad_codec", [BF16, GRAD_INT8, INT4])
@pytest.mark.parametrize("norm", [True, False])
def test_encode_backward_matches_autograd_of_formula(grad_codec, norm):
    x, w_e, _, gamma, _ = make()
    gamma = gamma if norm else None
    grad_payload = reference.write_payload(randn(N, K, seed=13), grad_codec, seed=2)
    g_z = read(grad_payload, grad_codec, N, K)
    leaves = [t.clone().requires_grad_() for t in (x, w_e) + ((gamma,) if norm else ())]
    explicit_z(leaves[0], leaves[1], leaves[2] if norm else None).backward(g_z)
    grad_x, grad_w, grad_gamma = ops.encode_backward(grad_payload, x, w_e, grad_codec, norm_weight=gamma, eps=EPS)
    tol = tolerance(torch.float64, D)
    torch.testing.assert_close(grad_x, leaves[0].grad, **tol)
    torch.testing.assert_close(grad_w, leaves[1].grad, **tol)
    if norm:
        torch.testing.assert_close(grad_gamma, leaves[2].grad, **tol)
    else:
        assert grad_gamma is None


# ---- identity path -----------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
def test_identity_path_with_zero_projections(codec):
    """With E and D zeroed the boundary passes x[:, :k] (up to the codec) in
    the first k channels and exact zeros elsewhere."""
    x, w_e, w_d, gamma, _ = make(torch.float32)
    h, payload = ops.boundary(x, torch.zeros_like(w_e), torch.zeros_like(w_d), codec, GRAD_INT8, norm_weight=gamma)
    assert torch.equal(h[:, K:], torch.zeros(N, D - K))
    assert_holds(payload, x[:, :K].double(), codec)
    torch.testing.assert_close(h[:, :K], read(payload, codec, N, K).float(), rtol=0, atol=0)


# ---- gradients -----------------------------------------------------------------------

@pytest.mark.parametrize("norm", [True, False])
def test_gradcheck_encode_project(norm):
    x, w_e, _, gamma, _ = make(n=6, d=32, k=8)
    inputs = (x.requires_grad_(), w_e.requires_grad_(), gamma.requires_grad_() if norm else None, EPS)
    assert torch.autograd.gradcheck(lambda *a: ops.encode_project(a[0], a[1], norm_weight=a[2], eps=a[3]), inputs)


@pytest.mark.parametrize("with_residual", [True, False])
def test_gradcheck_decode_project(with_residual):
    _, _, w_d, _, residual = make(n=6, d=32, k=8)
    zhat = randn(6, 8, seed=3).double().requires_grad_()
    r = residual.requires_grad_() if with_residual else None
    assert torch.autograd.gradcheck(lambda z, w, r: ops.decode_project(z, w, residual=r), (zhat, w_d.requires_grad_(), r))


@pytest.mark.parametrize("codec, grad_codec", [(INT8, GRAD_INT8), (INT4, Codec(bits=4, group_size=16)), (BF16, BF16)])
def test_fused_boundary_equals_composition(codec, grad_codec):
    """boundary = decode_project(wire_roundtrip(encode_project(x))), forward and
    backward: the fused op's autograd wires the four passes correctly."""
    x, w_e, w_d, gamma, residual = (t.float() for t in make())
    grad_h = randn(N, D, seed=21)

    def run(fused):
        leaves = [t.clone().requires_grad_() for t in (x, w_e, w_d, gamma, residual)]
        xx, we, wd, g, r = leaves
        if fused:
            h, _ = ops.boundary(xx, we, wd, codec, grad_codec, norm_weight=g, residual=r, eps=EPS, seed=4, grad_seed=8)
        else:
            z = ops.encode_project(xx, we, norm_weight=g, eps=EPS)
            h = ops.decode_project(ops.wire_roundtrip(z, codec, grad_codec, seed=4, grad_seed=8), wd, residual=r)
        h.backward(grad_h)
        return [h.detach()] + [t.grad for t in leaves]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **tolerance(torch.float32, D))


def test_passes_with_their_default_seeds_give_the_boundarys_gradients():
    """boundary's default seeds are the passes' defaults: a hand-written
    encode -> decode_backward -> encode_backward reproduces its stochastically
    rounded gradient without naming a seed."""
    x, w_e, w_d, gamma, _ = (t.float() for t in make())
    grad_h = randn(N, D, seed=22)
    xx = x.clone().requires_grad_()
    h, payload = ops.boundary(xx, w_e, w_d, GRAD_INT8, GRAD_INT8, norm_weight=gamma, eps=EPS)
    h.backward(grad_h)

    torch.testing.assert_close(payload, ops.encode(x, w_e, GRAD_INT8, norm_weight=gamma, eps=EPS), rtol=0, atol=0)
    grad_payload, _ = ops.decode_backward(grad_h, payload, w_d, GRAD_INT8, GRAD_INT8)
    grad_x = ops.encode_backward(grad_payload, x, w_e, GRAD_INT8, norm_weight=gamma, eps=EPS)[0]
    torch.testing.assert_close(xx.grad, grad_x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_boundary_dtypes_track_float64(dtype):
    x, w_e, w_d, gamma, _ = make()
    outs = {}
    for dt in (torch.float64, dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, w_e, w_d, gamma)]
        h, _ = ops.boundary(leaves[0], leaves[1], leaves[2], BF16, BF16, norm_weight=leaves[3])
        h.float().square().mean().backward()
        outs[dt] = [h.double()] + [t.grad.double() for t in leaves]
        assert h.dtype == dt and all(t.grad.dtype == dt for t in leaves)
    # a few units of the coarser of the dtype and the bf16 wire (whose rounding of z can differ by one
    # ulp where the dtype's z falls on the other side of a tie), of each tensor's largest value
    unit = max(torch.finfo(dtype).eps, 2**-8)
    for a, b in zip(outs[torch.float64], outs[dtype]):
        torch.testing.assert_close(b, a, atol=4 * unit * a.abs().max().item(), rtol=0)


# ---- autocast -----------------------------------------------------------------------------

def test_boundary_under_autocast():
    check_boundary_under_autocast("reference", "cpu")


def test_boundary_out_dtype():
    """bf16 GEMMs writing float32 h (and taking a float32 residual, whose
    gradient stays float32): h is decode's of the same payload with that
    out_dtype; the backward runs the passes on the gradient cast to bf16."""
    x, w_e, w_d, gamma = leaves = [t.bfloat16().requires_grad_() for t in make()[:4]]
    residual = make()[4].float().requires_grad_()
    h, payload = ops.boundary(x, w_e, w_d, INT8, GRAD_INT8, norm_weight=gamma, residual=residual,
                              out_dtype=torch.float32)
    want = ops.decode(payload, w_d.detach(), INT8, N, residual=residual.detach(), out_dtype=torch.float32)
    assert h.dtype == torch.float32 and torch.equal(h, want)
    grad = randn(N, D, seed=9)
    h.backward(grad)
    assert torch.equal(residual.grad, grad)
    with torch.no_grad():
        grad_payload, grad_w_d = ops.decode_backward(grad.bfloat16(), payload, w_d, INT8, GRAD_INT8)
        grad_x, grad_w_e, grad_gamma = ops.encode_backward(grad_payload, x, w_e, GRAD_INT8, norm_weight=gamma)
    for t, g in zip(leaves, (grad_x, grad_w_e, grad_w_d, grad_gamma)):
        assert torch.equal(t.grad, g)


def test_autocast_leaves_the_other_ops_alone():
    """Under autocast every op but the boundary gives what it gives without
    (the reference's matmuls would be autocast, the kernels' would not)."""
    x, w_e, w_d, gamma, residual = (t.float() for t in make())
    payload, stats = ops.encode(x, w_e, INT8, norm_weight=gamma, return_row_stats=True)
    grad_payload = reference.write_payload(randn(N, K, seed=7), GRAD_INT8, 0)
    z = randn(N, K, seed=8)
    calls = (
        lambda: ops.encode(x, w_e, INT8, norm_weight=gamma, return_row_stats=True),
        lambda: torch.ops.resbm.encode_forward(x, w_e, gamma, EPS, INT8.spec, 0, True),
        lambda: ops.encode(x, w_e, INT8, out=torch.empty_like(payload)),
        lambda: ops.decode(payload, w_d, INT8, N, residual=residual),
        lambda: ops.decode_backward(residual, payload, w_d, INT8, GRAD_INT8),
        lambda: ops.decode_backward(residual, payload, w_d, INT8, GRAD_INT8, out=torch.empty_like(grad_payload)),
        lambda: ops.encode_backward(grad_payload, x, w_e, GRAD_INT8, norm_weight=gamma, row_stats=stats),
        lambda: ops.encode_project(x, w_e, norm_weight=gamma),
        lambda: ops.decode_project(z, w_d, residual=residual),
        lambda: ops.wire_roundtrip(z, INT8, GRAD_INT8),
        lambda: ops.dequantize(*ops.quantize(z, INT8), INT8),
    )
    for i, call in enumerate(calls):
        want = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
            assert torch.equal(a, b), f"call {i} changed under autocast"


def test_every_op_has_an_autocast_rule():
    names = {name for name in dir(torch.ops.resbm)
             if isinstance(getattr(torch.ops.resbm, name), torch._ops.OpOverloadPacket)}
    assert names == set(ops._AUTOCAST_FREE) | {"boundary"}
    for name in names:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resbm::{name}", key), (name, key)


def test_torch_compile_under_autocast_matches_eager():
    from resbm_kernels import ResBMBoundary

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), ResBMBoundary(64, 16, codec=INT8), torch.nn.Linear(64, 8))
    x = randn(4, 5, 32, seed=1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs = []
    for run in (model, compiled):
        model[1].calls = 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(run(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)

# ---- opcheck and torch.compile ----------------------------------------------------------


def _samples():
    x, w_e, w_d, gamma, residual = (t.float() for t in make(n=8, d=32, k=8))
    c, gc = INT8.spec, GRAD_INT8.spec
    payload = ops.encode(x, w_e, INT8)
    stats = ops.encode(x, w_e, INT8, norm_weight=gamma, eps=EPS, return_row_stats=True)[1]
    grad_payload = reference.write_payload(randn(8, 8, seed=1), GRAD_INT8, 0)
    z = randn(8, 8, seed=2)
    int4 = Codec(bits=4, group_size=4)
    q, s = ops.quantize(z, int4)
    return [
        (torch.ops.resbm.quantize, (z, int4.spec, 1)),
        (torch.ops.resbm.dequantize, (q, s, int4.spec, torch.float32)),
        (torch.ops.resbm.pack, (q, 4)),
        (torch.ops.resbm.unpack, (ops.pack(q, 4), 4, 8)),
        (torch.ops.resbm.encode_forward, (x, w_e, gamma, EPS, c, 0)),
        (torch.ops.resbm.encode_forward, (x, w_e, gamma, EPS, c, 0, True)),
        (torch.ops.resbm.decode_forward, (payload, w_d, residual, c, 8, torch.float32)),
        (torch.ops.resbm.decode_backward, (randn(8, 32, seed=3), payload, w_d, c, gc, 0)),
        (torch.ops.resbm.encode_backward, (grad_payload, x, w_e, gamma, EPS, gc)),
        (torch.ops.resbm.encode_backward, (grad_payload, x, w_e, gamma, EPS, gc, stats)),
        (torch.ops.resbm.encode_forward_out, (torch.full_like(payload, 0xAB), x, w_e, gamma, EPS, c, 0)),
        (torch.ops.resbm.encode_forward_out, (torch.full_like(payload, 0xAB), x, w_e, gamma, EPS, c, 0, True)),
        (torch.ops.resbm.decode_backward_out, (torch.full_like(grad_payload, 0xAB), randn(8, 32, seed=3), payload,
                                               w_d, c, gc, 0)),
        (torch.ops.resbm.boundary, (*(t.clone().requires_grad_() for t in (x, w_e, gamma, w_d)),
                                    residual, EPS, c, gc, 0, 1)),
        (torch.ops.resbm.boundary, (*(t.bfloat16().requires_grad_() for t in (x, w_e, gamma, w_d)),
                                    residual, EPS, c, gc, 0, 1, True, torch.float32)),
        (torch.ops.resbm.wire_roundtrip, (z.clone().requires_grad_(), c, gc, 0, 1)),
        (torch.ops.resbm.wire_roundtrip, (z.clone().requires_grad_(), c, gc, 0, 1, torch.tensor(6))),
        (torch.ops.resbm.boundary, (*(t.clone().requires_grad_() for t in (x, w_e, gamma, w_d)),
                                    residual, EPS, c, gc, 0, 1, True, None, torch.tensor(4))),
        (torch.ops.resbm.decode_backward, (randn(8, 32, seed=3), payload, w_d, c, gc, 0, torch.tensor(2))),
        (torch.ops.resbm.encode_project, (x, w_e, gamma, EPS)),
        (torch.ops.resbm.decode_project, (z.clone().requires_grad_(), w_d, residual)),
    ]


@pytest.mark.parametrize("op, args", _samples(), ids=lambda v: str(v).split(".")[-1] if callable(v) else "")
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    from resbm_kernels import ResBMBoundary

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), ResBMBoundary(64, 16, codec=INT8), torch.nn.Linear(64, 8))
    x = randn(4, 5, 32, seed=1)
    eager = model(x)
    model[1].calls = 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model[1].calls = 0
    torch.testing.assert_close(compiled(x), eager)


def test_torch_export_with_dynamic_tokens_matches_eager():
    """torch.export of a model with a stochastic boundary (the fake kernels, a
    dynamic token count): the exported program takes the call counter as a
    buffer it advances, and runs other token counts as eager does, call for call."""
    from resbm_kernels import ResBMBoundary

    stochastic = Codec(bits=8, rounding="stochastic")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), ResBMBoundary(64, 16, codec=stochastic),
                                torch.nn.Linear(64, 8))
    program = torch.export.export(model, (randn(10, 32, seed=1),),
                                  dynamic_shapes=({0: torch.export.Dim("tokens")},))
    assert "torch.ops.resbm.boundary" in program.graph_module.code
    exported = program.module()
    model[1].calls = 0
    want = [model(randn(n, 32, seed=n)) for n in (7, 7, 3)]
    exported.get_buffer("1._calls").zero_()
    got = [exported(randn(n, 32, seed=n)) for n in (7, 7, 3)]
    assert int(exported.get_buffer("1._calls")) == 3
    assert not torch.equal(got[0], got[1])  # (new seeds each call)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("mlp_hidden", [None, 16])
def test_torch_compile_does_not_recompile_as_the_seeds_advance(mlp_hidden):
    """A boundary draws new stochastic-rounding seeds every call; the compiled
    model takes them from its call counter (a tensor) instead of baking them in
    (it recompiled every call): one graph, and eager's outputs and gradients."""
    from resbm_kernels import ResBMBoundary

    stochastic = Codec(bits=8, rounding="stochastic")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64),
                                ResBMBoundary(64, 16, codec=stochastic, grad_codec=stochastic, mlp_hidden=mlp_hidden),
                                torch.nn.Linear(64, 8))
    x = randn(4, 5, 32, seed=1)
    runs = {}
    torch._dynamo.reset()  # (other tests compiled models through the same wrapper code)
    for name in ("eager", "compiled"):
        model[1].calls = 0
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if name == "compiled" else model
        runs[name] = []
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(4):
                model.zero_grad()
                y = run(x)
                y.square().sum().backward()
                runs[name].append([y.detach()] + [p.grad.clone() for p in model.parameters()])
    assert model[1].calls == 4
    assert not torch.equal(runs["eager"][0][0], runs["eager"][1][0])  # (the seeds did advance)
    for got, want in zip(runs["compiled"], runs["eager"]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_seed_offset_adds_to_both_seeds():
    x, w_e, w_d, gamma, _ = (t.float() for t in make())
    stochastic = Codec(bits=8, rounding="stochastic")
    grads = {}
    for how in ("offset", "int"):
        leaves = [t.clone().requires_grad_() for t in (x, w_e, w_d, gamma)]
        extra = (dict(seed=3, grad_seed=4, seed_offset=torch.tensor(10)) if how == "offset"
                 else dict(seed=13, grad_seed=14))
        h, payload = ops.boundary(*leaves[:3], stochastic, stochastic, norm_weight=leaves[3], **extra)
        h.backward(randn(N, D, seed=5))
        grads[how] = [payload] + [t.grad for t in leaves]
    for a, b in zip(grads["offset"], grads["int"]):
        assert torch.equal(a, b)
    z = randn(N, K, seed=6).requires_grad_()
    y = ops.wire_roundtrip(z, stochastic, stochastic, seed=3, grad_seed=4, seed_offset=torch.tensor([10]))
    y.backward(randn(N, K, seed=7))
    z2 = z.detach().clone().requires_grad_()
    y2 = ops.wire_roundtrip(z2, stochastic, stochastic, seed=13, grad_seed=14)
    y2.backward(randn(N, K, seed=7))
    assert torch.equal(y, y2) and torch.equal(z.grad, z2.grad)


def test_seed_offset_is_read_on_the_device_by_the_reference(monkeypatch):
    check_seed_offset_is_read_on_the_device("reference", "cpu", monkeypatch)


_NOT_ONE_CPU_INTEGER = "seed_offset: needs one integer on the CPU, got a "


@pytest.mark.parametrize("bad, message", [
    (torch.tensor(1.0), _NOT_ONE_CPU_INTEGER + "torch.float32 tensor of shape () on cpu"),
    (torch.tensor([1, 2]), _NOT_ONE_CPU_INTEGER + "torch.int64 tensor of shape (2,) on cpu"),
    (torch.tensor(1, device="meta"), _NOT_ONE_CPU_INTEGER + "torch.int64 tensor of shape () on meta"),
    (3, "Expected a value of type 'Optional[Tensor]' for argument 'seed_offset'")], ids=str)
def test_a_bad_seed_offset_is_named(bad, message):
    x, w_e, w_d, _, _ = (t.float() for t in make())
    with pytest.raises((TypeError, ValueError, RuntimeError), match=re.escape(message)):
        ops.boundary(x, w_e, w_d, INT8, GRAD_INT8, seed_offset=bad)


def test_torch_compile_with_dynamic_token_counts():
    """A symbolic N reaches the payload size in the ops' fake kernels (not cached there)."""
    from resbm_kernels import ResBMBoundary

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), ResBMBoundary(64, 16, codec=Codec(bits=4, group_size=8)),
                                torch.nn.Linear(64, 8))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for tokens in (5, 11):
        x = randn(tokens, 32, seed=tokens)
        torch.testing.assert_close(compiled(x), model(x))


def test_torch_compile_fullgraph_of_the_public_passes():
    """The Python wrappers (which skip the dispatcher in eager calls) trace to the ops."""
    x, w_e, w_d, gamma, _ = make(dtype=torch.float32)

    def boundary(x, w_e, w_d, gamma):
        payload, stats = ops.encode(x, w_e, INT8, norm_weight=gamma, eps=EPS, return_row_stats=True)
        h = ops.decode(payload, w_d, INT8, x.shape[0])
        grad_payload, grad_w_d = ops.decode_backward(h, payload, w_d, INT8, GRAD_INT8, grad_seed=3)
        return h, grad_w_d, *ops.encode_backward(grad_payload, x, w_e, GRAD_INT8, norm_weight=gamma, eps=EPS,
                                                 row_stats=stats)

    compiled = torch.compile(boundary, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, w_e, w_d, gamma), boundary(x, w_e, w_d, gamma)):
        torch.testing.assert_close(got, want)


# ---- calls that skip the dispatcher ------------------------------------------------------

def _dispatch_needed_cases():
    """(name, decode_forward's arguments, context, whether the dispatcher is needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = randn(4, 8)
    plain = [x, torch.nn.Parameter(x.clone(), requires_grad=False), None, "int8/row/bf16/nearest", 3, torch.float32]
    nothing = contextlib.nullcontext
    yield "plain eager", plain, nothing, False
    yield "requires grad", [x.clone().requires_grad_(), *plain[1:]], nothing, True
    yield "requires grad, no_grad", [x.clone().requires_grad_(), *plain[1:]], torch.no_grad, False
    yield "a parameter", [x, torch.nn.Parameter(x.clone()), *plain[2:]], nothing, True
    yield "tensor subclass", [torch.Tensor._make_subclass(_Subclass, x), *plain[1:]], nothing, True
    yield "a float for an int", [*plain[:4], 3.0, plain[5]], nothing, True
    yield "a tensor for an optional tensor", [x, x, x, *plain[3:]], nothing, False
    yield "fake tensor mode", plain, FakeTensorMode, True
    yield "torch function mode", plain, lambda: torch.device("cpu"), True
    yield "profiler", plain, torch.profiler.profile, True
    yield "autocast", plain, lambda: torch.autocast("cpu", dtype=torch.bfloat16), True


class _Subclass(torch.Tensor):
    pass


def _decode_forward_accepts():
    return ops._functions[ops._decode_forward][1]


@pytest.mark.parametrize("case", list(_dispatch_needed_cases()), ids=lambda c: c[0])
def test_dispatch_needed(case):
    """The pass ops run their functions directly only in plain eager calls."""
    _, args, context, needed = case
    with context():
        assert ops._dispatch_needed(args, _decode_forward_accepts()) is needed


def test_dispatch_needed_by_a_differentiable_op():
    """The differentiable ops (boundary, wire_roundtrip) skip the dispatcher
    with gradients too (through their autograd.Function), not in other modes."""
    x = randn(4, 8).requires_grad_()
    args = [x, *list(_dispatch_needed_cases())[0][1][1:]]
    assert not ops._dispatch_needed(args, _decode_forward_accepts(), differentiable=True)
    with torch.profiler.profile():
        assert ops._dispatch_needed(args, _decode_forward_accepts(), differentiable=True)


def _boundary_and_roundtrip_grads(call, stochastic: Codec) -> list:
    """Outputs and gradients of the boundary (RMSNorm, residual, seed offset)
    and of wire_roundtrip, each op called by ``call(op, *args)``."""
    x, w_e, w_d, gamma, residual = (t.float().requires_grad_() for t in make())
    offset = torch.tensor(5)
    h, payload, _ = call(ops._boundary, x, w_e, gamma, w_d, residual, EPS, stochastic.spec, GRAD_INT8.spec, 3, 4,
                         True, None, offset)
    h.backward(randn(N, D, seed=8))
    z = randn(N, K, seed=9).requires_grad_()
    y = call(ops._wire_roundtrip, z, stochastic.spec, GRAD_INT8.spec, 3, 4, offset)
    y.backward(randn(N, K, seed=10))
    return [h, payload, y, z.grad, *(t.grad for t in (x, w_e, w_d, gamma, residual))]


def test_eager_autograd_function_equals_the_registered_autograd():
    """In eager calls boundary and wire_roundtrip run through an autograd.Function
    of the ops' own forward, setup and backward (no dispatcher: less host time):
    outputs and gradients equal those of the ops through the dispatcher bit for
    bit, and that path is the one taken."""
    stochastic = Codec(bits=4, group_size=8, rounding="stochastic")
    eager = _boundary_and_roundtrip_grads(ops._run, stochastic)
    dispatched = _boundary_and_roundtrip_grads(lambda op, *args: op(*args), stochastic)
    for a, b in zip(eager, dispatched):
        assert torch.equal(a, b)
    x = randn(N, D).requires_grad_()
    h, _ = ops.boundary(x, *(t.float() for t in make()[1:3]), INT8, GRAD_INT8)
    assert type(h.grad_fn).__name__ == "resbm_boundaryBackward"


def test_eager_projections_equal_the_registered_autograd():
    """encode_project and decode_project (the MLP boundary's and the modules'
    projections) through their autograd.Function in eager calls, as through the
    dispatcher, bit for bit, forward and gradients."""
    def run(call):
        x, w_e, w_d, gamma, residual = (t.float().requires_grad_() for t in make())
        z = call(ops._encode_project, x, w_e, gamma, EPS)
        h = call(ops._decode_project, z, w_d, residual)
        h.backward(randn(N, D, seed=11))
        return [z, h, *(t.grad for t in (x, w_e, w_d, gamma, residual)), type(h.grad_fn).__name__]
    eager, dispatched = run(ops._run), run(lambda op, *args: op(*args))
    for a, b in zip(eager[:-1], dispatched[:-1]):
        assert torch.equal(a, b)
    assert eager[-1] == "resbm_decode_projectBackward" != dispatched[-1]


def test_dispatch_needed_under_vmap():
    seen = []
    plain = [None, "int8/row/bf16/nearest", 3, torch.float32]
    torch.func.vmap(lambda t: seen.append(ops._dispatch_needed([t, t, *plain], _decode_forward_accepts())) or t)(
        randn(3, 4))
    assert seen == [True]


def test_arguments_of_the_wrong_type_get_the_dispatchers_message():
    x, w_e, w_d, _, _ = make(dtype=torch.float32)
    payload = ops.encode(x, w_e, INT8)
    with pytest.raises(RuntimeError, match="Expected a value of type 'int' for argument 'n'"):
        ops.decode(payload, w_d, INT8, float(N))
    with pytest.raises(RuntimeError, match="Expected a value of type 'int' for argument 'seed'"):
        ops.encode(x, w_e, INT8, seed=1.5)


def test_a_pass_op_with_gradients_still_refuses_backward():
    """Through the dispatcher as before: the output of a pass (no derivative)
    records a backward that raises, rather than a silent zero gradient."""
    x, w_e, w_d, _, _ = make(dtype=torch.float32)
    payload = ops.encode(x, w_e, INT8)
    h = ops.decode(payload, w_d.requires_grad_(), INT8, N)
    assert h.requires_grad
    with pytest.raises(RuntimeError, match=r"resbm::decode_forward has no derivative: differentiate through "):
        h.sum().backward()


def test_second_derivative_through_the_boundary_raises():
    """create_graph=True records the boundary's backward, whose passes have no
    derivative: differentiating that gradient raises naming the pass."""
    x, w_e, w_d, _, _ = make(dtype=torch.float32)
    x.requires_grad_()
    (grad_x,) = torch.autograd.grad(ops.boundary(x, w_e, w_d, INT8, INT8)[0].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"resbm::encode_backward has no derivative.*second derivative"):
        grad_x.sum().backward()


def test_out_buffers_change_version(monkeypatch):
    """Written in place (through the dispatcher or not): autograd sees the write,
    also from a backend whose kernels write through data pointers (a stand-in
    here that writes nothing, so only the op can move the version on)."""
    class Untouched:
        def encode_forward(self, *args, out=None, row_stats=None, seed_offset=None):
            return out

        def decode_backward(self, grad_h, payload, w_d, *args, out=None, seed_offset=None):
            return out, torch.zeros_like(w_d)

    monkeypatch.setattr(ops, "select", lambda device, case: Untouched())
    x, w_e, w_d, _, _ = make(dtype=torch.float32)
    buf = torch.empty(INT8.payload_bytes(N, K), dtype=torch.uint8)
    version = buf._version
    ops.encode(x, w_e, INT8, out=buf)
    assert buf._version > version
    version = buf._version
    ops.decode_backward(randn(N, D, seed=7), reference.write_payload(randn(N, K), INT8, 0), w_d, INT8, INT8, out=buf)
    assert buf._version > version


def test_host_overhead_tool(capsys, monkeypatch):
    """bench/host_overhead.py times every pass of the backends present and a
    boundary's training step, also with the Triton autotuners' GPU config sets,
    and puts the real launches, configs, tuning caches, timing and payload
    header checks back afterwards."""
    from resbm_kernels import checks

    monkeypatch.setenv("RESBM_CUDA_EMULATE", "1")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # (its import of graph_replay)
    header_check = checks._is_fake
    spec = importlib.util.spec_from_file_location("resbm_host_overhead", ROOT / "bench" / "host_overhead.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from resbm_kernels.backends import _load

    present = [b for b in ("triton", "cuda") if _load(b)[0] is not None and _load(b)[0].supports("cpu")]
    if not present:
        pytest.skip("neither the Triton interpreter nor the CUDA emulator library is here")

    def launches():  # the launch attributes as the objects themselves hold them (a kernel: none, its class's run)
        return {b: [vars(obj).get(name) for obj, name in tool.launch_targets(b, _load(b)[0])] for b in present}

    def tuners():  # the Triton autotuners' config lists and caches (--gpu-configs swaps them)
        module = _load("triton")[0]
        return [(t.configs, t.cache) for t in module.KERNELS.values()] if "triton" in present else []

    before, tuned = launches(), tuners()
    passes = ("encode_forward", "decode_forward", "decode_backward", "encode_backward")
    for extra in ([], ["--gpu-configs"]):
        tool.main(["--backends", ",".join(present), "--N", "40", "--calls", "2", "--repeat", "1", *extra])
        rows = [line.rsplit(None, 2) for line in capsys.readouterr().out.splitlines()[2:]]
        assert [tuple(r[0].split(None, 1)) for r in rows] == [(b, p) for b in present
                                                              for p in (*passes, "boundary step")]
        assert all(float(public) > 0 and (fn == "-" if head.endswith("step") else float(fn) > 0)
                   for head, public, fn in rows)
        assert launches() == before and checks._is_fake is header_check
        assert all(c is c0 and t is t0 for (c, t), (c0, t0) in zip(tuners(), tuned))
        assert "triton" not in present or not any("_bench" in vars(t) for t in _load("triton")[0].KERNELS.values())
    tool.main(["--backends", ",".join(present), "--N", "40", "--calls", "2", "--repeat", "1", "--profile", "3"])
    out = capsys.readouterr().out.split("own time per call under cProfile, top functions:\n")[1].splitlines()
    heads = [line for line in out if not line.startswith(" ")]
    assert heads == [head for b in present for head in (*(f"{b} {p}, public op:" for p in passes),
                                                       f"{b} boundary step:")]
    assert len(out) == 4 * len(heads) and all(" us own " in line for line in out if line.startswith(" "))
    assert launches() == before
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            tool.main(["--device", "cuda"])
        assert "--device cuda needs a GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--backends", "triton,reference"])
    assert "--backends: reference" in capsys.readouterr().err


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, e.g. a model built on the meta device) go through the
    ops' fake kernels: outputs of the right shapes on the meta device, backward included."""
    x = torch.empty(N, D, device="meta", requires_grad=True)
    w_e, w_d = torch.empty(K, D, device="meta"), torch.empty(D, K, device="meta")
    payload = ops.encode(x.detach(), w_e, INT8)
    assert payload.device.type == "meta" and payload.shape == (INT8.payload_bytes(N, K),)
    assert ops.decode(payload, w_d, INT8, N).shape == (N, D)
    h, _ = ops.boundary(x, w_e, w_d, INT8, GRAD_INT8, norm_weight=torch.empty(D, device="meta"))
    h.sum().backward()
    assert h.shape == (N, D) and x.grad.shape == (N, D) and x.grad.device.type == "meta"


def test_profiler_sees_the_pass_ops():
    x, w_e, _, _, _ = make(dtype=torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.encode(x, w_e, INT8)
    assert "resbm::encode_forward" in {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=needs_cuda_kernels)])
def test_out_buffers_give_the_same_payloads(backend, monkeypatch):
    """encode/decode_backward into a reused (poisoned) buffer == a fresh payload
    (the fast backends on a GPU when there is one, else the interpreter / emulator)."""
    device = "cuda" if backend != "reference" and torch.cuda.is_available() else "cpu"
    if backend == "triton":
        pytest.importorskip("triton")
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton backend runs on the CPU only under TRITON_INTERPRET=1 (set by the test command)")
    if backend == "cuda":
        emulate_cuda_without_gpu(monkeypatch)
        device = CUDA_KERNELS_DEVICE
    x, w_e, w_d, gamma, _ = (t.float().to(device) for t in make(n=20, d=64, k=16))
    codec, grad_codec = Codec(bits=4, group_size=16), Codec(bits=8, rounding="stochastic")
    grad_h = randn(20, 64, seed=5).to(device)
    with use_backend(backend):
        fresh = ops.encode(x, w_e, codec, norm_weight=gamma, seed=3)
        buf = torch.full_like(fresh, 0xAB)
        assert ops.encode(x, w_e, codec, norm_weight=gamma, seed=3, out=buf) is buf
        assert torch.equal(buf, fresh)
        fresh_g, fresh_w = ops.decode_backward(grad_h, fresh, w_d, codec, grad_codec, grad_seed=9)
        gbuf = torch.full_like(fresh_g, 0xAB)
        out, grad_w = ops.decode_backward(grad_h, fresh, w_d, codec, grad_codec, grad_seed=9, out=gbuf)
        assert out is gbuf and torch.equal(gbuf, fresh_g) and torch.equal(grad_w, fresh_w)


def test_out_buffer_of_the_wrong_size_is_rejected():
    x, w_e, _, _, _ = (t.float() for t in make(n=4, d=64, k=16))
    with pytest.raises(ValueError, match="payload: .* bytes is truncated"):
        ops.encode(x, w_e, INT8, out=torch.empty(10, dtype=torch.uint8))
