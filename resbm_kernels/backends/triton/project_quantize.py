"""Encode forward and decode backward: stream the big (N, d) input once, project
it to k channels on tensor cores, add the identity path and write the quantized,
packed result straight into the payload (no N x k intermediate in memory).

Grid: one program per BLOCK_N rows. Each program keeps its (BLOCK_N, k) fp32
accumulator in registers while it walks d in BLOCK_D tiles, so the input is
read exactly once; W (k x d, small) is re-read from L2 by every program.
With fewer row blocks than the device runs programs at once (small N,
configs.d_splits) the grid's axis 1 splits d instead: each program writes its
partial projection and sums of squares (fp32, (splits, N, k + 1)), and
``finish_rows_kernel`` adds them up in a fixed order and does the rest.

Decode backward also writes the operand of the weight-gradient pass: the
forward payload dequantized, Z = zhat (N x k, in that GEMM's dtype), so the
second pass over grad_h streams both operands without per-element work.
Encode forward through RMSNorm can also write the row statistics encode
backward needs (see :mod:`.grad_operand`), so that pass need not re-read x.
"""

import triton
import triton.language as tl

from .codec import load_payload, payload_pointers, rng_key, store_header, store_payload
from .configs import LoopConstants, autotune_project_quantize
from .tiles import d_range, inv_rms, load_rows, project_rows, store_operand, store_row_stats, sum_splits
from .weight_grad import fused_row_block


@autotune_project_quantize
@LoopConstants
# n (also the header's word hdr2) and the seed change from call to call: specialised (to a
# constant when 1, as aligned when divisible by 16) they would compile new variants mid-training
@triton.jit(do_not_specialize=["n", "seed_lo", "seed_hi", "hdr2"])
def project_quantize_kernel(
    a_ptr, w_ptr, payload_ptr, zpayload_ptr, z_ptr, stats_ptr, part_ptr, wgrad_ptr,
    n, d, k, n_groups, scales_at, zscales_at, stride_a, stride_wk, stride_wd, stride_stats, eps,
    seed_lo, seed_hi, seed_offset_ptr,
    hdr0, hdr1, hdr2, hdr3, chunk_rows,
    HAS_NORM: tl.constexpr, BITS: tl.constexpr, GROUP_RESHAPE: tl.constexpr,
    SCALE_KIND: tl.constexpr, STOCHASTIC: tl.constexpr, SEED_OFFSET: tl.constexpr, ZBITS: tl.constexpr,
    ZGROUP: tl.constexpr, ZSCALE_KIND: tl.constexpr,
    WRITE_STATS: tl.constexpr, EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr, FUSED_WGRAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """payload rows = quantize(r * (A @ W^T) + A[:, :k]); r = 1/rms(A) with the
    norm (W then holds gamma * W_e), else 1; program 0 also writes the header
    (words hdr0..3) and the codes padding. The identity tile is loaded with the first d tile
    (same cache lines), the RMS is gathered during the same d loop.

    The payload's scales start at byte ``scales_at`` (see payload_pointers).
    ZBITS > 0 (decode backward): also Z[rows] = dequantize(zpayload), the
    forward payload of ZBITS bits, scale group ZGROUP (see codec.load_payload),
    scales of ZSCALE_KIND at byte ``zscales_at``.
    WRITE_STATS (with the norm): also stats[rows] = [r * (A @ W^T) | r].
    SPLIT_D: only this program's partial [A @ W^T | sum of squares] over its
    run of d, into part[program_id(1)] (see finish_rows_kernel).
    FUSED_WGRAD (decode backward, ZBITS = 0): the grid also holds the weight
    gradient's programs (weight_grad.fused_row_block, chunks of ``chunk_rows``
    rows), which write one (d, k) fp32 partial of Z^T A per chunk into wgrad,
    Z the (N, k) operand at z_ptr, written before the launch."""
    block = tl.program_id(0)
    work = True
    if FUSED_WGRAD:  # (the (d, k) partials of grad W_d)
        block, work = fused_row_block(a_ptr, stride_a, z_ptr, wgrad_ptr, 1, k, n, d, k, chunk_rows,
                                      UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
    if work:
        project_block(a_ptr, w_ptr, payload_ptr, zpayload_ptr, z_ptr, stats_ptr, part_ptr, block,
                      n, d, k, n_groups, scales_at, zscales_at, stride_a, stride_wk, stride_wd,
                      stride_stats, eps, seed_lo, seed_hi, seed_offset_ptr, hdr0, hdr1, hdr2, hdr3,
                      HAS_NORM, BITS, GROUP_RESHAPE, SCALE_KIND, STOCHASTIC, SEED_OFFSET, ZBITS, ZGROUP, ZSCALE_KIND,
                      WRITE_STATS, EVEN_D, SPLIT_D, UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)


@triton.jit
def project_block(
    a_ptr, w_ptr, payload_ptr, zpayload_ptr, z_ptr, stats_ptr, part_ptr, block,
    n, d, k, n_groups, scales_at, zscales_at, stride_a, stride_wk, stride_wd, stride_stats, eps,
    seed_lo, seed_hi, seed_offset_ptr,
    hdr0, hdr1, hdr2, hdr3,
    HAS_NORM: tl.constexpr, BITS: tl.constexpr, GROUP_RESHAPE: tl.constexpr,
    SCALE_KIND: tl.constexpr, STOCHASTIC: tl.constexpr, SEED_OFFSET: tl.constexpr, ZBITS: tl.constexpr,
    ZGROUP: tl.constexpr, ZSCALE_KIND: tl.constexpr,
    WRITE_STATS: tl.constexpr, EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """project_quantize_kernel's work for row block ``block``."""
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    kcols = tl.arange(0, BLOCK_K)
    if ZBITS != 0 and not SPLIT_D:
        store_z_operand(zpayload_ptr, zscales_at, z_ptr, rows, kcols, n, k, ZBITS, ZGROUP, ZSCALE_KIND, BLOCK_K)
    if SPLIT_D:
        d_begin, d_end = d_range(d, BLOCK_D)
        acc, sumsq = project_rows(a_ptr, stride_a, w_ptr, stride_wk, stride_wd, rows, n, d, k, d_begin, d_end,
                                  HAS_NORM, EVEN_D, UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        store_row_stats(part_ptr + tl.program_id(1) * (n * (k + 1)), k + 1, rows, kcols, n, k, acc, sumsq)
    else:
        if block == 0:
            store_header(payload_ptr, hdr0, hdr1, hdr2, hdr3, n, k, BITS)
        ident = load_rows(a_ptr, stride_a, rows, kcols, n, k, False, "")
        acc, sumsq = project_rows(a_ptr, stride_a, w_ptr, stride_wk, stride_wd, rows, n, d, k, 0, d,
                                  HAS_NORM, EVEN_D, UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        quantize_rows(acc, sumsq, ident, rows, payload_ptr, scales_at, stats_ptr,
                      n, d, k, n_groups, stride_stats, eps, seed_lo, seed_hi, seed_offset_ptr,
                      HAS_NORM, BITS, GROUP_RESHAPE, SCALE_KIND, STOCHASTIC, SEED_OFFSET, WRITE_STATS, BLOCK_N, BLOCK_K)


@triton.jit(do_not_specialize=["n", "seed_lo", "seed_hi", "hdr2"])
def finish_rows_kernel(
    a_ptr, part_ptr, payload_ptr, zpayload_ptr, z_ptr, stats_ptr,
    n, d, k, splits, n_groups, scales_at, zscales_at, stride_a, stride_stats, eps, seed_lo, seed_hi, seed_offset_ptr,
    hdr0, hdr1, hdr2, hdr3,
    HAS_NORM: tl.constexpr, BITS: tl.constexpr, GROUP_RESHAPE: tl.constexpr,
    SCALE_KIND: tl.constexpr, STOCHASTIC: tl.constexpr, SEED_OFFSET: tl.constexpr, ZBITS: tl.constexpr,
    ZGROUP: tl.constexpr, ZSCALE_KIND: tl.constexpr,
    WRITE_STATS: tl.constexpr, AT_ONCE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The rest of project_quantize_kernel after a SPLIT_D launch: the sum of
    the ``splits`` (n, k + 1) partials [proj | sumsq], AT_ONCE splits in flight
    (tiles.sum_splits), then as there. (Offsets in int32: d is split only while
    N is small.)"""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kcols = tl.arange(0, BLOCK_K)
    if ZBITS != 0:
        store_z_operand(zpayload_ptr, zscales_at, z_ptr, rows, kcols, n, k, ZBITS, ZGROUP, ZSCALE_KIND, BLOCK_K)
    if tl.program_id(0) == 0:
        store_header(payload_ptr, hdr0, hdr1, hdr2, hdr3, n, k, BITS)
    row_at = rows[:, None] * (k + 1)
    in_rows = rows[:, None] < n
    acc = sum_splits(part_ptr, n * (k + 1), row_at + kcols[None, :], in_rows & (kcols[None, :] < k), splits, AT_ONCE)
    sumsq = tl.sum(sum_splits(part_ptr, n * (k + 1), row_at + k, in_rows, splits, AT_ONCE), axis=1)
    # (loaded after the sums: held through them, the tile spilled at k=256 on sm_80)
    ident = load_rows(a_ptr, stride_a, rows, kcols, n, k, False, "")
    quantize_rows(acc, sumsq, ident, rows, payload_ptr, scales_at, stats_ptr,
                  n, d, k, n_groups, stride_stats, eps, seed_lo, seed_hi, seed_offset_ptr,
                  HAS_NORM, BITS, GROUP_RESHAPE, SCALE_KIND, STOCHASTIC, SEED_OFFSET, WRITE_STATS, BLOCK_N, BLOCK_K)


@triton.jit
def quantize_rows(acc, sumsq, ident, rows, payload_ptr, scales_at, stats_ptr, n, d, k, n_groups, stride_stats, eps,
                  seed_lo, seed_hi, seed_offset_ptr,
                  HAS_NORM: tl.constexpr, BITS: tl.constexpr, GROUP_RESHAPE: tl.constexpr,
                  SCALE_KIND: tl.constexpr, STOCHASTIC: tl.constexpr, SEED_OFFSET: tl.constexpr,
                  WRITE_STATS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """From the rows' projection A @ W^T, sums of squares and identity tile
    A[:, :k]: the payload rows and, with the norm, the row statistics (see
    project_quantize_kernel). Stochastic rounding keys on the seed (seed_hi,
    seed_lo), plus with SEED_OFFSET the int64 at seed_offset_ptr (codec.rng_key)."""
    kcols = tl.arange(0, BLOCK_K)
    if HAS_NORM:
        r = inv_rms(sumsq, d, eps)
        acc = acc * r[:, None]
        if WRITE_STATS:
            store_row_stats(stats_ptr, stride_stats, rows, kcols, n, k, acc, r)
    z = acc + ident.to(tl.float32)
    codes_ptr, scales_ptr = payload_pointers(payload_ptr, scales_at, BITS, SCALE_KIND)
    key = rng_key(seed_lo, seed_hi, seed_offset_ptr, SEED_OFFSET) if STOCHASTIC else 0
    store_payload(z, rows, n, k, n_groups, codes_ptr, scales_ptr, key,
                  BITS, GROUP_RESHAPE, SCALE_KIND, STOCHASTIC, BLOCK_N, BLOCK_K)


@triton.jit
def store_z_operand(zpayload_ptr, zscales_at, z_ptr, rows, kcols, n, k, ZBITS: tl.constexpr, ZGROUP: tl.constexpr,
                    ZSCALE_KIND: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode backward's Z[rows] = dequantize(forward payload rows)."""
    zcodes_ptr, zscales_ptr = payload_pointers(zpayload_ptr, zscales_at, ZBITS, ZSCALE_KIND)
    zhat = load_payload(zcodes_ptr, zscales_ptr, rows, 0, n, k, ZBITS, ZGROUP, BLOCK_K)
    store_operand(z_ptr, rows, kcols, n, k, zhat)
