"""Tile helpers shared by the GEMM kernels: the tensor-core dot, weight tile
loads, the d-streaming projection loop and the RMS statistic."""

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, op_dtype: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. On the GPU both operands are cast to
    ``op_dtype`` (bf16/fp16 run on tensor cores); under the interpreter
    (UPCAST) they are cast to fp32, because its bf16 ``tl.dot`` is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        return tl.dot(a.to(op_dtype), b.to(op_dtype), acc, input_precision=PRECISION)


@triton.jit
def load_w(w_ptr, kcols, dcols, k, d, stride_wk, stride_wd):
    """(len(kcols), len(dcols)) tile of W viewed as k x d (w_e directly, w_d
    through its strides), 0 outside the matrix."""
    mask = (kcols < k)[:, None] & (dcols < d)[None, :]
    return tl.load(w_ptr + kcols[:, None] * stride_wk + dcols[None, :] * stride_wd, mask=mask, other=0.0)


@triton.jit
def load_rows(ptr, stride, rows, cols, n, ncols):
    """Tile ptr[rows, cols] of a row-major matrix, 0 outside n x ncols."""
    mask = (rows < n)[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def project_rows(a_ptr, stride_a, w_ptr, stride_wk, stride_wd, gamma_ptr, rows, n, d, k,
                 HAS_NORM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pass over A's rows: acc = A[rows] @ (gamma * W)^T (BLOCK_N, BLOCK_K)
    and, when HAS_NORM, the rows' sums of squares (gamma folded into the W tile,
    so the normalised activations are never formed)."""
    kcols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    sumsq = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        a = load_rows(a_ptr, stride_a, rows, dcols, n, d)
        w = load_w(w_ptr, kcols, dcols, k, d, stride_wk, stride_wd)
        if HAS_NORM:
            af = a.to(tl.float32)
            sumsq += tl.sum(af * af, axis=1)
            w = w.to(tl.float32) * tl.load(gamma_ptr + dcols, mask=dcols < d, other=0.0).to(tl.float32)[None, :]
        acc = mma(a, tl.trans(w), acc, a.dtype, UPCAST, PRECISION)
    return acc, sumsq


@triton.jit
def inv_rms(sumsq, d, eps):
    """1 / sqrt(sumsq / d + eps), correctly rounded steps (as the reference)."""
    ms = tl.math.div_rn(sumsq, tl.full(sumsq.shape, d, tl.float32)) + eps
    return tl.math.div_rn(tl.full(sumsq.shape, 1.0, tl.float32), tl.math.sqrt_rn(ms))
