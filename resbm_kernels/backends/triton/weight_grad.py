"""Weight gradients: M = Z^T @ A summed over rows, where Z (N x k, small) is
the dequantized payload already scaled per row (written by decode backward's
main kernel, see :mod:`.project_quantize`, or by :mod:`.grad_operand` for
encode backward).

A d x k reduction over N cannot share a row-blocked kernel without per-program
d x k partials or atomics, so this pass is d-tile major. Both operands stream
through shared memory straight into the tensor cores, so the loop does no
per-element work. Grid: (d tiles, row splits); each program walks its rows
and writes one fp32 partial (deterministic, no atomics, safe to autotune);
``finish_weight_grad_kernel`` sums the few splits in a fixed order and does
the rest in one launch (the encoder's RMSNorm factors, the cast to the
weights' dtype), where torch ops took up to eight small kernels.

Decode backward runs it as a second pass over grad_h (its row-blocked main
kernel needs whole rows of g_z before it can quantize). Encode backward
(GRAD_X) writes grad_x from the same tiles, since each grad_x tile needs only
its x tile, Z, W_e's tile and the per-row alpha (see :mod:`.grad_operand`):
x is read once and grad_x written once in this pass. The two uses tile best
differently (grad_x adds a (BLOCK_N, BLOCK_D) tile), so each has its own
autotuner over the same kernel.
"""

import triton
import triton.language as tl

from .codec import load_payload, round_to_kind
from .configs import autotune_wgrad, autotune_wgrad_x
from .tiles import dequant_mma, load_rows, load_w, tile_mask


@triton.jit(do_not_specialize=["n", "rows_per_split"])
def _weight_grad(
    a_ptr, z_ptr, out_ptr, w_ptr, gamma_ptr, alpha_ptr, codes_ptr, scales_ptr, gx_ptr,
    n, d, k, group, stride_a, rows_per_split, stride_os, stride_ok, stride_od, stride_wk, stride_wd, stride_gx,
    GRAD_X: tl.constexpr, HAS_NORM: tl.constexpr, BITS: tl.constexpr, OUT_KIND: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[split, c, j] = sum_{rows of split} Z[r, c] * A[r, j].

    With GRAD_X (encode backward, A = x, W = w_e): also the grad_x tile
    gamma * (Z @ W) - alpha * x + pad_d(g_z) (without HAS_NORM: Z @ W + pad_d(g_z)),
    g_z re-read from the gradient payload (codes, scales, BITS) for the d tiles
    below k."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    kcols = tl.arange(0, BLOCK_K)
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, n)
    acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    if GRAD_X:
        w = load_w(w_ptr, kcols, dcols, k, d, stride_wk, stride_wd, False)
        if HAS_NORM:
            g = tl.load(gamma_ptr + dcols, mask=dcols < d, other=0.0).to(tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        a = load_rows(a_ptr, stride_a, rows, dcols, end, d, False)  # (the column test is loop-invariant here)
        z = load_rows(z_ptr, k, rows, kcols, end, k, False)
        acc = dequant_mma(tl.trans(z), a, acc, UPCAST, PRECISION)
        if GRAD_X:
            h = dequant_mma(z, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), UPCAST, PRECISION)
            if HAS_NORM:
                alpha = tl.load(alpha_ptr + rows, mask=rows < end, other=0.0)
                h = h * g[None, :] - a.to(tl.float32) * alpha[:, None]
            if pid_d * BLOCK_D < k:  # identity path
                h += load_payload(codes_ptr, scales_ptr, rows[:, None], dcols[None, :], end, k, group, BITS)
            mask = tile_mask(rows, dcols, end, d, False)
            out = round_to_kind(h, OUT_KIND).to(gx_ptr.dtype.element_ty)
            tl.store(gx_ptr + rows[:, None].to(tl.int64) * stride_gx + dcols[None, :], out, mask=mask)
    mask = tile_mask(kcols, dcols, k, d, False)
    tl.store(out_ptr + pid_s * stride_os + kcols[:, None] * stride_ok + dcols[None, :] * stride_od, acc, mask=mask)


weight_grad_kernel = autotune_wgrad(_weight_grad)
weight_grad_x_kernel = autotune_wgrad_x(_weight_grad)  # GRAD_X=True launches


@triton.jit(do_not_specialize=["splits"])  # (grows with n: one compiled variant)
def finish_weight_grad_kernel(
    part_ptr, w_ptr, gamma_ptr, out_ptr, grad_gamma_ptr,
    splits, d, k, stride_ps, stride_pk, stride_pd, stride_wk, stride_wd, stride_ok, stride_od,
    HAS_NORM: tl.constexpr, OUT_KIND: tl.constexpr, GAMMA_KIND: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """M = sum of part[s] over s = 0..splits-1 in order, M viewed k x d through the
    strides (decode backward's (d, k) layout too); out = M, or with HAS_NORM
    (encoder, W = w_e): out = M * gamma[j] and grad_gamma[j] = sum_c W[c, j] * M[c, j].
    Each rounded once to its output's dtype."""
    dcols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    kcols = tl.arange(0, BLOCK_K)
    mask = tile_mask(kcols, dcols, k, d, False)
    offsets = kcols[:, None] * stride_pk + dcols[None, :] * stride_pd
    m = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for s in range(0, splits):
        m += tl.load(part_ptr + s * stride_ps + offsets, mask=mask, other=0.0)
    if HAS_NORM:
        w = load_w(w_ptr, kcols, dcols, k, d, stride_wk, stride_wd, False).to(tl.float32)
        grad_gamma = round_to_kind(tl.sum(w * m, axis=0), GAMMA_KIND)
        tl.store(grad_gamma_ptr + dcols, grad_gamma.to(grad_gamma_ptr.dtype.element_ty), mask=dcols < d)
        m = m * tl.load(gamma_ptr + dcols, mask=dcols < d, other=0.0).to(tl.float32)[None, :]
    out = round_to_kind(m, OUT_KIND).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + kcols[:, None] * stride_ok + dcols[None, :] * stride_od, out, mask=mask)
