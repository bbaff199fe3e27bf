"""Pure-PyTorch reference backend: the oracle every fast backend is tested against.

Runs on any device. Arithmetic is float32 (float64 when the inputs are
float64, so ``gradcheck`` can check the formulas); quantization always works
on float32 values, exactly as the kernels do, so codes match bit for bit.
"""

from __future__ import annotations

import torch

from ..codec import Codec, empty_payload, payload_views, rng_key, write_header

# ---- codec --------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, without
    overflowing int64 (split x into 16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def offset_seed(seed: int, seed_offset: torch.Tensor | None) -> int | torch.Tensor:
    """``seed`` plus ``seed_offset`` (a one-element int64 tensor, or None): an
    int64 tensor on the offset's device (wrapping modulo 2**64, as the kernels'
    sum), never read on the host."""
    if seed_offset is None:
        return seed
    seed &= 0xFFFFFFFFFFFFFFFF
    return seed_offset.reshape(()) + (seed - (1 << 64) if seed >= 1 << 63 else seed)


def _rng_key(seed: int | torch.Tensor) -> int | torch.Tensor:
    """codec.rng_key, also of a seed in an int64 tensor (:func:`offset_seed`)."""
    if not isinstance(seed, torch.Tensor):
        return rng_key(seed)
    return _hash32((seed & 0xFFFFFFFF) ^ _hash32((seed >> 32) & 0xFFFFFFFF))


def uniform(n: int, k: int, seed: int | torch.Tensor, device) -> torch.Tensor:
    """The counter-based uniforms in [0, 1) used by stochastic rounding (``seed``
    an int or, from :func:`offset_seed`, an int64 tensor)."""
    idx = torch.arange(n * k, dtype=torch.int64, device=device) & 0xFFFFFFFF
    bits = _hash32(idx ^ _rng_key(seed)) >> 8
    return (bits.to(torch.float32) * 2.0**-24).view(n, k)


def quantize(z: torch.Tensor, codec: Codec, seed: int | torch.Tensor = 0):
    """z (N, k) float -> (codes int8 (N, k), scales (N, k/g) scale_dtype).

    scale = round_to_scale_dtype(absmax / qmax); q = clamp(round(z * (1/scale))).
    """
    n, k = z.shape
    g = codec.group(k)
    zf = z.to(torch.float32).view(n, k // g, g)
    absmax = zf.abs().amax(dim=-1)
    # full-tensor divisions: CUDA turns division by a scalar into a
    # multiplication by its reciprocal, which is not correctly rounded
    scales = (absmax / torch.full_like(absmax, codec.qmax)).to(codec.scale_dtype)
    s32 = scales.to(torch.float32)
    if not torch.isfinite(s32).all():
        raise ValueError(
            f"quantize: activation absmax {absmax.max().item():.3g} overflows the {codec.scale_dtype} scale"
            if torch.isfinite(absmax).all()
            else "quantize: input contains non-finite values (inf or nan)"
        )
    inv = torch.where(s32 > 0, torch.ones_like(s32) / s32, torch.zeros_like(s32))
    y = (zf * inv[..., None]).view(n, k)
    if codec.stochastic:
        q = torch.floor(y + uniform(n, k, seed, z.device))
    else:
        q = torch.round(y)
    return q.clamp_(-codec.qmax, codec.qmax).to(torch.int8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, codec: Codec, dtype: torch.dtype) -> torch.Tensor:
    """codes int8 (N, k), scales (N, k/g) -> float (N, k) of ``dtype``."""
    n, k = codes.shape
    g = codec.group(k)
    vals = codes.to(torch.float32).view(n, k // g, g) * scales.to(torch.float32)[..., None]
    return vals.view(n, k).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes (N, k) -> uint8 (N, k*bits/8); first value in the lowest bits."""
    if bits == 8:
        return codes.view(torch.uint8).clone()
    n, k = codes.shape
    per = 8 // bits
    fields = (codes.to(torch.int32) & ((1 << bits) - 1)).view(n, k // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (fields << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 (N, k*bits/8) -> sign-extended int8 codes (N, k)."""
    if bits == 8:
        return packed.view(torch.int8).clone()
    n = packed.shape[0]
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    fields = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    signed = fields - ((fields >> (bits - 1)) << bits)
    return signed.view(n, k).to(torch.int8)


def quantize_pack(z: torch.Tensor, codec: Codec, seed: int | torch.Tensor = 0):
    """z (N, k) -> the contents of a payload's two regions: (packed codes
    uint8 (N, k*bits/8), scales) -- for bits=16 the bf16 bytes and no scales."""
    if codec.quantized:
        q, s = quantize(z, codec, seed)
        return pack(q, codec.bits), s
    if not torch.isfinite(z).all():
        raise ValueError("quantize: input contains non-finite values (inf or nan)")
    return z.to(torch.bfloat16).contiguous().view(torch.uint8), None


def unpack_dequantize(codes: torch.Tensor, scales, codec: Codec, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_pack` (up to rounding): float (N, k) of ``dtype``."""
    if not codec.quantized:
        return codes.contiguous().view(torch.bfloat16).to(dtype)
    return dequantize(unpack(codes, codec.bits, k), scales, codec, dtype)


def fill_payload(payload: torch.Tensor, codec: Codec, n: int, k: int, codes: torch.Tensor, scales) -> torch.Tensor:
    """Copy packed codes and scales into a payload whose header is written."""
    codes_view, scales_view = payload_views(payload, codec, n, k)
    codes_view.copy_(codes)
    if scales is not None:
        scales_view.copy_(scales)
    return payload


def write_payload(z: torch.Tensor, codec: Codec, seed: int | torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize + pack z (N, k) into a payload (header, codes, scales): ``out``
    if given, else a fresh one."""
    n, k = z.shape
    payload = empty_payload(codec, n, k, z.device) if out is None else write_header(out, codec, n, k)
    return fill_payload(payload, codec, n, k, *quantize_pack(z, codec, seed))


def read_payload(payload: torch.Tensor, codec: Codec, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Unpack + dequantize a payload into float (N, k) of ``dtype``."""
    return unpack_dequantize(*payload_views(payload, codec, n, k), codec, k, dtype)


def payload_steps(p: torch.Tensor, q: torch.Tensor, codec: Codec, n: int, k: int) -> torch.Tensor:
    """|values of p - values of q| (N, k) in quantization steps: the larger of
    the two payloads' scales of each value's group (a quantized codec). How
    the tests and benchmarks compare a kernel's payload with the reference's,
    whose codes may sit a step apart where their inputs round differently."""
    (_, sa), (_, sb) = payload_views(p, codec, n, k), payload_views(q, codec, n, k)
    a, b = (read_payload(t, codec, n, k, torch.float32) for t in (p, q))
    step = torch.maximum(sa.float(), sb.float()).repeat_interleave(codec.group(k), dim=1)
    return (a - b).abs() / step.clamp_min(torch.finfo(torch.float32).tiny)


# ---- the four passes ------------------------------------------------------------


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The reference's arithmetic for inputs of t's dtype: float64 kept, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def _projection(x, w_e, norm_weight, eps):
    """(RMSNorm(x) W_e^T, 1/rms(x) as (N, 1) or None without the norm), compute dtype."""
    ct = compute_dtype(x)
    xf, w = x.to(ct), w_e.to(ct)
    if norm_weight is None:
        return xf @ w.T, None
    r = _rms(xf, eps)
    return (xf * r * norm_weight.to(ct)) @ w.T, r


def encode_project(x, w_e, norm_weight, eps):
    """z = RMSNorm(x) W_e^T + x[:, :k] in the compute dtype (no wire)."""
    proj, _ = _projection(x, w_e, norm_weight, eps)
    return proj + x[:, : w_e.shape[0]].to(proj.dtype)


def fill_row_stats(row_stats, proj, r):
    """The RMSNorm row statistics encode forward leaves for encode backward:
    row_stats (N, k+1) fp32 = [RMSNorm(x) W_e^T | 1/rms(x)]."""
    k = proj.shape[1]
    row_stats[:, :k] = proj
    row_stats[:, k:] = r
    return row_stats


def decode_project(zhat, w_d, residual, out_dtype):
    """h = zhat W_d^T + pad_d(zhat) (+ residual)."""
    ct = compute_dtype(zhat)
    z, w = zhat.to(ct), w_d.to(ct)
    h = z @ w.T
    h[:, : z.shape[1]] += z
    if residual is not None:
        h += residual.to(ct)
    return h.to(out_dtype)


def encode_forward(x, w_e, norm_weight, eps, codec: Codec, seed: int, out=None, row_stats=None, seed_offset=None):
    """Payload of z; with a ``row_stats`` buffer (N, k+1) fp32 (RMSNorm only)
    also fills it (see :func:`fill_row_stats`). Stochastic rounding keys on
    seed + seed_offset (see :func:`offset_seed`)."""
    proj, r = _projection(x, w_e, norm_weight, eps)
    if row_stats is not None:
        fill_row_stats(row_stats, proj, r)
    return write_payload(proj + x[:, : w_e.shape[0]].to(proj.dtype), codec, offset_seed(seed, seed_offset), out)


def decode_forward(payload, w_d, residual, codec: Codec, n: int, out_dtype):
    k = w_d.shape[1]
    zhat = read_payload(payload, codec, n, k, compute_dtype(w_d))
    return decode_project(zhat, w_d, residual, out_dtype)


def decode_backward_dense(grad_h, zhat, w_d):
    """Backward of decode_project: (dL/dzhat, dL/dW_d) in the compute dtype."""
    ct = compute_dtype(grad_h)
    g = grad_h.to(ct)
    g_z = g @ w_d.to(ct) + g[:, : w_d.shape[1]]
    return g_z, g.T @ zhat.to(ct)


def decode_backward(grad_h, payload, w_d, codec: Codec, grad_codec: Codec, seed: int, out=None, seed_offset=None):
    """grad_h (N, d) -> (gradient payload of dL/dzhat, grad_W_d); seeds as
    :func:`encode_forward`'s."""
    n, k = grad_h.shape[0], w_d.shape[1]
    zhat = read_payload(payload, codec, n, k, compute_dtype(grad_h))
    g_z, grad_w_d = decode_backward_dense(grad_h, zhat, w_d)
    try:
        grad_payload = write_payload(g_z, grad_codec, offset_seed(seed, seed_offset), out)
    except ValueError as e:  # (quantize's own message does not say that this is the gradient)
        raise ValueError(f"decode backward, the gradient dL/dzhat into the gradient codec {grad_codec.spec}: {e}") \
            from None
    return grad_payload, grad_w_d.to(w_d.dtype)


def encode_backward_dense(g_z, x, w_e, norm_weight, eps):
    """Backward of encode_project given g_z = dL/dz (compute dtype)."""
    ct = g_z.dtype
    k = w_e.shape[0]
    xf, w = x.to(ct), w_e.to(ct)
    g_u = g_z @ w
    if norm_weight is None:
        grad_x, grad_w, grad_gamma = g_u, g_z.T @ xf, None
    else:
        gamma = norm_weight.to(ct)
        r = _rms(xf, eps)
        xhat = xf * r
        grad_gamma = (g_u * xhat).sum(dim=0)
        g_xhat = g_u * gamma
        grad_x = r * g_xhat - xhat * (r * (g_xhat * xhat).mean(dim=-1, keepdim=True))
        grad_w = g_z.T @ (xhat * gamma)
    grad_x[:, :k] += g_z
    return grad_x, grad_w, grad_gamma


def encode_backward(grad_payload, x, w_e, norm_weight, eps, grad_codec: Codec, row_stats=None):
    """Gradient payload -> (grad_x, grad_W_e, grad_norm_weight or None). The
    oracle recomputes everything from x: ``row_stats`` is accepted and unused."""
    n, k = x.shape[0], w_e.shape[0]
    g_z = read_payload(grad_payload, grad_codec, n, k, compute_dtype(x))
    grad_x, grad_w, grad_gamma = encode_backward_dense(g_z, x, w_e, norm_weight, eps)
    return (
        grad_x.to(x.dtype),
        grad_w.to(w_e.dtype),
        None if grad_gamma is None else grad_gamma.to(norm_weight.dtype),
    )


def supports(device) -> bool:
    """The reference runs wherever PyTorch does."""
    return True


def unsupported(case) -> None:
    """The reference runs every case the ops accept."""
    return None
