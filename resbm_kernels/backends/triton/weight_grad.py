"""Weight gradients: M = Z^T @ A summed over rows, where Z (N x k, small) is
the dequantized payload already scaled per row (written by the main kernel of
the same backward pass, see :mod:`.project_quantize` and :mod:`.dequant_project`).

This is a separate pass over A (grad_h for decode backward, x for encode
backward): a d x k reduction over N cannot share the row-blocked main kernels
without per-program d x k partials or atomics. Both operands stream through
shared memory straight into the tensor cores, so the loop does no per-element
work. Grid: (d tiles, row splits); each program walks its rows and writes one
fp32 partial; the host sums the few splits (deterministic, no atomics, safe
to autotune).
"""

import triton
import triton.language as tl

from .configs import autotune_wgrad
from .tiles import dequant_mma, load_rows


@autotune_wgrad
@triton.jit
def weight_grad_kernel(
    a_ptr, z_ptr, out_ptr,
    n, d, k, stride_a, rows_per_split, stride_os, stride_ok, stride_od,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[split, c, j] = sum_{rows of split} Z[r, c] * A[r, j]."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    kcols = tl.arange(0, BLOCK_K)
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, n)
    acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        a = load_rows(a_ptr, stride_a, rows, dcols, end, d)
        z = load_rows(z_ptr, k, rows, kcols, end, k)
        acc = dequant_mma(tl.trans(z), a, acc, UPCAST, PRECISION)
    mask = (kcols < k)[:, None] & (dcols < d)[None, :]
    tl.store(out_ptr + pid_s * stride_os + kcols[:, None] * stride_ok + dcols[None, :] * stride_od, acc, mask=mask)
