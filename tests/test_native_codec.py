"""The native codec libraries (csrc/) against the PyTorch reference, bit for bit."""

from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CUDA_ARCHS, CUDA_KERNELS_DEVICE, cuda_library_resources, emulate_cuda_without_gpu
from helpers import needs_cuda_emulator, needs_cuda_kernels, needs_cuda_library
from resbm_kernels import native
from resbm_kernels.backends import reference as ref
from resbm_kernels.codec import Codec, empty_payload, payload_views

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
GROUPS = {16: (None,), 8: (None, 1, 16), 4: (None, 2, 16), 2: (None, 4, 16)}

needs_cpu_lib = pytest.mark.skipif(
    not native.available("cpu"),
    reason="libresbm_cpu is not built (pip install . or cmake -S . -B build -G Ninja && cmake --build build)",
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so NaN payloads and -0.0 compare exactly."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _sample(n: int, k: int, dtype: torch.dtype, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """randn times a random magnitude 10**[lo, hi) per row and per 8 columns."""
    row = torch.empty(n, 1).uniform_(lo, hi, generator=gen)
    col = torch.empty(1, (k + 7) // 8).uniform_(-1, 1, generator=gen).repeat_interleave(8, dim=1)[:, :k]
    return (torch.randn(n, k, generator=gen) * 10 ** (row + col)).to(dtype)


def _native_payload(z: torch.Tensor, codec: Codec, seed: int) -> torch.Tensor:
    n, k = z.shape
    payload = empty_payload(codec, n, k, z.device)
    codes, scales = payload_views(payload, codec, n, k)
    native.quantize_pack(z, codec, seed, codes, scales)
    return payload


def _native_read(payload: torch.Tensor, codec: Codec, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    codes, scales = payload_views(payload, codec, n, k)
    out = torch.empty(n, k, dtype=dtype, device=payload.device)
    native.unpack_dequantize(codes, scales, codec, k, out)
    return out


def _check_roundtrip(z: torch.Tensor, codec: Codec, seed: int, out_dtypes=FLOATS) -> None:
    n, k = z.shape
    expected = ref.write_payload(z, codec, seed)
    got = _native_payload(z, codec, seed)
    assert torch.equal(got, expected), f"payload differs for {codec.spec}, z {z.dtype}"
    for dtype in out_dtypes:
        want = ref.read_payload(expected, codec, n, k, dtype)
        assert torch.equal(_bits(_native_read(got, codec, n, k, dtype)), _bits(want)), f"dequantize to {dtype}"


# ---- bit-exact parity -----------------------------------------------------------


@needs_cpu_lib
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scale_dtype", FLOATS)
@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("z_dtype", FLOATS)
def test_matches_reference(z_dtype, bits, scale_dtype, rounding):
    gen = torch.Generator().manual_seed(bits * 7 + FLOATS.index(scale_dtype))
    # fp16 inputs and scales have a narrow range: keep absmax/qmax inside it
    narrow = torch.float16 in (z_dtype, scale_dtype)
    lo, hi = (-6, 3) if narrow else (-30, 30)
    z = _sample(9, 64, z_dtype, lo, hi, gen)
    for group in GROUPS[bits]:
        codec = Codec(bits=bits, group_size=group, scale_dtype=scale_dtype, rounding=rounding)
        _check_roundtrip(z, codec, seed=0x1234_5678_9ABC)


@needs_cpu_lib
@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 5),
    groups=st.integers(1, 4),
    bits=st.sampled_from([16, 8, 4, 2]),
    group_mult=st.sampled_from([1, 2, 3, 8]),
    per_row=st.booleans(),
    scale_dtype=st.sampled_from(FLOATS),
    z_dtype=st.sampled_from(FLOATS),
    out_dtype=st.sampled_from(FLOATS),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**31),
)
def test_random_shapes(n, groups, bits, group_mult, per_row, scale_dtype, z_dtype, out_dtype, stochastic, seed, data_seed):
    group = {16: 1, 8: 1, 4: 2, 2: 4}[bits] * group_mult
    k = groups * group
    codec = Codec(
        bits=bits,
        group_size=None if per_row or bits == 16 else group,
        scale_dtype=scale_dtype,
        rounding="stochastic" if stochastic else "nearest",
    )
    narrow = torch.float16 in (z_dtype, scale_dtype)
    z = _sample(n, k, z_dtype, -6 if narrow else -20, 3 if narrow else 20, torch.Generator().manual_seed(data_seed))
    _check_roundtrip(z, codec, seed, out_dtypes=(out_dtype,))


@needs_cpu_lib
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_all_zero_group(bits, rounding):
    z = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    z[1, 16:] = 0.0
    z[2, :16] = -0.0
    codec = Codec(bits=bits, group_size=16, rounding=rounding)
    _check_roundtrip(z, codec, seed=5)
    codes, scales = payload_views(_native_payload(z, codec, 5), codec, 3, 32)
    assert scales[1, 1] == 0 and scales[2, 0] == 0


@needs_cpu_lib
@pytest.mark.parametrize("bits", [8, 4])
def test_ties_round_half_to_even(bits):
    """y = z / scale lands exactly on halves: nearest rounding must go to even."""
    qmax = (1 << (bits - 1)) - 1
    z = torch.arange(-2 * qmax, 2 * qmax, dtype=torch.float32).view(1, -1) / 2  # absmax qmax: scale 1
    codec = Codec(bits=bits, group_size=None, scale_dtype=torch.float32)
    _check_roundtrip(z, codec, seed=0)
    q, _ = ref.quantize(z, codec)
    assert q[0, 1].item() == -qmax + 1  # -qmax + 0.5 (qmax odd) goes to the even neighbour


@needs_cpu_lib
def test_scale_underflow_and_extremes():
    """Scales that underflow to zero or subnormals, and near-overflow bf16 scales."""
    z = torch.tensor([[1e-9, -3e-9, 2e-9, 1e-9], [6e-6, 1e-7, -2e-6, 3e-6], [3e38, -1e38, 2e37, 1.0]])
    _check_roundtrip(z[:2], Codec(bits=8, group_size=None, scale_dtype=torch.float16), seed=3)
    _check_roundtrip(z, Codec(bits=2, group_size=4, scale_dtype=torch.bfloat16, rounding="stochastic"), seed=3)
    _check_roundtrip(z, Codec(bits=16), seed=3)


@needs_cpu_lib
def test_stochastic_uses_rng_key():
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    codec = Codec(bits=4, group_size=16, rounding="stochastic")
    a, b = _native_payload(z, codec, 1), _native_payload(z, codec, 2)
    assert not torch.equal(a, b) and torch.equal(a, ref.write_payload(z, codec, 1))


# ---- errors --------------------------------------------------------------------


@needs_cpu_lib
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bits, bad):
    z = torch.randn(2, 32)
    z[1, 5] = bad
    codec = Codec(bits=bits, group_size=None if bits == 16 else 8)
    with pytest.raises(ValueError, match="non-finite"):
        ref.write_payload(z, codec, 0)
    with pytest.raises(ValueError, match="non-finite input"):
        _native_payload(z, codec, 0)


OVERFLOWING = (torch.full((1, 8), 1e6), Codec(bits=4, group_size=8, scale_dtype=torch.float16))


@needs_cpu_lib
def test_scale_overflow(monkeypatch):
    monkeypatch.delenv("RESBM_CUDA_EMULATE", raising=False)  # CPU tensors: the CPU library
    z, codec = OVERFLOWING
    with pytest.raises(ValueError, match="overflows"):
        ref.write_payload(z, codec, 0)
    with pytest.raises(ValueError, match="scale overflow.*fp16 scale"):
        _native_payload(z, codec, 0)


@needs_cuda_kernels
def test_cuda_scale_overflow(monkeypatch):
    """The CUDA codec kernel's overflow, named like the CPU library's."""
    emulate_cuda_without_gpu(monkeypatch)
    z, codec = OVERFLOWING
    with pytest.raises(ValueError, match="resbm_cuda_quantize_pack: scale overflow.*fp16 scale"):
        _native_payload(z.to(CUDA_KERNELS_DEVICE), codec, 0)


@needs_cpu_lib
def test_python_argument_errors():
    z = torch.randn(2, 64)
    with pytest.raises(ValueError, match="does not divide"):
        _native_payload(z, Codec(bits=8, group_size=24), 0)
    codec = Codec(bits=8)
    payload = empty_payload(codec, 2, 64, "cpu")
    codes, scales = payload_views(payload, codec, 2, 64)
    with pytest.raises(TypeError, match="z has dtype torch.float64"):
        native.quantize_pack(z.double(), codec, 0, codes, scales)
    with pytest.raises(TypeError, match="z must be a 2-D tensor"):
        native.quantize_pack(z.tolist(), codec, 0, codes, scales)
    with pytest.raises(ValueError, match="contiguous"):
        native.quantize_pack(torch.randn(64, 2).T, codec, 0, codes, scales)
    with pytest.raises(TypeError, match="scales has dtype"):
        native.quantize_pack(z, codec, 0, codes, scales.float())
    with pytest.raises(ValueError, match="codes has shape"):
        native.quantize_pack(z, codec, 0, codes[:1], scales)
    with pytest.raises(ValueError, match="needs a scales"):
        native.unpack_dequantize(codes, None, codec, 64, torch.empty(2, 64))


def _c_quantize(z, z_dtype=1, n=2, k=64, bits=8, group=16, scale_dtype=3, codes=True, scales=True):
    lib = native.library("cpu")
    codes_buf = ctypes.create_string_buffer(512) if codes else None  # room for n=2, k=64
    scales_buf = ctypes.create_string_buffer(512) if scales else None
    rc = lib.resbm_cpu_quantize_pack(z.data_ptr(), z_dtype, n, k, bits, group, scale_dtype, 0, 0, codes_buf, scales_buf)
    return rc, lib.resbm_last_error().decode()


@needs_cpu_lib
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 3}, "bad bits=3"),
        ({"bits": 1}, "bad bits=1"),
        ({"group": 24}, "group=24 does not divide k=64"),
        ({"group": 0}, "group=0 does not divide"),
        ({"bits": 2, "group": 2}, "not a whole number of bytes"),
        ({"k": 0}, "bad shape"),
        ({"n": -1}, "bad shape"),
        ({"n": 2**62}, "too large"),
        ({"n": 0, "k": 2**61, "bits": 16}, "too large"),  # (k * bits would overflow)
        ({"z_dtype": 7}, "bad z_dtype=7"),
        ({"scale_dtype": 0}, "bad scale_dtype=0"),
        ({"codes": False}, "null pointer codes"),
        ({"scales": False}, "null pointer scales"),
    ],
)
def test_c_argument_errors(kwargs, message):
    rc, err = _c_quantize(torch.randn(2, 64), **kwargs)
    assert rc != 0
    assert err.startswith("resbm_cpu_quantize_pack: ") and message in err


@needs_cpu_lib
def test_c_misaligned_pointers():
    """Values, 16-bit codes and scales are accessed whole: a misaligned pointer is an error."""
    lib = native.library("cpu")
    buf = ctypes.create_string_buffer(1024)
    base = ctypes.addressof(buf) + (-ctypes.addressof(buf) % 16)
    err = lambda: lib.resbm_last_error().decode()  # noqa: E731
    # quantize_pack: z, z_dtype, n, k, bits, group, scale_dtype, stochastic, key, codes, scales
    assert lib.resbm_cpu_quantize_pack(base + 2, 1, 2, 64, 8, 16, 3, 0, 0, base, base) != 0
    assert "z is not 4-byte aligned" in err()
    assert lib.resbm_cpu_quantize_pack(base, 1, 2, 64, 8, 16, 3, 0, 0, base, base + 1) != 0
    assert "scales is not 2-byte aligned" in err()
    assert lib.resbm_cpu_quantize_pack(base, 1, 2, 64, 16, 0, 0, 0, 0, base + 1, None) != 0
    assert "codes is not 2-byte aligned (bits=16)" in err()
    # unpack_dequantize: codes, scales, n, k, bits, group, scale_dtype, out_dtype, out
    assert lib.resbm_cpu_unpack_dequantize(base, base, 2, 64, 8, 16, 1, 3, base + 1) != 0
    assert "out is not 2-byte aligned" in err()


@needs_cpu_lib
def test_c_dequantize_errors_and_empty():
    lib = native.library("cpu")
    buf = ctypes.create_string_buffer(64)
    assert lib.resbm_cpu_unpack_dequantize(buf, buf, 1, 8, 8, 8, 3, 9, buf) != 0
    assert "bad out_dtype=9" in lib.resbm_last_error().decode()
    assert lib.resbm_cpu_unpack_dequantize(None, buf, 1, 8, 8, 8, 3, 1, buf) != 0
    assert "null pointer codes" in lib.resbm_last_error().decode()
    assert lib.resbm_cpu_unpack_dequantize(None, None, 0, 8, 8, 8, 3, 1, None) == 0  # n = 0: nothing to do
    assert lib.resbm_abi_version() == native.ABI_VERSION == 7


def test_missing_library_fails_lazily(monkeypatch, tmp_path):
    monkeypatch.delenv("RESBM_CUDA_EMULATE", raising=False)  # CPU tensors: the CPU library
    monkeypatch.setattr(native, "_PKG_DIR", tmp_path / "resbm_kernels")
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setenv("RESBM_LIB_DIR", str(tmp_path))
    assert not native.available("cpu") and not native.available("cuda")
    codec = Codec(bits=8)
    codes, scales = torch.zeros(1, 8, dtype=torch.uint8), torch.ones(1, 1, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"libresbm_cpu.so is not available.*pip install \."):
        native.unpack_dequantize(codes, scales, codec, 8, torch.empty(1, 8))


# ---- CUDA library ----------------------------------------------------------------


@needs_cuda_library
@pytest.mark.skipif(torch.cuda.is_available(), reason="launching on bogus pointers is only safe without a GPU")
def test_cuda_library_reports_launch_errors():
    lib = native.library("cuda")
    rc = lib.resbm_cuda_quantize_pack(16, 1, 1, 8, 8, 8, 3, 0, 0, 16, 16, None)
    assert rc != 0
    assert re.match(r"resbm_cuda_quantize_pack: quantize_pack_kernel launch failed: .+", lib.resbm_last_error().decode())
    assert lib.resbm_cuda_quantize_pack(16, 1, 1, 8, 5, 8, 3, 0, 0, 16, 16, None) != 0
    assert "bad bits=5" in lib.resbm_last_error().decode()


@needs_cuda_kernels
@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cuda_matches_reference(bits, rounding, monkeypatch):
    """libresbm_cuda's codec kernels (on the CPU emulator without a GPU)."""
    emulate_cuda_without_gpu(monkeypatch)
    gen = torch.Generator().manual_seed(bits)
    for z_dtype in FLOATS:
        for scale_dtype in FLOATS:
            narrow = torch.float16 in (z_dtype, scale_dtype)
            z = _sample(33, 96, z_dtype, -6 if narrow else -20, 3 if narrow else 20, gen)
            for group in GROUPS[bits]:
                codec = Codec(bits=bits, group_size=group, scale_dtype=scale_dtype, rounding=rounding)
                expected = ref.write_payload(z, codec, 99)  # the CPU reference is the spec
                got = _native_payload(z.to(CUDA_KERNELS_DEVICE), codec, 99)
                assert torch.equal(got.cpu(), expected), codec.spec
                for dtype in FLOATS:
                    want = ref.read_payload(expected, codec, 33, 96, dtype)
                    out = _native_read(got, codec, 33, 96, dtype).cpu()
                    assert torch.equal(_bits(out), _bits(want)), (codec.spec, dtype)
    bad = torch.randn(2, 32, device=CUDA_KERNELS_DEVICE)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite input"):
        _native_payload(bad, Codec(bits=bits, group_size=None if bits == 16 else 16), 0)


# ---- native build checks ------------------------------------------------------------


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


def test_ctest_known_vectors(tmp_path):
    """Configure + build the CPU targets in a temp dir and run the C++ tests with ctest
    (the codec's known vectors; the CUDA emulator's primitives and launch checks)."""
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    if not cmake or not ctest:
        pytest.skip("cmake/ctest not found on PATH")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler found on PATH")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = _run([cmake, "-S", ROOT, "-B", tmp_path, *gen, "-DRESBM_CUDA=OFF"])
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = _run([cmake, "--build", tmp_path, "--target", "test_codec", "test_emulator"])
    assert build.returncode == 0, build.stdout + build.stderr
    test = _run([ctest, "--test-dir", tmp_path, "--output-on-failure"])
    assert test.returncode == 0, test.stdout + test.stderr
    assert "100% tests passed" in test.stdout and "cuda_emulator" in test.stdout


@needs_cuda_library
def test_cuda_kernels_do_not_spill():
    """libresbm_cuda holds its codec kernels for sm_80 and sm_90a, spilling nothing."""
    # codec_cuda.cu's kernels: their anonymous namespace's mangled name holds the file's name
    report = [r for r in cuda_library_resources() if "codec_cuda" in r[1]]
    for arch in CUDA_ARCHS:
        assert sum(r[0] == f"sm_{arch}" for r in report) == 3, report  # three kernels per arch
    assert all(r[3] == r[4] == 0 for r in report), report


_C_KINDS = {"int": "i", "int64_t": "l", "uint64_t": "q", "uint32_t": "u", "float": "f"}
_CTYPES_KINDS = {ctypes.c_void_p: "p", ctypes.c_int: "i", ctypes.c_int64: "l", ctypes.c_uint64: "q",
                 ctypes.c_uint32: "u", ctypes.c_float: "f"}


def _header_signatures() -> dict[str, str]:
    """{function: argument kinds (p pointer, i int, l int64, q uint64, u uint32, f float)} of c_api.h."""
    text = (ROOT / "csrc" / "include" / "resbm" / "c_api.h").read_text()
    signatures = {}
    for name, params in re.findall(r"RESBM_API [\w\s*]*?\b(resbm_\w+)\(([^)]*)\);", text):
        params = [" ".join(p.split()) for p in params.split(",")]
        signatures[name] = "".join("p" if "*" in p else _C_KINDS[p.rsplit(" ", 1)[0]]
                                   for p in params if p not in ("", "void"))
    return signatures


@pytest.mark.parametrize("which", [pytest.param("cpu", marks=needs_cpu_lib),
                                   pytest.param("cuda_emu", marks=needs_cuda_emulator),
                                   pytest.param("cuda", marks=needs_cuda_library)])
def test_ctypes_declarations_match_the_c_api_header(which):
    """Every function of a library is declared to ctypes with the argument types
    c_api.h gives it (a mismatch passes garbage that only the call which uses
    the argument would show), and every function the header lists is there."""
    prefix = "resbm_cpu_" if which == "cpu" else "resbm_cuda_"
    header = {name: kinds for name, kinds in _header_signatures().items()
              if name.startswith(prefix) or name in ("resbm_abi_version", "resbm_last_error")}
    assert len(header) == (4 if which == "cpu" else 13), sorted(header)  # (the parse found them all)
    lib = native.library(which)
    for name, kinds in header.items():
        declared = "".join(_CTYPES_KINDS[t] for t in getattr(lib, name).argtypes)
        assert declared == kinds, f"{name}: declared {declared!r}, c_api.h has {kinds!r}"
