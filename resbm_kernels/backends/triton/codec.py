"""Per-element codec helpers shared by every Triton kernel.

Everything that decides a bit of the wire format lives here, written once:
rounding to the scale / output dtype, the reciprocal of the scale, the
stochastic-rounding hash, round-half-even, the payload tile load/store and
the payload header.
Rounding to bf16 / fp16 is the GPU's cast (cvt.rn: round to nearest even, one
instruction); under the interpreter, whose fp32->bf16 cast truncates, it is
done with integer bit operations that give the same result, so GPU and CPU
match :mod:`resbm_kernels.backends.reference` bit for bit.
Kernels must be launched with ``enable_fp_fusion=False`` so that ``z * inv``
followed by an add is never contracted into one FMA (which would round once
instead of twice, unlike the reference).
"""

import triton
import triton.language as tl

from ...codec import HEADER_BYTES
from .configs import INTERPRET

INTERPRETED = tl.constexpr(INTERPRET)
HEADER = tl.constexpr(HEADER_BYTES)  # bytes before a payload's codes

# dtype kinds used as constexprs for rounding (scales and outputs)
KIND_F32 = tl.constexpr(0)
KIND_F16 = tl.constexpr(1)
KIND_BF16 = tl.constexpr(2)


@triton.jit
def round_half_even(y):
    """Round fp32 to the nearest integer, ties to even (valid for |y| < 2**22)."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def round_to_kind(x, KIND: tl.constexpr):
    """fp32 -> the nearest (ties to even) value representable in the dtype of
    ``KIND``, still as fp32 (so a later cast is exact). Overflow gives inf."""
    if KIND == KIND_F32:
        return x
    elif not INTERPRETED:
        return x.to(tl.bfloat16 if KIND == KIND_BF16 else tl.float16).to(tl.float32)
    elif KIND == KIND_BF16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    elif KIND == KIND_F16:
        b = x.to(tl.uint32, bitcast=True)
        sign = b & 0x80000000
        a = tl.abs(x)
        ab = a.to(tl.uint32, bitcast=True)
        # normal fp16 range: keep 10 mantissa bits (round at bit 13)
        normal = ((ab + (0xFFF + ((ab >> 13) & 1))) & 0xFFFFE000).to(tl.float32, bitcast=True)
        # subnormal fp16 range: multiples of 2**-24
        sub = round_half_even(a * 16777216.0) * 5.9604644775390625e-08
        r = tl.where(a < 6.103515625e-05, sub, normal)
        r = tl.where(r > 65504.0, float("inf"), r)
        return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def hash32(x):
    """The 'lowbias32' integer hash (Wellons) on uint32 (wrapping multiply)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def rng_key(seed_lo, seed_hi, seed_offset_ptr, SEED_OFFSET: tl.constexpr):
    """codec.rng_key of the 64-bit seed with int32 halves seed_hi, seed_lo, plus
    with SEED_OFFSET the int64 at seed_offset_ptr (read in the kernel, so a CUDA
    graph's replay sees the offset's current value), wrapping modulo 2**64."""
    seed = (seed_hi.to(tl.int64) << 32) | seed_lo.to(tl.uint32).to(tl.int64)
    if SEED_OFFSET:
        seed += tl.load(seed_offset_ptr)
    return hash32(seed.to(tl.uint32) ^ hash32((seed >> 32).to(tl.uint32)))


@triton.jit
def stochastic_uniform(rows, cols, k, key):
    """u in [0, 1) for elements (rows, cols): (hash32((row*k+col) ^ key) >> 8) * 2**-24."""
    idx = rows.to(tl.uint32)[:, None] * k.to(tl.uint32) + cols.to(tl.uint32)[None, :]
    h = hash32(idx ^ key.to(tl.uint32))
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def store_payload(z, rows, n, k, n_groups, codes_ptr, scales_ptr, key,
                  BITS: tl.constexpr, GROUP_RESHAPE: tl.constexpr, SCALE_KIND: tl.constexpr,
                  STOCHASTIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Quantize + pack a (BLOCK_N, BLOCK_K) fp32 tile of z (rows ``rows``,
    columns 0..k-1; padding columns must hold 0) straight into the payload
    (``n_groups`` = k / group scales per row).

    bits=16: ``codes_ptr`` points to bf16, values rounded to nearest even.
    Otherwise one symmetric absmax scale per group: groups are formed by
    reshaping the tile to (BLOCK_N, BLOCK_K // GROUP_RESHAPE, GROUP_RESHAPE),
    where GROUP_RESHAPE is the group size (a power of two) or BLOCK_K when the
    group is the whole row (zero padding does not change an absmax).
    """
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < n
    if BITS == 16:
        mask = row_ok[:, None] & (cols < k)[None, :]
        zb = round_to_kind(z, KIND_BF16).to(codes_ptr.dtype.element_ty)
        tl.store(codes_ptr + rows[:, None].to(tl.int64) * k + cols[None, :], zb, mask=mask)
    else:
        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        NG: tl.constexpr = BLOCK_K // GROUP_RESHAPE
        zg = tl.reshape(z, (BLOCK_N, NG, GROUP_RESHAPE))
        absmax = tl.max(tl.abs(zg), axis=2)
        scale = round_to_kind(tl.math.div_rn(absmax, tl.full(absmax.shape, QMAX, tl.float32)), SCALE_KIND)
        one = tl.full(scale.shape, 1.0, tl.float32)
        inv = tl.where(scale > 0, tl.math.div_rn(one, tl.where(scale > 0, scale, 1.0)), 0.0)
        y = tl.reshape(zg * inv[:, :, None], (BLOCK_N, BLOCK_K))
        # |y| <= qmax+1 changes no result and keeps the rounding trick valid
        y = tl.minimum(tl.maximum(y, -QMAX - 1.0), QMAX + 1.0)
        if STOCHASTIC:
            q = tl.floor(y + stochastic_uniform(rows, cols, k, key))
        else:
            q = round_half_even(y)
        q = tl.minimum(tl.maximum(q, -QMAX * 1.0), QMAX * 1.0).to(tl.int32)

        gcols = tl.arange(0, NG)
        smask = row_ok[:, None] & (gcols < n_groups)[None, :]
        tl.store(scales_ptr + rows[:, None].to(tl.int64) * n_groups + gcols[None, :],
                 scale.to(scales_ptr.dtype.element_ty), mask=smask)

        PER: tl.constexpr = 8 // BITS
        fields = q & ((1 << BITS) - 1)
        if PER > 1:
            shifts = tl.arange(0, PER) * BITS
            fields = tl.sum(tl.reshape(fields, (BLOCK_N, BLOCK_K // PER, PER)) << shifts[None, None, :], axis=2)
        row_bytes = k // PER
        bcols = tl.arange(0, BLOCK_K // PER)
        bmask = row_ok[:, None] & (bcols < row_bytes)[None, :]
        tl.store(codes_ptr + rows[:, None].to(tl.int64) * row_bytes + bcols[None, :],
                 fields.to(tl.uint8), mask=bmask)


@triton.jit
def payload_pointers(payload_ptr, scales_at, BITS: tl.constexpr, SCALE_KIND: tl.constexpr):
    """(codes, scales) pointers into a uint8 payload (codec.payload_layout):
    the codes after the 16-byte header (bf16 values for bits=16, whose
    scales pointer is then unused), the scales at byte ``scales_at``, in the
    dtype of SCALE_KIND. The kernels take the payload and this offset instead
    of two views of it: fewer tensors to make on the host per call."""
    codes = payload_ptr + HEADER
    if BITS == 16:
        codes = codes.to(tl.pointer_type(tl.bfloat16))
    scales = payload_ptr + scales_at
    if SCALE_KIND == KIND_BF16:
        scales = scales.to(tl.pointer_type(tl.bfloat16))
    elif SCALE_KIND == KIND_F16:
        scales = scales.to(tl.pointer_type(tl.float16))
    else:
        scales = scales.to(tl.pointer_type(tl.float32))
    return codes, scales


@triton.jit
def store_header(payload_ptr, hdr0, hdr1, hdr2, hdr3, n, k, BITS: tl.constexpr):
    """The payload's 16-byte header (the little-endian int32 words of
    codec.header_words) and the zero padding that aligns its codes region to
    16 bytes; written by one program of the kernel that writes the codes."""
    b = tl.arange(0, 16)
    word = tl.where(b < 4, hdr0, tl.where(b < 8, hdr1, tl.where(b < 12, hdr2, hdr3)))
    tl.store(payload_ptr + b, ((word >> ((b % 4) * 8)) & 0xFF).to(tl.uint8))
    codes_end = 16 + n.to(tl.int64) * k * BITS // 8
    tl.store(payload_ptr + codes_end + b, tl.zeros((16,), tl.uint8), mask=b < (16 - codes_end % 16) % 16)


@triton.jit
def signed_field(b, p: tl.constexpr, BITS: tl.constexpr):
    """Field p (bits p * BITS ..) of bytes ``b`` (int32), sign-extended: moved
    to the top of the int32 and shifted back arithmetically."""
    return (b << (32 - BITS - p * BITS)) >> (32 - BITS)


@triton.jit
def load_payload(codes_ptr, scales_ptr, rows, c0, n, k, BITS: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Unpack + dequantize payload columns c0 .. c0 + BLOCK_C of ``rows`` into an
    fp32 (len(rows), BLOCK_C) tile, 0 outside rows < n, columns < k. GROUP: the
    scale group, a power of two, or one scale per row (a power of two >= k, as
    store_payload's GROUP_RESHAPE); c0 a multiple of BLOCK_C.

    The packed bytes and the scales are loaded as the tiles they are in memory
    (wide loads along each row), then spread over the columns in registers:
    the codes' fields interleaved, a group's scale by a reshape (as store_payload
    packs). Loaded one element at a time, each from its own byte and scale
    address, a 64-row tile at k=128 took 68 (int8) / 128 (int4) loads a thread
    and 1400-2400 instructions (sm_90), in the prologue that every program of a
    launch runs at once."""
    row_ok = rows < n
    rows64 = rows.to(tl.int64)
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = (cols < k)[None, :]
    if BITS == 16:
        return tl.load(codes_ptr + rows64[:, None] * k + cols[None, :], mask=row_ok[:, None] & col_ok,
                       other=0.0).to(tl.float32)
    else:
        PER: tl.constexpr = 8 // BITS
        bcols = tl.arange(0, BLOCK_C // PER)
        row_bytes = k // PER
        byte = tl.load(codes_ptr + c0 // PER + rows64[:, None] * row_bytes + bcols[None, :],
                       mask=row_ok[:, None] & (bcols < row_bytes - c0 // PER)[None, :],
                       other=0).to(tl.int8, bitcast=True)
        # field p of byte b is column b * PER + p
        if PER == 1:
            q = byte.to(tl.float32)
        elif PER == 2:
            b = byte.to(tl.int32)
            q = tl.interleave(signed_field(b, 0, BITS), signed_field(b, 1, BITS)).to(tl.float32)
        else:
            b = byte.to(tl.int32)
            q = tl.interleave(tl.interleave(signed_field(b, 0, BITS), signed_field(b, 2, BITS)),
                              tl.interleave(signed_field(b, 1, BITS), signed_field(b, 3, BITS))).to(tl.float32)
        n_groups = tl.cdiv(k, GROUP)  # scales per row
        if GROUP >= BLOCK_C:  # the tile's columns share one scale per row
            s = tl.load(scales_ptr + rows64 * n_groups + c0 // GROUP, mask=row_ok & (c0 < k), other=0.0)
            v = q * s.to(tl.float32)[:, None]
        else:
            NG: tl.constexpr = BLOCK_C // GROUP
            groups = c0 // GROUP + tl.arange(0, NG)
            s = tl.load(scales_ptr + rows64[:, None] * n_groups + groups[None, :],
                        mask=row_ok[:, None] & (groups < n_groups)[None, :], other=0.0)
            v = tl.reshape(tl.reshape(q, (rows.shape[0], NG, GROUP)) * s.to(tl.float32)[:, :, None],
                           (rows.shape[0], BLOCK_C))
        return tl.where(col_ok, v, 0.0)  # (a row's one scale also reaches its padding columns)
