"""The nn modules: encoder, decoder, single-process boundary."""

import contextlib
import copy

import pytest
import torch

from helpers import randn
from resbm_kernels import BF16, GRAD_INT8, INT4, INT8, Codec, ResBMBoundary, ResBMDecoder, ResBMEncoder, ops
from resbm_kernels.nn import activation_checkpoint

D, K = 64, 16


@pytest.mark.parametrize("mlp_hidden", [None, 32])
@pytest.mark.parametrize("norm", [True, False])
def test_boundary_matches_explicit_encode_decode(mlp_hidden, norm):
    """Forward equals encoder.project -> quantize/dequantize -> decoder.project,
    the linear encoder's projection the formula (a norm weight away from ones)."""
    torch.manual_seed(0)
    b = ResBMBoundary(D, K, codec=INT8, grad_codec=GRAD_INT8, mlp_hidden=mlp_hidden, norm=norm)
    if norm:
        torch.nn.init.normal_(b.encoder.norm_weight, 1.0, 0.3)
    x = randn(3, 5, D, seed=1)
    h = b(x)
    z = b.encoder.project(x.reshape(-1, D))
    if mlp_hidden is None:
        x2d = x.reshape(-1, D).double()
        u = x2d * torch.rsqrt(x2d.square().mean(-1, keepdim=True) + b.encoder.eps)
        u = u * b.encoder.norm_weight.double() if norm else x2d
        torch.testing.assert_close(z.double(), u @ b.encoder.weight.double().T + x2d[:, :K], rtol=1e-5, atol=1e-5)
    q, s = ops.quantize(z.detach(), INT8)
    expected = b.decoder.project(ops.dequantize(q, s, INT8)).reshape(3, 5, D)
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mlp_hidden", [None, 32])
def test_encoder_and_decoder_modules_take_any_leading_shape(mlp_hidden):
    """encoder(x) and decoder(zhat, residual) over (..., width) activations are
    their projections over the flattened tokens, with the leading shape kept."""
    torch.manual_seed(0)
    enc, dec = ResBMEncoder(D, K, mlp_hidden=mlp_hidden), ResBMDecoder(D, K, mlp_hidden=mlp_hidden)
    x, residual = randn(2, 3, D, seed=1), randn(2, 3, D, seed=2)
    z = enc(x)
    assert z.shape == (2, 3, K)
    torch.testing.assert_close(z, enc.project(x.reshape(-1, D)).reshape(2, 3, K), rtol=0, atol=0)
    h = dec(z, residual)
    assert h.shape == (2, 3, D)
    want = dec.project(z.reshape(-1, K), residual.reshape(-1, D)).reshape(2, 3, D)
    torch.testing.assert_close(h, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ResBMEncoder: input has 32 channels, expected 64"):
        enc(x[..., :32])
    with pytest.raises(ValueError, match="ResBMDecoder: residual has 8 channels, expected 64"):
        dec(z, residual[..., :8])


@pytest.mark.parametrize("mlp_hidden", [None, 32])
def test_gradients_reach_every_parameter(mlp_hidden):
    b = ResBMBoundary(D, K, codec=Codec(bits=4, group_size=8), grad_codec=GRAD_INT8, mlp_hidden=mlp_hidden)
    x = randn(4, D, seed=2).requires_grad_()
    b(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in b.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_identity_path_of_the_mlp_variant():
    """With the MLPs' output layers zeroed, the boundary passes x[:, :k]
    (up to the bf16 wire) and zeros elsewhere."""
    b = ResBMBoundary(D, K, codec=BF16, grad_codec=BF16, mlp_hidden=32)
    torch.nn.init.zeros_(b.encoder.mlp.down.weight)
    torch.nn.init.zeros_(b.decoder.mlp.down.weight)
    x = randn(6, D, seed=3)
    h = b(x)
    assert torch.equal(h[:, K:], torch.zeros(6, D - K))
    assert torch.equal(h[:, :K], x[:, :K].bfloat16().float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_activations_with_fp32_parameters(dtype):
    torch.manual_seed(0)
    b = ResBMBoundary(D, K, codec=INT8)
    x = randn(8, D, seed=4, dtype=dtype).requires_grad_()
    h = b(x)
    assert h.dtype == dtype
    h.float().sum().backward()
    assert x.grad.dtype == dtype and b.encoder.weight.grad.dtype == torch.float32
    ref = b(x.detach().float())
    # z in the dtype may round to the neighbouring int8 code: a couple of steps (or dtype ulps) of the largest value
    unit = max(torch.finfo(dtype).eps, 1 / INT8.qmax)
    torch.testing.assert_close(h.float(), ref, atol=2 * unit * ref.abs().max().item(), rtol=0)


def test_stochastic_rounding_draws_new_seeds_reproducibly():
    codec = Codec(bits=4, group_size=16, rounding="stochastic")
    torch.manual_seed(0)
    a = ResBMBoundary(D, K, codec=codec, seed=5)
    torch.manual_seed(0)
    b = ResBMBoundary(D, K, codec=codec, seed=5)
    x = randn(16, D, seed=6)
    first, second = a(x), a(x)
    assert not torch.equal(first, second)  # a fresh seed each call
    assert torch.equal(first, b(x)) and torch.equal(second, b(x))


def test_wire_accounting():
    b = ResBMBoundary(4096, 32, codec=INT8)
    assert b.wire_bytes(1024) == INT8.payload_bytes(1024, 32) == 16 + 1024 * (32 + 2)
    assert b.compression_ratio(1024) == pytest.approx(2 * 4096 * 1024 / b.wire_bytes(1024))
    assert "int8/row/bf16/nearest" in repr(b)


def test_module_construction_errors():
    with pytest.raises(ValueError, match="k=24 must divide the model width d=64"):
        ResBMEncoder(64, 24)
    with pytest.raises(ValueError, match="bottleneck width k=0 must be at least 1"):
        ResBMDecoder(64, 0)
    with pytest.raises(ValueError, match="group_size=32 does not divide k=16"):
        ResBMBoundary(64, 16, codec=INT4)
    with pytest.raises(ValueError, match="model width d=0 must be at least 1"):
        ResBMBoundary(0, 16)
    with pytest.raises(TypeError, match="bottleneck width k=16.0 must be an integer"):
        ResBMEncoder(64, 16.0)
    with pytest.raises(ValueError, match="mlp_hidden=0 must be at least 1"):
        ResBMDecoder(64, 16, mlp_hidden=0)
    with pytest.raises(ValueError, match="RMSNorm's epsilon must be a finite number >= 0"):
        ResBMEncoder(64, 16, eps=-1e-6)
    with pytest.raises(TypeError, match="seed=1.5 must be an integer"):
        ResBMBoundary(64, 16, seed=1.5)


def test_demo_example_runs():
    """The README's main job (examples/train_boundary.py), a few steps."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "examples" / "train_boundary.py"
    res = subprocess.run([sys.executable, str(script), "--steps", "3", "--width", "64", "--layers", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "validation loss:" in res.stdout and "compression ratio: forward" in res.stdout


def test_readme_first_snippet_runs():
    """The README's opening example, as printed there: a boundary's forward and backward."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    x, h = scope["x"], scope["h"]
    assert h.shape == x.shape and torch.isfinite(h).all()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_resumed_boundary_draws_the_seeds_of_the_uninterrupted_run():
    """The call counter that seeds stochastic rounding is saved in the state_dict."""
    codec = Codec(bits=4, group_size=8, rounding="stochastic")
    x = randn(16, D, seed=5)
    run = ResBMBoundary(D, K, codec=codec, seed=3)
    run(x), run(x)
    resumed = ResBMBoundary(D, K, codec=codec, seed=3)
    resumed.load_state_dict(run.state_dict())
    assert resumed.calls == 2
    torch.testing.assert_close(resumed(x), run(x), rtol=0, atol=0)
    fresh = ResBMBoundary(D, K, codec=codec, seed=3)
    fresh.load_state_dict({name: t for name, t in run.state_dict().items() if name != "_extra_state"}, strict=False)
    assert not torch.equal(fresh(x), resumed(x))  # (call 1's seeds, not call 4's: the counter matters)


@pytest.mark.parametrize("mlp_hidden", [None, 32])
def test_meta_device_init_then_reset_parameters(mlp_hidden):
    """Built on the meta device, moved with to_empty (uninitialised memory) and
    reset module by module (FSDP's deferred init): the parameters a direct
    construction draws from the same seed, the norm weight ones again."""
    torch.manual_seed(3)
    direct = ResBMBoundary(D, K, mlp_hidden=mlp_hidden)
    with torch.device("meta"):
        deferred = ResBMBoundary(D, K, mlp_hidden=mlp_hidden)
    deferred.to_empty(device="cpu")
    for p in deferred.parameters():
        torch.nn.init.constant_(p, float("nan"))  # what to_empty may leave
    deferred._calls.fill_(12345)
    torch.manual_seed(3)
    for m in deferred.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    want = dict(direct.named_parameters())
    for name, p in deferred.named_parameters():
        assert torch.equal(p, want[name]), name
    x = randn(3, D, seed=4)
    assert torch.equal(deferred(x), direct(x))  # (and the call counter: reset to 0)


def test_call_counter_moves_with_the_module_and_is_copied():
    b = ResBMBoundary(D, K, codec=INT8).to(torch.float64)  # (an int64 buffer: dtype casts leave it)
    b(randn(2, D, seed=1).double())
    twin = copy.deepcopy(b)
    twin(randn(2, D, seed=1).double())
    assert (b.calls, twin.calls) == (1, 2) and twin._calls.dtype == torch.int64
    state = b.state_dict()  # (the count: extra state, a copy, not the buffer)
    assert "_calls" not in state and torch.equal(state["_extra_state"]["calls"], torch.tensor(1))
    b(randn(2, D, seed=1).double())
    assert state["_extra_state"]["calls"] == 1
    assert b.to("meta")._calls.is_meta and ResBMBoundary(D, K, device="meta")._calls.is_meta
    assert b.state_dict()["_extra_state"]["calls"].is_meta  # (a meta module has a state_dict too)


def test_call_count_loads_from_an_int_or_a_tensor():
    """States saved before the count was a tensor carry an int; both load, a
    tensor of anything but one integer is refused."""
    b = ResBMBoundary(D, K)
    b.set_extra_state({"calls": 7})
    assert b.calls == 7
    b.set_extra_state({"calls": torch.tensor([9], dtype=torch.int32)})
    assert b.calls == 9
    with pytest.raises(ValueError, match=r"calls: expected one integer, got a torch.float32 tensor of shape \(\)"):
        b.set_extra_state({"calls": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="calls=-1 must be at least 0"):
        b.calls = -1


def _three_steps(model, x, forward) -> tuple[list, list, int]:
    """(outputs, parameter gradients, boundary calls) of three forward and
    backward steps from call 0, the forward run by ``forward(model, x)``."""
    model[1].calls = 0
    model.zero_grad()
    outputs = []
    for _ in range(3):
        y = forward(model, x)
        y.square().sum().backward()
        outputs.append(y.detach())
    return outputs, [p.grad.clone() for p in model.parameters()], model[1].calls


def test_activation_checkpoint_recomputes_with_the_forward_seeds():
    """Under activation_checkpoint a stochastic boundary's recomputed forward
    draws the seeds of the original one: outputs and gradients equal the
    uncheckpointed run's bit for bit, and the counter counts each call once.
    torch's checkpoint alone recomputes with the next seeds (so the calls
    double and the gradients differ). The checkpointed model is a deep copy
    (copies are replayed too)."""
    torch.manual_seed(0)
    stochastic = Codec(bits=4, group_size=8, rounding="stochastic")
    model = torch.nn.Sequential(torch.nn.Linear(32, D), ResBMBoundary(D, K, codec=stochastic),
                                torch.nn.Linear(D, 8))
    x = randn(4, 32, seed=1)
    plain = _three_steps(model, x, lambda m, x: m(x))
    ours = _three_steps(copy.deepcopy(model), x, activation_checkpoint)
    theirs = _three_steps(model, x, lambda m, x: torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False))
    assert plain[2] == ours[2] == 3 and theirs[2] == 6
    for got, want in zip(ours[0] + ours[1], plain[0] + plain[1]):
        assert torch.equal(got, want)
    assert not all(torch.equal(a, b) for a, b in zip(theirs[1], plain[1]))
    for bad in (dict(use_reentrant=True), dict(context_fn=contextlib.nullcontext)):
        with pytest.raises(ValueError, match="activation_checkpoint is non-reentrant and supplies its own"):
            activation_checkpoint(model, x, **bad)


@pytest.mark.parametrize("where", ["compiled caller", "compiled function"])
def test_activation_checkpoint_with_torch_compile(where):
    """Called from compiled code (a graph break: torch's checkpoint traced there
    recomputes with other seeds) or given a compiled function, the recomputation
    draws the forward's seeds: gradients equal the uncheckpointed eager run's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, D),
                                ResBMBoundary(D, K, codec=Codec(bits=4, group_size=8, rounding="stochastic")),
                                torch.nn.Linear(D, 8))
    x = randn(4, 32, seed=1)
    plain = _three_steps(model, x, lambda m, x: m(x))
    twin = copy.deepcopy(model)
    if where == "compiled caller":
        step = torch.compile(lambda x: activation_checkpoint(twin, x) * 1.0, backend="aot_eager")
    else:
        compiled = torch.compile(twin, backend="aot_eager")
        step = lambda x: activation_checkpoint(compiled, x)  # noqa: E731
    got = _three_steps(twin, x, lambda m, x: step(x))
    assert got[2] == plain[2] == 3
    for a, b in zip(got[0] + got[1], plain[0] + plain[1]):
        assert torch.equal(a, b)
