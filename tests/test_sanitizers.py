"""The native libraries under AddressSanitizer and UndefinedBehaviorSanitizer, on the CPU.

CMake builds the host libraries with ``RESBM_SANITIZE=address,undefined`` into a
temporary directory; a Python process with the ASan runtime preloaded then runs
the cases of ``bench/sanitize_cuda.py`` (the list compute-sanitizer's memcheck
runs on a GPU) against them: the CPU codec library, and the CUDA kernels (codec
and the four passes) on the emulator of ``csrc/emu``. torch allocates CPU
tensors with posix_memalign, which ASan intercepts, so a kernel that reads or
writes past a tensor stops the process with a report, as memcheck fails the
kernel on a GPU; the emulator also poisons its shared-memory buffer beyond the
launch's dynamic shared memory. A positive control checks that an overrun of a
torch tensor by the library is caught at all.

Needs Linux, cmake and GCC (its libasan); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SANITIZERS = "address,undefined"
TARGETS = ("resbm_cpu", "resbm_cuda_emu", "test_codec", "test_emulator")
REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:")  # an ASan or a UBSan report


def _run(cmd, timeout=600, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _runtime_library(compiler: str, name: str) -> str | None:
    """The compiler's copy of shared library ``name`` (e.g. libasan.so), or None."""
    found = _run([compiler, f"-print-file-name={name}"]).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    """(build directory, environment for a sanitized Python process)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the sanitizer build is set up for Linux")
    cmake = shutil.which("cmake")
    compiler = shutil.which("g++")
    if not cmake or not compiler:
        pytest.skip("cmake and g++ are needed for the sanitizer build")
    asan = _runtime_library(compiler, "libasan.so")
    cxx_runtime = _runtime_library(compiler, "libstdc++.so.6") or _runtime_library(compiler, "libstdc++.so")
    if not asan or not cxx_runtime:
        pytest.skip(f"{compiler} has no libasan / libstdc++ runtime to preload")
    build = tmp_path_factory.mktemp("sanitized")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    # -O1 with line tables only (-g1): ASan's usual level, reports still name file and line; the
    # emulated passes' translation unit builds in half the time of -O2 -g (~45 against ~95 s on a
    # 2-core EPYC, 2026-11-27), and the cases below ran as fast (~90 s either way)
    cfg = _run([cmake, "-S", ROOT, "-B", build, *gen, "-DRESBM_CUDA=OFF", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1", f"-DCMAKE_CXX_COMPILER={compiler}",
                f"-DRESBM_SANITIZE={SANITIZERS}"])
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    res = _run([cmake, "--build", build, "--target", *TARGETS], timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    env = dict(
        os.environ,
        # the ASan runtime first; libstdc++ too, so that ASan finds the C++ runtime it
        # intercepts (Triton's extension throws through it on import)
        LD_PRELOAD=f"{asan} {cxx_runtime}",
        ASAN_OPTIONS="detect_leaks=0",  # the interpreter keeps its objects at exit
        UBSAN_OPTIONS="print_stacktrace=1",
        RESBM_LIB_DIR=str(build),  # searched before the installed libraries
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.pop("RESBM_CUDA_EMULATE", None)
    return build, env


def _python(env, *args, **extra_env):
    return _run([sys.executable, *args], env=dict(env, **extra_env))


def test_cpp_tests_under_sanitizers(sanitized):
    """The codec's known vectors and the emulator's primitives, instrumented."""
    build, _ = sanitized
    for name in ("test_codec", "test_emulator"):
        res = _run([build / name])
        log = res.stdout + res.stderr
        assert res.returncode == 0 and not REPORT.search(log), log


OVERRUN = """\
import ctypes, torch
from resbm_kernels import native
lib = native.library("cpu")
z = torch.randn(4, 64)
codes = torch.empty(4 * 64 - 16, dtype=torch.uint8)  # one row's codes short
scales = torch.empty(4, 1, dtype=torch.bfloat16)
# int8, one scale per row (bf16 = 3), nearest
lib.resbm_cpu_quantize_pack(z.data_ptr(), 1, 4, 64, 8, 64, 3, 0, 0, codes.data_ptr(), scales.data_ptr())
print("no report")
"""


def test_an_overrun_is_caught(sanitized):
    """Positive control: the library writing past a torch tensor stops the process with
    ASan's report (the C ABI cannot know a buffer's size; the Python layer checks it)."""
    _, env = sanitized
    res = _python(env, "-c", OVERRUN)
    log = res.stdout + res.stderr
    assert res.returncode != 0 and "heap-buffer-overflow" in log and "no report" not in log, log
    assert "codec_cpu.cpp" in log, log  # the report points into the library's source


def _sanitize_run(env, backends, **extra_env):
    res = _python(env, ROOT / "bench" / "sanitize_cuda.py", "--device", "cpu", "--backends", backends, **extra_env)
    log = res.stdout + res.stderr
    assert not REPORT.search(log), log
    assert res.returncode == 0, log
    summary = re.search(r"summary: (\d+) cases ran clean, 0 failed, 0 notes", log)
    assert summary, log
    return int(summary.group(1)), log


def test_cpu_codec_library(sanitized):
    build, env = sanitized
    cases, log = _sanitize_run(env, "native")
    # (bits 16: one codec; 8, 4, 2: two groups x two roundings) x two dtypes x three row counts
    assert cases == (1 + 3 * 2 * 2) * 2 * 3, log
    assert f"library cpu: {build / 'libresbm_cpu.so'}" in log, log


def test_cuda_kernels_on_the_emulator(sanitized):
    """The CUDA codec kernels and the four fused passes, every shape, row count and norm,
    then the reduced set at k = 16 and 128 with every kernel on wgmma and with none."""
    build, env = sanitized
    cases, log = _sanitize_run(env, "native,cuda", RESBM_CUDA_EMULATE="1")
    # the codec's, then bits x (d, k) x row counts x norm, then bits x (d, k) twice
    assert cases == 78 + 4 * 2 * 3 * 2 + 2 * 4 * 2, log
    for wgmma in "10":
        assert log.count(f"ok       cuda[RESBM_CUDA_WGMMA={wgmma}] ") == 4 * 2, log
    assert f"library cuda_emu: {build / 'libresbm_cuda_emu.so'}" in log, log
