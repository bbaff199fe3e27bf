"""Encode forward and decode backward: stream the big (N, d) input once, project
it to k channels on tensor cores, add the identity path and write the quantized,
packed result straight into the payload (no N x k intermediate in memory).

Grid: one program per BLOCK_N rows. Each program keeps its (BLOCK_N, k) fp32
accumulator in registers while it walks d in BLOCK_D tiles, so the input is
read exactly once; W (k x d, small) is re-read from L2 by every program.
"""

import triton
import triton.language as tl

from .codec import store_payload
from .configs import autotune_project
from .tiles import inv_rms, load_rows, project_rows


@autotune_project
@triton.jit(do_not_specialize=["key"])  # an int argument equal to 1 would become a constant
def project_quantize_kernel(
    a_ptr, w_ptr, gamma_ptr, codes_ptr, scales_ptr,
    n, d, k, n_groups, stride_a, stride_wk, stride_wd, eps, key,
    HAS_NORM: tl.constexpr, BITS: tl.constexpr, GROUP_RESHAPE: tl.constexpr,
    SCALE_KIND: tl.constexpr, STOCHASTIC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """payload rows = quantize(r * (A @ (gamma * W)^T) + A[:, :k]); r = 1/rms(A)
    with the norm, else 1. The identity tile is loaded with the first d tile
    (same cache lines), the RMS is gathered during the same d loop."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ident = load_rows(a_ptr, stride_a, rows, tl.arange(0, BLOCK_K), n, k)
    acc, sumsq = project_rows(a_ptr, stride_a, w_ptr, stride_wk, stride_wd, gamma_ptr, rows, n, d, k,
                              HAS_NORM, UPCAST, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
    if HAS_NORM:
        acc = acc * inv_rms(sumsq, d, eps)[:, None]
    z = acc + ident.to(tl.float32)
    store_payload(z, rows, n, k, n_groups, codes_ptr, scales_ptr, key,
                  BITS, GROUP_RESHAPE, SCALE_KIND, STOCHASTIC, BLOCK_N, BLOCK_K)
