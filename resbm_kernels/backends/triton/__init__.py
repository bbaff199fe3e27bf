"""Triton backend: the four fused passes as Triton kernels.

Same signatures and return conventions as
:mod:`resbm_kernels.backends.reference`. Runs on CUDA, and on the CPU under
``TRITON_INTERPRET=1`` (for tests). Extra requirements over the reference:
d and k multiples of 16, k <= 256 (larger tiles spill or outgrow shared
memory on the GPU, see ``fast.MAX_K``; the same under the interpreter),
float32/float16/bfloat16 inputs, and a scale group that is a power of two or
the whole row.

Kernels (one family per module):

- :mod:`.project_quantize`: encode forward and decode backward (read the
  (N, d) input once, write codes + scales into the payload);
- :mod:`.dequant_project`: decode forward (read the payload, write the (N, d)
  output once), and encode backward's grad_x (the same with x read once);
- :mod:`.weight_grad`: the weight gradients, a d-tile-major pass over the
  (N, d) input that reduces over rows, its (N, k) operand Z being the
  dequantized payload scaled per row; a small second kernel sums its
  per-split partials;
- :mod:`.grad_operand`: encode backward's Z and per-row RMSNorm terms, from
  the gradient payload (and with the norm, one read of x);
- :mod:`.codec`: the per-element codec helpers all of them share;
- :mod:`.tiles`, :mod:`.configs`: shared GEMM tile helpers, launch configs.

Reads of the big (N, d) tensor: encode forward and decode forward once;
decode backward twice; encode backward twice through RMSNorm, once without
(grad_x then needs no x), and once more through RMSNorm without the row
statistics encode forward can return (``row_stats``). The backward passes'
weight gradient is a second, d-tile-major pass: decode backward's main
kernel needs whole rows of g_z to quantize, and encode backward's grad_x is
a rows kernel, which measured faster than one d-tile-major pass doing both
(bench/HISTORY.md, "The backward passes' structure"). With
``RESBM_TRITON_FUSED_WGRAD=1`` (0 or 1; off by default: on an H200 it was
slower but for decode backward at k <= 64) its programs join the main
kernel's launch, interleaved by chunks of rows so that the second read may
hit L2 (see :mod:`.weight_grad`).

Precision: GEMMs accumulate in fp32. bf16 inputs run on bf16 tensor cores;
fp32 inputs on 3xTF32; fp16 inputs on fp16 tensor cores, except the GEMMs
whose operand is a dequantized payload (decode forward, encode backward,
weight gradients), which run on TF32 (fp16's precision, fp32's range: the
gradients of unscaled fp16 training are often fp16 subnormals). Under the
interpreter the operands are rounded the same way (see :mod:`.tiles`).

Non-finite inputs are not detected here (no device sync): they produce inf /
NaN scales or codes of 0, where the reference raises.
"""

from __future__ import annotations

import functools
import os

import torch

from ...codec import Codec, header_words, payload_layout
from ... import checks
from .. import fast
from . import configs
from .codec import KIND_BF16, KIND_F16, KIND_F32
from .dequant_project import dequant_project_kernel
from .grad_operand import grad_operand_kernel
from .project_quantize import finish_rows_kernel, project_quantize_kernel
from .weight_grad import finish_weight_grad_kernel, weight_grad_kernel

# the autotuned kernels by name (the benchmarks and the static check enumerate them)
KERNELS = dict(project_quantize=project_quantize_kernel, dequant_project=dequant_project_kernel,
               grad_operand=grad_operand_kernel, weight_grad=weight_grad_kernel)
# each one's register model (configs.tile_regs kind)
TILE_KINDS = dict(project_quantize="project", dequant_project="dequant", grad_operand="project", weight_grad="wgrad")

# on: the backward passes form their weight gradients in their main kernel's launch (weight_grad.fused_row_block)
FUSED_WGRAD_SWITCH = "RESBM_TRITON_FUSED_WGRAD"
FINISH_ROWS, FINISH_WARPS = 32, 4  # finish_rows_kernel's launch (no GEMM, not tuned; 64 rows spill at k=256)
SPLITS_AT_ONCE = 8  # most partials a finishing kernel has in flight at once (tiles.sum_splits)
WGRAD_SPLITS = SPLITS_AT_ONCE  # row splits of the weight-gradient pass on a GPU: all in flight in its finish
FINISH_SMEM = 64 * 1024  # most shared memory a finishing kernel's copies ahead take (sm_80 on: 99 KB or more)
_KINDS = {torch.float32: int(KIND_F32), torch.float16: int(KIND_F16), torch.bfloat16: int(KIND_BF16)}


CPU_SWITCH = "TRITON_INTERPRET=1, the Triton interpreter: slow"  # (named in backends.select's error)


def supports(device) -> bool:
    """CUDA devices; the CPU only under the Triton interpreter."""
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    return kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# ---- argument helpers ---------------------------------------------------------------


def unsupported(case) -> str | None:
    """Why these kernels cannot run ``case`` (a :class:`~resbm_kernels.backends.Case`), or None."""
    found = fast.problem(case.d, case.k, case.dtypes)
    if found:
        return found[1]
    return next(filter(None, (_group_problem(c, case.k) for c in case.codecs)), None)


def _check(what: str, d: int, k: int, *dtypes) -> None:
    fast.check("triton", what, d, k, *dtypes)


def _group_problem(codec: Codec, k: int) -> str | None:
    g = codec.group(k)
    if codec.quantized and g != k and g & (g - 1):
        return f"scale group {g} must be a power of two or the whole row (k={k})"
    return None


@functools.lru_cache(maxsize=1024)
def _group_reshape(codec: Codec, k: int) -> int:
    """Group width the kernels reshape by: the group if a power of two, the
    padded row when the group is the whole row (cached: every call asks)."""
    why = _group_problem(codec, k)
    if why:
        raise ValueError(f"triton backend: {why}")
    g = codec.group(k)
    return g if codec.quantized and g != k else _block_k(k)


def _block_k(k: int) -> int:
    return max(16, 1 << (k - 1).bit_length())  # the next power of two


@functools.lru_cache(maxsize=None)
def _common(device) -> dict:
    """Launch arguments that depend on where the kernel runs (cached: a dict
    the launches unpack, never change)."""
    cpu = torch.device(device).type == "cpu"
    return dict(UPCAST=cpu, PRECISION="ieee" if cpu else "tf32x3", enable_fp_fusion=False)


def _seed_halves(seed: int) -> tuple[int, int]:
    """The 64-bit seed (modulo 2**64) as the kernels take it: int32 (low, high)
    halves, so that any seed launches the same compiled kernel."""
    return tuple(h - (1 << 32) if h >= 1 << 31 else h for h in (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))


def _scales_at(codec: Codec, n: int, k: int) -> int:
    """Byte offset of a payload's scales, which the kernels take beside the
    payload (codec.payload_pointers in the kernels; 0 for bits=16: no scales)."""
    return payload_layout(codec, n, k).scales_at if codec.quantized else 0


def _rows_grid(n, d_splits=1):
    """(row blocks, d splits): see :func:`.configs.d_splits` (the kernel's SPLIT_D is d_splits > 1),
    times the config's D_SPLIT where it has one (dequant_project)."""
    return lambda meta: (configs.cdiv(n, meta["BLOCK_N"]), d_splits * meta.get("D_SPLIT", 1))


def _fused_chunk_rows(a) -> int:
    """Rows per chunk when a backward pass over ``a`` (n, d) forms its weight
    gradient in its main kernel's launch (RESBM_TRITON_FUSED_WGRAD=1, and no d
    split: small N), else 0."""
    n, d = a.shape
    if n and checks.switch(FUSED_WGRAD_SWITCH) and configs.d_splits(n, d, a.device) == 1:
        return configs.fused_chunk_rows(d, a.element_size(), a.device)
    return 0


def _fused_grid(n, d, chunk_rows):
    """Per chunk of rows, its row blocks and its weight-gradient d tiles (see weight_grad.fused_row_block)."""
    return lambda meta: (configs.cdiv(n, chunk_rows) * (chunk_rows // meta["BLOCK_N"]
                                                        + configs.cdiv(d, meta["BLOCK_D"])),)


# ---- launchers ----------------------------------------------------------------------


def _fold_norm(w, gamma, dtype):
    """gamma * w (k, d), rounded once to the GEMM operand dtype: the weight tile
    every program would otherwise scale in its loop (the kernels' tensor-core
    operand conversion rounds to nearest even, as this cast does). One kernel
    when the dtypes agree (torch forms 16-bit products in fp32, where they are
    exact, and rounds once), else two to four."""
    if w.dtype == gamma.dtype == dtype:
        return w * gamma
    return (w.float() * gamma.float()).to(dtype)


@functools.lru_cache(maxsize=1024)
def _quantize_launch(codec: Codec, n: int, k: int, has_norm: bool, write_stats: bool, z_codec: Codec | None):
    """What a projection launch takes that depends only on its shape and
    codecs (cached: every call asks): the payload's (groups per row, scales
    offset, Z payload's scales offset), header words, constexpr flags."""
    z_args = (_scales_at(z_codec, n, k),) if z_codec is not None else (0,)
    flags = dict(HAS_NORM=has_norm, BITS=codec.bits, GROUP_RESHAPE=_group_reshape(codec, k),
                 SCALE_KIND=_KINDS[codec.scale_dtype], STOCHASTIC=codec.stochastic,
                 ZBITS=z_codec.bits if z_codec is not None else 0,
                 ZGROUP=_group_reshape(z_codec, k) if z_codec is not None else _block_k(k),
                 ZSCALE_KIND=_KINDS[z_codec.scale_dtype] if z_codec is not None else 0,
                 WRITE_STATS=write_stats, BLOCK_K=_block_k(k))
    return (k // codec.group(k), _scales_at(codec, n, k), *z_args), header_words(codec, n, k), flags


def _project_quantize(a, w, w_strides, gamma, eps, codec: Codec, seed: int, seed_offset, k: int, out, z=None,
                      stats=None, wgrad=None):
    """Payload of quantize(r * (a @ (gamma * W)^T) + a[:, :k]) for W viewed k x d,
    stochastic rounding keyed on seed + seed_offset (an int64 on a's device, or None);
    ``z = (buffer, payload, codec)`` also dequantizes that payload into buffer;
    ``stats`` (with gamma) is filled with the RMSNorm row statistics;
    ``wgrad = (partials, chunk_rows, z)``: the same launch fills partials
    (chunks, d, k) with z^T a per chunk of rows (see weight_grad.fused_row_block)."""
    n, d = a.shape
    if n == 0:
        return fast.new_payload(codec, n, k, a.device, out)
    payload = fast.payload_buffer(codec, n, k, a.device, out)  # header and padding: written by the kernels
    z_buffer, z_payload, z_codec = z if z is not None else (a, a, None)  # (unused without z)
    quant_args, header, flags = _quantize_launch(codec, n, k, gamma is not None, stats is not None, z_codec)
    splits = configs.d_splits(n, d, a.device)  # small N: partials over runs of d, summed by finish_rows_kernel
    if gamma is not None:
        w = _fold_norm(w, gamma, a.dtype)
        w_strides = (w.stride(0), w.stride(1))
    part = fast.empty((splits, n, k + 1), torch.float32, a.device) if splits > 1 else a
    stats_arg, stats_stride = (stats, stats.stride(0)) if stats is not None else (a, 0)
    has_offset = seed_offset is not None and codec.stochastic  # (else the kernel never reads it)
    seed_args = (*_seed_halves(seed), seed_offset if has_offset else a)
    if wgrad is not None:
        wgrad_partials, chunk_rows, z_buffer = wgrad
    else:
        wgrad_partials, chunk_rows = a, 0
    grid = _fused_grid(n, d, chunk_rows) if wgrad is not None else _rows_grid(n, splits)
    project_quantize_kernel[grid](
        a, w, payload, z_payload, z_buffer, stats_arg, part, wgrad_partials,
        n, d, k, *quant_args, a.stride(0), *w_strides, stats_stride, eps, *seed_args, *header, chunk_rows,
        SPLIT_D=splits > 1, FUSED_WGRAD=wgrad is not None, SEED_OFFSET=has_offset, **flags, **_common(a.device),
    )
    if splits > 1:
        launch = finish_rows_launch(k, splits)
        finish_rows_kernel[(configs.cdiv(n, launch["BLOCK_N"]),)](
            a, part, payload, z_payload, z_buffer, stats_arg,
            n, d, k, splits, *quant_args, a.stride(0), stats_stride, eps, *seed_args, *header,
            SEED_OFFSET=has_offset, **flags, **launch, enable_fp_fusion=False,
        )
    return payload


def _weight_operand(n: int, k: int, dtype, device):
    """The (n, k) Z buffer the main kernel of a backward pass fills for the
    weight gradient: bf16 for bf16 activations (bf16 tensor cores), else fp32
    (the TF32 / 3xTF32 GEMMs of fp16 / fp32)."""
    return fast.empty((n, k), torch.bfloat16 if dtype == torch.bfloat16 else torch.float32, device)


def _weight_grad(a, z, transpose: bool):
    """fp32 per-split partials of z^T a: (splits, k, d), or (splits, d, k) if
    transpose (see :func:`_finish_weight_grad`)."""
    n, d = a.shape
    k = z.shape[1]
    # one split under the interpreter (its cost grows with the number of programs)
    max_splits = 1 if a.device.type == "cpu" else WGRAD_SPLITS
    partial = fast.weight_grad_partials(n, d, k, transpose, a.device, max_splits=max_splits)
    splits = partial.shape[0]
    if n == 0:
        return partial[:0]
    stride_ok, stride_od = (1, k) if transpose else (d, 1)
    weight_grad_kernel[lambda meta: (configs.cdiv(d, meta["BLOCK_D"]), splits)](
        a, z, partial, n, d, k, a.stride(0), configs.cdiv(n, splits), d * k, stride_ok, stride_od,
        BLOCK_K=_block_k(k), **_common(a.device),
    )
    return partial


def _at_once(splits: int, tile_per_thread: int, values: int) -> int:
    """AT_ONCE of a finishing kernel (tiles.sum_splits: the splits in flight): the
    splits rounded up to a power of two, at most SPLITS_AT_ONCE and ``values``
    values a thread in flight."""
    return max(1, min(SPLITS_AT_ONCE, values // tile_per_thread, 1 << max(0, splits - 1).bit_length()))


def finish_rows_launch(k: int, splits: int) -> dict:
    """Launch constants of finish_rows_kernel: FINISH_ROWS rows a program, its d
    split's partials AT_ONCE in flight, 32 values a thread (4 splits at k <= 32,
    one at k >= 128: with 64, Triton 3.6 gave the k=128 kernel 254 registers on
    sm_80 when the splits came in one 3-D load)."""
    per_thread = FINISH_ROWS * _block_k(k) // (32 * FINISH_WARPS)
    return dict(AT_ONCE=_at_once(splits, per_thread, 32), BLOCK_N=FINISH_ROWS, num_warps=FINISH_WARPS)


def finish_weight_grad_launch(k: int, splits: int) -> dict:
    """Launch constants of finish_weight_grad_kernel: (k, 16) tiles (64-byte runs of
    the (k, d) partials; 256 programs at d=4096), one warp per 16 rows of k, so
    that each thread holds 8 values of a tile, up to WGRAD_SPLITS tiles in flight,
    their AT_ONCE - 1 copies ahead within FINISH_SMEM (5 at k=256)."""
    block_k = _block_k(k)
    at_once = min(_at_once(splits, 8, 64), 1 + FINISH_SMEM // (block_k * 16 * 4))
    return dict(AT_ONCE=at_once, BLOCK_K=block_k, BLOCK_D=16, num_warps=block_k // 16)


def _finish_weight_grad(partial, transpose: bool, dtype, w_e=None, gamma=None):
    """(grad, grad_gamma) from :func:`_weight_grad`'s partials: grad in ``dtype``,
    their sum (k, d), or (d, k) if transpose; with ``gamma`` (the encoder through
    RMSNorm) sum * gamma and grad_gamma = sum over k of w_e * sum (see
    tests/helpers.finish_weight_grad_reference), else grad_gamma None."""
    splits = partial.shape[0]
    k, d = (partial.shape[2], partial.shape[1]) if transpose else (partial.shape[1], partial.shape[2])
    out = fast.empty((d, k) if transpose else (k, d), dtype, partial.device)
    if gamma is None:
        grad_gamma, norm_args = None, (partial, partial, partial, 0, 0)  # unused
    else:
        grad_gamma = fast.empty((d,), gamma.dtype, gamma.device)
        norm_args = (w_e, gamma, grad_gamma, *w_e.stride())
    w, g, gg, stride_wk, stride_wd = norm_args
    strides = (1, k) if transpose else (d, 1)  # (k, d) index strides of the partials and of out
    launch = finish_weight_grad_launch(k, splits)
    finish_weight_grad_kernel[(configs.cdiv(d, launch["BLOCK_D"]),)](
        partial, w, g, out, gg, splits, d, k, partial.stride(0), *strides, stride_wk, stride_wd, *strides,
        HAS_NORM=gamma is not None, OUT_KIND=_KINDS[dtype], GAMMA_KIND=_KINDS[gamma.dtype] if gamma is not None else 0,
        **launch,
    )
    return out, grad_gamma


def _dequant_project(payload, codec: Codec, n: int, d: int, k: int, w, w_strides, out_dtype, residual=None,
                     norm=None, z=None, wgrad=None):
    """out (n, d) = zhat @ W + pad_d(zhat) (+ residual); ``norm = (x, gamma, r,
    alpha, stats)`` (encode backward through RMSNorm): gamma * ((r * zhat) @ W) -
    alpha * x + pad_d(zhat), with r and alpha given, or (None) formed from
    encode forward's row ``stats``; ``z``: also writes the weight gradient's
    operand Z = r * zhat (zhat without the norm) into it; ``wgrad =
    (partials, chunk_rows, z, x)``: the same launch fills partials (chunks, k, d)
    with z^T x per chunk of rows (see weight_grad.fused_row_block)."""
    out = fast.empty((n, d), out_dtype, w.device)
    if n == 0:
        return out
    wgrad_partials, chunk_rows, wgrad_z, x = wgrad if wgrad is not None else (out, 0, None, None)
    # res_ptr: x (the norm's, or the weight gradient's input), else the residual
    res = x if x is not None else norm[0] if norm is not None else residual
    gamma, r, alpha, stats = norm[1:] if norm is not None else (None, None, None, None)
    # Z written (WRITE_Z) or read (the fused weight gradient); out in the place of what the flags leave unused
    res_ptr, r_ptr, gamma_ptr, alpha_ptr, stats_ptr, z_ptr = (
        t if t is not None else out for t in (res, r, gamma, alpha, stats, z if z is not None else wgrad_z))
    # small N: each program a run of d (output columns are independent), and the config's D_SPLIT
    splits = configs.d_splits(n, d, w.device)
    grid = _fused_grid(n, d, chunk_rows) if wgrad is not None else _rows_grid(n, splits)
    dequant_project_kernel[grid](
        payload, w, res_ptr, out, r_ptr, gamma_ptr, alpha_ptr, stats_ptr, z_ptr,
        wgrad_partials, n, d, k, _scales_at(codec, n, k), *w_strides, res.stride(0) if res is not None else 0,
        out.stride(0), stats.stride(0) if stats is not None else 0, chunk_rows, BITS=codec.bits,
        GROUP=_group_reshape(codec, k), SCALE_KIND=_KINDS[codec.scale_dtype],
        HAS_RES=residual is not None, HAS_NORM=norm is not None, HAS_STATS=stats is not None, WRITE_Z=z is not None,
        OUT_KIND=_KINDS[out_dtype], SPLIT_D=splits > 1, FUSED_WGRAD=wgrad is not None, BLOCK_K=_block_k(k),
        **_common(w.device),
    )
    return out


def _grad_operand(grad_payload, codec: Codec, x, w_e, gamma, eps, stats):
    """Encode backward's (Z, r, alpha): Z = r * g_z (n, k) and, through RMSNorm,
    r = 1/rms(x) and alpha (n,) fp32 (None without it), from encode forward's
    row ``stats`` when given, else from a pass over x; see :mod:`.grad_operand`."""
    n, d = x.shape
    k = w_e.shape[0]
    z = _weight_operand(n, k, x.dtype, x.device)
    r, alpha = (fast.empty((n,), torch.float32, x.device) for _ in range(2)) if gamma is not None else (None, None)
    if n == 0:
        return z, r, alpha
    has_stats = stats is not None  # (the ops accept them only with the norm)
    w = _fold_norm(w_e, gamma, x.dtype) if gamma is not None and not has_stats else w_e
    grad_operand_kernel[_rows_grid(n)](
        grad_payload, x, w, stats if has_stats else z, z, r if r is not None else z, alpha if alpha is not None else z,
        n, d, k, _scales_at(codec, n, k), x.stride(0), w.stride(0), w.stride(1),
        stats.stride(0) if has_stats else 0, eps, BITS=codec.bits, GROUP=_group_reshape(codec, k),
        SCALE_KIND=_KINDS[codec.scale_dtype],
        HAS_NORM=gamma is not None, HAS_STATS=has_stats, BLOCK_K=_block_k(k), **_common(x.device),
    )
    return z, r, alpha


# ---- the four passes (reference signatures) --------------------------------------------


def encode_forward(x, w_e, norm_weight, eps, codec: Codec, seed: int, out=None, row_stats=None, seed_offset=None):
    k, d = w_e.shape
    _check("encode_forward", d, k, x.dtype, w_e.dtype, norm_weight.dtype if norm_weight is not None else None)
    return _project_quantize(x, w_e, (w_e.stride(0), w_e.stride(1)), norm_weight, eps, codec, seed, seed_offset, k,
                             out, stats=row_stats)


def decode_forward(payload, w_d, residual, codec: Codec, n: int, out_dtype):
    d, k = w_d.shape
    _check("decode_forward", d, k, w_d.dtype, out_dtype)
    _group_reshape(codec, k)
    return _dequant_project(payload, codec, n, d, k, w_d, (w_d.stride(1), w_d.stride(0)), out_dtype, residual=residual)


def decode_backward(grad_h, payload, w_d, codec: Codec, grad_codec: Codec, seed: int, out=None, seed_offset=None):
    d, k = w_d.shape
    _check("decode_backward", d, k, grad_h.dtype, w_d.dtype)
    _group_reshape(codec, k)
    n = grad_h.shape[0]
    chunk_rows = _fused_chunk_rows(grad_h)
    if chunk_rows:  # Z first (grad_operand's kernel without the norm: the dequantized payload)
        z = _grad_operand(payload, codec, grad_h, w_d.t(), None, 0.0, None)[0]
        partial = fast.empty((configs.cdiv(n, chunk_rows), d, k), torch.float32, grad_h.device)
        operand = dict(wgrad=(partial, chunk_rows, z))
    else:  # the main kernel writes Z
        z = _weight_operand(n, k, grad_h.dtype, grad_h.device)
        operand = dict(z=(z, payload, codec))
    grad_payload = _project_quantize(grad_h, w_d, (w_d.stride(1), w_d.stride(0)), None, 0.0, grad_codec, seed,
                                     seed_offset, k, out, **operand)
    if not chunk_rows:
        partial = _weight_grad(grad_h, z, transpose=True)
    grad_w_d, _ = _finish_weight_grad(partial, True, w_d.dtype)
    return grad_payload, grad_w_d


def encode_backward(grad_payload, x, w_e, norm_weight, eps, grad_codec: Codec, row_stats=None):
    n, d = x.shape
    k = w_e.shape[0]
    _check("encode_backward", d, k, x.dtype, w_e.dtype, norm_weight.dtype if norm_weight is not None else None)
    _group_reshape(grad_codec, k)
    # grad_x a rows kernel, the weight gradient a pass of its own over x, or the two kinds of
    # programs in one launch (RESBM_TRITON_FUSED_WGRAD)
    chunk_rows = _fused_chunk_rows(x)
    # Z, r and alpha come from a launch of their own where grad_x's cannot form them: the fused
    # weight gradient reads Z in that launch, and without the forward's row statistics r needs
    # a pass over x; else grad_x's programs form them from the payload rows they load anyway
    separate = bool(chunk_rows) or (norm_weight is not None and row_stats is None)
    if separate:
        z, r, alpha = _grad_operand(grad_payload, grad_codec, x, w_e, norm_weight, eps, row_stats)
    else:
        z, r, alpha = _weight_operand(n, k, x.dtype, x.device), None, None
    norm = (x, norm_weight, r, alpha, None if separate else row_stats) if norm_weight is not None else None
    partial = fast.empty((configs.cdiv(n, chunk_rows), k, d), torch.float32, x.device) if chunk_rows else None
    grad_x = _dequant_project(grad_payload, grad_codec, n, d, k, w_e, (w_e.stride(0), w_e.stride(1)), x.dtype,
                              norm=norm, z=None if separate else z,
                              wgrad=(partial, chunk_rows, z, x) if chunk_rows else None)
    if not chunk_rows:
        partial = _weight_grad(x, z, transpose=False)
    return (grad_x, *_finish_weight_grad(partial, False, w_e.dtype, w_e, norm_weight))
