"""Pieces shared by the compiled backends (Triton and CUDA): input limits
and output allocation.

Outputs are allocated through :func:`empty`, :func:`payload_buffer` and
:func:`new_payload` (looked up on this module at call time) so tests can
poison fresh outputs and catch elements a kernel never writes.
"""

from __future__ import annotations


import torch

from ..codec import Codec, empty_payload, write_header

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The largest k of both backends: the CUDA kernels are instantiated up to it, and above it the
# Triton kernels' (rows, k) tiles outgrow an SM (compiled for sm_90 at k=512, 2026-11-28: encode
# forward's and encode backward's kernels spill; with fp32 inputs decode forward's and the weight
# gradient's need more shared memory than an H100 has, 256 / 280 KB of 227).
MAX_K = 256


def problem(d: int, k: int, dtypes=()):
    """The compiled kernels' limits (float32/16/bf16, d and k multiples of 16,
    k <= MAX_K): None if met, else (exception type, reason)."""
    for dtype in dtypes:
        if dtype is not None and dtype not in DTYPES:
            return TypeError, f"dtype {dtype} is not supported; use float32/float16/bfloat16 or the reference backend"
    if d % 16 or k % 16:
        return ValueError, f"d={d} and k={k} must both be multiples of 16"
    if k > MAX_K:
        return ValueError, (f"k={k} is larger than {MAX_K}, the most the compiled kernels take; "
                            "use the reference backend")
    return None


def check(backend: str, what: str, d: int, k: int, *dtypes) -> None:
    """Raise if :func:`problem` finds one."""
    found = problem(d, k, dtypes)
    if found:
        error, reason = found
        raise error(f"{backend} backend ({what}): {reason}")


def empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def weight_grad_partials(n: int, d: int, k: int, transpose: bool, device, max_splits: int = 8) -> torch.Tensor:
    """The fp32 buffer a weight-gradient kernel fills, one (k, d) -- or (d, k)
    if ``transpose`` -- partial per row split (about one split per 1024 rows, at
    most ``max_splits``); the caller sums them, so the result is deterministic."""
    splits = max(1, min(max_splits, -(-n // 1024)))
    return empty((splits, d, k) if transpose else (splits, k, d), torch.float32, device)


def payload_buffer(codec: Codec, n: int, k: int, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """A payload buffer for a kernel that writes all of it, header and codes
    padding included: ``out`` (already validated by the ops) or a fresh one."""
    return out if out is not None else empty((codec.payload_bytes(n, k),), torch.uint8, device)


def new_payload(codec: Codec, n: int, k: int, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """A payload for n x k values: ``out`` (already validated by the ops) with
    its header written, or a fresh buffer."""
    return empty_payload(codec, n, k, device) if out is None else write_header(out, codec, n, k)
