"""Weight gradients: M = Z^T @ A summed over rows, where Z (N x k, small) is
the dequantized payload already scaled per row (written by decode backward's
main kernel, see :mod:`.project_quantize`, or by :mod:`.grad_operand` for
encode backward).

A d x k reduction over N cannot share a row-blocked kernel without per-program
d x k partials or atomics, so this pass is d-tile major and reads the (N, d)
input once more: decode backward's main kernel needs whole rows of g_z before
it can quantize, and encode backward's grad_x is a rows kernel like decode
forward (:mod:`.dequant_project`). Both operands stream through shared memory
straight into the tensor cores, so the loop does no per-element work. Grid:
(d tiles, row splits); each program walks its rows and writes one fp32
partial (deterministic, no atomics, safe to autotune);
``finish_weight_grad_kernel`` sums the few splits in a fixed order and does
the rest in one launch (the encoder's RMSNorm factors, the cast to the
weights' dtype), where torch ops took up to eight small kernels.

Fused (``RESBM_TRITON_FUSED_WGRAD=1``; off by default, see below):
the same programs join the main kernel's launch instead (:func:`fused_row_block`),
so that the second read of the input comes from L2. That grid walks the rows
in chunks of about 16 MiB of input (an H100 has 50 MB of L2), each chunk's
row blocks and then its weight-gradient tiles over the same rows; a GPU
starts programs about in grid order (which the grouped program order of
Triton's matmul tutorial relies on for L2 reuse too), so both reads of a chunk
should fall within microseconds of each other, whichever comes first. Each
such program covers one chunk and one BLOCK_D tile (one partial per chunk,
summed as above: fp32 (k, d) each, so 2k / chunk rows of a 16-bit input's
size, against at most 8 partials for the separate pass). Decode backward's Z
is then written before the launch, by :mod:`.grad_operand`'s kernel without
the norm (its row blocks would write it too late; dequantizing the payload in
every weight-gradient program took 4-5x the loop instructions).
On an H200 the fused launch cut DRAM traffic by a quarter to a third (not
the half a full L2 hit gives) and was faster only for decode backward at
k <= 64; one pass writing encode backward's grad_x from this pass's x tiles
was no faster either and was removed (bench/HISTORY.md, "The backward
passes' structure").
"""

import triton
import triton.language as tl

from .codec import round_to_kind
from .configs import autotune_wgrad
from .tiles import dequant_mma, load_rows, load_w, sum_splits, tile_mask


@autotune_wgrad
@triton.jit(do_not_specialize=["n", "rows_per_split"])
def weight_grad_kernel(
    a_ptr, z_ptr, out_ptr,
    n, d, k, stride_a, rows_per_split, stride_os, stride_ok, stride_od,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[split, c, j] = sum_{rows of split} Z[r, c] * A[r, j]."""
    pid_s = tl.program_id(1)
    dcols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    start = pid_s * rows_per_split
    acc = accumulate_weight_grad(a_ptr, stride_a, z_ptr, start, tl.minimum(start + rows_per_split, n),
                                 dcols, d, k, UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
    store_partial(out_ptr + pid_s * stride_os, acc, dcols, d, k, stride_ok, stride_od, BLOCK_K)


@triton.jit
def accumulate_weight_grad(a_ptr, stride_a, z_ptr, start, end, dcols, d, k,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum over rows start..end-1 of Z[r, :]^T A[r, dcols]: a (BLOCK_K, BLOCK_D) fp32 tile."""
    kcols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        a = load_rows(a_ptr, stride_a, rows, dcols, end, d, False, "")  # (the column test is loop-invariant here)
        z = load_rows(z_ptr, k, rows, kcols, end, k, False, "")
        acc = dequant_mma(tl.trans(z), a, acc, UPCAST, PRECISION)
    return acc


@triton.jit
def store_partial(ptr, acc, dcols, d, k, stride_ok, stride_od, BLOCK_K: tl.constexpr):
    """Store a (BLOCK_K, len(dcols)) weight-gradient tile at ptr[c, j] (strides in elements)."""
    kcols = tl.arange(0, BLOCK_K)
    tl.store(ptr + kcols[:, None] * stride_ok + dcols[None, :] * stride_od, acc,
             mask=tile_mask(kcols, dcols, k, d, False))


@triton.jit
def fused_row_block(a_ptr, stride_a, z_ptr, out_ptr, stride_ok, stride_od, n, d, k, chunk_rows,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(row block, whether it has rows) of this program in a launch that fuses a
    rows kernel with the weight gradient of its input A (see the module's note).
    The grid walks chunks of ``chunk_rows`` rows, each chunk's row blocks first,
    then its weight-gradient programs, one per BLOCK_D columns: such a program
    stores the chunk's partial tile of Z^T A (chunk c's (k, d) partial at
    out + c * k * d, strides stride_ok, stride_od) and has no row block."""
    blocks = chunk_rows // BLOCK_N
    per_chunk = blocks + tl.cdiv(d, BLOCK_D)
    chunk = tl.program_id(0) // per_chunk
    local = tl.program_id(0) - chunk * per_chunk
    if local >= blocks:
        start = chunk * chunk_rows
        dcols = (local - blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = accumulate_weight_grad(a_ptr, stride_a, z_ptr, start, tl.minimum(start + chunk_rows, n), dcols, d, k,
                                     UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        store_partial(out_ptr + chunk.to(tl.int64) * k * d, acc, dcols, d, k, stride_ok, stride_od, BLOCK_K)
    block = chunk * blocks + local
    return block, (local < blocks) & (block * BLOCK_N < n)  # (the last chunk's row blocks past n have none)


@triton.jit(do_not_specialize=["splits"])  # (grows with n in the fused passes: one compiled variant)
def finish_weight_grad_kernel(
    part_ptr, w_ptr, gamma_ptr, out_ptr, grad_gamma_ptr,
    splits, d, k, stride_ps, stride_pk, stride_pd, stride_wk, stride_wd, stride_ok, stride_od,
    AT_ONCE: tl.constexpr, HAS_NORM: tl.constexpr, OUT_KIND: tl.constexpr, GAMMA_KIND: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """M = the sum of part[s] over s = 0..splits-1, M viewed k x d through the
    strides (decode backward's (d, k) layout too); out = M, or with HAS_NORM
    (encoder, W = w_e): out = M * gamma[j] and grad_gamma[j] = sum_c W[c, j] * M[c, j].
    Each rounded once to its output's dtype. The partials come AT_ONCE splits in
    flight (tiles.sum_splits)."""
    dcols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    kcols = tl.arange(0, BLOCK_K)
    mask = tile_mask(kcols, dcols, k, d, False)
    offsets = kcols[:, None] * stride_pk + dcols[None, :] * stride_pd
    m = sum_splits(part_ptr, stride_ps, offsets, mask, splits, AT_ONCE)
    if HAS_NORM:
        w = load_w(w_ptr, kcols, dcols, k, d, stride_wk, stride_wd, False).to(tl.float32)
        grad_gamma = round_to_kind(tl.sum(w * m, axis=0), GAMMA_KIND)
        tl.store(grad_gamma_ptr + dcols, grad_gamma.to(grad_gamma_ptr.dtype.element_ty), mask=dcols < d)
        m = m * tl.load(gamma_ptr + dcols, mask=dcols < d, other=0.0).to(tl.float32)[None, :]
    out = round_to_kind(m, OUT_KIND).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + kcols[:, None] * stride_ok + dcols[None, :] * stride_od, out, mask=mask)
