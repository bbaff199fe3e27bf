"""Decode forward and encode backward: read a payload, dequantize it in
registers and expand it to d channels on tensor cores, writing the big (N, d)
output exactly once.

Grid: one program per BLOCK_N rows; the (BLOCK_N, k) dequantized tile stays in
registers while the program walks d in BLOCK_D tiles.

Encode backward with RMSNorm needs two per-row scalars before any grad_x
element can be written: r = 1/rms(x) and mean(g_xhat * xhat), which reduces to
k-dim quantities: sum_j g_xhat_j xhat_j = r * sum_c g_z_c s_c with
s = x @ (gamma * W_e)^T. A first d loop (the encode forward's projection)
recomputes r and s, so x is read twice in that case (once without the norm).
Encode backward also writes the operand of the weight-gradient pass,
Z = r * g_z (N x k, in that GEMM's dtype).
"""

import triton
import triton.language as tl

from .codec import load_payload, round_to_kind
from .configs import autotune_dequant
from .tiles import dequant_mma, inv_rms, load_rows, load_w, project_rows, store_operand


@autotune_dequant
@triton.jit
def dequant_project_kernel(
    codes_ptr, scales_ptr, w_ptr, x_ptr, gamma_ptr, res_ptr, out_ptr, z_ptr,
    n, d, k, group, stride_wk, stride_wd, stride_x, stride_res, stride_out, eps,
    BITS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, OUT_KIND: tl.constexpr,
    WRITE_Z: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = zhat @ W + pad_d(zhat) (+ residual), W the k x d matrix.

    With HAS_NORM (encode backward through RMSNorm, zhat = g_z, W = w_e):
    out = r * gamma * (g_z @ W) - x * r^3 * (g_z . s) / d + pad_d(g_z).
    With WRITE_Z (encode backward): Z[rows] = r * g_z (r = 1 without the norm).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kcols = tl.arange(0, BLOCK_K)
    zhat = load_payload(codes_ptr, scales_ptr, rows[:, None], kcols[None, :], n, k, group, BITS)
    if HAS_NORM:
        s, sumsq = project_rows(x_ptr, stride_x, w_ptr, stride_wk, stride_wd, gamma_ptr, rows, n, d, k,
                                True, UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        r = inv_rms(sumsq, d, eps)
        alpha = tl.math.div_rn(r * r * r * tl.sum(zhat * s, axis=1), tl.full(r.shape, d, tl.float32))
    if WRITE_Z:  # before the loop: stored later, zhat stays live and the k=256 fallback spills
        store_operand(z_ptr, rows, kcols, n, k, zhat * r[:, None] if HAS_NORM else zhat)
    for d0 in range(0, d, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        w = load_w(w_ptr, kcols, dcols, k, d, stride_wk, stride_wd)
        h = dequant_mma(zhat, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), UPCAST, PRECISION)
        if HAS_NORM:
            g = tl.load(gamma_ptr + dcols, mask=dcols < d, other=0.0).to(tl.float32)
            xt = load_rows(x_ptr, stride_x, rows, dcols, n, d).to(tl.float32)
            h = r[:, None] * (h * g[None, :]) - xt * alpha[:, None]
        if d0 < k:
            # identity path: re-dequantize the (cache-hot) payload columns d0..
            h += load_payload(codes_ptr, scales_ptr, rows[:, None], dcols[None, :], n, k, group, BITS)
        if HAS_RES:
            h += load_rows(res_ptr, stride_res, rows, dcols, n, d).to(tl.float32)
        mask = (rows < n)[:, None] & (dcols < d)[None, :]
        out = round_to_kind(h, OUT_KIND).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + dcols[None, :], out, mask=mask)
