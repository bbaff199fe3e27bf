"""Tile helpers shared by the GEMM kernels: the tensor-core dot, weight tile
loads, operand stores, the d-streaming projection loop and the RMS statistic."""

import triton
import triton.language as tl

from .codec import KIND_BF16, KIND_F16, round_to_kind


@triton.jit
def mma(a, b, acc, op_dtype: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation, both operands rounded to ``op_dtype``
    (bf16/fp16 run on tensor cores). Under the interpreter (UPCAST) the rounded
    operands are multiplied in fp32, because its bf16 ``tl.dot`` is wrong: the
    products of 16-bit values are exact in fp32, so this is the GPU's arithmetic
    up to the order of the fp32 sums."""
    if UPCAST:
        return tl.dot(rounded(a, op_dtype), rounded(b, op_dtype), acc, input_precision=PRECISION)
    else:
        return tl.dot(a.to(op_dtype), b.to(op_dtype), acc, input_precision=PRECISION)


@triton.jit
def rounded(x, op_dtype: tl.constexpr):
    """x rounded to nearest even in ``op_dtype``, as fp32 (the interpreter's
    own fp32 -> bf16 cast truncates, unlike the GPU's operand conversion)."""
    if op_dtype == tl.bfloat16:
        return round_to_kind(x.to(tl.float32), KIND_BF16)
    elif op_dtype == tl.float16:
        return round_to_kind(x.to(tl.float32), KIND_F16)
    else:
        return x.to(tl.float32)


@triton.jit
def dequant_mma(zhat, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + zhat @ b where zhat holds dequantized payload values (fp32).

    bf16 b: on bf16 tensor cores (bf16 has fp32's range). fp16 b: on TF32
    tensor cores, fp16's precision with fp32's range -- fp16 operands would
    turn gradients below 6e-5 into subnormals (and overflow above 65504) where
    the reference works in fp32; the interpreter truncates the operands to
    TF32's 10 mantissa bits (the worst case of the GPU's conversion). fp32 b:
    PRECISION (tf32x3 on the GPU).
    """
    if b.dtype == tl.bfloat16:
        return mma(zhat, b, acc, tl.bfloat16, UPCAST, PRECISION)
    elif b.dtype == tl.float16:
        if UPCAST:
            return tl.dot(tf32_truncate(zhat), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(zhat, b.to(tl.float32), acc, input_precision="tf32")
    else:
        return mma(zhat, b, acc, tl.float32, UPCAST, PRECISION)


@triton.jit
def tf32_truncate(x):
    """fp32 -> fp32 with the low 13 mantissa bits cleared (TF32 by truncation)."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def load_w(w_ptr, kcols, dcols, k, d, stride_wk, stride_wd, EVEN_D: tl.constexpr):
    """(len(kcols), len(dcols)) tile of W viewed as k x d (w_e directly, w_d
    through its strides), 0 outside the matrix; EVEN_D: no column lies beyond d."""
    mask = tile_mask(kcols, dcols, k, d, EVEN_D)
    return tl.load(w_ptr + kcols[:, None] * stride_wk + dcols[None, :] * stride_wd, mask=mask, other=0.0)


@triton.jit
def tile_mask(rows, cols, n, ncols, EVEN_COLS: tl.constexpr):
    """rows < n and cols < ncols for a (len(rows), len(cols)) tile; EVEN_COLS: no
    column lies beyond ncols (a loop over whole tiles of d needs no column
    test, which saves address arithmetic in every iteration)."""
    if EVEN_COLS:
        return (rows < n)[:, None]
    else:
        return (rows < n)[:, None] & (cols < ncols)[None, :]


@triton.jit
def load_rows(ptr, stride, rows, cols, n, ncols, EVEN_COLS: tl.constexpr, CACHE: tl.constexpr):
    """Tile ptr[rows, cols] of a row-major matrix, 0 outside n x ncols;
    ``CACHE``: tl.load's cache modifier ("" for none; no default, which
    Triton 3.6 fails to compile when a caller leaves it out)."""
    mask = tile_mask(rows, cols, n, ncols, EVEN_COLS)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0,
                   cache_modifier=CACHE)


@triton.jit
def store_operand(ptr, rows, cols, n, ncols, v):
    """Store fp32 tile ``v`` as ptr[rows, cols] of a row-major (n, ncols)
    GEMM operand matrix, rounded to nearest even when it is bf16 (as the
    GPU's operand conversion; the interpreter's cast would truncate)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        v = round_to_kind(v, KIND_BF16)
    mask = tile_mask(rows, cols, n, ncols, False)
    tl.store(ptr + rows[:, None].to(tl.int64) * ncols + cols[None, :], v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def project_rows(a_ptr, stride_a, w_ptr, stride_wk, stride_wd, rows, n, d, k, d_begin, d_end,
                 HAS_NORM: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pass over A's rows, columns d_begin..d_end (whole rows: 0..d):
    acc = A[rows] @ W^T (BLOCK_N, BLOCK_K) and, when HAS_NORM, the rows' sums of
    squares. Through RMSNorm W is gamma * W_e, folded once per call by the
    launcher, so the normalised activations are never formed."""
    kcols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    # 16-bit A: the sums of squares are the diagonal of the rows' Gram matrix A A^T,
    # formed on the tensor cores from the tile the projection reads (shared memory):
    # the products of 16-bit values are exact in fp32, as in an FMA of the upcast
    # values. Summed per element in registers they took about 54 of the 138 sm_90 loop
    # instructions per KiB of x at k=128 with Triton 3.8 (this way ~9, 93 in all; with
    # 3.6 138 -> 104; tests/test_triton_static.py prints them), and a load of their own
    # from L2: when the MMA's operand load also fed the squares, Triton's software
    # pipeliner (3.6 and 3.8, sm_90) gave that operand one shared-memory buffer too
    # few, so the copy of a later tile could overwrite the one an asynchronous wgmma
    # was still reading (Triton issue 6691's pattern; on an H100, 2026-11-26, 3-30 %
    # of the rows wrong at d=4096). fp32 A keeps that per-element way (tl.fma: the
    # kernels run with fp fusion off): its 3xTF32 Gram matrix spills on sm_90.
    per_element = a_ptr.dtype.element_ty == tl.float32
    squares = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    gram = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    for d0 in range(d_begin, d_end, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        a = load_rows(a_ptr, stride_a, rows, dcols, n, d, EVEN_D, "")
        w = load_w(w_ptr, kcols, dcols, k, d, stride_wk, stride_wd, EVEN_D)
        if HAS_NORM and per_element:
            af = load_rows(a_ptr, stride_a, rows, dcols, n, d, EVEN_D, ".cg").to(tl.float32)
            squares = tl.fma(af, af, squares)
        elif HAS_NORM:
            gram = mma(a, tl.trans(a), gram, a.dtype, UPCAST, PRECISION)
        acc = mma(a, tl.trans(w), acc, a.dtype, UPCAST, PRECISION)
    if per_element:
        return acc, tl.sum(squares, axis=1)
    diagonal = tl.arange(0, BLOCK_N)[:, None] == tl.arange(0, BLOCK_N)[None, :]
    return acc, tl.sum(tl.where(diagonal, gram, 0.0), axis=1)


@triton.jit
def sum_splits(ptr, split_stride, offsets, mask, splits, AT_ONCE: tl.constexpr):
    """The sum over s < splits of ptr[s * split_stride + offsets] (a 2-D tile of
    offsets, 0 where not ``mask``), added in registers in split order, the loop
    copying AT_ONCE - 1 splits' tiles ahead with cp.async (its own num_stages).
    Added as each split's load came in, every add waited for its own load, one
    memory latency per split (the weight gradient's finish took 16-21 us for its
    16 MB of partials so on the H200 of 2026-11-27). AT_ONCE splits in one 3-D
    load, summed along its first axis, got a layout with the warps on the splits
    from Triton 3.6 (the GPUs'): the sum crossed warps through shared memory (the
    decoder's finish at k=128: 178 registers, 64 KB, 144 shared stores a thread;
    decode backward 101 -> 137 us on the H200 of 2026-11-28)."""
    total = tl.zeros(offsets.shape, tl.float32)
    for s in tl.range(0, splits, num_stages=AT_ONCE):
        total += tl.load(ptr + s * split_stride + offsets, mask=mask, other=0.0)
    return total


@triton.jit
def d_range(d, BLOCK_D: tl.constexpr):
    """This program's run of BLOCK_D tiles of d when the grid's axis 1 splits d
    (see configs.d_splits): equal runs of whole tiles, the last ones shorter or empty."""
    tiles = tl.cdiv(tl.cdiv(d, BLOCK_D), tl.num_programs(1))
    d_begin = tl.program_id(1) * tiles * BLOCK_D
    return d_begin, tl.minimum(d, d_begin + tiles * BLOCK_D)


@triton.jit
def store_row_stats(ptr, stride, rows, kcols, n, k, proj, r):
    """RMSNorm row statistics [proj | r] (fp32, row stride ``stride``): the
    normalised projection (BLOCK_N, BLOCK_K) and 1/rms (BLOCK_N,)."""
    base = ptr + rows.to(tl.int64) * stride
    tl.store(base[:, None] + kcols[None, :], proj, mask=tile_mask(rows, kcols, n, k, False))
    tl.store(base + k, r, mask=rows < n)


@triton.jit
def load_row_stats(ptr, stride, rows, kcols, n, k):
    """(proj, r) as stored by :func:`store_row_stats`, 0 outside the rows."""
    base = ptr + rows.to(tl.int64) * stride
    proj = tl.load(base[:, None] + kcols[None, :], mask=tile_mask(rows, kcols, n, k, False), other=0.0)
    return proj, tl.load(base + k, mask=rows < n, other=0.0)


@triton.jit
def rms_alpha(g_z, p, r, d):
    """Encode backward's per-row alpha = r^2 (g_z . p) / d through RMSNorm (see
    grad_operand), the division correctly rounded."""
    return tl.math.div_rn(r * r * tl.sum(g_z * p, axis=1), tl.full(r.shape, d, tl.float32))


@triton.jit
def inv_rms(sumsq, d, eps):
    """1 / sqrt(sumsq / d + eps), correctly rounded steps (as the reference)."""
    ms = tl.math.div_rn(sumsq, tl.full(sumsq.shape, d, tl.float32)) + eps
    return tl.math.div_rn(tl.full(sumsq.shape, 1.0, tl.float32), tl.math.sqrt_rn(ms))
