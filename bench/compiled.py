"""``torch.compile`` of the reference backend's four passes (a baseline).

``torch.compile`` cannot take the reference functions whole: they write the
payload through views of one uint8 buffer reinterpreted as other dtypes,
which AOTAutograd rejects ("input mutations on views with different
dtypes"). So each pass is split into the math -- RMSNorm, projection,
identity path, absmax, quantize, pack / unpack, dequantize, the weight
gradients -- built from the reference's own functions and compiled, and the
payload assembly (header + copying the packed bytes and scales into the
payload buffer, a copy of the payload's size) done eagerly around it. The
reference's finiteness check stays (a graph break and a device sync, as in
eager). Outputs are checked against the eager reference by the benchmark.
"""

from __future__ import annotations

import torch

from resbm_kernels.backends import reference as R
from resbm_kernels.codec import Codec, empty_payload, payload_views

_configured = False


def _configure() -> None:
    """Every benchmark shape is a new specialisation: raise dynamo's
    recompile limit so none silently falls back to eager."""
    global _configured
    if _configured:
        return
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 100_000)
    _configured = True


# ---- the compiled math (pure functions of tensors; codecs are Python constants) ----


def _encode_math(x, w_e, gamma, eps, codec, seed):
    return R.quantize_pack(R.encode_project(x, w_e, gamma, eps), codec, seed)


def _decode_math(codes, scales, w_d, residual, codec, out_dtype):
    zhat = R.unpack_dequantize(codes, scales, codec, w_d.shape[1], torch.float32)
    return R.decode_project(zhat, w_d, residual, out_dtype)


def _decode_backward_math(grad_h, codes, scales, w_d, codec, grad_codec, seed):
    zhat = R.unpack_dequantize(codes, scales, codec, w_d.shape[1], torch.float32)
    g_z, grad_w_d = R.decode_backward_dense(grad_h, zhat, w_d)
    packed, s = R.quantize_pack(g_z, grad_codec, seed)
    return packed, s, grad_w_d.to(w_d.dtype)


def _encode_backward_math(codes, scales, x, w_e, gamma, eps, grad_codec):
    g_z = R.unpack_dequantize(codes, scales, grad_codec, w_e.shape[0], torch.float32)
    grad_x, grad_w, grad_gamma = R.encode_backward_dense(g_z, x, w_e, gamma, eps)
    return grad_x.to(x.dtype), grad_w.to(w_e.dtype), None if gamma is None else grad_gamma.to(gamma.dtype)


# ---- eager payload assembly around the compiled math ------------------------------


def _views(payload, codec: Codec, n: int, k: int):
    codes, scales = payload_views(payload, codec, n, k)
    return codes.contiguous(), (scales.contiguous() if scales is not None else None)


class CompiledReference:
    """The four passes with the reference backend's signatures and results,
    the math under ``torch.compile`` (one compiled function per pass)."""

    def __init__(self, **compile_kwargs):
        _configure()
        kw = dict(dynamic=False, **compile_kwargs)
        self._enc = torch.compile(_encode_math, **kw)
        self._dec = torch.compile(_decode_math, **kw)
        self._dec_bwd = torch.compile(_decode_backward_math, **kw)
        self._enc_bwd = torch.compile(_encode_backward_math, **kw)

    def encode_forward(self, x, w_e, norm_weight, eps, codec: Codec, seed: int):
        n, k = x.shape[0], w_e.shape[0]
        packed, scales = self._enc(x, w_e, norm_weight, eps, codec, seed)
        return R.fill_payload(empty_payload(codec, n, k, x.device), codec, n, k, packed, scales)

    def decode_forward(self, payload, w_d, residual, codec: Codec, n: int, out_dtype):
        codes, scales = _views(payload, codec, n, w_d.shape[1])
        return self._dec(codes, scales, w_d, residual, codec, out_dtype)

    def decode_backward(self, grad_h, payload, w_d, codec: Codec, grad_codec: Codec, seed: int):
        n, k = grad_h.shape[0], w_d.shape[1]
        codes, scales = _views(payload, codec, n, k)
        packed, s, grad_w_d = self._dec_bwd(grad_h, codes, scales, w_d, codec, grad_codec, seed)
        return R.fill_payload(empty_payload(grad_codec, n, k, grad_h.device), grad_codec, n, k, packed, s), grad_w_d

    def encode_backward(self, grad_payload, x, w_e, norm_weight, eps, grad_codec: Codec):
        codes, scales = _views(grad_payload, grad_codec, x.shape[0], w_e.shape[0])
        return self._enc_bwd(codes, scales, x, w_e, norm_weight, eps, grad_codec)
