"""ctypes bindings of the native codec libraries (``libresbm_cpu``, ``libresbm_cuda``,
and ``libresbm_cuda_emu``: the CUDA library's kernels on the CPU emulator of
``csrc/emu``, same C ABI, host pointers; tests).

The libraries are plain C ABIs built by CMake (``pip install .`` builds them when
cmake and a compiler are present). Importing this module never fails: a missing
library raises a ``RuntimeError`` naming it on first use. Search order:
``$RESBM_LIB_DIR``, ``resbm_kernels/lib/``, then ``build/`` at the repository
root (``cmake -S . -B build -G Ninja && cmake --build build``).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import threading

import torch

from . import checks
from .codec import SCALE_DTYPES, SCALE_NAMES, Codec, rng_key

ABI_VERSION = 7  # RESBM_ABI_VERSION of csrc/include/resbm/c_api.h
_NAMES = {"cpu": "libresbm_cpu.so", "cuda": "libresbm_cuda.so", "cuda_emu": "libresbm_cuda_emu.so"}
_PKG_DIR = pathlib.Path(__file__).resolve().parent
DTYPE_CODES = SCALE_DTYPES  # the C ABI's dtype codes (1 fp32, 2 fp16, 3 bf16): the wire format's scale codes
_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}


def search_dirs() -> list[pathlib.Path]:
    """Directories searched for the libraries, in order."""
    dirs = [_PKG_DIR / "lib", _PKG_DIR.parent / "build"]
    env = os.environ.get("RESBM_LIB_DIR")
    return ([pathlib.Path(env)] if env else []) + dirs


def _declare(lib: ctypes.CDLL, which: str) -> None:
    p, i32, i64, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint32
    which = "cpu" if which == "cpu" else "cuda"  # the emulator exports the CUDA library's API
    lib.resbm_abi_version.restype = i32
    lib.resbm_abi_version.argtypes = []
    lib.resbm_last_error.restype = ctypes.c_char_p
    lib.resbm_last_error.argtypes = []
    stream = [p] if which == "cuda" else []
    quantize = getattr(lib, f"resbm_{which}_quantize_pack")
    quantize.restype = i32
    quantize.argtypes = [p, i32, i64, i64, i32, i32, i32, i32, u32, p, p] + stream
    dequantize = getattr(lib, f"resbm_{which}_unpack_dequantize")
    dequantize.restype = i32
    dequantize.argtypes = [p, p, i64, i64, i32, i32, i32, i32, p] + stream
    if which == "cuda":  # the four fused passes and the weight-gradient reduction (passes.cu)
        f32 = ctypes.c_float
        for name, args in _CUDA_PASSES.items():
            fn = getattr(lib, name)
            fn.restype = i32
            fn.argtypes = [{"p": p, "i": i32, "l": i64, "q": ctypes.c_uint64, "f": f32}[c] for c in args]


# argument kinds of the CUDA pass entry points (p pointer, i int, l int64, q uint64, f float)
_CUDA_PASSES = {
    # pass, dtype, d, k, norm, bytes (int64*)
    "resbm_cuda_workspace_bytes": "iillip",
    # dtype, n, d, k, splits (int*)
    "resbm_cuda_projection_splits": "illlp",
    # x, dtype, n, d, k, w_e, norm_weight, eps, bits, group, scale_dtype, stochastic, seed, seed_offset,
    # codes, scales, header, row_stats, partial, splits, workspace, stream
    "resbm_cuda_encode_forward": "pilllppfiiiiqppppppipp",
    # codes, scales, n, d, k, bits, group, scale_dtype, w_d, w_dtype, residual, out, out_dtype, workspace, stream
    "resbm_cuda_decode_forward": "ppllliiipippipp",
    # grad_h, dtype, n, d, k, w_d, bits, group, scale_dtype, stochastic, seed, seed_offset, codes, scales,
    # header, partial, splits, workspace, stream
    "resbm_cuda_decode_backward": "pilllpiiiiqpppppipp",
    # codes, scales, n, d, k, bits, group, scale_dtype, x, dtype, w_e, norm_weight, eps, grad_x, rscale,
    # row_stats, workspace, stream
    "resbm_cuda_encode_backward": "ppllliiipippfppppp",
    # dtype, n, k, bytes (int64*)
    "resbm_cuda_weight_grad_workspace_bytes": "illp",
    # a, dtype, n, d, k, codes, scales, bits, group, scale_dtype, rscale, splits, transpose, partial,
    # workspace, stream
    "resbm_cuda_weight_grad": "pilllppiiipiippp",
    # partial, splits, rows, cols, out, out_dtype, norm_weight, w, grad_norm, norm_dtype, stream
    "resbm_cuda_finish_weight_grad": "pillpipppip",
}


def _load(which: str) -> ctypes.CDLL | None:
    with _lock:
        if which in _libs:
            return _libs[which]
        lib, tried = None, []
        for d in search_dirs():
            path = d / _NAMES[which]
            if not path.is_file():
                tried.append(str(path))
                continue
            try:
                candidate = ctypes.CDLL(str(path))
                _declare(candidate, which)
                version = candidate.resbm_abi_version()
            except (OSError, AttributeError) as e:
                tried.append(f"{path} ({e})")
                continue
            if version != ABI_VERSION:
                tried.append(f"{path} (ABI version {version}, expected {ABI_VERSION})")
                continue
            lib = candidate
            break
        _libs[which] = lib
        if lib is None:
            _errors[which] = (
                f"resbm native library {_NAMES[which]} is not available (looked for: "
                f"{'; '.join(tried)}). Build it with `pip install .` on a machine with cmake and a "
                f"C++ compiler{' and nvcc' if which == 'cuda' else ''} (POSIX for the emulator), or `cmake -S . -B build -G Ninja "
                f"&& cmake --build build` in the repository, or point RESBM_LIB_DIR at it."
            )
        return lib


def available(which: str = "cpu") -> bool:
    """True if the ``"cpu"``, ``"cuda"`` or ``"cuda_emu"`` library can be loaded."""
    if which not in _NAMES:
        raise ValueError(f"native: which must be one of {tuple(_NAMES)}, got {which!r}")
    return _load(which) is not None


def library(which: str = "cpu") -> ctypes.CDLL:
    """The loaded library, or ``RuntimeError`` saying why it is missing."""
    if not available(which):
        raise RuntimeError(_errors[which])
    return _libs[which]


ERR_ARG, ERR_NONFINITE = 1, 2  # the C ABI's error codes for bad input (c_api.h); 3: a CUDA error


def check_rc(lib: ctypes.CDLL, rc: int) -> None:
    """Raise a library's last error (it names the function, and the kernel) if
    ``rc`` is one: ValueError for bad input (as the Python checks and the
    reference raise), RuntimeError for a CUDA error."""
    if rc != 0:
        error = ValueError if rc in (ERR_ARG, ERR_NONFINITE) else RuntimeError
        raise error(lib.resbm_last_error().decode(errors="replace"))


def _check_tensor(name: str, t: torch.Tensor, shape, dtypes, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"native: {name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"native: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"native: {name} has dtype {t.dtype}, expected one of {list(dtypes)}")
    if t.device != device:
        raise ValueError(f"native: {name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"native: {name} must be contiguous")


def emulating() -> bool:
    """``RESBM_CUDA_EMULATE=1``: CPU tensors take the CUDA code paths, on the CUDA
    library's kernels built for the CPU emulator (``libresbm_cuda_emu``; tests)."""
    return checks.switch("RESBM_CUDA_EMULATE")


def _target(device: torch.device):
    """(library, trailing stream argument list, "cpu" or "cuda") for tensors on ``device``."""
    if device.type == "cpu":
        return (library("cuda_emu"), [None], "cuda") if emulating() else (library("cpu"), [], "cpu")
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream().cuda_stream
        return library("cuda"), [ctypes.c_void_p(stream)], "cuda"
    raise ValueError(f"native: tensors on {device} are not supported (cpu or cuda only)")


def _layout(codec: Codec, n: int, k: int, codes: torch.Tensor, scales, device) -> tuple[int, int]:
    """Check codes/scales against the codec; return (group, scale dtype code)."""
    group = codec.group(k) if codec.quantized else 0
    _check_tensor("codes", codes, (n, k * codec.bits // 8), (torch.uint8,), device)
    if not codec.quantized:
        return 0, 0
    if scales is None:
        raise ValueError(f"native: codec {codec.spec} needs a scales tensor")
    _check_tensor("scales", scales, (n, k // group), (codec.scale_dtype,), device)
    return group, DTYPE_CODES[codec.scale_dtype]


def ptr(t) -> int | None:
    """A tensor's data pointer for a C argument, None (NULL) for None."""
    return None if t is None else t.data_ptr()


def quantize_pack(z: torch.Tensor, codec: Codec, seed: int, codes_out: torch.Tensor, scales_out) -> None:
    """Quantize + pack ``z`` (N, k) into ``codes_out``/``scales_out`` (the
    :func:`resbm_kernels.codec.payload_views` of a payload), bit for bit like
    the reference. ``scales_out`` is ``None`` for bits=16."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise (ValueError if isinstance(z, torch.Tensor) else TypeError)("native: z must be a 2-D tensor (N, k)")
    n, k = z.shape
    _check_tensor("z", z, (n, k), tuple(DTYPE_CODES), z.device)
    group, scale_code = _layout(codec, n, k, codes_out, scales_out, z.device)
    lib, stream, which = _target(z.device)
    rc = getattr(lib, f"resbm_{which}_quantize_pack")(
        z.data_ptr(), DTYPE_CODES[z.dtype], n, k, codec.bits, group, scale_code,
        int(codec.stochastic), rng_key(seed), codes_out.data_ptr(), ptr(scales_out), *stream,
    )
    check_rc(lib, rc)
    if which == "cuda":  # the kernel cannot report bad values: they show in the output
        _check_finite_cuda(z, codec, scales_out)


def _check_finite_cuda(z, codec: Codec, scales_out) -> None:
    """Raise like the CPU library when a group was non-finite (syncs the stream)."""
    if codec.quantized and torch.isfinite(scales_out).all():
        return
    if not torch.isfinite(z).all():
        raise ValueError("resbm_cuda_quantize_pack: non-finite input (inf or nan)")
    if codec.quantized:
        raise ValueError(
            f"resbm_cuda_quantize_pack: scale overflow: an activation absmax does not fit the "
            f"{SCALE_NAMES[codec.scale_dtype]} scale"
        )


def unpack_dequantize(codes: torch.Tensor, scales, codec: Codec, k: int, out: torch.Tensor) -> None:
    """Unpack + dequantize ``codes``/``scales`` into ``out`` (N, k) of float32,
    float16 or bfloat16, bit for bit like the reference."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise (ValueError if isinstance(out, torch.Tensor) else TypeError)("native: out must be a 2-D tensor (N, k)")
    n = out.shape[0]
    _check_tensor("out", out, (n, k), tuple(DTYPE_CODES), out.device)
    group, scale_code = _layout(codec, n, k, codes, scales, out.device)
    lib, stream, which = _target(out.device)
    rc = getattr(lib, f"resbm_{which}_unpack_dequantize")(
        codes.data_ptr(), ptr(scales), n, k, codec.bits, group, scale_code,
        DTYPE_CODES[out.dtype], out.data_ptr(), *stream,
    )
    check_rc(lib, rc)
