"""Decode forward: read a payload, dequantize it in registers and expand it to
d channels on tensor cores, writing the big (N, d) output exactly once.

Encode backward's grad_x is the same work on the gradient payload with W_e
(same tiles, the input x in place of the residual): through RMSNorm
(HAS_NORM) the operand is scaled per row by r = 1/rms(x), the product per
column by gamma, and x enters times -alpha per row (see :mod:`.grad_operand`);
given encode forward's row statistics (HAS_STATS) the prologue forms r and
alpha from them, and with WRITE_Z the first d split's programs also store the
scaled operand Z = r * g_z for the weight gradient.

Grid: (row blocks of BLOCK_N, d splits); the (BLOCK_N, k) dequantized tile stays
in registers while the program walks its share of d in BLOCK_D tiles, its loop
software-pipelined STAGES deep (the config's num_stages, configs.LoopConstants):
the tiles of W, and of x or the residual, are copied into shared memory that
many tiles ahead. Output columns are independent, so d is split between
programs (same results; each program dequantizes its rows once) when there
are fewer row blocks than the device runs programs at once (small N: the
launcher's split), and by D_SPLIT, a tuned constant of the config (large N:
64-row blocks give a GPU about two programs an SM at N=16384).
"""

import triton
import triton.language as tl

from .codec import load_payload, payload_pointers, round_to_kind
from .configs import LoopConstants, autotune_dequant
from .tiles import d_range, dequant_mma, load_row_stats, load_rows, load_w, rms_alpha, store_operand, tile_mask
from .weight_grad import fused_row_block


@autotune_dequant
@LoopConstants
@triton.jit(do_not_specialize=["n"])
def dequant_project_kernel(
    payload_ptr, w_ptr, res_ptr, out_ptr, r_ptr, gamma_ptr, alpha_ptr, stats_ptr, z_ptr, wgrad_ptr,
    n, d, k, scales_at, stride_wk, stride_wd, stride_res, stride_out, stride_stats, chunk_rows,
    BITS: tl.constexpr, GROUP: tl.constexpr, SCALE_KIND: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_STATS: tl.constexpr, WRITE_Z: tl.constexpr, OUT_KIND: tl.constexpr,
    EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr, FUSED_WGRAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr, D_SPLIT: tl.constexpr,
):
    """out = zhat @ W + pad_d(zhat) (+ residual), W the k x d matrix, zhat
    the payload (scales of SCALE_KIND at byte ``scales_at``, one per GROUP
    columns: see codec.load_payload).

    HAS_NORM (encode backward through RMSNorm, residual = x):
    out = gamma * ((r * zhat) @ W) - alpha * x + pad_d(zhat), r and alpha per
    row from r_ptr / alpha_ptr, or with HAS_STATS from the (n, k + 1) row
    statistics [p | r] at stats_ptr: alpha = r^2 (zhat . p) / d.
    WRITE_Z: Z = r * zhat (zhat without the norm) stored at z_ptr (n, k)
    by the programs whose run of d starts at column 0.
    FUSED_WGRAD (encode backward, x at res_ptr also without the norm): the grid
    also holds the weight gradient's programs (weight_grad.fused_row_block, chunks
    of ``chunk_rows`` rows), which write one (k, d) fp32 partial of Z^T x per
    chunk into wgrad, Z the (N, k) operand at z_ptr."""
    block = tl.program_id(0)
    work = True
    if FUSED_WGRAD:  # (the (k, d) partials of grad W_e)
        block, work = fused_row_block(res_ptr, stride_res, z_ptr, wgrad_ptr, d, 1, n, d, k, chunk_rows,
                                      UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
    if work:
        dequant_project_block(payload_ptr, w_ptr, res_ptr, out_ptr, r_ptr, gamma_ptr, alpha_ptr, stats_ptr, z_ptr,
                              block, n, d, k, scales_at, stride_wk, stride_wd, stride_res, stride_out, stride_stats,
                              BITS, GROUP, SCALE_KIND, HAS_RES, HAS_NORM, HAS_STATS, WRITE_Z, OUT_KIND, EVEN_D,
                              SPLIT_D or D_SPLIT > 1, UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D, STAGES)


@triton.jit
def dequant_project_block(
    payload_ptr, w_ptr, res_ptr, out_ptr, r_ptr, gamma_ptr, alpha_ptr, stats_ptr, z_ptr, block,
    n, d, k, scales_at, stride_wk, stride_wd, stride_res, stride_out, stride_stats,
    BITS: tl.constexpr, GROUP: tl.constexpr, SCALE_KIND: tl.constexpr, HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr,
    HAS_STATS: tl.constexpr, WRITE_Z: tl.constexpr, OUT_KIND: tl.constexpr,
    EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    """dequant_project_kernel's work for row block ``block``."""
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    kcols = tl.arange(0, BLOCK_K)
    d_begin, d_end = 0, d
    if SPLIT_D:
        d_begin, d_end = d_range(d, BLOCK_D)
    codes_ptr, scales_ptr = payload_pointers(payload_ptr, scales_at, BITS, SCALE_KIND)
    zhat = load_payload(codes_ptr, scales_ptr, rows, 0, n, k, BITS, GROUP, BLOCK_K)
    if HAS_NORM:
        if HAS_STATS:  # r and alpha from encode forward's row statistics (see grad_operand)
            p, r = load_row_stats(stats_ptr, stride_stats, rows, kcols, n, k)
            alpha = rms_alpha(zhat, p, r, d)
        else:
            r = tl.load(r_ptr + rows, mask=rows < n, other=0.0)
            alpha = tl.load(alpha_ptr + rows, mask=rows < n, other=0.0)
        zhat = zhat * r[:, None]
    if WRITE_Z:  # the weight gradient's operand Z = r * g_z (g_z without the norm), once per row
        if d_begin == 0:
            store_operand(z_ptr, rows, kcols, n, k, zhat)
    # STAGES on the loop itself: then Triton's software pipeliner copies x (or the residual) and
    # gamma ahead through shared memory like the dot's operand W, STAGES - 1 tiles in flight;
    # with the stages left to the launch option it prefetches only W (x loaded in the loop:
    # encode backward 9-29 % slower, H200 2026-11-28, N=16384, d=4096, autotuned)
    for d0 in tl.range(d_begin, d_end, BLOCK_D, num_stages=STAGES):
        dcols = d0 + tl.arange(0, BLOCK_D)
        if HAS_NORM or HAS_RES:
            x = load_rows(res_ptr, stride_res, rows, dcols, n, d, EVEN_D, "").to(tl.float32)
        w = load_w(w_ptr, kcols, dcols, k, d, stride_wk, stride_wd, EVEN_D)
        h = dequant_mma(zhat, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), UPCAST, PRECISION)
        if HAS_NORM:
            g = tl.load(gamma_ptr + dcols, mask=dcols < d, other=0.0).to(tl.float32)
            # one FMA (one rounding on the GPU, two under the interpreter): x then joins the
            # product's MMA layout as its 16-bit tile; given x * alpha as a value of its own,
            # Triton moved that fp32 tile through shared memory instead, twice the bytes (sm_90,
            # k=32, 64x64 w8: steady loop 227 -> 198 instructions per KiB of x, barriers 10 -> 7)
            h = tl.fma(x, -alpha[:, None], h * g[None, :])
        if d0 < k:
            # identity path: re-dequantize the (cache-hot) payload columns d0..
            h += load_payload(codes_ptr, scales_ptr, rows, d0, n, k, BITS, GROUP, BLOCK_D)
        if HAS_RES:
            h += x
        mask = tile_mask(rows, dcols, n, d, EVEN_D)
        out = round_to_kind(h, OUT_KIND).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + dcols[None, :], out, mask=mask)
