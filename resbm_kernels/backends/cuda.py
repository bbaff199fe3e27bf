"""CUDA backend: the four fused passes as hand-written CUDA kernels (csrc/cuda/passes.cu).

Same signatures and return conventions as
:mod:`resbm_kernels.backends.reference`. The kernels live in the
framework-agnostic ``libresbm_cuda`` (C ABI, loaded with ctypes by
:mod:`resbm_kernels.native`); this module allocates the outputs with torch on
the inputs' device and launches on the current torch stream
(``torch.cuda.current_stream().cuda_stream``). Nothing here synchronises the
device.

Requirements: CUDA tensors, float32/float16/bfloat16, d and k multiples of 16
and k <= 256 (as the Triton backend). Any scale group that divides k works
(the Triton backend's: powers of two or the row).

With ``RESBM_CUDA_EMULATE=1`` the backend also takes CPU tensors and runs the
same kernels on the CPU emulator (``libresbm_cuda_emu``, built from the same
sources by ``csrc/emu``; slow, for tests), as Triton's kernels run under
``TRITON_INTERPRET=1``.

The kernels multiply on mma.sync, but for bf16 / fp16 inputs with k <= 128 on an sm_90
GPU with a library built for sm_90a (the default ``RESBM_CUDA_ARCHS="80;90a;90-virtual"``)
the projection (encode forward, decode backward) runs on the warpgroup MMA (wgmma): on an
H200 (2026-11-28, N=16384, d=4096) encode forward took 0.61-0.81x mma.sync's time there,
where wgmma made decode forward and encode backward slower. ``RESBM_CUDA_WGMMA=1`` puts
every pass kernel (the row kernels and the weight gradient) on wgmma, ``0`` none (for
comparison).
``RESBM_CUDA_SPLITS=0`` keeps the row kernels from splitting d (below; for
comparison), ``RESBM_CUDA_PREFETCH=0`` decode forward's and encode backward's row kernel
from asking for its residual or x a tile ahead into L2 (k > 32; for comparison),
``RESBM_CUDA_STAGE_X`` decides whether encode backward's row kernel copies its x tiles
through the weight tiles' cp.async ring: unset, unless that leaves an SM one block where
more fit without it (on an H200: k <= 64); ``1`` always, ``0`` never (for comparison).
The switches take 0 or 1; another value raises ValueError at the launch.

Precision: bf16/fp16 inputs on 16-bit tensor cores with fp32 accumulation
(dequantized zhat is rounded to bf16 for bf16 inputs and split as hi + lo for
fp16; the RMSNorm-folded encoder weight is rounded once to the input dtype, as
the Triton kernels do); fp32 inputs use
3xTF32, so results match the float32 reference within fp32 tolerances. Known limit:
with fp16 inputs the hi + lo split of dequantized values is in fp16, so
values below fp16's normal range (6e-5: unscaled fp16 gradients) lose
precision, and values above 65504 overflow (the Triton backend uses TF32 there),
so ``auto`` does not pick these kernels for fp16 in those passes.

Each pass first converts its weights to the tensor cores' operand types once
(into a workspace allocated here, sized by ``resbm_cuda_workspace_bytes``), so
no block of the main kernel converts weights. For small N the row kernels split
d between blocks to fill the GPU: the projection (encode forward, decode
backward) then writes fp32 partials (allocated here,
``resbm_cuda_projection_splits``) that a second kernel sums in a fixed order. Weight gradients are a separate
reduction kernel over the (N, d) input (like the Triton backend): per-split
fp32 partials, summed in a fixed order (deterministic) by a finishing kernel
that also applies the encoder's RMSNorm factors and rounds once; its (N, k)
operand, the payload dequantized and scaled per row, is written once per call
into a second workspace (``resbm_cuda_weight_grad_workspace_bytes``) that its
blocks stream.

Non-finite inputs are not detected (no device sync): they produce inf / NaN
scales or codes, where the reference raises.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch

from .. import checks, native
from . import fast
from ..codec import HEADER_BYTES, Codec, header_words, payload_layout

FP16_SPLIT_PASSES = ("decode_forward", "decode_backward", "encode_backward")


CPU_SWITCH = "RESBM_CUDA_EMULATE=1 and libresbm_cuda_emu, the CPU emulator: slow"  # (named in backends.select's error)


def supports(device) -> bool:
    """CUDA devices, when libresbm_cuda loads and a GPU is present; the CPU only
    with ``RESBM_CUDA_EMULATE=1`` and libresbm_cuda_emu."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and native.available("cuda")
    return kind == "cpu" and native.emulating() and native.available("cuda_emu")


def _library_name(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cuda_emu"


# ---- helpers ----------------------------------------------------------------------


def unsupported(case) -> str | None:
    """Why ``auto`` should not run ``case`` (a :class:`~resbm_kernels.backends.Case`)
    on these kernels, or None: the kernels' limits, and fp16 in the passes that
    split dequantized values into fp16 (see Precision above)."""
    found = fast.problem(case.d, case.k, case.dtypes)
    if found:
        return found[1]
    if torch.float16 in case.dtypes and case.op in FP16_SPLIT_PASSES:
        return f"{case.op} with float16 splits dequantized values into fp16 (precision lost below 6e-5)"
    return None


def _check(what: str, d: int, k: int, *dtypes) -> None:
    fast.check("cuda", what, d, k, *dtypes)


def _dense(t):
    """Contiguous and 16-byte aligned (the kernels use 16-byte vector accesses)."""
    if t is None:
        return None
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _payload(codec: Codec, n: int, k: int, device, out):
    """(payload buffer, header words for the kernel to write, or None): with rows
    the kernel that writes the codes also writes the header and the padding."""
    if n == 0:
        return fast.new_payload(codec, n, k, device, out), None
    return fast.payload_buffer(codec, n, k, device, out), _header_arg(codec, n, k)


@functools.lru_cache(maxsize=1024)
def _header_arg(codec: Codec, n: int, k: int):
    """The header words as the C array the kernels read (never written: cached)."""
    return (ctypes.c_int32 * 4)(*header_words(codec, n, k))


def _codec_args(payload, codec: Codec, n: int, k: int):
    """(codes ptr, scales ptr, bits, group, scale dtype code) of a payload."""
    base, (offset, bits, group, dtype_code) = payload.data_ptr(), _codec_layout(codec, n, k)
    return base + HEADER_BYTES, (base + offset if bits != 16 else None), bits, group, dtype_code


@functools.lru_cache(maxsize=1024)
def _codec_layout(codec: Codec, n: int, k: int):
    """(scales offset, bits, group, scale dtype code) of a payload: what the
    kernels need besides its address (group and dtype code 0 for bits=16)."""
    if not codec.quantized:
        return 0, 16, 0, 0
    return payload_layout(codec, n, k).scales_at, codec.bits, codec.group(k), native.DTYPE_CODES[codec.scale_dtype]


def _seed_args(seed: int, seed_offset):
    """The kernels' (seed, seed_offset pointer): they key stochastic rounding on
    codec.rng_key(seed + offset), reading the offset (an int64 on the inputs'
    device, or None for 0) on the device."""
    return seed & 0xFFFFFFFFFFFFFFFF, native.ptr(seed_offset)


_SWITCHES = ("RESBM_CUDA_WGMMA", "RESBM_CUDA_SPLITS", "RESBM_CUDA_PREFETCH", "RESBM_CUDA_STAGE_X")


def _check_switches() -> None:
    """The library reads RESBM_CUDA_WGMMA (unset: the projection on wgmma; "1": every
    kernel), RESBM_CUDA_SPLITS, RESBM_CUDA_PREFETCH (off only for "0") and
    RESBM_CUDA_STAGE_X (unset: decided by occupancy) at each launch: any other value is
    a mistake, not a silent default."""
    for name in _SWITCHES:
        checks.switch(name)


def _call(name: str, device: torch.device, *args) -> None:
    """Launch ``name`` on the current stream of ``device`` (the emulator runs it
    at once); raise naming the kernel on error."""
    _check_switches()
    lib = native.library(_library_name(device))
    if device.type != "cuda":
        native.check_rc(lib, getattr(lib, name)(*args, None))
        return
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        native.check_rc(lib, getattr(lib, name)(*args, ctypes.c_void_p(stream)))


_PASS_IDS = {"encode_forward": 0, "decode_forward": 1, "decode_backward": 2, "encode_backward": 3}


@functools.lru_cache(maxsize=1024)
def _size_query(which: str, name: str, *args) -> int:
    """A size query's answer from library ``which`` (its last argument, an int64
    out-parameter), asked once per arguments (not on every op call)."""
    lib = native.library(which)
    nbytes = ctypes.c_int64()
    native.check_rc(lib, getattr(lib, name)(*args, ctypes.byref(nbytes)))
    return nbytes.value


@functools.lru_cache(maxsize=1024)
def _projection_splits(device: torch.device, dtype_code: int, n: int, d: int, k: int, env: tuple) -> int:
    """d splits of the projection kernel (encode forward, decode backward) on
    ``device``: see ``resbm_cuda_projection_splits`` (asked once per device, shape
    and ``env``: RESBM_CUDA_WGMMA, which picks the loop and so its d tile, and
    RESBM_CUDA_SPLITS, both read by the library)."""
    lib = native.library(_library_name(device))
    splits = ctypes.c_int()
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        native.check_rc(lib, lib.resbm_cuda_projection_splits(dtype_code, n, d, k, ctypes.byref(splits)))
    return splits.value


def _projection_partial(a, k: int):
    """(partial buffer or None, splits) for a projection pass over ``a`` (n, d):
    more than one split for small n, each writing (n, k + 1) fp32 partials."""
    n, d = a.shape
    env = (os.environ.get("RESBM_CUDA_WGMMA"), os.environ.get("RESBM_CUDA_SPLITS"))
    splits = _projection_splits(a.device, native.DTYPE_CODES[a.dtype], n, d, k, env)
    return (fast.empty((splits, n, k + 1), torch.float32, a.device) if splits > 1 else None), splits


def _workspace(pass_: str, dtype, d: int, k: int, norm: bool, device) -> torch.Tensor | None:
    """The device workspace a pass needs (its weights converted to the tensor
    cores' operand types once per call), or None. Keep it referenced until the
    pass is launched; after that the caching allocator reuses it in stream order."""
    nbytes = _size_query(_library_name(device), "resbm_cuda_workspace_bytes", _PASS_IDS[pass_],
                         native.DTYPE_CODES[dtype], d, k, int(norm))
    return fast.empty((nbytes,), torch.uint8, device) if nbytes else None


def _weight_grad(a, payload, codec: Codec, rscale, k: int, transpose: bool, w, norm_weight=None):
    """The weight gradient sum over rows of (rscale * zhat)^T a, finished on the
    device: (grad, None) with grad (d, k) in w's dtype if ``transpose`` (decode's
    grad_w_d), else (k, d); with ``norm_weight`` (the encoder through RMSNorm,
    w = w_e) grad * norm_weight and grad_norm_weight = sum over k of w_e * grad."""
    n, d = a.shape
    partial = fast.weight_grad_partials(n, d, k, transpose, a.device)
    splits, rows, cols = partial.shape
    if n == 0:
        partial.zero_()
    else:
        codes, scales, bits, group, sdt = _codec_args(payload, codec, n, k)
        # the (rscale * zhat)^T operand, written once by the library's first kernel
        nbytes = _size_query(_library_name(a.device), "resbm_cuda_weight_grad_workspace_bytes",
                             native.DTYPE_CODES[a.dtype], n, k)
        workspace = fast.empty((nbytes,), torch.uint8, a.device)
        _call("resbm_cuda_weight_grad", a.device, a.data_ptr(), native.DTYPE_CODES[a.dtype], n, d, k, codes, scales,
              bits, group, sdt, native.ptr(rscale), splits, int(transpose), partial.data_ptr(), workspace.data_ptr())
    grad = fast.empty((rows, cols), w.dtype, a.device)
    grad_norm = None if norm_weight is None else fast.empty((cols,), norm_weight.dtype, a.device)
    _call("resbm_cuda_finish_weight_grad", a.device, partial.data_ptr(), splits, rows, cols, grad.data_ptr(),
          native.DTYPE_CODES[w.dtype], native.ptr(norm_weight), native.ptr(w), native.ptr(grad_norm),
          0 if norm_weight is None else native.DTYPE_CODES[norm_weight.dtype])
    return grad, grad_norm


# ---- the four passes (reference signatures) --------------------------------------------


def encode_forward(x, w_e, norm_weight, eps, codec: Codec, seed: int, out=None, row_stats=None, seed_offset=None):
    k, d = w_e.shape
    _check("encode_forward", d, k, x.dtype, w_e.dtype, norm_weight.dtype if norm_weight is not None else None)
    n = x.shape[0]
    payload, header = _payload(codec, n, k, x.device, out)
    if n == 0:
        return payload
    x, w_e, gamma = _dense(x), _dense(w_e), _dense(norm_weight)
    codes, scales, bits, group, sdt = _codec_args(payload, codec, n, k)
    ws = _workspace("encode_forward", x.dtype, d, k, gamma is not None, x.device)
    partial, splits = _projection_partial(x, k)
    _call("resbm_cuda_encode_forward", x.device, x.data_ptr(), native.DTYPE_CODES[x.dtype], n, d, k, w_e.data_ptr(),
          native.ptr(gamma), float(eps), bits, group, sdt, int(codec.stochastic), *_seed_args(seed, seed_offset), codes,
          scales, header, native.ptr(row_stats), native.ptr(partial), splits, native.ptr(ws))
    return payload


def decode_forward(payload, w_d, residual, codec: Codec, n: int, out_dtype):
    d, k = w_d.shape
    _check("decode_forward", d, k, w_d.dtype, out_dtype)
    codec.group(k)
    out = fast.empty((n, d), out_dtype, w_d.device)
    if n == 0:
        return out
    w_d, residual = _dense(w_d), _dense(residual)
    codes, scales, bits, group, sdt = _codec_args(payload, codec, n, k)
    ws = _workspace("decode_forward", w_d.dtype, d, k, False, w_d.device)
    _call("resbm_cuda_decode_forward", w_d.device, codes, scales, n, d, k, bits, group, sdt, w_d.data_ptr(),
          native.DTYPE_CODES[w_d.dtype], native.ptr(residual), out.data_ptr(), native.DTYPE_CODES[out_dtype],
          native.ptr(ws))
    return out


def decode_backward(grad_h, payload, w_d, codec: Codec, grad_codec: Codec, seed: int, out=None, seed_offset=None):
    d, k = w_d.shape
    _check("decode_backward", d, k, grad_h.dtype, w_d.dtype)
    codec.group(k)
    n = grad_h.shape[0]
    grad_payload, header = _payload(grad_codec, n, k, grad_h.device, out)
    grad_h = _dense(grad_h)
    if n > 0:
        w = _dense(w_d.to(grad_h.dtype))  # the kernel reads both in grad_h's dtype
        codes, scales, bits, group, sdt = _codec_args(grad_payload, grad_codec, n, k)
        ws = _workspace("decode_backward", grad_h.dtype, d, k, False, grad_h.device)
        partial, splits = _projection_partial(grad_h, k)
        _call("resbm_cuda_decode_backward", grad_h.device, grad_h.data_ptr(), native.DTYPE_CODES[grad_h.dtype], n, d, k,
              w.data_ptr(), bits, group, sdt, int(grad_codec.stochastic), *_seed_args(seed, seed_offset), codes, scales,
              header, native.ptr(partial), splits, native.ptr(ws))
    grad_w_d, _ = _weight_grad(grad_h, payload, codec, None, k, transpose=True, w=w_d)
    return grad_payload, grad_w_d


def encode_backward(grad_payload, x, w_e, norm_weight, eps, grad_codec: Codec, row_stats=None):
    n, d = x.shape
    k = w_e.shape[0]
    _check("encode_backward", d, k, x.dtype, w_e.dtype, norm_weight.dtype if norm_weight is not None else None)
    grad_codec.group(k)
    x, w_e, gamma = _dense(x), _dense(w_e), _dense(norm_weight)
    stats = _dense(row_stats)  # (without them, a pre-pass over x)
    grad_x = fast.empty((n, d), x.dtype, x.device)
    rscale = fast.empty((n,), torch.float32, x.device) if gamma is not None else None
    if n > 0:
        codes, scales, bits, group, sdt = _codec_args(grad_payload, grad_codec, n, k)
        ws = _workspace("encode_backward", x.dtype, d, k, gamma is not None, x.device)
        _call("resbm_cuda_encode_backward", x.device, codes, scales, n, d, k, bits, group, sdt, x.data_ptr(),
              native.DTYPE_CODES[x.dtype], w_e.data_ptr(), native.ptr(gamma), float(eps), grad_x.data_ptr(),
              native.ptr(rscale), native.ptr(stats), native.ptr(ws))
    return (grad_x, *_weight_grad(x, grad_payload, grad_codec, rscale, k, transpose=False, w=w_e, norm_weight=gamma))
