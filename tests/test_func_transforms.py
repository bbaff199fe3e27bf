"""torch.func transforms (grad, vjp, vmap, jacrev) through the differentiable ops
and ResBMBoundary: the same values as torch.autograd on the same inputs and
seeds, on every backend (torch.autograd's are checked against the reference
elsewhere); a second derivative through the boundary and forward-mode AD raise
naming the op, and so does a transform inside torch.compile."""

import os
import warnings

import pytest
import torch

from helpers import CUDA_KERNELS_DEVICE, emulate_cuda_without_gpu, needs_cuda_kernels, normal
from resbm_kernels import Codec, ResBMBoundary, ops, use_backend

STOCHASTIC = Codec(bits=8, rounding="stochastic")
INT4 = Codec(bits=4, group_size=16, rounding="stochastic")


def _device(backend, monkeypatch) -> str:
    if backend == "cuda":
        emulate_cuda_without_gpu(monkeypatch)
        return CUDA_KERNELS_DEVICE
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1")
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=needs_cuda_kernels)])
def test_grad_and_vjp_of_boundary_equal_autograd(backend, monkeypatch):
    """torch.func.grad over every differentiable argument of ops.boundary, and
    torch.func.vjp's output and cotangent, equal torch.autograd's bit for bit
    (the same kernels with the same seeds: stochastic rounding both ways)."""
    device = _device(backend, monkeypatch)
    gen = torch.Generator().manual_seed(35)
    n, d, k = 37, 64, 16
    x, residual, cotangent = (normal(n, d, dtype=torch.float32, gen=gen).to(device) for _ in range(3))
    w_e = normal(k, d, dtype=torch.float32, scale=d**-0.5, gen=gen).to(device)
    gamma = (1 + normal(d, dtype=torch.float32, scale=0.1, gen=gen)).to(device)
    w_d = normal(d, k, dtype=torch.float32, scale=k**-0.5, gen=gen).to(device)
    weight = normal(n, d, dtype=torch.float32, gen=gen).to(device)

    def h_of(x, w_e, gamma, w_d, residual):
        return ops.boundary(x, w_e, w_d, INT4, STOCHASTIC, norm_weight=gamma, residual=residual, seed=5,
                            grad_seed=6)[0]

    def loss(*args):
        return (h_of(*args) * weight).sum()

    args = (x, w_e, gamma, w_d, residual)
    with use_backend(backend):
        got = torch.func.grad(loss, argnums=tuple(range(5)))(*args)
        h, vjp = torch.func.vjp(lambda x: h_of(x, *args[1:]), x)
        (got_x,) = vjp(cotangent)
        leaves = [t.clone().requires_grad_() for t in args]
        want = torch.autograd.grad(loss(*leaves), leaves)
        want_h = h_of(*leaves)
        (want_x,) = torch.autograd.grad(want_h, leaves[0], cotangent)
    for name, g, w in zip(("x", "w_e", "norm_weight", "w_d", "residual"), got, want):
        assert torch.equal(g, w), f"grad {name}: {(g - w).abs().max().item()} apart"
    assert torch.equal(h, want_h.detach())
    assert torch.equal(got_x, want_x)


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=needs_cuda_kernels)])
def test_grad_under_autocast_equals_autograd(backend, monkeypatch):
    """Under torch.autocast the transforms apply the ops' autocast rules (the
    boundary's GEMMs in bfloat16, h in x's dtype), as torch.autograd's calls do."""
    device = _device(backend, monkeypatch)
    gen = torch.Generator().manual_seed(40)
    n, d, k = 21, 64, 16
    x = normal(n, d, dtype=torch.float32, gen=gen).to(device)
    w_e = normal(k, d, dtype=torch.float32, scale=d**-0.5, gen=gen).to(device)
    w_d = normal(d, k, dtype=torch.float32, scale=k**-0.5, gen=gen).to(device)

    def loss(x, w_e, w_d):
        h = ops.boundary(x, w_e, w_d, Codec(bits=8), STOCHASTIC)[0]
        return h.pow(2).sum(), h

    with use_backend(backend), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got, h = torch.func.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w_e, w_d)
        leaves = [t.clone().requires_grad_() for t in (x, w_e, w_d)]
        value, want_h = loss(*leaves)
        want = torch.autograd.grad(value, leaves)
    assert h.dtype == torch.float32 and torch.equal(h, want_h.detach())
    with use_backend(backend):
        assert not torch.equal(h, loss(x, w_e, w_d)[1])  # (autocast did change the GEMMs)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)


def test_per_sample_grads_and_jacobian_equal_autograd():
    """vmap(grad) (per-sample gradients) and jacrev, both through vmap's loop
    over the ops, equal a loop of torch.autograd calls."""
    gen = torch.Generator().manual_seed(36)
    n, d, k = 6, 32, 16
    xs = normal(3, n, d, dtype=torch.float32, gen=gen)
    w_e = normal(k, d, dtype=torch.float32, scale=d**-0.5, gen=gen)
    w_d = normal(d, k, dtype=torch.float32, scale=k**-0.5, gen=gen)

    def h_of(x, w_e):
        return ops.boundary(x, w_e, w_d, Codec(bits=8), STOCHASTIC)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's: no batching rule for resbm::boundary, a loop)
        per_sample = torch.func.vmap(torch.func.grad(lambda x, w: h_of(x, w).pow(2).sum(), argnums=1),
                                     in_dims=(0, None))(xs, w_e)
        jacobian = torch.func.jacrev(h_of)(xs[0][:2], w_e)
    for i in range(3):
        w = w_e.clone().requires_grad_()
        (want,) = torch.autograd.grad(h_of(xs[i], w).pow(2).sum(), w)
        assert torch.equal(per_sample[i], want), i
    want = torch.autograd.functional.jacobian(lambda x: h_of(x, w_e), xs[0][:2])
    assert torch.equal(jacobian, want)


@pytest.mark.parametrize("op", ["wire_roundtrip", "encode_project", "decode_project"])
def test_grad_of_the_other_differentiable_ops_equals_autograd(op):
    gen = torch.Generator().manual_seed(37)
    n, d, k = 9, 32, 16
    w_e = normal(k, d, dtype=torch.float32, scale=d**-0.5, gen=gen)
    w_d = normal(d, k, dtype=torch.float32, scale=k**-0.5, gen=gen)
    gamma = 1 + normal(d, dtype=torch.float32, scale=0.1, gen=gen)
    fn, width = {"wire_roundtrip": (lambda z: ops.wire_roundtrip(z, INT4, STOCHASTIC, seed=2, grad_seed=3), k),
                 "encode_project": (lambda x: ops.encode_project(x, w_e, norm_weight=gamma), d),
                 "decode_project": (lambda z: ops.decode_project(z, w_d), k)}[op]
    z = normal(n, width, dtype=torch.float32, gen=gen)
    got = torch.func.grad(lambda z: fn(z).pow(2).sum())(z)
    leaf = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(fn(leaf).pow(2).sum(), leaf)
    assert torch.equal(got, want)


def test_second_derivative_through_the_boundary_raises():
    """The boundary's backward runs the passes, which have no derivative:
    nested torch.func.grad says so (as create_graph=True does in torch.autograd)
    rather than taking their contribution as zero."""
    gen = torch.Generator().manual_seed(38)
    x = normal(4, 32, dtype=torch.float32, gen=gen)
    w_e, w_d = normal(16, 32, dtype=torch.float32, gen=gen), normal(32, 16, dtype=torch.float32, gen=gen)

    def loss(x):
        return ops.boundary(x, w_e, w_d, Codec(bits=8), Codec(bits=8))[0].pow(2).sum()

    with pytest.raises(RuntimeError, match=r"resbm::(encode|decode)_backward has no derivative"):
        torch.func.grad(lambda x: torch.func.grad(loss)(x).sum())(x)


def test_module_under_functional_call():
    """ResBMBoundary through torch.func.functional_call: with its buffers passed,
    the gradients equal torch.autograd's for the same call count and the passed
    counter advances (the module's own does not); with the counter captured, a
    clear error says to pass the buffers (its in-place increment is not allowed)."""
    gen = torch.Generator().manual_seed(39)
    torch.manual_seed(39)
    module = ResBMBoundary(32, 16, codec=INT4, grad_codec=STOCHASTIC)
    module.calls = 4
    x = normal(7, 32, dtype=torch.float32, gen=gen)
    params = {name: p.detach() for name, p in module.named_parameters()}
    buffers = {name: b.clone() for name, b in module.named_buffers()}

    def loss(params, buffers):
        return torch.func.functional_call(module, (params, buffers), (x,)).pow(2).sum()

    got = torch.func.grad(loss)(params, buffers)
    assert int(buffers["_calls"]) == 5 and module.calls == 4
    module(x).pow(2).sum().backward()  # call 5 too
    for name, p in module.named_parameters():
        assert torch.equal(got[name], p.grad), name
    with pytest.raises(RuntimeError, match=r"ResBMBoundary counts its calls .* pass the module's buffers"):
        torch.func.grad(lambda params: torch.func.functional_call(module, params, (x,)).sum())(params)


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=needs_cuda_kernels)])
def test_forward_mode_ad_raises(backend, monkeypatch):
    """Forward-mode AD is not supported: every op with a tangent among its
    inputs raises naming the op (the kernels would drop the tangents, the
    reference's torch ops would carry them: results differing by backend)."""
    import torch.autograd.forward_ad as forward_ad

    device = _device(backend, monkeypatch)
    gen = torch.Generator().manual_seed(41)
    x = normal(16, 64, dtype=torch.float32, gen=gen).to(device)
    w_e = normal(16, 64, dtype=torch.float32, scale=0.125, gen=gen).to(device)
    w_d = normal(64, 16, dtype=torch.float32, scale=0.25, gen=gen).to(device)
    match = r"resbm::{}: forward-mode AD .* is not supported"
    with use_backend(backend):
        payload = ops.encode(x, w_e, Codec(bits=8))
        with forward_ad.dual_level():
            assert ops.decode(payload, w_d, Codec(bits=8), 16).shape == (16, 64)  # (no tangent: runs)
            with pytest.raises(NotImplementedError, match=match.format("decode_forward")):
                ops.decode(payload, forward_ad.make_dual(w_d, torch.ones_like(w_d)), Codec(bits=8), 16)
            with pytest.raises(NotImplementedError, match=match.format("boundary")):
                ops.boundary(forward_ad.make_dual(x, torch.ones_like(x)), w_e, w_d, Codec(bits=8), Codec(bits=8))
        with pytest.raises(NotImplementedError, match=match.format("boundary")):
            torch.func.jvp(lambda x: ops.boundary(x, w_e, w_d, Codec(bits=8), Codec(bits=8))[0], (x,),
                           (torch.ones_like(x),))



@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_transform_falls_back_or_names_the_limit(fullgraph):
    """torch.compile of a torch.func.grad through the boundary: torch's custom-op
    autograd fails there (pytorch/pytorch#170834), so the op refuses by name;
    dynamo then runs that part eagerly (the eager transform's values), or with
    fullgraph=True reports the refusal. (torch 2.11's dynamo does not fall back:
    the error reaches the caller either way.)"""
    gen = torch.Generator().manual_seed(42)
    x = normal(8, 64, dtype=torch.float32, gen=gen)
    w_e = normal(16, 64, dtype=torch.float32, scale=0.125, gen=gen)
    w_d = normal(64, 16, dtype=torch.float32, scale=0.25, gen=gen)

    def loss(x):
        return ops.boundary(x, w_e, w_d, INT4, STOCHASTIC, seed=7, grad_seed=8)[0].pow(2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad(loss), backend="aot_eager", fullgraph=fullgraph)
    try:
        got = compiled(x)
    except Exception as e:  # (dynamo wraps it)
        assert "resbm::boundary under a torch.func transform inside torch.compile is not supported" in str(e)
        older = torch.torch_version.TorchVersion(torch.__version__) < "2.14"
        assert fullgraph or older, "dynamo should have run the op eagerly"
    else:
        assert not fullgraph and torch.equal(got, torch.func.grad(loss)(x))
