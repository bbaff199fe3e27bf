"""Codec config, wire format and the reference codec against explicit formulas."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import np_quantize, randn
from resbm_kernels import ops
from resbm_kernels.backends import reference
from resbm_kernels.codec import (
    BF16, GRAD_INT8, HEADER_BYTES, INT4, INT8, Codec, check_header, header_bytes, parse_header,
)

CODECS = [
    Codec(bits=8),
    Codec(bits=8, group_size=16, scale_dtype=torch.float32),
    Codec(bits=4, group_size=32),
    Codec(bits=4, group_size=8, scale_dtype=torch.float16),
    Codec(bits=2, group_size=16),
    Codec(bits=8, rounding="stochastic"),
    Codec(bits=4, group_size=16, rounding="stochastic"),
    Codec(bits=2, rounding="stochastic", scale_dtype=torch.float32),
]


# ---- config -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=3), "unsupported bits=3"),
    (dict(bits=8, rounding="up"), "rounding"),
    (dict(bits=8, scale_dtype=torch.int8), "scale_dtype"),
    (dict(bits=8, group_size=0), "group_size"),
    (dict(bits=2, group_size=3), "whole number of bytes"),
    (dict(bits=8, group_size=True), "group_size must be a positive int or None, got True"),
])
def test_codec_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Codec(**kwargs)


def test_group_must_divide_k():
    with pytest.raises(ValueError, match="group_size=32 does not divide k=48"):
        INT4.group(48)


@pytest.mark.parametrize("k", [0, -32])
def test_payload_needs_channels(k):
    with pytest.raises(ValueError, match=f"k={k} channels"):
        INT8.payload_bytes(4, k)


@pytest.mark.parametrize("codec", CODECS + [BF16])
def test_spec_round_trip(codec):
    assert Codec.parse(codec.spec) == codec


def test_parse_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse"):
        Codec.parse("int8-please")


# ---- wire size ---------------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS + [BF16])
@pytest.mark.parametrize("n, k", [(1, 32), (7, 64), (33, 128)])
def test_payload_size_matches_formula(codec, n, k):
    """DESIGN.md: k*b/8 code bytes + (k/g) scales per token, plus the header
    (and the 16-byte alignment padding of the codes region)."""
    payload = reference.write_payload(randn(n, k, seed=n), codec, seed=1)
    g = k if codec.group_size is None else codec.group_size
    scale_bytes = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}[codec.scale_dtype]
    codes = n * k * codec.bits // 8
    padded = -(-codes // 16) * 16
    scales = n * (k // g) * scale_bytes if codec.bits < 16 else 0
    assert payload.numel() == 16 + padded + scales == codec.payload_bytes(n, k)
    assert codec.bytes_per_token(k) == k * codec.bits / 8 + (scales // n)


def test_compression_ratio_counts_scales_and_header():
    d, k, n = 4096, 32, 1024
    ratio = INT8.compression_ratio(d, k, n)
    assert ratio == pytest.approx(2 * d * n / (16 + n * (32 + 2)))
    assert BF16.compression_ratio(d, k, n) == pytest.approx(2 * d * n / (16 + n * 64))


# ---- header -------------------------------------------------------------------------

def test_header_fields():
    h = parse_header(header_bytes(INT4, 1000, 64))
    assert (h.version, h.bits, h.scale_code, h.group, h.n, h.k) == (1, 4, 3, 32, 1000, 64)
    assert len(header_bytes(BF16, 3, 16)) == HEADER_BYTES


def test_header_mismatch_names_the_field():
    raw = header_bytes(Codec(bits=8, scale_dtype=torch.float16), 4, 32)
    with pytest.raises(ValueError, match="scale_dtype=fp16 but the reader expects scale_dtype=bf16"):
        check_header(raw, INT8, 4, 32)
    with pytest.raises(ValueError, match="n=4 but the reader expects n=5"):
        check_header(raw, Codec(bits=8, scale_dtype=torch.float16), 5, 32)
    with pytest.raises(ValueError, match="bad magic"):
        check_header(b"XYZ" + raw[3:], INT8, 4, 32)
    with pytest.raises(ValueError, match="format version 9"):
        check_header(raw[:3] + bytes([9]) + raw[4:], INT8, 4, 32)
    with pytest.raises(ValueError, match="shorter than"):
        check_header(raw[:10], INT8, 4, 32)


# ---- quantize / dequantize -----------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_matches_numpy_formula(codec, dtype):
    """Codes and scales bit for bit against an independent NumPy implementation."""
    z = randn(9, 64, dtype=dtype, seed=3, scale=torch.logspace(-3, 2, 9)[:, None])
    q, s = ops.quantize(z, codec, seed=1234)
    q_np, s_np = np_quantize(z.float().numpy(), codec, seed=1234)
    np.testing.assert_array_equal(q.numpy(), q_np)
    np.testing.assert_array_equal(s.float().numpy(), s_np)


def test_quantize_hand_computed():
    z = torch.tensor([[3.5, -7.0, 1.75, 0.5, 14.0, -5.0, 3.0, 1.0]])
    q, s = ops.quantize(z, Codec(bits=4, group_size=4, scale_dtype=torch.float32))
    # group 1: absmax 7 -> scale 1 -> y = 3.5, -7, 1.75, 0.5 -> half-even 4, -7, 2, 0
    # group 2: absmax 14 -> scale 2 -> y = 7, -2.5, 1.5, 0.5 -> 7, -2, 2, 0
    assert q.tolist() == [[4, -7, 2, 0, 7, -2, 2, 0]]
    assert s.tolist() == [[1.0, 2.0]]


def test_zero_group_gives_zero_scale_and_codes():
    z = torch.zeros(2, 32)
    z[1, 16:] = torch.linspace(-1, 1, 16)
    q, s = ops.quantize(z, Codec(bits=8, group_size=16))
    assert s[0].tolist() == [0, 0] and s[1, 0] == 0 and s[1, 1] > 0
    assert (q[0] == 0).all() and (q[1, :16] == 0).all()


@pytest.mark.parametrize("codec", CODECS)
def test_dequantize_error_is_within_half_a_step(codec):
    z = randn(16, 64, seed=5, scale=torch.logspace(-2, 1, 16)[:, None])
    q, s = ops.quantize(z, codec, seed=7)
    zhat = ops.dequantize(q, s, codec)
    g = codec.group(64)
    step = s.float().repeat_interleave(g, dim=1)
    bound = step * (1.0 if codec.stochastic else 0.5) + step * 2**-7 + 1e-12  # + scale rounding
    assert ((zhat - z).abs() <= bound).all()
    assert torch.equal(zhat, q.float() * step)


def test_stochastic_rounding_is_unbiased_and_reproducible():
    codec = Codec(bits=2, rounding="stochastic", scale_dtype=torch.float32)
    z = torch.full((1, 4096), 0.3)
    z[0, 0] = 1.0  # absmax 1 -> scale 1, y = 0.3
    q1, _ = ops.quantize(z, codec, seed=99)
    q2, _ = ops.quantize(z, codec, seed=99)
    q3, _ = ops.quantize(z, codec, seed=100)
    assert torch.equal(q1, q2) and not torch.equal(q1, q3)
    mean = q1[0, 1:].float().mean().item()
    assert abs(mean - 0.3) < 4 * (0.3 * 0.7 / 4095) ** 0.5


def test_scale_overflow_and_nonfinite_raise():
    with pytest.raises(ValueError, match="non-finite"):
        ops.quantize(torch.tensor([[1.0, float("nan")] * 8]), INT8)
    with pytest.raises(ValueError, match="overflows"):
        ops.quantize(torch.full((1, 16), 1e10), Codec(bits=8, scale_dtype=torch.float16))


# ---- pack / unpack ---------------------------------------------------------------------

def test_pack_hand_computed():
    codes = torch.tensor([[1, -1, 2, -2, 7, -7, 0, 3]], dtype=torch.int8)
    assert ops.pack(codes, 4).tolist() == [[0xF1, 0xE2, 0x97, 0x30]]
    crumbs = torch.tensor([[1, -1, 0, 1, -1, -1, 0, 0]], dtype=torch.int8)
    assert ops.pack(crumbs, 2).tolist() == [[0b01_00_11_01, 0b00_00_11_11]]
    assert ops.pack(codes, 8).tolist() == [[1, 255, 2, 254, 7, 249, 0, 3]]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([8, 4, 2]),
    n=st.integers(0, 9),
    k_units=st.integers(1, 24),
    seed=st.integers(0, 2**31),
)
def test_pack_unpack_round_trip(bits, n, k_units, seed):
    k = k_units * (8 // bits)
    qmax = (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-qmax, qmax + 1, (n, k), generator=g, dtype=torch.int8)
    packed = ops.pack(codes, bits)
    assert packed.shape == (n, k * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(ops.unpack(packed, bits, k), codes)


@settings(max_examples=40, deadline=None)
@given(codec=st.sampled_from(CODECS + [BF16]), n=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_payload_round_trip(codec, n, seed):
    z = randn(n, 32, seed=seed % 1000, scale=10.0)
    payload = reference.write_payload(z, codec, seed)
    assert payload.numel() == codec.payload_bytes(n, 32)
    check_header(bytes(payload[:16].tolist()), codec, n, 32)
    zhat = reference.read_payload(payload, codec, n, 32, torch.float32)
    if codec.quantized:
        q, s = reference.quantize(z, codec, seed)
        assert torch.equal(zhat, reference.dequantize(q, s, codec, torch.float32))
    else:
        assert torch.equal(zhat, z.bfloat16().float())


def test_presets_are_usable():
    for codec in (INT8, INT4, GRAD_INT8, BF16):
        assert codec.payload_bytes(4, 64) > HEADER_BYTES
