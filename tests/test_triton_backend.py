"""The Triton backend against the reference: on a CUDA GPU when one is present,
otherwise on the CPU under TRITON_INTERPRET=1.

Every pass goes through the public ops with ``use_backend("triton")``. Inputs
are fresh random values (never zeros). Two kinds of comparison:

- exact inputs (small integers times powers of two: every product and sum is
  exact in fp32 in any order), so z is identical and the payload must match
  the reference byte for byte, stochastic rounding included;
- random-normal inputs, compared after dequantization (codes may differ by at
  most one step) or within tolerances derived from the output dtype.

Fresh outputs are poisoned (NaN, 0xFF) before the kernels run, so unwritten
elements show.
"""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest.py set TRITON_INTERPRET=1 without a GPU

pytest.importorskip("triton")

from resbm_kernels import ops  # noqa: E402
from resbm_kernels.backends import reference as ref  # noqa: E402
from resbm_kernels.backends import use_backend  # noqa: E402
from helpers import assert_close_payload, exact, normal, poison_fast_outputs, rel_err  # noqa: E402
from helpers import check_decode_backward_mixed_dtypes, check_encode_row_stats  # noqa: E402
from helpers import check_boundary_draws_anew_in_a_cuda_graph, check_boundary_under_autocast  # noqa: E402
from helpers import check_boundary_compiled_with_cuda_graphs  # noqa: E402
from helpers import check_seed_offset_is_read_on_the_device  # noqa: E402
from helpers import check_passes_do_not_synchronise, check_passes_replay_in_a_cuda_graph  # noqa: E402
from helpers import FAST_CODECS, FINISH_LAYOUTS, GRAD_CODEC  # noqa: E402
from helpers import exact_finish_case, finish_weight_grad_reference  # noqa: E402
from helpers import NO_WORK_OPS, to_device, training_pass_calls  # noqa: E402
from helpers import ids as _ids  # noqa: E402
from helpers import rel_tol as tol  # noqa: E402
from resbm_kernels.backends import triton as tb  # noqa: E402
from resbm_kernels.codec import Codec  # noqa: E402

needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODECS = FAST_CODECS
# (N, d, k): one block with a masked tail, several row blocks and two d tiles,
# and a k that is not a power of two (padded BLOCK_K, masked groups and bytes)
SHAPES = ((37, 128, 32), (150, 256, 16), (20, 96, 48))


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Fresh kernel outputs start as NaN / 0xFF instead of whatever was in memory."""
    poison_fast_outputs(monkeypatch)


@pytest.fixture(autouse=True)
def interpreter_split_rule(monkeypatch):
    """The d split (small N) as under the interpreter, on a GPU too: SHAPES then
    take both the split and the one-program-per-row-block paths on every device
    (with a GPU's SM count every test shape here would split)."""
    monkeypatch.setattr(tb.configs, "programs_at_once", lambda device: 4)


def triton_call(fn, *args, **kwargs):
    """Run an op on the Triton backend on DEVICE; tensors come back on the CPU."""
    with use_backend("triton"):
        out = fn(*to_device(args, DEVICE), **to_device(kwargs, DEVICE))
    return to_device(out, "cpu")


# ---- encode forward -------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_encode_forward_bit_exact(shape, dtype, codec):
    n, d, k = shape
    gen = torch.Generator().manual_seed(n * d + k)
    x = exact(n, d, dtype=dtype, gen=gen)
    w_e = exact(k, d, dtype=dtype, scale=1 / 16, gen=gen)
    got = triton_call(ops.encode, x, w_e, codec, seed=1234)
    want = ops.encode(x, w_e, codec, seed=1234)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} payload bytes differ"


@pytest.mark.parametrize("codec", CODECS[:4] + CODECS[6:7], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("norm", (False, True), ids=("plain", "norm"))
def test_encode_forward_random(norm, dtype, codec):
    n, d, k = 150, 256, 32
    gen = torch.Generator().manual_seed(7)
    x = normal(n, d, dtype=dtype, gen=gen)
    w_e = normal(k, d, dtype=dtype, scale=d**-0.5, gen=gen)
    gamma = normal(d, dtype=dtype, gen=gen).add_(1.0) if norm else None
    got = triton_call(ops.encode, x, w_e, codec, norm_weight=gamma, seed=3)
    want = ops.encode(x, w_e, codec, norm_weight=gamma, seed=3)
    assert_close_payload(got, want, codec, n, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_encode_forward_row_stats(shape, dtype):
    check_encode_row_stats("triton", DEVICE, shape, dtype)


def test_encode_forward_strided_rows():
    """Row stride larger than d (a column slice of a wider tensor)."""
    gen = torch.Generator().manual_seed(1)
    x = exact(40, 160, dtype=torch.float32, gen=gen, device=DEVICE)[:, :128]  # sliced where it runs
    w_e = exact(32, 128, dtype=torch.float32, scale=1 / 16, gen=gen)
    assert x.stride() == (160, 1)
    assert torch.equal(triton_call(ops.encode, x, w_e, Codec()), ops.encode(x.cpu(), w_e, Codec()))


def test_stochastic_seed_reproducible_and_distinct():
    gen = torch.Generator().manual_seed(2)
    x = exact(37, 128, dtype=torch.bfloat16, gen=gen)
    w_e = exact(32, 128, dtype=torch.bfloat16, scale=1 / 16, gen=gen)
    c = Codec(bits=4, group_size=16, rounding="stochastic")
    a = triton_call(ops.encode, x, w_e, c, seed=2**40 + 5)
    assert torch.equal(a, triton_call(ops.encode, x, w_e, c, seed=2**40 + 5))
    assert torch.equal(a, ops.encode(x, w_e, c, seed=2**40 + 5))
    assert not torch.equal(a, triton_call(ops.encode, x, w_e, c, seed=6))


# ---- decode forward -------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS[:6], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_decode_forward(shape, dtype, codec):
    n, d, k = shape
    gen = torch.Generator().manual_seed(n + d + k)
    payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), codec, 0)
    w_d = normal(d, k, dtype=dtype, scale=k**-0.5, gen=gen)
    for residual in (None, normal(n, d, dtype=dtype, gen=gen)):
        got = triton_call(ops.decode, payload, w_d, codec, n, residual=residual, out_dtype=dtype)
        want = ops.decode(payload, w_d, codec, n, residual=residual, out_dtype=dtype)
        assert got.dtype == dtype and got.shape == (n, d)
        assert torch.isfinite(got).all()
        assert rel_err(got, want) <= tol(dtype)


# (programs the device runs at once, the launcher's d split, the config's D_SPLIT) for one row
# block of four d tiles: 3 programs take runs of 2, 2 and 0 tiles, 6 of 1 tile or none
D_SPLIT_CASES = ((1, 1, 1), (3, 3, 1), (64, 4, 1), (1, 1, 3), (3, 3, 2))


def force_d_splits(monkeypatch, programs, splits, tuned, n, d):
    """The launcher's small-N split of dequant_project (and project_quantize) for
    ``programs`` at once, ``splits``, and dequant_project's config with D_SPLIT=``tuned``."""
    monkeypatch.setattr(tb.configs, "programs_at_once", lambda device: programs)
    assert tb.configs.d_splits(n, d, "cpu") == splits
    config = (*tb.configs.INTERPRET_BLOCKS, 4, 1, {"D_SPLIT": tuned})
    monkeypatch.setattr(tb.KERNELS["dequant_project"], "configs", tb.configs.gpu_configs((config,)))


def test_decode_forward_d_splits(monkeypatch):
    """Decode forward splits d between programs: with fewer row blocks than the
    device runs programs at once (the launcher's split), and by the config's
    D_SPLIT (tuned at large N); every split gives the very output of one program
    per row block (outputs start poisoned, so a skipped tile shows)."""
    n, d, k = 20, 512, 32  # one row block, four d tiles of the interpreter's BLOCK_D=128
    gen = torch.Generator().manual_seed(11)
    codec = Codec(bits=4, group_size=16)
    payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), codec, 0)
    w_d = normal(d, k, dtype=torch.bfloat16, scale=k**-0.5, gen=gen)
    residual = normal(n, d, dtype=torch.bfloat16, gen=gen)
    kernel = tb.KERNELS["dequant_project"].fn.fn  # under configs.LoopConstants
    grids = []

    def run(*args, _run=kernel.run, **kwargs):
        grids.append(kwargs["grid"](kwargs))
        return _run(*args, **kwargs)
    monkeypatch.setattr(kernel, "run", run)
    outputs = []
    for case in D_SPLIT_CASES:
        force_d_splits(monkeypatch, *case, n, d)
        outputs.append(triton_call(ops.decode, payload, w_d, codec, n, residual=residual))
    assert grids == [(1, splits * tuned) for _, splits, tuned in D_SPLIT_CASES]
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    want = ops.decode(payload, w_d, codec, n, residual=residual)
    assert rel_err(outputs[0], want) <= tol(torch.bfloat16)


def test_project_quantize_d_splits(monkeypatch):
    """With fewer row blocks than the device runs programs at once, encode
    forward and decode backward split d between programs and sum the partials
    in a second kernel: payloads, row statistics and decode backward's weight
    gradient are the very ones of one program per row block (exact inputs:
    every summation order gives the same fp32 sums), and match the reference."""
    n, d, k = 20, 512, 32  # one row block, four d tiles of the interpreter's BLOCK_D=128
    gen = torch.Generator().manual_seed(12)
    bf16 = torch.bfloat16
    x = exact(n, d, dtype=bf16, gen=gen)
    w_e = exact(k, d, dtype=bf16, scale=1 / 16, gen=gen)
    w_d = exact(d, k, dtype=bf16, scale=1 / 16, gen=gen)
    gamma = normal(d, dtype=bf16, scale=0.1, gen=gen).add_(1.0)
    codec, grad_codec = Codec(bits=8), Codec(bits=4, group_size=16, rounding="stochastic")
    payload = ops.encode(x, w_e, codec, seed=3)
    results = []
    for programs, splits in ((1, 1), (3, 3), (64, 4)):  # 3: runs of 2, 2 and 0 tiles
        monkeypatch.setattr(tb.configs, "programs_at_once", lambda device, programs=programs: programs)
        assert tb.configs.d_splits(n, d, "cpu") == splits
        encoded = triton_call(ops.encode, x, w_e, codec, norm_weight=gamma, seed=3, return_row_stats=True)
        results.append((*encoded, *triton_call(ops.decode_backward, x, payload, w_d, codec, grad_codec, grad_seed=4)))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], got))
    want_payload, want_stats = ops.encode(x, w_e, codec, norm_weight=gamma, seed=3, return_row_stats=True)
    assert_close_payload(results[0][0], want_payload, codec, n, k)
    assert rel_err(results[0][1], want_stats) <= tol(bf16)  # bf16(gamma * W_e) operands, as the unsplit kernel
    want_gp, want_gw = ops.decode_backward(x, payload, w_d, codec, grad_codec, grad_seed=4)
    assert torch.equal(results[0][2], want_gp)
    assert rel_err(results[0][3], want_gw) <= tol(bf16)


def test_encode_backward_d_splits(monkeypatch):
    """Encode backward with d split between grad_x's programs (small N, and the
    config's D_SPLIT, as in test_decode_forward_d_splits): given
    the forward's row statistics, the programs of the first split also write
    Z, the weight gradient's operand (and every program forms alpha from the
    statistics): every split gives the very outputs of one program per row
    block, through RMSNorm and without it, and they match the reference; Z is
    not formed by a launch of its own (outputs start poisoned, so rows of Z
    left unwritten would show in grad_w_e)."""
    n, d, k = 20, 512, 32  # one row block, four d tiles of the interpreter's BLOCK_D=128
    gen = torch.Generator().manual_seed(13)
    bf16 = torch.bfloat16
    x = normal(n, d, dtype=bf16, gen=gen)
    w_e = normal(k, d, dtype=bf16, scale=d**-0.5, gen=gen)
    gamma = normal(d, dtype=bf16, scale=0.2, gen=gen).add_(1.0)
    grad_payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), GRAD_CODEC, 4)
    stats = triton_call(ops.encode, x, w_e, Codec(bits=8), norm_weight=gamma, return_row_stats=True)[1]

    def separate_launch(*args):
        raise AssertionError("Z came from grad_operand's launch")

    monkeypatch.setattr(tb, "_grad_operand", separate_launch)
    for norm in (gamma, None):
        results = []
        for case in D_SPLIT_CASES:
            force_d_splits(monkeypatch, *case, n, d)
            results.append(triton_call(ops.encode_backward, grad_payload, x, w_e, GRAD_CODEC, norm_weight=norm,
                                       row_stats=stats if norm is not None else None))
        for got in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], got) if a is not None)
        want = ops.encode_backward(grad_payload, x, w_e, GRAD_CODEC, norm_weight=norm)
        for name, a, b in zip(("grad_x", "grad_w_e", "grad_gamma"), results[0], want):
            assert (a is None) == (b is None) and (a is None or rel_err(a, b) <= 4 * tol(bf16)), (name, norm is None)


def test_decode_forward_out_dtype_differs():
    """fp32 weights, bf16 output (rounded to nearest even by hand)."""
    gen = torch.Generator().manual_seed(3)
    codec = Codec(bits=8)
    payload = ref.write_payload(normal(37, 32, gen=gen, dtype=torch.float32), codec, 0)
    w_d = normal(128, 32, dtype=torch.float32, gen=gen)
    got = triton_call(ops.decode, payload, w_d, codec, 37, out_dtype=torch.bfloat16)
    want = ops.decode(payload, w_d, codec, 37, out_dtype=torch.bfloat16)
    assert rel_err(got, want) <= tol(torch.bfloat16)


def test_dot_operands_round_to_nearest_even():
    """bf16 tensor-core operands are rounded to nearest even (the GPU's
    conversion), under the interpreter too, whose own fp32 -> bf16 cast
    truncates. W_d is 0/1 with one 1 per row, so every output is one exact
    product plus the identity path: equality, not a tolerance."""
    n, d, k = 8, 32, 16
    gen = torch.Generator().manual_seed(5)
    codec = Codec(bits=8)
    payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), codec, 0)
    zhat = ref.read_payload(payload, codec, n, k, torch.float32)
    cols = torch.arange(d) % k
    w_d = torch.zeros(d, k, dtype=torch.bfloat16)
    w_d[torch.arange(d), cols] = 1
    got = triton_call(ops.decode, payload, w_d, codec, n, out_dtype=torch.float32)
    nearest = zhat.to(torch.bfloat16).float()
    truncated = (zhat.view(torch.int32) & -65536).view(torch.float32)
    assert (nearest != truncated).any()  # the data tells the two apart
    want = nearest[:, cols] + torch.nn.functional.pad(zhat, (0, d - k))
    assert torch.equal(got, want)


# ---- decode backward ------------------------------------------------------------------


@pytest.mark.parametrize("grad_codec", (GRAD_CODEC, Codec(bits=4, group_size=16, rounding="stochastic"),
                                        Codec(bits=8), Codec(bits=16)), ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_ids)
def test_decode_backward(shape, dtype, grad_codec):
    n, d, k = shape
    gen = torch.Generator().manual_seed(11)
    codec = Codec(bits=4, group_size=16)
    payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), codec, 0)
    grad_h = exact(n, d, dtype=dtype, gen=gen)
    w_d = exact(d, k, dtype=dtype, scale=1 / 16, gen=gen)
    gp, gw = triton_call(ops.decode_backward, grad_h, payload, w_d, codec, grad_codec, grad_seed=99)
    gp_ref, gw_ref = ops.decode_backward(grad_h, payload, w_d, codec, grad_codec, grad_seed=99)
    assert torch.equal(gp, gp_ref), "gradient payload differs"
    assert gw.dtype == dtype and rel_err(gw, gw_ref) <= tol(dtype)


@pytest.mark.parametrize("codec", (Codec(bits=16), Codec(bits=8), Codec(bits=2, group_size=16),
                                   Codec(bits=8, group_size=32, scale_dtype=torch.float32)), ids=_ids)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=_ids)
def test_decode_backward_forward_codecs(codec, dtype):
    """The weight gradient reads zhat from the forward payload (dequantized by the
    main kernel into its operand buffer) for every forward codec."""
    n, d, k = 70, 128, 64
    gen = torch.Generator().manual_seed(13)
    payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), codec, 0)
    grad_h = normal(n, d, dtype=dtype, gen=gen)
    w_d = normal(d, k, dtype=dtype, scale=k**-0.5, gen=gen)
    _, gw = triton_call(ops.decode_backward, grad_h, payload, w_d, codec, GRAD_CODEC, grad_seed=5)
    _, gw_ref = ops.decode_backward(grad_h, payload, w_d, codec, GRAD_CODEC, grad_seed=5)
    assert gw.dtype == dtype and rel_err(gw, gw_ref) <= tol(dtype)


@pytest.mark.parametrize("dtypes", ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)), ids=str)
def test_decode_backward_mixed_dtypes(dtypes):
    check_decode_backward_mixed_dtypes("triton", DEVICE, *dtypes)


def test_boundary_under_autocast():
    check_boundary_under_autocast("triton", DEVICE)


def test_seed_offset_is_read_on_the_device(monkeypatch):
    check_seed_offset_is_read_on_the_device("triton", DEVICE, monkeypatch)


# ---- encode backward ------------------------------------------------------------------


@pytest.mark.parametrize("grad_codec", (GRAD_CODEC, Codec(bits=2, group_size=16), Codec(bits=16)), ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("norm", (False, True, "row_stats"), ids=("plain", "norm", "norm-row-stats"))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_encode_backward(shape, norm, dtype, grad_codec):
    """norm-row-stats: with the row statistics of the Triton encode forward (no pass over x for them)."""
    check_encode_backward(shape, norm, dtype, grad_codec)


def check_encode_backward(shape, norm, dtype, grad_codec):
    """Triton's encode backward against the reference (see test_encode_backward)."""
    n, d, k = shape
    gen = torch.Generator().manual_seed(5)
    grad_payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), grad_codec, 4)
    x = normal(n, d, dtype=dtype, gen=gen)
    w_e = normal(k, d, dtype=dtype, scale=d**-0.5, gen=gen)
    gamma = normal(d, dtype=dtype, scale=0.2, gen=gen).add_(1.0) if norm else None
    stats = None
    if norm == "row_stats":
        stats = triton_call(ops.encode, x, w_e, Codec(bits=8), norm_weight=gamma, eps=1e-5, return_row_stats=True)[1]
    got = triton_call(ops.encode_backward, grad_payload, x, w_e, grad_codec, norm_weight=gamma, eps=1e-5,
                      row_stats=stats)
    want = ops.encode_backward(grad_payload, x, w_e, grad_codec, norm_weight=gamma, eps=1e-5)
    names = ("grad_x", "grad_w_e", "grad_gamma")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        # the norm's backward subtracts nearly equal terms: allow 4 output ulps
        assert rel_err(a, b) <= tol(dtype) * (4 if norm else 1), name


@pytest.mark.parametrize("norm, n, grad_scale, x_scale", ((False, 150, 3e-7, 1e3), (True, 1024, 3e-6, 1.0)),
                         ids=("plain", "norm"))
def test_encode_backward_fp16_small_gradients(norm, n, grad_scale, x_scale):
    """fp16 activations with gradients in fp16's subnormal range: the GEMMs
    with dequantized gradients keep fp32 range (TF32), so the weight gradients
    (normal fp16 numbers here) stay within fp16 tolerance. With fp16 operands
    their error was 5e-2 (plain) and 6e-3 (norm)."""
    d, k = 128, 32
    gen = torch.Generator().manual_seed(13)
    grad_codec = Codec(bits=8, rounding="stochastic")
    grad_payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32, scale=grad_scale), grad_codec, 4)
    x = normal(n, d, dtype=torch.float16, scale=x_scale, gen=gen)
    w_e = normal(k, d, dtype=torch.float16, scale=d**-0.5, gen=gen)
    gamma = normal(d, dtype=torch.float16, scale=0.2, gen=gen).add_(1.0) if norm else None
    got = triton_call(ops.encode_backward, grad_payload, x, w_e, grad_codec, norm_weight=gamma)
    want = ops.encode_backward(grad_payload, x, w_e, grad_codec, norm_weight=gamma)
    # grad_x is itself subnormal in fp16: allow one subnormal step (2**-24) besides the relative bound
    torch.testing.assert_close(got[0], want[0], rtol=tol(torch.float16), atol=2.0**-24)
    for name, a, b in zip(("grad_w_e", "grad_gamma"), got[1:], want[1:]):
        if b is not None:
            assert rel_err(a, b) <= tol(torch.float16), name


def test_encode_backward_uses_row_stats():
    """Given the statistics, the kernels use them instead of x's: doubled
    statistics change every gradient (a path that still recomputed them from
    x would not notice)."""
    n, d, k = 37, 128, 32
    gen = torch.Generator().manual_seed(21)
    grad_payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), GRAD_CODEC, 4)
    x = normal(n, d, dtype=torch.float32, gen=gen)
    w_e = normal(k, d, dtype=torch.float32, scale=d**-0.5, gen=gen)
    gamma = normal(d, dtype=torch.float32, scale=0.2, gen=gen).add_(1.0)
    stats = triton_call(ops.encode, x, w_e, Codec(bits=8), norm_weight=gamma, return_row_stats=True)[1]
    good = triton_call(ops.encode_backward, grad_payload, x, w_e, GRAD_CODEC, norm_weight=gamma, row_stats=stats)
    bad = triton_call(ops.encode_backward, grad_payload, x, w_e, GRAD_CODEC, norm_weight=gamma, row_stats=stats * 2)
    for name, a, b in zip(("grad_x", "grad_w_e", "grad_gamma"), bad, good):
        assert rel_err(a, b) > 0.1, name


@pytest.mark.parametrize("n, splits", ((150, 3), (4, 3), (150, 2)), ids=("150-rows-3-splits", "4-rows-3-splits",
                                                                         "150-rows-2-splits"))
def test_backward_row_splits(monkeypatch, n, splits):
    """The weight-gradient pass with several row splits (the GPU's layout for
    N >= 2048; the interpreter otherwise runs one), including an empty split:
    every split's partial and its rows of grad_x are written."""
    from resbm_kernels.backends import fast

    monkeypatch.setattr(fast, "weight_grad_partials", lambda n, d, k, transpose, device, max_splits=8: fast.empty(
        (splits, d, k) if transpose else (splits, k, d), torch.float32, device))
    d, k = 96, 32
    gen = torch.Generator().manual_seed(n + splits)
    codec = Codec(bits=8)
    x = normal(n, d, dtype=torch.bfloat16, gen=gen)
    w_e = normal(k, d, dtype=torch.bfloat16, scale=d**-0.5, gen=gen)
    w_d = normal(d, k, dtype=torch.bfloat16, scale=k**-0.5, gen=gen)
    gamma = normal(d, dtype=torch.bfloat16, scale=0.2, gen=gen).add_(1.0)
    payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), codec, 0)
    grad_payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), GRAD_CODEC, 4)
    grad_h = normal(n, d, dtype=torch.bfloat16, gen=gen)
    got = triton_call(ops.decode_backward, grad_h, payload, w_d, codec, GRAD_CODEC, grad_seed=2)[1]
    assert rel_err(got, ops.decode_backward(grad_h, payload, w_d, codec, GRAD_CODEC, grad_seed=2)[1]) <= \
        tol(torch.bfloat16), "grad_w_d"
    stats = triton_call(ops.encode, x, w_e, codec, norm_weight=gamma, return_row_stats=True)[1]
    want = ops.encode_backward(grad_payload, x, w_e, GRAD_CODEC, norm_weight=gamma)
    got = triton_call(ops.encode_backward, grad_payload, x, w_e, GRAD_CODEC, norm_weight=gamma, row_stats=stats)
    for name, a, b in zip(("grad_x", "grad_w_e", "grad_gamma"), got, want):
        assert rel_err(a, b) <= 4 * tol(torch.bfloat16), name


@pytest.mark.parametrize("splits", [3, 2 * tb.WGRAD_SPLITS + 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("layout", FINISH_LAYOUTS)
def test_finish_weight_grad_exact(layout, dtype, splits):
    """The kernel that finishes a weight gradient from its row-split partials,
    bit for bit against torch on exact inputs (see exact_finish_case): the sum
    over the splits and, through RMSNorm, M * gamma and grad_gamma = sum_c W_e * M.
    More splits than it loads at once (the fused passes' chunks): the loop over
    groups of them, the last group partly past the end."""
    partial, transpose, w_e, gamma = exact_finish_case(layout, dtype, splits)
    want = finish_weight_grad_reference(partial, dtype, w_e, gamma)
    encoder = (w_e.to(DEVICE), gamma.to(DEVICE)) if gamma is not None else ()
    got = to_device(tb._finish_weight_grad(partial.to(DEVICE), transpose, dtype, *encoder), "cpu")
    assert got[0].dtype == dtype and torch.equal(got[0], want[0]), "gradient"
    if gamma is not None:
        assert torch.equal(got[1], want[1]), "grad_gamma"
    if dtype != torch.float32:
        m = partial.sum(0)
        assert not torch.equal(want[0].float(), (m * gamma.float() if gamma is not None else m)), "no rounding needed"


# ---- the backward passes with the weight gradient in the main launch ------------------


def force_fused(monkeypatch):
    """RESBM_TRITON_FUSED_WGRAD=1, the separate weight-gradient pass made to
    fail: a test that passes took the fused launch."""
    monkeypatch.setenv(tb.FUSED_WGRAD_SWITCH, "1")

    def separate_pass(*args):
        raise AssertionError("the separate weight-gradient pass ran")

    monkeypatch.setattr(tb, "_weight_grad", separate_pass)


@pytest.fixture
def fused_wgrad(monkeypatch):
    """force_fused, with chunks of 128 rows on every device (as under the interpreter)."""
    force_fused(monkeypatch)
    monkeypatch.setattr(tb.configs, "fused_chunk_rows", lambda d, elem_bytes, device: 128)


# one chunk with a masked tail; three chunks, the last with a row block past N, d not a multiple of
# BLOCK_D and k padded to BLOCK_K; three chunks, several weight-gradient d tiles
FUSED_SHAPES = ((37, 128, 32), (300, 96, 48), (300, 256, 16))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=_ids)
def test_decode_backward_fused_weight_grad(shape, dtype, fused_wgrad):
    n, d, k = shape
    gen = torch.Generator().manual_seed(n + d)
    codec = Codec(bits=4, group_size=16)
    payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), codec, 0)
    grad_h = exact(n, d, dtype=dtype, gen=gen)  # exact GEMMs: the payload is bit-exact
    w_d = exact(d, k, dtype=dtype, scale=1 / 16, gen=gen)
    gp, gw = triton_call(ops.decode_backward, grad_h, payload, w_d, codec, GRAD_CODEC, grad_seed=8)
    gp_ref, gw_ref = ops.decode_backward(grad_h, payload, w_d, codec, GRAD_CODEC, grad_seed=8)
    assert torch.equal(gp, gp_ref), "gradient payload differs"
    assert gw.dtype == dtype and rel_err(gw, gw_ref) <= tol(dtype)


@pytest.mark.parametrize("codec", (Codec(bits=16), Codec(bits=8), Codec(bits=2, group_size=16)), ids=_ids)
def test_decode_backward_fused_forward_codecs(codec, fused_wgrad):
    """With the fused launch Z (the forward payload dequantized) comes from
    grad_operand's kernel, run before it: every forward codec."""
    n, d, k = 300, 128, 64
    gen = torch.Generator().manual_seed(17)
    payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), codec, 0)
    grad_h = normal(n, d, dtype=torch.bfloat16, gen=gen)
    w_d = normal(d, k, dtype=torch.bfloat16, scale=k**-0.5, gen=gen)
    _, gw = triton_call(ops.decode_backward, grad_h, payload, w_d, codec, GRAD_CODEC, grad_seed=5)
    _, gw_ref = ops.decode_backward(grad_h, payload, w_d, codec, GRAD_CODEC, grad_seed=5)
    assert rel_err(gw, gw_ref) <= tol(torch.bfloat16)


def test_fused_switch_other_than_0_or_1_raises(monkeypatch):
    monkeypatch.setenv(tb.FUSED_WGRAD_SWITCH, "yes")
    grad_h = torch.randn(37, 128).bfloat16()
    payload = ref.write_payload(torch.randn(37, 32), Codec(bits=8), 0)
    with pytest.raises(ValueError, match="RESBM_TRITON_FUSED_WGRAD must be 0 or 1, not 'yes'"):
        triton_call(ops.decode_backward, grad_h, payload, torch.randn(128, 32).bfloat16(), Codec(bits=8), GRAD_CODEC)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("norm", (False, True, "row_stats"), ids=("plain", "norm", "norm-row-stats"))
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=_ids)
def test_encode_backward_fused_weight_grad(shape, norm, dtype, fused_wgrad):
    check_encode_backward(shape, norm, dtype, GRAD_CODEC)


@needs_gpu
@pytest.mark.parametrize("k", (32, 128))
def test_backward_fused_at_full_chunks(monkeypatch, k):
    """The fused launch at its GPU chunk size (16 MiB of rows: three chunks here,
    the last one short) against the reference, both backward passes, d=4096."""
    force_fused(monkeypatch)
    n, d = 5000, 4096
    assert tb.configs.cdiv(n, tb.configs.fused_chunk_rows(d, 2, DEVICE)) == 3
    gen = torch.Generator().manual_seed(k)
    codec = Codec(bits=8)
    payload = ref.write_payload(normal(n, k, gen=gen, dtype=torch.float32), codec, 0)
    grad_h = normal(n, d, dtype=torch.bfloat16, gen=gen)
    w_d = normal(d, k, dtype=torch.bfloat16, scale=k**-0.5, gen=gen)
    gp, gw_d = triton_call(ops.decode_backward, grad_h, payload, w_d, codec, codec, grad_seed=1)
    gp_ref, gw_d_ref = ops.decode_backward(grad_h, payload, w_d, codec, codec, grad_seed=1)
    assert_close_payload(gp, gp_ref, codec, n, k)
    assert rel_err(gw_d, gw_d_ref) <= tol(torch.bfloat16), "grad W_d"
    w_e = normal(k, d, dtype=torch.bfloat16, scale=d**-0.5, gen=gen)
    gamma = normal(d, dtype=torch.bfloat16, scale=0.2, gen=gen).add_(1.0)
    got = triton_call(ops.encode_backward, payload, grad_h, w_e, codec, norm_weight=gamma)
    want = ops.encode_backward(payload, grad_h, w_e, codec, norm_weight=gamma)
    for name, a, b in zip(("grad_x", "grad_w_e", "grad_gamma"), got, want):
        assert rel_err(a, b) <= 4 * tol(torch.bfloat16), name


# ---- the differentiable boundary --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("norm", (False, True), ids=("plain", "norm"))
def test_boundary_gradients(norm, dtype):
    n, d, k = 37, 128, 32
    gen = torch.Generator().manual_seed(21)
    leaves = dict(
        x=exact(n, d, dtype=dtype, gen=gen),
        w_e=exact(k, d, dtype=dtype, scale=1 / 16, gen=gen),
        w_d=normal(d, k, dtype=dtype, scale=k**-0.5, gen=gen),
        residual=normal(n, d, dtype=dtype, gen=gen),
    )
    if norm:
        leaves["norm_weight"] = normal(d, dtype=dtype, scale=0.1, gen=gen).add_(1.0)
    upstream = exact(n, d, dtype=dtype, gen=gen)

    def run(backend):
        device = DEVICE if backend == "triton" else "cpu"
        ts = {name: t.detach().to(device).clone().requires_grad_() for name, t in leaves.items()}
        with use_backend(backend):
            h, payload = ops.boundary(ts["x"], ts["w_e"], ts["w_d"], Codec(bits=8), GRAD_CODEC,
                                      norm_weight=ts.get("norm_weight"), residual=ts["residual"], seed=1, grad_seed=2)
            (h.float() * upstream.to(device).float()).sum().backward()
        return h.detach().cpu(), payload.cpu(), {name: t.grad.cpu() for name, t in ts.items()}

    h, payload, grads = run("triton")
    h_ref, payload_ref, grads_ref = run("reference")
    with use_backend("reference"):  # h is what its own payload decodes to
        h_own = ops.decode(payload, leaves["w_d"], Codec(bits=8), n, residual=leaves["residual"])
    assert rel_err(h, h_own) <= tol(dtype)
    if norm:
        assert_close_payload(payload, payload_ref, Codec(bits=8), n, k)
    else:
        assert torch.equal(payload, payload_ref)
        assert rel_err(h, h_ref) <= tol(dtype)
    for name, g in grads.items():
        assert g is not None and g.dtype == dtype, name
        # through the norm (the folded weight rounded to the dtype) codes may sit a step from the reference's
        limit = tol(dtype) + (1 / Codec(bits=8).qmax if norm else 0)
        assert rel_err(g, grads_ref[name]) <= limit, name


@needs_gpu
def test_passes_do_not_synchronise():
    check_passes_do_not_synchronise("triton")


@needs_gpu
def test_passes_replay_in_a_cuda_graph():
    check_passes_replay_in_a_cuda_graph("triton")


@needs_gpu
def test_boundary_draws_anew_in_a_cuda_graph():
    check_boundary_draws_anew_in_a_cuda_graph("triton")


@needs_gpu
def test_boundary_compiled_with_cuda_graphs():
    check_boundary_compiled_with_cuda_graphs("triton")


# torch ops that launch no device work (views, allocation, autograd bookkeeping)
@pytest.mark.parametrize("weights", (torch.bfloat16, torch.float32), ids=_ids)
def test_passes_launch_no_torch_kernels(monkeypatch, weights):
    """Besides its Triton kernels, a pass runs no torch op that launches device
    work (a small kernel costs a few microseconds of a pass that streams its
    tensor in 30-60 at the target shapes), except encode forward's one
    multiply folding gamma into W_e (fp32 weights with bf16 activations: and
    the cast to the GEMM's dtype)."""
    import triton
    from torch.utils._python_dispatch import TorchDispatchMode

    from resbm_kernels.backends import fast

    # outputs not poisoned here (the fills would count)
    monkeypatch.setattr(fast, "empty", lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    inside, seen = [0], []
    for cls in {triton.runtime.jit.JITFunction, type(tb.finish_rows_kernel)}:  # (the interpreter's class on CPU)
        def run(self, *args, __run=cls.run, **kwargs):
            inside[0] += 1
            try:
                return __run(self, *args, **kwargs)
            finally:
                inside[0] -= 1
        monkeypatch.setattr(cls, "run", run)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and func.__name__.split(".")[0] not in NO_WORK_OPS:
                seen.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    tb_calls = training_pass_calls(tb, DEVICE, weights)
    fold = ["mul"] if weights == torch.bfloat16 else ["mul", "_to_copy"]
    for name, call in tb_calls.items():
        call()  # compiled (and tuned) first
        seen.clear()
        with torch.no_grad(), Ops():
            call()
        assert seen == (fold if name == "encode_forward" else []), name


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)

    class Boundary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_e = torch.nn.Parameter(normal(32, 128, dtype=torch.float32, scale=0.1, gen=gen))
            self.w_d = torch.nn.Parameter(normal(128, 32, dtype=torch.float32, scale=0.1, gen=gen))
            self.gamma = torch.nn.Parameter(normal(128, dtype=torch.float32, scale=0.1, gen=gen).add_(1.0))

        def forward(self, x):
            h, _ = ops.boundary(x, self.w_e, self.w_d, Codec(bits=8), GRAD_CODEC, norm_weight=self.gamma)
            return torch.tanh(h).sum()

    model = Boundary().to(DEVICE)
    x = normal(37, 128, dtype=torch.float32, gen=gen, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    with use_backend("triton"):
        loss = model(x)
        loss.backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss_c = compiled(x)
        loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    for p, g in zip(model.parameters(), eager_grads):
        # the gradients pass a stochastic quantizer: an ulp of difference upstream may flip a code,
        # a step of its row's largest value (on the CPU they agree to 2e-7)
        assert rel_err(p.grad, g) <= tol(torch.float32) + 1 / GRAD_CODEC.qmax


# ---- support and errors ---------------------------------------------------------------


def test_supports(monkeypatch):
    assert tb.supports("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.supports(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tb.supports("cpu")
    assert not tb.supports("meta")


def test_k_not_multiple_of_16():
    x, w_e = torch.randn(8, 96), torch.randn(24, 96)
    with pytest.raises(ValueError, match="multiples of 16"):
        triton_call(ops.encode, x, w_e, Codec())
    with pytest.raises(ValueError, match="multiples of 16"):
        triton_call(ops.decode, ref.write_payload(torch.randn(8, 24), Codec(), 0), torch.randn(96, 24), Codec(), 8)


def test_k_above_the_kernels_limit():
    # (k=256 runs: the random cases draw k up to 256, the static check compiles k=256)
    x, w_e = torch.randn(4, 272), torch.randn(272, 272)
    with pytest.raises(ValueError, match="k=272 is larger than 256"):
        triton_call(ops.encode, x, w_e, Codec())
    with pytest.raises(ValueError, match="k=272 is larger than 256"):
        triton_call(ops.decode, ref.write_payload(torch.randn(4, 272), Codec(), 0), w_e.T.contiguous(), Codec(), 4)


def test_float64_rejected():
    x, w_e = torch.randn(8, 64, dtype=torch.float64), torch.randn(16, 64, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        triton_call(ops.encode, x, w_e, Codec())


def test_group_not_power_of_two():
    x, w_e = torch.randn(8, 96), torch.randn(48, 96)
    with pytest.raises(ValueError, match="power of two"):
        triton_call(ops.encode, x, w_e, Codec(bits=8, group_size=24))


def test_zero_rows():
    w_e, w_d, gamma, codec = torch.randn(16, 64), torch.randn(64, 16), torch.randn(64), Codec()
    p = triton_call(ops.encode, torch.randn(0, 64), w_e, codec)
    assert torch.equal(p, ops.encode(torch.randn(0, 64), w_e, codec))
    assert triton_call(ops.decode, p, w_d, codec, 0).shape == (0, 64)
    grad_payload, grad_w_d = triton_call(ops.decode_backward, torch.randn(0, 64), p, w_d, codec, GRAD_CODEC)
    assert torch.equal(grad_w_d, torch.zeros(64, 16)), "an empty sum of partials is zero"
    grad_x, grad_w_e, grad_gamma = triton_call(ops.encode_backward, grad_payload, torch.randn(0, 64), w_e,
                                               GRAD_CODEC, norm_weight=gamma)
    assert grad_x.shape == (0, 64)
    assert torch.equal(grad_w_e, torch.zeros(16, 64)) and torch.equal(grad_gamma, torch.zeros(64))


@pytest.mark.parametrize("dtypes", ((torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float32,) * 2,
                                    (torch.float16, torch.bfloat16)), ids=str)
def test_fold_norm_rounds_once(dtypes):
    """gamma * W_e, the encoder's folded GEMM operand, is the exact product
    rounded once to the activations' dtype (one torch kernel when the dtypes agree)."""
    w_dtype, dtype = dtypes
    gen = torch.Generator().manual_seed(3)
    w, gamma = normal(32, 64, dtype=w_dtype, gen=gen), normal(64, dtype=w_dtype, gen=gen)
    folded = tb._fold_norm(w, gamma, dtype)
    assert folded.dtype == dtype
    assert torch.equal(folded, (w.double() * gamma.double()).to(dtype))


# ---- every GPU launch config ---------------------------------------------------------------


def _block_sizes(table):
    return sorted({(bn, bd) for bn, bd, *_ in table})


ALL_GPU_CONFIGS = sum(tb.configs.GPU_TABLES.values(), ())


@pytest.mark.parametrize("blocks", _block_sizes(ALL_GPU_CONFIGS), ids=str)
def test_every_gpu_block_size(monkeypatch, blocks):
    """Each (BLOCK_N, BLOCK_D) of the GPU autotune sets, forced on every kernel,
    gives the reference result on a shape with a tail in every dimension (the
    interpreter otherwise only runs its one fixed config; on a GPU the autotuner
    would pick just one)."""
    rows = [c for c in tb.configs.gpu_configs(ALL_GPU_CONFIGS)
            if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]) == blocks][:1]
    for kernel in tb.KERNELS.values():
        monkeypatch.setattr(kernel, "configs", rows)
    check_four_passes(seed=sum(blocks))


@needs_gpu
def test_autotuned_passes(monkeypatch):
    """With autotuning on (the default; the GPU test run sets
    RESBM_TRITON_AUTOTUNE=0 and so would never take this path), each autotuned
    kernel times several launchable configs, keeps one of them, and the four
    passes give the reference result."""
    monkeypatch.setattr(tb.configs, "AUTOTUNE", True)
    offered = {}
    for name, tuner in tb.KERNELS.items():
        monkeypatch.setattr(tuner, "cache", {})  # tuned anew, whatever earlier tests ran

        def prune(*args, _prune=tuner.prune_configs, _name=name, **kwargs):
            kept = _prune(*args, **kwargs)
            offered.setdefault(_name, []).append(kept)
            return kept
        monkeypatch.setattr(tuner, "prune_configs", prune)
    check_four_passes(seed=3)
    for name, tuner in tb.KERNELS.items():
        assert offered.get(name), f"{name}: never tuned"
        assert all(len(kept) > 1 for kept in offered[name]), f"{name}: a key tuned over a single config"
        assert any(tuner.best_config in kept for kept in offered[name]), f"{name}: best config not among the timed"


@pytest.mark.parametrize("autotune", (True, False), ids=("autotune", "first-config"))
def test_tuned_keys_skip_tritons_autotuner_run(monkeypatch, autotune):
    """configs.Autotuner.run launches the config chosen for a key it has seen
    without Triton's Autotuner.run (which rebuilds dicts of every argument on
    each call), with two configs per kernel and Triton's timing stubbed.
    Autotuning: the first round of the four passes tunes each key through
    Triton's run, the second takes the short path for every launch (its key_of
    is Triton's key, or the lookup would miss). RESBM_TRITON_AUTOTUNE=0: pruning
    leaves the first launchable config, launched and kept for its key without
    Triton's run or its timing (Triton 3.6 timed a single config: ~100 ms a new key on a
    GPU). Both rounds give the same bits."""
    import triton

    tritons_run = triton.runtime.autotuner.Autotuner.run
    through_triton, timed = [], []

    def counted(self, *args, **kwargs):
        through_triton.append(self)
        return tritons_run(self, *args, **kwargs)

    def bench(self, *args, config, **meta):
        timed.append(config)
        return [0.0]
    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", counted)
    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "_bench", bench)
    monkeypatch.setattr(tb.configs, "AUTOTUNE", autotune)
    for tuner in tb.KERNELS.values():
        monkeypatch.setattr(tuner, "configs", [tuner.configs[0], tb.configs.gpu_configs([(32, 32, 4, 1)])[0]])
        monkeypatch.setattr(tuner, "cache", {})
    calls = training_pass_calls(tb, DEVICE)
    # given the forward's row statistics, encode backward's grad_x kernel forms Z itself: without
    # them the grad_operand kernel's pass over x does, whose launches are checked too
    calls["encode_backward, no statistics"] = training_pass_calls(tb, DEVICE, backward_stats=False)["encode_backward"]
    rounds, through = [], []  # each round's outputs; launches through Triton's run after it
    for _ in range(2):
        rounds.append([to_device(call(), "cpu") for call in calls.values()])
        through.append(len(through_triton))
    tuned, after = through
    if autotune:
        assert tuned >= len(tb.KERNELS) and timed, "the first round was not tuned through Triton's run"
    else:
        assert tuned == 0 and not timed, f"{tuned} launches went through Triton's run, {len(timed)} timed"
    assert after == tuned, f"{after - tuned} launches went through Triton's run again"
    assert all(tuner.cache for tuner in tb.KERNELS.values())
    assert all(any(tuner.best_config is c for c in tuner.cache.values()) for tuner in tb.KERNELS.values())
    flat = lambda outs: [t for out in outs for t in (out if isinstance(out, tuple) else (out,)) if t is not None]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(rounds[0]), flat(rounds[1])))


def _long_rows(k: int, n: int = 8192, d: int = 4096):
    """bf16 x (8192 x 4096), w_e, gamma on the GPU and the reference's row
    statistics of encode forward through RMSNorm: rows of 32 to 128 d tiles
    per program, where the other tests' rows span a few."""
    gen = torch.Generator().manual_seed(k)
    bf16 = torch.bfloat16
    x = normal(n, d, dtype=bf16, gen=gen).to(DEVICE)
    w_e = normal(k, d, dtype=bf16, scale=d**-0.5, gen=gen).to(DEVICE)
    gamma = normal(d, dtype=bf16, scale=0.1, gen=gen).add_(1.0).to(DEVICE)
    with use_backend("reference"):
        stats = ops.encode(x, w_e, Codec(bits=16), norm_weight=gamma, return_row_stats=True)[1]
    return x, w_e, gamma, stats


def _each_project_config(monkeypatch, kernel_name: str, k: int, device):
    """Each config of the project family launchable at ``k`` here, forced on ``kernel_name`` in turn."""
    kernel = tb.KERNELS[kernel_name]
    launchable = tb.configs.launchable(kernel.configs, k, 2, tb.configs.smem_limit(device), "project")
    assert len(launchable) > 1
    for config in launchable:
        monkeypatch.setattr(kernel, "configs", [config])
        yield config


def _rows_off(got, want, scale) -> int:
    """Rows of ``got`` whose largest error exceeds bf16's tolerance times that row's ``scale``."""
    err = (got.double() - want.double()).abs().reshape(got.shape[0], -1).amax(1)
    return int((err > tol(torch.bfloat16) * scale.reshape(-1)).sum().item())


@needs_gpu
@pytest.mark.parametrize("k", (64, 128))
def test_encode_forward_long_rows_every_config(monkeypatch, k):
    """Encode forward through RMSNorm over long rows, each launchable config of
    its kernel forced: the projection (row statistics) matches the reference
    row by row, and a second call gives the same bits. On an H100 (Triton 3.6,
    2026-11-26) the pipeliner's race on the x tile's buffers (see
    tiles.project_rows) made 3-30 % of the rows wrong by about one d tile's
    contribution, different rows on every call, at d=4096 only."""
    x, w_e, gamma, want = _long_rows(k)
    codec = Codec(bits=16)
    for config in _each_project_config(monkeypatch, "project_quantize", k, x.device):
        with use_backend("triton"):
            first, stats = ops.encode(x, w_e, codec, norm_weight=gamma, return_row_stats=True)
            again, stats_again = ops.encode(x, w_e, codec, norm_weight=gamma, return_row_stats=True)
        bad = _rows_off(stats[:, :k], want[:, :k], want[:, :k].abs().amax(1))
        assert bad == 0, f"{config}: {bad} of {x.shape[0]} rows off"
        assert torch.equal(stats, stats_again) and torch.equal(first, again), f"{config}: differs between calls"


@needs_gpu
@pytest.mark.parametrize("k", (32, 128))
def test_dequant_project_every_config(monkeypatch, k):
    """Decode forward with a residual and encode backward's grad_x through RMSNorm
    (x or the residual copied ahead in the loop) over long rows, each config with
    D_SPLIT launchable for the pass (grad_x's tiles also hold x: fewer fit) forced
    in turn (else only autotuning runs them on a GPU), and its unsplit twin (the
    same config with D_SPLIT=1): each matches the reference, and the split gives
    the very bits of its twin."""
    check_dequant_project_every_config(monkeypatch, *_long_rows(k, n=2048))


def check_dequant_project_every_config(monkeypatch, x, w_e, gamma, stats):
    """test_dequant_project_every_config on these inputs."""
    import triton

    n, k = x.shape[0], w_e.shape[0]
    bf16 = torch.bfloat16
    payload = ref.write_payload(torch.randn(n, k, generator=torch.Generator().manual_seed(k)), Codec(bits=8), 0)
    grad_payload = ref.write_payload(torch.randn(n, k, generator=torch.Generator().manual_seed(k + 1)),
                                     GRAD_CODEC, 1)
    payload, grad_payload, w_d = payload.to(x.device), grad_payload.to(x.device), w_e.t().contiguous()
    passes = {  # name: (the pass on the current backend, has_norm, tolerance)
        "decode forward": (lambda: ops.decode(payload, w_d, Codec(bits=8), n, residual=x), False, tol(bf16)),
        "grad_x": (lambda: ops.encode_backward(grad_payload, x, w_e, GRAD_CODEC, norm_weight=gamma,
                                               row_stats=stats)[0], True, 4 * tol(bf16)),
    }
    kernel = tb.KERNELS["dequant_project"]
    limit = tb.configs.smem_limit(x.device) if x.is_cuda else tb.configs.SMEM_FALLBACK
    configs = tb.configs.gpu_configs(tb.configs.GPU_DEQUANT)
    for name, (run_pass, has_norm, tolerance) in passes.items():
        with use_backend("reference"):
            want = run_pass()

        def run(config):
            monkeypatch.setattr(kernel, "configs", [config])
            with use_backend("triton"):
                got = run_pass()
            assert rel_err(got, want) <= tolerance, f"{config}: {name}"
            return got

        launchable = tb.configs.launchable(configs, tb._block_k(k), 2, limit, "dequant", has_norm=has_norm)
        split = [c for c in launchable if c.kwargs.get("D_SPLIT", 1) > 1]
        assert split, f"{name}: no launchable config with D_SPLIT"
        for config in split:
            twin = triton.Config({**config.kwargs, "D_SPLIT": 1}, num_warps=config.num_warps,
                                 num_stages=config.num_stages, maxnreg=config.maxnreg)
            assert torch.equal(run(config), run(twin)), f"{config}: {name}, split and unsplit differ"


@needs_gpu
@pytest.mark.parametrize("k", (64, 128))
def test_grad_operand_long_rows_every_config(monkeypatch, k):
    """Encode backward's per-row terms through RMSNorm recomputed from x (the
    projection loop encode forward uses, over long rows), each launchable config
    forced: row by row as computed from the reference's row statistics (that
    path does no GEMM): r within the error of a sum of d squares on tensor cores,
    Z = r * g_z and alpha = r^2 (g_z . p) / d within bf16's (alpha against the
    size of such a dot product of k random terms, r^2 |g_z| |p| / (d sqrt(k))).
    The squares of bf16 values are exact in fp32, but the tensor cores add each
    step of 16 into the fp32 sum with truncation (Fasi et al. 2021, "Numerical
    behavior of NVIDIA tensor cores"): at most d/16 + 4 one-ulp losses of the sum
    of positive terms, half that relative error in r = (sum / d + eps)^-1/2."""
    x, w_e, gamma, stats = _long_rows(k)
    n, d = x.shape
    grad_payload = ref.write_payload(torch.randn(n, k, device=DEVICE) * 1e-2, GRAD_CODEC, 0)
    z_want, r_want, alpha_want = tb._grad_operand(grad_payload, GRAD_CODEC, x, w_e, gamma, 1e-6, stats)
    g_z = ref.read_payload(grad_payload, GRAD_CODEC, n, k, torch.float32)
    alpha_scale = r_want.square() * g_z.norm(dim=1) * stats[:, :k].norm(dim=1) / (d * k**0.5)
    r_tol = (d // 16 + 4) * 2**-24 + 1e-6  # (1.6e-5 at d=4096; the rest: fp32 rounding)
    for config in _each_project_config(monkeypatch, "grad_operand", k, x.device):
        z, r, alpha = tb._grad_operand(grad_payload, GRAD_CODEC, x, w_e, gamma, 1e-6, None)
        assert (r - r_want).abs().le(r_tol * r_want).all(), f"{config}: r"
        bad_z = _rows_off(z, z_want, z_want.abs().amax(1))
        bad_alpha = _rows_off(alpha, alpha_want, alpha_scale)
        assert bad_z == bad_alpha == 0, f"{config}: Z off in {bad_z} rows, alpha in {bad_alpha} of {n}"


def check_four_passes(seed: int) -> None:
    """The four passes through the Triton backend against the reference (bf16, N=150,
    d=240, k=48: no multiple of 64 or 128 anywhere): payloads byte for byte on exact
    inputs, floats within bf16 tolerances; encode backward with the row statistics
    recomputed from x and with those of encode forward."""
    n, d, k = 150, 240, 48
    gen = torch.Generator().manual_seed(seed)
    codec, grad_codec = Codec(bits=4, group_size=16), Codec(bits=8, rounding="stochastic")
    bf16 = torch.bfloat16
    x = exact(n, d, dtype=bf16, gen=gen)
    w_e = exact(k, d, dtype=bf16, scale=1 / 16, gen=gen)
    w_d = exact(d, k, dtype=bf16, scale=1 / 16, gen=gen)
    grad_h = exact(n, d, dtype=bf16, gen=gen)
    gamma = normal(d, dtype=bf16, scale=0.1, gen=gen).add_(1.0)

    payload = triton_call(ops.encode, x, w_e, codec, seed=5)
    assert torch.equal(payload, ops.encode(x, w_e, codec, seed=5)), "encode_forward payload"
    h = triton_call(ops.decode, payload, w_d, codec, n, residual=x)
    assert rel_err(h, ops.decode(payload, w_d, codec, n, residual=x)) <= tol(bf16), "decode_forward"
    gp, gw_d = triton_call(ops.decode_backward, grad_h, payload, w_d, codec, grad_codec, grad_seed=6)
    gp_ref, gw_d_ref = ops.decode_backward(grad_h, payload, w_d, codec, grad_codec, grad_seed=6)
    assert torch.equal(gp, gp_ref), "decode_backward gradient payload"
    assert rel_err(gw_d, gw_d_ref) <= tol(bf16), "decode_backward weight gradient"
    want = ops.encode_backward(gp_ref, x, w_e, grad_codec, norm_weight=gamma)
    stats = triton_call(ops.encode, x, w_e, codec, norm_weight=gamma, return_row_stats=True)[1]
    for row_stats in (None, stats):  # the statistics recomputed from x, or from the forward
        got = triton_call(ops.encode_backward, gp_ref, x, w_e, grad_codec, norm_weight=gamma, row_stats=row_stats)
        for name, a, b in zip(("grad_x", "grad_w_e", "grad_gamma"), got, want):
            assert rel_err(a, b) <= 4 * tol(bf16), f"encode_backward {name}, row_stats={row_stats is not None}"


@pytest.mark.parametrize("autotune", (True, False), ids=("autotune", "RESBM_TRITON_AUTOTUNE=0"))
def test_config_pruning(monkeypatch, autotune):
    """GPU configs whose register-resident fp32 tiles need more than
    MAX_TILE_REGS registers per thread, or whose tiles overflow shared memory,
    are pruned, the last config being the fallback; without autotuning only the
    first one is kept."""
    cfg = tb.configs
    monkeypatch.setattr(cfg, "AUTOTUNE", autotune)
    bf16 = {"a_ptr": torch.empty(1, dtype=torch.bfloat16), "w_ptr": torch.empty(1, dtype=torch.bfloat16)}
    tables = cfg.GPU_TABLES
    assert tables.keys() == tb.KERNELS.keys() == tb.TILE_KINDS.keys()
    for name, kind in tb.TILE_KINDS.items():
        configs = cfg.gpu_configs(tables[name])
        prune = cfg._pruner(kind, dequant=kind != "project", operand="a_ptr")
        assert cfg.launchable(configs, 16, 2, 232448, kind) == configs  # every config fits k=16 on an H100
        fits = cfg.launchable(configs, 16, 2, cfg.SMEM_FALLBACK, kind)  # CPU tensors: the fallback limit
        assert prune(configs, bf16, BLOCK_K=16) == (fits if autotune else fits[:1])
        assert prune(configs, bf16, BLOCK_K=1024) == configs[-1:]  # none fits: the fallback
        for block_k in (32, 64, 128, 256):
            for limit in (48 * 1024, 232448):
                kept = cfg.launchable(configs, block_k, 2, limit, kind)
                assert kept
                for c in kept:
                    bn, bd = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]
                    tiles = bn * (bd + block_k) if kind == "wgrad" else (bn + block_k) * bd
                    in_registers = {"project": bn * block_k, "dequant": bn * block_k + bn * bd,
                                    "wgrad": bd * block_k}[kind]
                    regs = in_registers / (32 * c.num_warps)
                    assert c is configs[-1] or (regs <= cfg.MAX_TILE_REGS[kind] and c.num_stages * tiles * 2 <= limit)
    # project_quantize's register-limited config: first at k=128 for 16-bit encode forward on
    # sm_90, never with fp32 operands, on sm_80 or in decode backward (which writes Z)
    pq = cfg.gpu_configs(cfg.GPU_PROJECT_QUANTIZE)
    limited = [c for c in pq if c.maxnreg]
    assert len(limited) == 1 and cfg.launchable(pq, 128, 2, 232448, "project")[0] is limited[0]
    for elem, writes_z, arch in ((4, False, 90), (2, True, 90), (2, False, 80)):
        assert limited[0] not in cfg.launchable(pq, 128, elem, 232448, "project", False, writes_z, arch)
    prune = cfg._pruner("project", dequant=False, operand="a_ptr")  # (CPU tensors: 99 KB, the first fits at k=32)
    assert limited[0] in prune(pq, bf16, BLOCK_K=32, ZBITS=0)
    assert limited[0] not in prune(pq, bf16, BLOCK_K=32, ZBITS=8)
    # the 16-warp configs (128 registers a thread): sm_90 and 16-bit operands only, Z written or not
    wide = [c for c in pq + cfg.gpu_configs(cfg.GPU_DEQUANT) if c.num_warps == 16]
    assert len(wide) == 2
    for elem, writes_z, arch, fits in ((2, False, 90, True), (2, True, 90, True), (4, False, 90, False),
                                       (2, False, 80, False)):
        assert (wide[0] in cfg.launchable(pq, 128, elem, 232448, "project", False, writes_z, arch)) == fits
    # encode backward's grad_x through RMSNorm also holds an x tile: fewer decode configs fit
    dequant = cfg.gpu_configs(cfg.GPU_DEQUANT)
    assert set(cfg.launchable(dequant, 64, 2, 232448, "dequant", has_norm=True)) < \
        set(cfg.launchable(dequant, 64, 2, 232448, "dequant"))
    with_x = cfg.launchable(dequant, 64, 2, cfg.SMEM_FALLBACK, "dequant", has_norm=True)
    prune = cfg._pruner("dequant", dequant=True, operand="w_ptr")
    assert prune(dequant, bf16, BLOCK_K=64, HAS_NORM=True) == (with_x if autotune else with_x[:1])
    # with the weight gradient's programs in the launch their (k, BLOCK_D) accumulator counts too:
    # at k=64 the 64x128 4-warp config's is 64 registers; the fp16 programs' TF32 operands (4
    # bytes) size the shared memory
    fused_kept = cfg.launchable(pq, 64, 2, 232448, "project", fused_wgrad=2)
    assert pq[0] in cfg.launchable(pq, 64, 2, 232448, "project") and pq[0] not in fused_kept
    assert set(fused_kept) <= set(cfg.launchable(pq, 64, 2, 232448, "project"))
    assert cfg.smem_bytes(pq[0], 64, 2, "project", fused_wgrad=4) > cfg.smem_bytes(pq[0], 64, 2, "project")
    fp16 = {"a_ptr": torch.empty(1, dtype=torch.float16)}
    prune = cfg._pruner("project", dequant=False, operand="a_ptr")
    assert prune(pq, fp16, BLOCK_K=64, FUSED_WGRAD=True) == \
        cfg.launchable(pq, 64, 2, cfg.SMEM_FALLBACK, "project", fused_wgrad=4)[:None if autotune else 1]
