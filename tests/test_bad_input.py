"""Bad input gives a clear exception naming the problem."""

import pytest
import torch

from helpers import randn
from resbm_kernels import ResBMBoundary, ops
from resbm_kernels.backends import reference, use_backend
from resbm_kernels.codec import GRAD_INT8, INT4, INT8, Codec

N, D, K = 8, 64, 32


@pytest.fixture
def tensors():
    return randn(N, D, seed=1), randn(K, D, seed=2) * 0.1, randn(D, K, seed=3) * 0.1


@pytest.fixture
def payload(tensors):
    return ops.encode(tensors[0], tensors[1], INT8)


@pytest.mark.parametrize("make_x, message", [
    (lambda x: x.to(torch.int32), "x: dtype torch.int32 is not supported"),
    (lambda x: x[None], "x: expected a 2-D tensor"),
    (lambda x: x.t().contiguous().t(), "x: needs contiguous rows"),
    (lambda x: x[:1].expand(N, D), "x: needs contiguous rows without broadcast"),
    (lambda x: x[:, :48].contiguous(), "x: has 48 channels but w_e expects d=64"),
    (lambda x: x.to(torch.float16), "w_e: dtype torch.float32 differs"),
    (lambda x: "not a tensor", "Expected a value of type 'Tensor' for argument 'x'"),
])
def test_encode_rejects_bad_activations(tensors, make_x, message):
    x, w_e, _ = tensors
    with pytest.raises((TypeError, ValueError, RuntimeError), match=message):
        ops.encode(make_x(x), w_e, INT8)


def test_row_stats_need_the_norm(tensors):
    x, w_e, _ = tensors
    with pytest.raises(ValueError, match="only the encoder with RMSNorm"):
        ops.encode(x, w_e, INT8, return_row_stats=True)
    grad_payload = reference.write_payload(randn(N, K, seed=4), GRAD_INT8, 0)
    with pytest.raises(ValueError, match="without norm_weight there are none"):
        ops.encode_backward(grad_payload, x, w_e, GRAD_INT8, row_stats=torch.zeros(N, K + 1))


@pytest.mark.parametrize("make_stats, message", [
    (lambda s: s[:, :K], rf"row_stats: expected shape \({N}, {K + 1}\)"),
    (lambda s: s[:-1], rf"row_stats: expected shape \({N}, {K + 1}\)"),
    (lambda s: s.double(), "row_stats: dtype torch.float64 is not supported"),
    (lambda s: s.t().contiguous().t(), "row_stats: needs contiguous rows"),
    (lambda s: s[0], "row_stats: expected a 2-D tensor"),
])
def test_encode_backward_rejects_bad_row_stats(tensors, make_stats, message):
    x, w_e, _ = tensors
    gamma = torch.ones(D)
    _, stats = ops.encode(x, w_e, INT8, norm_weight=gamma, return_row_stats=True)
    grad_payload = reference.write_payload(randn(N, K, seed=4), GRAD_INT8, 0)
    with pytest.raises((TypeError, ValueError), match=message):
        ops.encode_backward(grad_payload, x, w_e, GRAD_INT8, norm_weight=gamma, row_stats=make_stats(stats))


def test_encode_rejects_other_device(tensors):
    x, w_e, _ = tensors
    with pytest.raises(ValueError, match="w_e: is on meta but the other inputs are on cpu"):
        ops.encode(x, w_e.to("meta"), INT8)


def test_k_must_divide_d():
    x = randn(N, 60, seed=1)
    with pytest.raises(ValueError, match="k=16 must divide the model width d=60"):
        ops.encode(x, randn(16, 60), INT8)
    with pytest.raises(ValueError, match="k=24 must divide the model width d=64"):
        ResBMBoundary(64, 24)


def test_group_must_divide_k(tensors):
    x, w_e, _ = tensors
    with pytest.raises(ValueError, match="group_size=64 does not divide k=32"):
        ops.encode(x, w_e, Codec(bits=4, group_size=64))


def test_unsupported_bits():
    with pytest.raises(ValueError, match="unsupported bits=3"):  # a spec string: checked when the op parses it
        ops.encode(randn(N, D), randn(K, D), "int3/row/bf16/nearest")
    with pytest.raises(ValueError, match="unsupported bits=5"):
        ops.pack(torch.zeros(2, 8, dtype=torch.int8), 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations(tensors, bad):
    x, w_e, _ = tensors
    x[3, 5] = bad
    for codec in (INT8, Codec(bits=16)):
        with pytest.raises(ValueError, match="non-finite"):
            ops.encode(x, w_e, codec)


def test_non_finite_gradient_names_the_backward(tensors, payload):
    """On the reference, a non-finite activation gradient raises naming the pass and the gradient codec."""
    _, _, w_d = tensors
    grad_h = randn(N, D)
    grad_h[2, 7] = float("inf")
    with pytest.raises(ValueError, match="decode backward, the gradient dL/dzhat into the gradient codec "
                                         "int8/row/bf16/stochastic: quantize: input contains non-finite"):
        ops.decode_backward(grad_h, payload, w_d, INT8, GRAD_INT8)


def test_gradient_codec_checked_in_the_forward():
    """A gradient codec that cannot carry k raises when the forward runs, not first in the backward."""
    x, w_e = randn(4, 96, seed=1).requires_grad_(), randn(48, 96, seed=2) * 0.1
    bad = Codec(bits=4, group_size=32)  # 32 does not divide k=48
    with pytest.raises(ValueError, match="grad_codec: Codec: group_size=32 does not divide k=48"):
        ops.boundary(x, w_e, w_e.t().contiguous(), INT8, bad)
    with pytest.raises(ValueError, match="grad_codec: Codec: group_size=32 does not divide k=48"):
        ops.wire_roundtrip(randn(4, 48, seed=3), INT8, bad)



def test_boundary_out_dtype_and_residual(tensors):
    x, w_e, w_d = tensors
    with pytest.raises(TypeError, match="out_dtype torch.int32 is not a supported float dtype"):
        ops.boundary(x, w_e, w_d, INT8, GRAD_INT8, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="residual: dtype torch.float32 differs from the output's torch.bfloat16"):
        ops.boundary(x, w_e, w_d, INT8, GRAD_INT8, residual=randn(N, D), out_dtype=torch.bfloat16)

def test_norm_weight_shape(tensors):
    x, w_e, _ = tensors
    with pytest.raises(ValueError, match=r"norm_weight: expected shape \(64,\)"):
        ops.encode(x, w_e, INT8, norm_weight=torch.ones(32))


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_rmsnorm_epsilon(tensors, payload, eps):
    x, w_e, _ = tensors
    gamma = torch.ones(D)
    for call in (lambda: ops.encode(x, w_e, INT8, norm_weight=gamma, eps=eps),
                 lambda: ops.encode_backward(payload, x, w_e, INT8, norm_weight=gamma, eps=eps),
                 lambda: ops.encode_project(x, w_e, norm_weight=gamma, eps=eps)):
        with pytest.raises(ValueError, match="RMSNorm's epsilon must be a finite number >= 0"):
            call()


def test_codec_of_another_type(tensors):
    x, w_e, _ = tensors
    with pytest.raises(TypeError, match="codec: expected a Codec or a spec string .* got NoneType"):
        ops.encode(x, w_e, None)


def test_truncated_payload(tensors, payload):
    _, _, w_d = tensors
    with pytest.raises(ValueError, match="is truncated"):
        ops.decode(payload[:-1], w_d, INT8, N)
    with pytest.raises(ValueError, match="shorter than the 16-byte header|is truncated"):
        ops.decode(payload[:5], w_d, INT8, N)


def test_payload_with_wrong_row_count(tensors, payload):
    with pytest.raises(ValueError, match="n=8 but the reader expects n=7"):  # (the header, read first on the CPU)
        ops.decode(payload, tensors[2], INT8, N - 1)


def test_payload_of_the_wrong_size(tensors, payload):
    """A payload whose header is right but whose bytes are cut short or run on."""
    with pytest.raises(ValueError, match=r"payload: 287 bytes is truncated; codec int8/row/bf16/nearest with 8 x 32 "
                                         r"values needs 288 bytes"):
        ops.decode(payload[:-1], tensors[2], INT8, N)
    with pytest.raises(ValueError, match="289 bytes is too long"):
        ops.decode(torch.cat([payload, payload[:1]]), tensors[2], INT8, N)


def test_corrupted_header(tensors, payload):
    bad = payload.clone()
    bad[0] = ord("X")
    with pytest.raises(ValueError, match="bad magic"):
        ops.decode(bad, tensors[2], INT8, N)
    bad = payload.clone()
    bad[3] = 7
    with pytest.raises(ValueError, match="format version 7"):
        ops.decode(bad, tensors[2], INT8, N)


def test_payload_from_another_codec(tensors):
    """A payload made with another codec or shape (same byte count or not): the
    header, checked before the size, names the differing field and both codecs."""
    x, w_e, w_d = tensors
    p16 = ops.encode(x, w_e, Codec(bits=8, scale_dtype=torch.float16))
    with pytest.raises(ValueError, match=r"scale_dtype=fp16 but the reader expects scale_dtype=bf16 "
                                         r"\(the payload holds int8/row/fp16 for 8 x 32 values"):
        ops.decode(p16, w_d, INT8, N)
    p4 = ops.encode(x, w_e, Codec(bits=4, group_size=8))
    with pytest.raises(ValueError, match=r"bits=4 but the reader expects bits=8 \(the payload holds int4/g8/bf16 "
                                         r"for 8 x 32 values; the reader, codec int8/row/bf16/nearest for 8 x 32\)"):
        ops.decode(p4, w_d, INT8, N)
    with pytest.raises(ValueError, match="k=32 but the reader expects k=16"):
        ops.decode(p4, w_d[:, :16].contiguous(), Codec(bits=4, group_size=8), N)


def test_payload_dtype_and_rank(tensors, payload):
    with pytest.raises(TypeError, match="payload: dtype torch.int8"):
        ops.decode(payload.view(torch.int8), tensors[2], INT8, N)
    with pytest.raises(ValueError, match="payload: expected a 1-D tensor"):
        ops.decode(payload[None], tensors[2], INT8, N)


def test_decode_residual_shape_and_dtype(tensors, payload):
    _, _, w_d = tensors
    with pytest.raises(ValueError, match=r"residual: expected shape \(8, 64\)"):
        ops.decode(payload, w_d, INT8, N, residual=randn(N, 32))
    with pytest.raises(TypeError, match="residual: dtype torch.float16 differs"):
        ops.decode(payload, w_d, INT8, N, residual=randn(N, D).half(), out_dtype=torch.float32)


def test_backward_ops_check_payloads(tensors, payload):
    x, w_e, w_d = tensors
    with pytest.raises(ValueError, match=r"grad_h: expected shape \(8, 64\)"):
        ops.decode_backward(randn(N, 32), payload, w_d, INT8, GRAD_INT8)
    with pytest.raises(ValueError, match="bits=8 but the reader expects bits=4"):
        ops.encode_backward(payload, x, w_e, Codec(bits=4, group_size=32))


@pytest.mark.parametrize("bits, bad", [(2, 2), (2, -3), (4, 8), (4, -9)])
def test_pack_codes_out_of_range(bits, bad):
    codes = torch.zeros(2, 16, dtype=torch.int8)
    codes[1, 5] = bad
    with pytest.raises(ValueError, match=f"codes: values from {min(bad, 0)} to {max(bad, 0)} do not fit {bits} bits"):
        ops.pack(codes, bits)
    codes[1, 5] = bad - 1 if bad > 0 else bad + 1  # the edge of the range packs and comes back
    assert torch.equal(ops.unpack(ops.pack(codes, bits), bits, 16), codes)


def test_unpack_shape_mismatch():
    with pytest.raises(ValueError, match=r"packed: expected shape \(2, 4\)"):
        ops.unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="unpack: 5 values of 4 bits are not a whole number of bytes"):
        ops.unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 5)


def test_pack_bits_16_names_the_passthrough():
    with pytest.raises(ValueError, match="pack: bits=16 is the bf16 passthrough"):
        ops.pack(torch.zeros(2, 8, dtype=torch.int8), 16)


def test_dequantize_scale_shape():
    codes = torch.zeros(2, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"scales: expected shape \(2, 1\)"):
        ops.dequantize(codes, torch.ones(2, 2, dtype=torch.bfloat16), INT8)
    with pytest.raises(TypeError, match="scales: dtype torch.float32"):
        ops.dequantize(codes, torch.ones(2, 1), INT8)


def test_quantize_rejects_bf16_passthrough_codec():
    with pytest.raises(ValueError, match="has no integer codes"):
        ops.quantize(randn(2, 32), Codec(bits=16))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with use_backend("fast"):
            pass


def test_unavailable_backend_raises_clearly(monkeypatch, tensors):
    monkeypatch.setenv("RESBM_BACKEND", "cuda")
    x, w_e, _ = tensors
    with pytest.raises(RuntimeError, match="resbm backend 'cuda'"):
        ops.encode(x, w_e, INT8)


def test_boundary_module_checks_width():
    with pytest.raises(ValueError, match="ResBMBoundary: input has 32 channels, expected 64"):
        ResBMBoundary(64, 16)(randn(2, 32))


def test_large_activation_overflows_fp16_scale():
    z = torch.full((2, 32), 1e9)
    with pytest.raises(ValueError, match="overflows the torch.float16 scale"):
        reference.write_payload(z, Codec(bits=4, group_size=32, scale_dtype=torch.float16), 0)
    assert INT4.scale_dtype == torch.bfloat16  # the default has fp32's range


def test_decode_project_checks_its_inputs():
    zhat, w_d = randn(N, K, seed=1), randn(D, K, seed=2)
    with pytest.raises(ValueError, match=r"zhat: expected shape \(8, 32\), got \(8, 16\)"):
        ops.decode_project(zhat[:, :16].contiguous(), w_d)
    with pytest.raises(TypeError, match="w_d: dtype torch.bfloat16 differs from the activations' torch.float32"):
        ops.decode_project(zhat, w_d.bfloat16())
    with pytest.raises(ValueError, match=r"residual: expected shape \(8, 64\), got \(8, 32\)"):
        ops.decode_project(zhat, w_d, residual=randn(N, 32))
    with pytest.raises(TypeError, match="residual: dtype torch.float16 differs"):
        ops.decode_project(zhat, w_d, residual=randn(N, D).half())
