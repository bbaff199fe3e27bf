"""Builds the native libraries (csrc/) with CMake + Ninja into resbm_kernels/lib/.

Environment: RESBM_CUDA=0|1|auto (skip, require, build if nvcc is found) and
RESBM_CUDA_ARCHS (default "80;90a;90-virtual": 90a adds the sm_90 wgmma kernels,
90-virtual PTX for later GPUs). nvcc is looked up as $CUDA_HOME/bin/nvcc
when CUDA_HOME is set, else /usr/local/cuda/bin/nvcc, else on PATH. A failed
native build only warns (the package then works as pure Python), unless
RESBM_CUDA=1 asked for the CUDA library.
"""

import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = pathlib.Path(__file__).resolve().parent
LIB_SUBDIR = pathlib.Path("resbm_kernels", "lib")
LIB_NAMES = ("libresbm_cpu.so", "libresbm_cuda.so", "libresbm_cuda_emu.so")


def warn(message: str) -> None:
    print(f"\nWARNING: resbm-kernels: {message}\n", file=sys.stderr, flush=True)


def find_nvcc():
    home = os.environ.get("CUDA_HOME")
    if home:  # an explicit CUDA_HOME is authoritative
        nvcc = pathlib.Path(home, "bin", "nvcc")
        return str(nvcc) if nvcc.is_file() else None
    if pathlib.Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


def cmake_build(build_dir: pathlib.Path, nvcc, archs: str) -> None:
    """Configure and build in a fresh build_dir; raises on failure."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake was not found on PATH")
    shutil.rmtree(build_dir, ignore_errors=True)
    args = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            "-DRESBM_BUILD_TESTS=OFF"]
    ninja = shutil.which("ninja")
    if ninja:
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    if nvcc:
        args += ["-DRESBM_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DRESBM_CUDA_ARCHS={archs}"]
    else:
        args += ["-DRESBM_CUDA=OFF"]
    subprocess.run(args, check=True)
    subprocess.run([cmake, "--build", str(build_dir)], check=True)


class CMakeBuild(build_ext):
    """Runs CMake instead of compiling extension sources; ships the .so files."""

    def build_extension(self, ext):
        mode = os.environ.get("RESBM_CUDA", "auto").strip().lower()
        if mode not in ("0", "1", "auto"):
            raise RuntimeError(f"RESBM_CUDA must be 0, 1 or auto, got {mode!r}")
        archs = os.environ.get("RESBM_CUDA_ARCHS", "80;90a;90-virtual")
        nvcc = find_nvcc() if mode != "0" else None
        if nvcc is None and mode == "1":
            raise RuntimeError("RESBM_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if nvcc is None and mode == "auto":
            warn("nvcc not found (CUDA_HOME, /usr/local/cuda/bin, PATH): building without libresbm_cuda")
        build_dir = pathlib.Path(self.build_temp, "cmake")
        out_dir = pathlib.Path(self.build_lib, LIB_SUBDIR)
        for name in LIB_NAMES:  # never ship a stale library from an earlier build
            (out_dir / name).unlink(missing_ok=True)
        attempts = [nvcc, None] if nvcc else [None]
        for attempt in attempts:
            try:
                cmake_build(build_dir, attempt, archs)
                break
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                if attempt and mode == "1":
                    raise RuntimeError(f"RESBM_CUDA=1 but the CUDA build failed: {e}") from e
                warn(f"native build {'with CUDA ' if attempt else ''}failed ({e}); "
                     + ("retrying without CUDA" if attempt else
                        "installing as pure Python (resbm_kernels.native will be unavailable)"))
        else:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in LIB_NAMES:
            if (build_dir / name).is_file():
                shutil.copy2(build_dir / name, out_dir / name)

    def _built(self):
        lib_dir = pathlib.Path(self.build_lib, LIB_SUBDIR)
        return [lib_dir / name for name in LIB_NAMES if (lib_dir / name).is_file()]

    def copy_extensions_to_source(self):
        (ROOT / LIB_SUBDIR).mkdir(exist_ok=True)
        for name in LIB_NAMES:
            (ROOT / LIB_SUBDIR / name).unlink(missing_ok=True)
        for lib in self._built():
            shutil.copy2(lib, ROOT / LIB_SUBDIR / lib.name)

    def get_outputs(self):
        return [str(p) for p in self._built()]

    def get_output_mapping(self):
        if not self.inplace:
            return {}
        return {str(p): str(ROOT / LIB_SUBDIR / p.name) for p in self._built()}


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: the libraries use no Python ABI, only the platform's."""

    def get_tag(self):
        return ("py3", "none", super().get_tag()[2])


setup(
    ext_modules=[Extension("resbm_kernels.lib.native", sources=[])],
    cmdclass={"build_ext": CMakeBuild, "bdist_wheel": PlatformWheel},
)
