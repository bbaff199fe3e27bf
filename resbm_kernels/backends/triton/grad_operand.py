"""Encode backward, first step: the per-row quantities the main pass needs
before it can write any grad_x element, from the small side only.

Through RMSNorm (xhat = r * x, r = 1/rms(x), u = gamma * xhat, z = u @ W_e^T
+ x[:, :k]) the input gradient is

    grad_x = gamma * (Z @ W_e) - alpha * x + pad_d(g_z),
    Z = r * g_z,  alpha = r^2 * (g_z . p) / d,  p = r * x @ (gamma * W_e)^T,

so every grad_x tile needs only its own x tile, the payload rows, r and
alpha per row. grad_x is a rows kernel over x like decode forward
(:mod:`.dequant_project`, HAS_NORM), and the weight gradient Z^T @ x a
d-tile-major pass (:mod:`.weight_grad`). Given the row statistics (p, r)
encode forward left, grad_x's programs form alpha and write Z themselves from
the payload rows they load anyway (HAS_STATS, WRITE_Z: no launch of this
kernel, whose 5-9 us the H200 of 2026-11-27 timed at k = 32 / 128). This
kernel computes the per-row quantities and Z where they cannot: without the
statistics (one program per BLOCK_N rows streams x once through the encode
forward's projection loop to recompute them), and before a launch that forms
the weight gradient from Z (RESBM_TRITON_FUSED_WGRAD, HAS_STATS here too).
Without the norm Z is the dequantized g_z and x is not read.
"""

import triton
import triton.language as tl

from .codec import load_payload, payload_pointers
from .configs import LoopConstants, autotune_grad_operand
from .tiles import inv_rms, load_row_stats, project_rows, rms_alpha, store_operand


@autotune_grad_operand
@LoopConstants
@triton.jit(do_not_specialize=["n"])
def grad_operand_kernel(
    payload_ptr, a_ptr, w_ptr, stats_ptr, z_ptr, r_ptr, alpha_ptr,
    n, d, k, scales_at, stride_a, stride_wk, stride_wd, stride_stats, eps,
    BITS: tl.constexpr, GROUP: tl.constexpr, SCALE_KIND: tl.constexpr, HAS_NORM: tl.constexpr,
    HAS_STATS: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Z[rows] = r * g_z and, with the norm, r[rows] and alpha[rows] (A = x, W = gamma * w_e);
    g_z from the gradient payload (scales of SCALE_KIND at byte ``scales_at``, one per GROUP
    columns)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kcols = tl.arange(0, BLOCK_K)
    codes_ptr, scales_ptr = payload_pointers(payload_ptr, scales_at, BITS, SCALE_KIND)
    if HAS_NORM:
        if HAS_STATS:
            p, r = load_row_stats(stats_ptr, stride_stats, rows, kcols, n, k)
        else:
            s, sumsq = project_rows(a_ptr, stride_a, w_ptr, stride_wk, stride_wd, rows, n, d, k, 0, d,
                                    True, EVEN_D, UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
            r = inv_rms(sumsq, d, eps)
            p = s * r[:, None]
    # (after the loop over x: held through it, the tile took (BLOCK_N, k) registers more there)
    g_z = load_payload(codes_ptr, scales_ptr, rows, 0, n, k, BITS, GROUP, BLOCK_K)
    if HAS_NORM:
        alpha = rms_alpha(g_z, p, r, d)
        tl.store(alpha_ptr + rows, alpha, mask=rows < n)
        tl.store(r_ptr + rows, r, mask=rows < n)
        g_z = g_z * r[:, None]
    store_operand(z_ptr, rows, kcols, n, k, g_z)
