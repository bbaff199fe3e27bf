"""The CUDA backend (csrc/cuda/passes.cu through resbm_kernels.backends.cuda).

Two groups:

- CPU-runnable: the built library holds every kernel for sm_80 and sm_90a
  with zero register spills and a tensor-core main loop whose size is reported, the
  C ABI rejects bad arguments with messages naming the problem before
  touching CUDA, launch failures name the kernel, and the backend refuses
  CPU tensors cleanly.
- The kernels (on the GPU; without one, the same kernels on the CPU emulator,
  libresbm_cuda_emu, through ``RESBM_CUDA_EMULATE=1``): every pass against the
  reference for random inputs, dtypes fp32/fp16/bf16, N with masked tails;
  fresh outputs are poisoned (NaN / 0xFF) so unwritten elements show.
- GPU only: streams, no synchronisation, replay in a CUDA graph, and one run
  of each kernel under ``compute-sanitizer --tool memcheck``.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from resbm_kernels import native, ops
from resbm_kernels.backends import reference as ref
from resbm_kernels.backends import use_backend
from helpers import CUDA_ARCHS, cuda_library_resources, cuda_library_sass, longest_run_of_loads, main_loops
from helpers import sass_functions, sass_loops
from helpers import assert_close_payload, exact, normal, poison_fast_outputs, rel_err
from helpers import check_decode_backward_mixed_dtypes, check_encode_row_stats, check_passes_do_not_synchronise
from helpers import check_boundary_compiled_with_cuda_graphs, check_boundary_draws_anew_in_a_cuda_graph
from helpers import check_boundary_under_autocast
from helpers import check_seed_offset_is_read_on_the_device
from helpers import check_passes_replay_in_a_cuda_graph
from helpers import FAST_CODECS, FINISH_LAYOUTS, GRAD_CODEC, exact_finish_case, finish_weight_grad_reference
from helpers import NO_WORK_OPS, training_pass_calls
from helpers import CUDA_KERNELS_DEVICE, HAS_CUDA_GPU, emulate_cuda_without_gpu, needs_cuda_kernels, use_projection
from helpers import needs_cuda_emulator, needs_cuda_library
from helpers import ids as _ids
from helpers import rel_tol as tol
from resbm_kernels.backends import cuda as cb
from resbm_kernels.codec import Codec

FAST_ALLOCATORS = {name: getattr(cb.fast, name) for name in ("empty", "new_payload")}  # before any poisoning

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KPADS = (16, 32, 64, 128, 256)
KERNELS = ("project_quantize", "dequant_project", "weight_grad")  # + prepare_operand, weight_operand per dtype

HAS_GPU = HAS_CUDA_GPU
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and libresbm_cuda (build it with cmake/pip)")
DEVICE = CUDA_KERNELS_DEVICE  # the kernels' device: the GPU, else the CPU emulator
needs_kernels = needs_cuda_kernels
no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="bogus pointers are only safe without a GPU")


# ---- CPU-runnable: compilation ----------------------------------------------------------


# the wgmma variants of each pass kernel (project_quantize, dequant_project, weight_grad): bf16 and
# fp16, KPAD up to 128
WGMMA_VARIANTS = 2 * sum(kpad <= 128 for kpad in KPADS)


@needs_cuda_library
def test_pass_kernels_compile_without_spills():
    """Every pass kernel instantiation is in the built library for sm_80 and
    sm_90a, with zero spills (no stack or local memory)."""
    report = cuda_library_resources()
    for arch in CUDA_ARCHS:
        funcs = [r for r in report if r[0] == f"sm_{arch}"]
        for kernel in KERNELS:
            # 3 dtypes x 5 padded k per kernel family and arch, and the wgmma variants
            want = 3 * len(KPADS) + WGMMA_VARIANTS
            assert sum(f"{kernel}_kernelILi" in r[1] for r in funcs) == want, (kernel, arch, report)
        assert sum("prepare_operand_kernel" in r[1] for r in funcs) == 3, (arch, report)  # one per dtype
        assert sum("weight_operand_kernelILi" in r[1] for r in funcs) == 3 * len(KPADS), (arch, report)
        assert sum("finish_weight_grad_kernel" in r[1] for r in funcs) == 1, (arch, report)
    spilling = [r for r in report if r[3] or r[4]]
    assert not spilling, "kernels use stack or local memory (spills):\n" + "\n".join(map(str, spilling))


@needs_cuda_library
def test_dequant_project_keeps_its_blocks_per_sm():
    """dequant_project's blocks wait on memory, so how many an SM holds sets its speed:
    at k <= 32 each needs at most 128 registers a thread (four blocks of 128 threads in
    an SM's 64 K registers), bf16 on sm_90a at most 96 (five). Loading a tile's x or residual ahead of use took it to 180 (bf16)
    and an H100's decode forward at N=65536 from 266 to 369 us (2026-11-27)."""
    report = cuda_library_resources()
    heavy = [(arch, name, regs) for arch, name, regs, *_ in report
             if re.search(r"dequant_project_kernelILi\dELi(16|32)E", name) and regs > 128]
    assert not heavy, heavy
    # bf16 on sm_90a (the benchmarked decode forward) holds five: 96 registers at most, as
    # registers are given out 8 a thread (98 would take 104: four blocks, as a 2026-11-28
    # attempt at cheaper ring-buffer indices showed); shared memory also allows five there
    heavy = [(name, regs) for arch, name, regs, *_ in report
             if arch == "sm_90a" and re.search(r"dequant_project_kernelILi3ELi(16|32)E", name) and regs > 96]
    assert not heavy, heavy


@pytest.fixture(scope="module")
def library_sass(tmp_path_factory) -> dict[str, str]:
    """{mangled kernel name: its sm_90a SASS} of the built library."""
    return sass_functions(cuda_library_sass(tmp_path_factory.mktemp("sass")))


@needs_cuda_library
def test_finishing_kernels_load_splits_together(library_sass):
    """The kernels that sum per-split partials (finish_weight_grad_kernel, and
    finish_rows_kernel after a d-split projection, every dtype and KPAD) issue
    the partials of four elements and eight splits (32 loads) before they add
    the first (split_sums): until 2026-11-28 each element's splits were added as
    they came, a loop per element, about one memory latency per element in
    finish_rows (its body unrolled by 16 splits never ran: a d split has at most
    8; longest run: 16) and at most 21 loads before an add in finish_weight_grad.
    From the sm_90a SASS: the longest run of global loads without an add, 32
    (finish_rows at KPAD=16: 19, the scheduler's choice, which starts adding the
    first splits while the last ones load; 21 before its parameters grew by the seed
    offset, 2026-11-28; 46 in finish_weight_grad). More than 17 tells the two
    apart."""
    runs = {name: longest_run_of_loads(body, "FADD") for name, body in library_sass.items()
            if "finish_weight_grad_kernel" in name or "finish_rows_kernelILi" in name}
    assert len(runs) == 1 + 3 * len(KPADS), sorted(runs)
    few = {name: n for name, n in runs.items() if n <= 17}
    assert not few, few


@needs_cuda_library
def test_dequant_project_plain_tiles_stored_lean(library_sass):
    """Decode forward without a residual stores each whole output tile past the
    identity columns in a loop of its own, one per output dtype (store_plain_tile16
    for bf16 and fp16, from a 16-bit staging tile; store_plain_tile for fp32):
    16-byte stores, at most 30 sm_90a instructions a chunk of 8 columns, where the
    general epilogue tests the flags, the bounds and the output dtype for every
    chunk (a loop body of about 310 static instructions, about 49 executed for such
    a chunk, 23 with the fp32 staging tile; 2026-11-28). 16-bit inputs, KPAD <= 128
    (the benchmarked kernels), on mma.sync and on wgmma."""
    checked = 0
    for name, body in library_sass.items():
        if re.search(r"dequant_project_kernelILi[23]ELi(16|32|64|128)E", name):
            ins, loops, _ = sass_loops(body)
            lean = [(first, last) for first, last in loops if last - first < 30
                    and any("STG.E.128" in x for x in ins[first:last + 1])]
            assert len(lean) >= 3, (name, [last - first + 1 for first, last in loops])
            checked += 1
    assert checked == 2 * WGMMA_VARIANTS  # (each 16-bit KPAD <= 128 kernel has a wgmma variant)


@needs_cuda_library
def test_projection_sums_of_squares_on_tensor_cores(library_sass):
    """The mma.sync projection loop (encode forward, decode backward; encode
    backward's pre-pass over x) of 16-bit inputs takes the rows' sums of squares
    from the diagonal of the Gram matrix A A^T, two more mma a k step on the A
    fragments it loaded: no fp32 arithmetic left in its main loop, where the
    squares took 48 FFMA / FMUL / FADD a trip (and their conversions: 196 sm_90a
    instructions a trip at KPAD=32 from 238; 2026-11-28). fp32 inputs (3xTF32)
    keep the per-element squares."""
    checked = 0
    for name, body in library_sass.items():
        if re.search(r"project_quantize_kernelILi[23]ELi\d+ELb0E", name):
            float_ops = sum(sum(main_loops(body, opcode=op)) for op in ("FFMA", "FMUL", "FADD"))
            assert float_ops == 0, (name, float_ops)
            checked += 1
    assert checked == 2 * len(KPADS)


@needs_cuda_library
def test_projection_copies_whole_tiles_lean(library_sass):
    """The mma.sync projection loop (project_loop: encode forward, decode backward,
    encode backward's pre-pass) copies a whole tile (inside d, the block's rows
    below n) from per-thread sources advanced a tile at a time, untested: a
    stretch of straight-line code in its main loop issues all of a tile's cp.async
    copies (at least 4) at most 6 sm_90a instructions a copy apart, where every
    copy formed its 64-bit offset and tested its row and column (about 12 a copy at
    KPAD=128, 2026-11-28). Every dtype and KPAD."""
    checked = 0
    for name, body in library_sass.items():
        if re.search(r"project_quantize_kernelILi\dELi\d+ELb0E", name):
            ins, loops, targets = sass_loops(body)
            first, last = max(loops, key=lambda loop: sum("HMMA" in x for x in ins[loop[0]:loop[1] + 1]))
            starts = {t for t in targets if t is not None} | {i + 1 for i, t in enumerate(targets) if t is not None}
            cuts = sorted({first, last + 1} | {i for i in starts if first < i <= last})
            blocks = [ins[a:b] for a, b in zip(cuts, cuts[1:])]
            copies = [(sum("LDGSTS" in x for x in b), len(b)) for b in blocks]
            assert any(n >= 4 and size <= 6 * n for n, size in copies), (name, [c for c in copies if c[0]])
            checked += 1
    assert checked == 3 * len(KPADS)


@needs_cuda_library
def test_pass_kernels_main_loops(library_sass):
    """Static instruction counts of each sm_90a pass kernel's tensor-core loops
    (per thread, per trip, an inner loop without tensor-core instructions
    counted once; innermost first), printed as a table with ``pytest -s``, as
    tests/test_triton_static.py does for Triton: a loop that grows is a kernel
    doing more work per byte. Every kernel has one; the wgmma variants' are
    warpgroup MMAs (HGMMA), the others' mma.sync (HMMA)."""
    names = {1: "fp32", 2: "fp16", 3: "bf16"}
    rows = []
    for name, body in library_sass.items():
        m = re.search(r"(\w+?)_kernelILi(\d)ELi(\d+)E(Lb1E)?", name)
        if m and m.group(1).endswith(KERNELS):
            kernel = next(k for k in KERNELS if m.group(1).endswith(k)) + ("/wgmma" if m.group(4) else "")
            wgmma = "HGMMA." in body
            assert wgmma == bool(m.group(4)), (name, "HGMMA" if wgmma else "no HGMMA")
            rows.append((kernel, names[int(m.group(2))], int(m.group(3)), main_loops(body)))
    rows.sort()
    print(f"\n{'kernel':23} {'dtype':5} {'KPAD':>4}  tensor-core loops (sm_90a instructions per trip)")
    for kernel, dtype, kpad, loops in rows:
        print(f"{kernel:23} {dtype:5} {kpad:>4}  {loops}")
    assert len(rows) == len(KERNELS) * (3 * len(KPADS) + WGMMA_VARIANTS), rows
    assert all(loops for *_, loops in rows), [r for r in rows if not r[3]]


@needs_cuda_library
def test_row_kernels_load_eight_elements_at_a_time(library_sass):
    """The row kernels' element-wise global loads are issued eight at a time
    (for_block_elements), not one per memory latency: dequant_project loads the
    codes and scales of eight payload elements before its first shared-memory
    store (until 2026-11-27 each element's code byte was used before its scale
    was loaded: 5 loads there), and project_quantize's finish_rows loads eight
    elements of x[:, :k] between stores (was 1: load, add, store). From the
    sm_90a SASS, every dtype and KPAD."""
    def loads_before_first_shared_store(body):
        return len(re.findall(r"\bLDG\.", body[:re.search(r"\bSTS(\.\w+)*\s", body).start()]))

    counts = {name: loads_before_first_shared_store(body) if "dequant_project_kernel" in name
              else longest_run_of_loads(body, "STS|STG")
              for name, body in library_sass.items() if re.search(r"(dequant_project|project_quantize)_kernelILi", name)}
    assert len(counts) == 2 * (3 * len(KPADS) + WGMMA_VARIANTS), sorted(counts)
    few = {name: n for name, n in counts.items() if n < 8}
    assert not few, few


@needs_cuda_library
def test_quantize_rows_reduces_four_groups_at_once(library_sass):
    """quantize_rows (project_quantize's epilogue, and finish_rows_kernel's after a d split)
    reduces the absmax of four (row, group) units at once, their shuffle chains interleaved:
    four first-step shuffles (lane offset 16) in the SASS, not one (until 2026-11-27 a warp
    quantized one group after another, waiting on each group's five shuffles in turn)."""
    counts = {name: len(re.findall(r"SHFL\.BFLY[^;]*, 0x10,", body)) for name, body in library_sass.items()
              if re.search(r"(project_quantize|finish_rows)_kernelILi", name)}
    assert len(counts) == 2 * 3 * len(KPADS) + WGMMA_VARIANTS, sorted(counts)
    few = {name: n for name, n in counts.items() if n < 4}
    assert not few, few


# ---- CPU-runnable: the C ABI rejects bad arguments ----------------------------------------


def _buf(n=4096):
    b = ctypes.create_string_buffer(n + 16)
    addr = ctypes.addressof(b)
    return b, addr + (-addr % 16)  # a 16-byte aligned address inside b


@pytest.fixture
def lib():  # for tests marked needs_cuda_library
    return native.library("cuda")


# valid arguments of two pass entry points, in order ("p": a 16-byte aligned buffer's address)
_C_PASS_ARGS = {
    "resbm_cuda_encode_forward": dict(
        x="p", dtype=3, n=4, d=64, k=16, w_e="p", norm=None, eps=1e-6, bits=8, group=16, sdt=3, stoch=0, seed=0,
        seed_offset=None, codes="p", scales="p", header=None, row_stats=None, partial=None, splits=1, workspace="p",
        stream=None),
    "resbm_cuda_decode_backward": dict(
        grad_h="p", dtype=3, n=4, d=64, k=16, w_d="p", bits=8, group=16, sdt=3, stoch=1, seed=0, seed_offset=None,
        codes="p", scales="p", header=None, partial=None, splits=1, workspace="p", stream=None),
}


def _c_pass(lib, fn: str, **kw):
    """(return code, error message) of pass entry point ``fn`` called with its
    valid arguments but ``kw``; "p" / "p+2": the aligned buffer's address (plus
    an offset), known only here."""
    keep, p = _buf()
    a = {**_C_PASS_ARGS[fn], **kw}
    rc = getattr(lib, fn)(*(p + int(v[2:] or 0) if isinstance(v, str) else v for v in a.values()))
    return rc, lib.resbm_last_error().decode()


def _encode_fwd(lib, **kw):
    return _c_pass(lib, "resbm_cuda_encode_forward", **kw)


@needs_cuda_library
@pytest.mark.parametrize("kwargs, message", [
    ({"d": 0}, "bad shape"),
    ({"n": -1}, "bad shape"),
    ({"k": 0}, "bad shape"),
    ({"d": 72}, "multiples of 16"),
    ({"k": 24, "group": 24}, "multiples of 16"),
    ({"k": 272, "d": 544, "group": 16}, "too large (at most 256)"),
    ({"k": 128, "d": 64, "group": 16}, "exceeds d=64"),
    ({"n": 2**40}, "too large"),
    ({"dtype": 9}, "bad dtype=9"),
    ({"bits": 3}, "bad bits=3"),
    ({"group": 24}, "group=24 does not divide k=16"),
    ({"sdt": 0}, "bad scale_dtype=0"),
    ({"x": None}, "null pointer x"),
    ({"w_e": None}, "null pointer w_e"),
    ({"codes": None}, "null pointer codes"),
    ({"scales": None}, "null pointer scales"),
    ({"workspace": None}, "null pointer workspace"),
    ({"splits": 0}, "bad splits=0"),
    ({"splits": 65536, "partial": "p"}, "bad splits=65536"),
    ({"splits": 2}, "null pointer partial"),
    ({"splits": 2, "partial": "p+2"}, "partial is not 4-byte aligned"),
    ({"row_stats": "p"}, "row_stats are RMSNorm statistics: they need norm_weight"),
    ({"row_stats": "p+2", "norm": "p"}, "row_stats is not 4-byte aligned"),
    ({"seed_offset": "p+4"}, "seed_offset is not 8-byte aligned"),
])
def test_c_encode_forward_rejects(lib, kwargs, message):
    rc, err = _encode_fwd(lib, **kwargs)
    assert rc == 1, err
    assert err.startswith("resbm_cuda_encode_forward: ") and message in err, err


@needs_cuda_library
def test_c_misaligned_and_zero_rows(lib):
    keep, p = _buf()
    rc, err = _encode_fwd(lib, x=p + 2)
    assert rc == 1 and "x is not 16-byte aligned" in err
    rc, err = _encode_fwd(lib, x=p + 1)
    assert rc == 1 and "x is not 2-byte aligned" in err
    rc, err = _encode_fwd(lib, scales=p + 1)
    assert rc == 1 and "scales is not 2-byte aligned" in err
    rc, err = _encode_fwd(lib, sdt=1, scales=p + 2)
    assert rc == 1 and "scales is not 4-byte aligned" in err
    rc, err = _encode_fwd(lib, bits=16, codes=p + 1, scales=None)
    assert rc == 1 and "codes is not 2-byte aligned (bits=16)" in err
    rc, err = _encode_fwd(lib, workspace=p + 8)
    assert rc == 1 and "workspace is not 16-byte aligned" in err
    rc, err = _encode_fwd(lib, n=0, x=None, codes=None, scales=None)
    assert rc == 0  # nothing to do: no CUDA call at all


@needs_cuda_library
def test_c_other_passes_reject(lib):
    keep, p = _buf()
    err = lambda: lib.resbm_last_error().decode()  # noqa: E731
    # decode forward: codes, scales, n, d, k, bits, group, sdt, w_d, w_dtype, residual, out, out_dtype,
    # workspace, stream
    assert lib.resbm_cuda_decode_forward(p, p, 4, 64, 16, 8, 16, 3, p, 3, None, None, 3, None, None) == 1
    assert err() == "resbm_cuda_decode_forward: null pointer out"
    assert lib.resbm_cuda_decode_forward(p, p, 4, 64, 16, 8, 16, 3, p, 5, None, p, 3, None, None) == 1
    assert "bad w_dtype=5" in err()
    assert lib.resbm_cuda_decode_forward(p, p, 4, 64, 16, 8, 16, 3, p, 3, p + 4, p, 3, None, None) == 1
    assert "residual is not 16-byte aligned" in err()
    assert lib.resbm_cuda_decode_forward(p, p, 4, 64, 16, 8, 16, 3, p, 3, None, p, 7, None, None) == 1
    assert "bad out_dtype=7" in err()
    assert lib.resbm_cuda_decode_forward(p, p, 4, 64, 16, 8, 16, 3, p + 2, 3, None, p, 3, None, None) == 1
    assert "w_d is not 16-byte aligned" in err()  # its rows stream with 16-byte copies
    assert lib.resbm_cuda_decode_forward(p, p, 4, 64, 16, 8, 16, 3, p, 1, None, p, 1, None, None) == 1
    assert err() == "resbm_cuda_decode_forward: null pointer workspace"  # fp32 weights are prepared
    for kwargs, message in (({"w_d": None}, "null pointer w_d"), ({"bits": 4, "group": 3}, "does not divide"),
                            ({"workspace": None}, "null pointer workspace"), ({"splits": 3}, "null pointer partial"),
                            ({"seed_offset": "p+2"}, "seed_offset is not 8-byte aligned")):
        rc, error = _c_pass(lib, "resbm_cuda_decode_backward", **kwargs)
        assert rc == 1 and error.startswith("resbm_cuda_decode_backward: ") and message in error, error
    # encode backward: codes, scales, n, d, k, bits, group, sdt, x, dtype, w_e, gamma, eps, grad_x, rscale,
    # row_stats, workspace, stream
    assert lib.resbm_cuda_encode_backward(p, p, 4, 64, 16, 8, 16, 3, None, 3, p, p, 1e-6, p, p, None, p,
                                          None) == 1
    assert err() == "resbm_cuda_encode_backward: null pointer x"
    assert lib.resbm_cuda_encode_backward(p, p, 4, 64, 16, 8, 16, 3, p, 3, p, p + 2, 1e-6, p, p, None, p,
                                          None) == 1
    assert "norm_weight is not 16-byte aligned" in err()
    assert lib.resbm_cuda_encode_backward(p, p, 4, 64, 16, 8, 16, 3, p, 3, p, p, 1e-6, p, p, p + 2, p,
                                          None) == 1
    assert "row_stats is not 4-byte aligned" in err()
    assert lib.resbm_cuda_encode_backward(p, p, 4, 64, 16, 8, 16, 3, p, 3, p, None, 1e-6, p, None, p, p,
                                          None) == 1
    assert err() == "resbm_cuda_encode_backward: row_stats are RMSNorm statistics: they need norm_weight"
    assert lib.resbm_cuda_encode_backward(p, p, 4, 64, 16, 8, 16, 3, p, 3, p, None, 1e-6, p, None, None, None,
                                          None) == 1
    assert err() == "resbm_cuda_encode_backward: null pointer workspace"
    # weight grad: a, dtype, n, d, k, codes, scales, bits, group, sdt, rscale, splits, transpose, partial,
    # workspace, stream
    assert lib.resbm_cuda_weight_grad(p, 3, 4, 64, 16, p, p, 8, 16, 3, None, 0, 0, p, p, None) == 1
    assert "bad splits=0" in err()
    assert lib.resbm_cuda_weight_grad(p, 3, 4, 64, 16, p, p, 8, 16, 3, None, 1, 0, None, p, None) == 1
    assert err() == "resbm_cuda_weight_grad: null pointer partial"
    assert lib.resbm_cuda_weight_grad(p, 3, 4, 64, 16, p, p, 8, 16, 3, None, 1, 0, p, None, None) == 1
    assert err() == "resbm_cuda_weight_grad: null pointer workspace"
    assert lib.resbm_cuda_weight_grad(p, 3, 4, 64, 16, p, p, 8, 16, 3, None, 1, 0, p, p + 8, None) == 1
    assert err() == "resbm_cuda_weight_grad: workspace is not 16-byte aligned"


@needs_cuda_library
@pytest.mark.parametrize("dtype, n, k, elem", [(3, 100, 48, 2), (2, 8, 16, 2), (1, 1, 256, 4), (3, 0, 32, 2)])
def test_c_weight_grad_workspace_bytes(lib, dtype, n, k, elem):
    """(rscale * zhat)^T, hi and lo (bf16: hi alone): padded k (a power of two from 16) x rows
    rounded up to 8, operand elements of 2 bytes (4 for fp32's tf32)."""
    out = ctypes.c_int64(-1)
    assert lib.resbm_cuda_weight_grad_workspace_bytes(dtype, n, k, ctypes.byref(out)) == 0
    kpad = max(16, 1 << (k - 1).bit_length())
    parts = 1 if dtype == 3 else 2
    assert out.value == parts * kpad * (-(-n // 8) * 8) * elem


@needs_cuda_library
def test_c_weight_grad_workspace_bytes_rejects(lib):
    out = ctypes.c_int64()
    err = lambda: lib.resbm_last_error().decode()  # noqa: E731
    assert lib.resbm_cuda_weight_grad_workspace_bytes(3, -1, 16, ctypes.byref(out)) == 1
    assert "bad n=-1" in err()
    assert lib.resbm_cuda_weight_grad_workspace_bytes(3, 8, 24, ctypes.byref(out)) == 1
    assert "bad k=24" in err()
    assert lib.resbm_cuda_weight_grad_workspace_bytes(4, 8, 16, ctypes.byref(out)) == 1
    assert "bad dtype=4" in err()
    assert lib.resbm_cuda_weight_grad_workspace_bytes(3, 8, 16, None) == 1
    assert err() == "resbm_cuda_weight_grad_workspace_bytes: null pointer bytes"


@needs_cuda_library
@pytest.mark.parametrize("pass_, dtype, d, k, norm, parts", [
    # (KPAD x d) operand parts for the projection + (d x KPAD) parts for the output projection
    (0, 3, 64, 16, 1, 1),    # encode forward with RMSNorm: gamma-folded, rounded to bf16
    (0, 3, 64, 16, 0, 1),    # encode forward: bf16 weights as they are
    (0, 1, 64, 16, 0, 2),    # fp32: tf32 hi + lo
    (1, 3, 64, 16, 0, 0),    # decode forward, 16-bit: w_d streams as it is
    (1, 1, 64, 16, 0, 2),    # decode forward, fp32
    (2, 2, 64, 16, 0, 1),    # decode backward (transposed w_d)
    (3, 3, 64, 16, 1, 2),    # encode backward with RMSNorm: the pre-pass's operand, transposed w_e
    (3, 1, 64, 16, 1, 4),    # the same in fp32: tf32 hi + lo of each
    (3, 3, 64, 16, 0, 1),
    (3, 3, 96, 48, 0, 1),    # k=48 pads to 64
])
def test_c_workspace_bytes(lib, pass_, dtype, d, k, norm, parts):
    """Workspace = parts x KPAD x d operand elements (2 bytes, 4 for fp32's tf32)."""
    out = ctypes.c_int64(-1)
    assert lib.resbm_cuda_workspace_bytes(pass_, dtype, d, k, norm, ctypes.byref(out)) == 0
    kpad = 16 if k <= 16 else 32 if k <= 32 else 64 if k <= 64 else 128 if k <= 128 else 256
    assert out.value == parts * kpad * d * (4 if dtype == 1 else 2)


@needs_cuda_library
def test_c_projection_splits(lib):
    """The query validates its arguments; without a GPU to ask there is one split."""
    out = ctypes.c_int(-1)
    assert lib.resbm_cuda_projection_splits(3, 24, 416, 32, None) == 1
    assert "null pointer splits" in lib.resbm_last_error().decode()
    assert lib.resbm_cuda_projection_splits(9, 24, 416, 32, ctypes.byref(out)) == 1
    assert "bad dtype=9" in lib.resbm_last_error().decode()
    assert lib.resbm_cuda_projection_splits(3, 24, 416, 24, ctypes.byref(out)) == 1
    assert "multiples of 16" in lib.resbm_last_error().decode()
    if not torch.cuda.is_available():
        assert lib.resbm_cuda_projection_splits(3, 24, 416, 32, ctypes.byref(out)) == 0 and out.value == 1


@needs_cuda_emulator
@pytest.mark.parametrize("dtype, projection, n, d, splits", [
    (3, "mma_sync", 24, 832, 4),    # one block of 64 rows, 13 d tiles of 64 bf16 columns: runs 4+4+4+1
    (3, "wgmma", 24, 832, 3),       # the wgmma loop's tiles of 128 columns, 7 of them: 3 + 3 + 1
    (1, "mma_sync", 24, 832, 4),    # fp32 tiles of 32 columns, 26 of them: 7 + 7 + 7 + 5
    (3, "wgmma", 150, 4096, 2),     # 2 blocks of 128 rows: 4 blocks of 16 tiles in one wave (18 tile times, 34 unsplit)
    (3, "wgmma", 512, 4096, 1),     # 4 row blocks of 128 fill the emulated device's 4 SMs
    (3, "mma_sync", 24, 128, 1),    # 2 d tiles: runs of at least 2
    (3, "wgmma", 0, 4096, 1),       # no rows
])
def test_emulated_projection_splits(dtype, projection, n, d, splits, monkeypatch):
    """On the emulated device (4 SMs, one block each) small n splits d (the tests'
    small shapes take that path), runs of at least two tiles, none empty."""
    use_projection(monkeypatch, projection)
    lib = native.library("cuda_emu")
    out = ctypes.c_int(-1)
    assert lib.resbm_cuda_projection_splits(dtype, n, d, 32, ctypes.byref(out)) == 0
    assert out.value == splits


@pytest.mark.skipif(HAS_GPU or not native.available("cuda_emu"), reason="the emulated device's split counts")
def test_backend_splits_follow_the_projection_loop(monkeypatch):
    """The backend asks for the split count once per shape and RESBM_CUDA_WGMMA, which
    picks the projection loop and so its d tile (d=832: 7 tiles of 128 columns or 13 of 64);
    unset, the projection runs on wgmma (the emulator, like an sm_90 GPU, has it)."""
    x = torch.empty(24, 832, dtype=torch.bfloat16)
    use_projection(monkeypatch, "wgmma")
    wide = cb._projection_partial(x, 32)
    use_projection(monkeypatch, "mma_sync")
    narrow = cb._projection_partial(x, 32)
    use_projection(monkeypatch, "default")
    default = cb._projection_partial(x, 32)
    assert (wide[1], narrow[1], default[1]) == (3, 4, 3)
    # the library reads a switch as the backend's check does: blank is unset, blanks around a value go
    for value, splits in (("", 3), (" ", 3), (" 0\n", 4), ("\t1 ", 3)):
        monkeypatch.setenv("RESBM_CUDA_WGMMA", value)
        assert cb._projection_partial(x, 32)[1] == splits, repr(value)
    assert wide[0].shape == (3, 24, 33) and wide[0].dtype == torch.float32
    monkeypatch.setenv("RESBM_CUDA_SPLITS", "0")  # the comparison switch: one split, no partials
    assert cb._projection_partial(x, 32) == (None, 1)


@needs_cuda_emulator
def test_shared_memory_opt_in_once_per_kernel_and_size(monkeypatch):
    """Kernels past 48 KiB of shared memory (k=64) are opted in with a driver call
    (cudaFuncSetAttribute) once per kernel and size, not on every call: a second
    round of the four passes makes none. Encode backward through RMSNorm without the
    row statistics gives dequant_project its pre-pass's larger tiles: a size the
    decode forward before it did not opt into, which the emulator would refuse."""
    monkeypatch.setenv("RESBM_CUDA_EMULATE", "1")
    lib = native.library("cuda_emu")
    lib.resbm_emu_smem_opt_ins.restype = ctypes.c_longlong
    gen = torch.Generator().manual_seed(5)
    n, d, k, dtype = 24, 128, 64, torch.bfloat16
    x, grad_h = (normal(n, d, dtype=dtype, gen=gen) for _ in range(2))
    w_e = normal(k, d, dtype=dtype, scale=d**-0.5, gen=gen)
    w_d = normal(d, k, dtype=dtype, scale=k**-0.5, gen=gen)
    gamma = normal(d, dtype=dtype, scale=0.2, gen=gen).add_(1.0)
    codec = Codec(bits=8)

    def passes():
        payload = cb.encode_forward(x, w_e, None, 1e-6, codec, 1)
        h = cb.decode_forward(payload, w_d, None, codec, n, dtype)
        grad_payload = cb.decode_backward(grad_h, payload, w_d, codec, GRAD_CODEC, 2)[0]
        grad_x = cb.encode_backward(grad_payload, x, w_e, gamma, 1e-6, GRAD_CODEC)[0]
        return h, grad_x

    first = passes()
    opted = lib.resbm_emu_smem_opt_ins()
    again = passes()
    assert opted > 0 and lib.resbm_emu_smem_opt_ins() == opted
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@needs_cuda_library
def test_c_workspace_bytes_rejects(lib):
    out = ctypes.c_int64()
    assert lib.resbm_cuda_workspace_bytes(4, 3, 64, 16, 0, ctypes.byref(out)) == 1
    assert "bad pass=4" in lib.resbm_last_error().decode()
    assert lib.resbm_cuda_workspace_bytes(0, 3, 64, 24, 0, ctypes.byref(out)) == 1
    assert "multiples of 16" in lib.resbm_last_error().decode()
    assert lib.resbm_cuda_workspace_bytes(0, 3, 64, 16, 0, None) == 1
    assert "null pointer bytes" in lib.resbm_last_error().decode()
    assert lib.resbm_cuda_workspace_bytes(0, 3, 2**60, 16, 0, ctypes.byref(out)) == 1  # (its size would wrap)
    assert "is too large" in lib.resbm_last_error().decode()


@needs_cuda_library
def test_c_finish_weight_grad_checks_alignment_by_dtype(lib):
    keep, p = _buf()
    err = lambda: lib.resbm_last_error().decode()  # noqa: E731
    # partial, splits, rows, cols, out, out_dtype, norm_weight, w, grad_norm, norm_dtype, stream
    assert lib.resbm_cuda_finish_weight_grad(p, 1, 16, 64, p + 2, 1, None, None, None, 0, None) == 1
    assert "out is not 4-byte aligned" in err()  # fp32
    assert lib.resbm_cuda_finish_weight_grad(p, 1, 16, 64, p, 3, p + 1, p, p, 3, None) == 1
    assert "norm_weight is not 2-byte aligned" in err()
    assert lib.resbm_cuda_finish_weight_grad(p, 1, 16, 64, p, 1, p, p + 2, p, 3, None) == 1
    assert "w is not 4-byte aligned" in err()  # the encoder weight: out's dtype
    assert lib.resbm_cuda_finish_weight_grad(p, 1, 16, 64, p, 3, p, p, p + 2, 1, None) == 1
    assert "grad_norm is not 4-byte aligned" in err()  # norm_dtype


@needs_cuda_library
@no_gpu_only
@pytest.mark.parametrize("call, kernel", [
    ("encode", "resbm_cuda_encode_forward: prepare_operand_kernel<bf16>"),  # weights first
    ("decode64", "resbm_cuda_decode_forward: dequant_project_kernel<bf16,64>"),
    ("decode256", "resbm_cuda_decode_forward: dequant_project_kernel<bf16,256>"),  # shared-memory opt-in
])
def test_c_launch_failure_names_kernel(lib, call, kernel):
    """Without a GPU valid arguments reach the first launch (or the shared-memory
    opt-in, for large tiles), which fails with a message naming the kernel."""
    keep, p = _buf(1 << 16)
    if call == "encode":
        rc, err = _encode_fwd(lib, k=64, d=128, group=16)
    else:
        k = int(call[6:])
        # codes, scales, n, d, k, bits, group, sdt, w_d, w_dtype, residual, out, out_dtype, workspace, stream
        rc = lib.resbm_cuda_decode_forward(p, p, 4, 2 * k, k, 8, 16, 3, p, 3, None, p, 3, None, None)
        err = lib.resbm_last_error().decode()
    assert rc == 3, err
    assert err.startswith(kernel), err


# ---- CPU-runnable: the Python backend ----------------------------------------------------


def test_supports_cuda_and_the_emulator(monkeypatch):
    monkeypatch.delenv("RESBM_CUDA_EMULATE", raising=False)
    assert not cb.supports("cpu") and not cb.supports(torch.device("meta"))
    assert cb.supports("cuda") == HAS_GPU
    monkeypatch.setenv("RESBM_CUDA_EMULATE", "1")
    assert cb.supports("cpu") == native.available("cuda_emu") and not cb.supports(torch.device("meta"))


def test_named_backend_on_cpu_raises(monkeypatch):
    monkeypatch.delenv("RESBM_CUDA_EMULATE", raising=False)
    x, w_e = torch.randn(8, 64), torch.randn(16, 64)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="does not support device cpu "
                                                                 r"\(on the CPU it runs with RESBM_CUDA_EMULATE=1"):
        ops.encode(x, w_e, Codec())


def test_shape_and_dtype_checks():
    with pytest.raises(ValueError, match="multiples of 16"):
        cb._check("encode_forward", 96, 24, torch.float32)
    with pytest.raises(ValueError, match="larger than 256"):
        cb._check("encode_forward", 1024, 512, torch.float32)
    with pytest.raises(TypeError, match="float64"):
        cb._check("encode_forward", 64, 16, torch.float64)


# ---- the kernels (GPU, else the emulator): every pass against the reference ----------------

# plus a group that is neither a power of two nor the row (k=96): the Triton backend refuses it
CODECS = FAST_CODECS[:6] + (Codec(bits=8, group_size=48),) + FAST_CODECS[6:]
# (N, d, k): masked row tail in one block, several blocks with a d tail tile,
# k not a power of two (padded), k = 256 (two column warps), k = d, d not a multiple of
# the 16-bit kernels' 64-column tiles; on the emulator (without a GPU, about 10^4 times
# slower) the last one has fewer d tiles
SHAPES = ((37, 128, 32), (150, 256, 16), (20, 192, 96), (70, 512, 256), (33, 64, 64), (45, 240, 48),
          (200, 1024 if HAS_GPU else 256, 128))


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Fresh kernel outputs start as NaN / 0xFF instead of whatever was in memory."""
    poison_fast_outputs(monkeypatch)


@pytest.fixture(autouse=True)
def emulated_without_gpu(monkeypatch):
    """Without a GPU, CPU tensors run on the kernels' emulator."""
    emulate_cuda_without_gpu(monkeypatch)


def cuda_call(fn, *args, **kwargs):
    with use_backend("cuda"):
        out = fn(*args, **kwargs)
    if HAS_GPU:
        torch.cuda.synchronize()
    return out


# The row kernels (project_quantize: encode forward, decode backward; dequant_project: decode
# forward, encode backward) multiply on mma.sync (RESBM_CUDA_WGMMA=0), or with
# RESBM_CUDA_WGMMA=1 on wgmma for 16-bit inputs up to KPAD = 128 (sm_90 with a library built
# for sm_90a; the emulator; unset: the projection alone): the 16-bit dtypes run both (fp32
# has no wgmma)
DTYPE_PROJECTIONS = [pytest.param(dtype, projection, id=f"{_ids(dtype)}-{projection}")
                     for dtype in DTYPES for projection in ("wgmma", "mma_sync")
                     if dtype != torch.float32 or projection == "mma_sync"]


def shape_codec_pairs(codecs):
    """(shape, codec) combinations whose scale group divides the shape's k."""
    return [pytest.param(shape, codec, id=f"{_ids(shape)}-{_ids(codec)}")
            for shape in SHAPES for codec in codecs
            if codec.group_size is None or shape[2] % codec.group_size == 0]


@needs_kernels
@pytest.mark.parametrize("dtype, projection", DTYPE_PROJECTIONS)
@pytest.mark.parametrize("shape, codec", shape_codec_pairs(CODECS))
def test_encode_forward_bit_exact(shape, dtype, codec, projection, monkeypatch):
    """Exact inputs: z is exact in any summation order, so the payload matches byte for byte."""
    use_projection(monkeypatch, projection)
    n, d, k = shape
    gen = torch.Generator().manual_seed(n * d + k)
    x = exact(n, d, dtype=dtype, gen=gen, device=DEVICE)
    w_e = exact(k, d, dtype=dtype, scale=1 / 64, gen=gen, device=DEVICE)
    got = cuda_call(ops.encode, x, w_e, codec, seed=7)
    want = ref.encode_forward(x.cpu(), w_e.cpu(), None, 1e-6, codec, 7)
    assert torch.equal(got.cpu(), want)


@needs_kernels
@pytest.mark.parametrize("name", ("RESBM_CUDA_WGMMA", "RESBM_CUDA_SPLITS", "RESBM_CUDA_PREFETCH",
                                  "RESBM_CUDA_STAGE_X"))
def test_switches_other_than_0_or_1_raise(name, monkeypatch):
    """The library would read "true" as unset: the backend refuses it, naming the switch,
    before any launch."""
    x = torch.randn(37, 128, device=DEVICE).bfloat16()
    w_e = torch.randn(32, 128, device=DEVICE).bfloat16()
    monkeypatch.setenv(name, "true")
    with pytest.raises(ValueError, match=f"{name} must be 0 or 1, not 'true'"):
        cuda_call(ops.encode, x, w_e, Codec(bits=8))
    monkeypatch.setenv(name, "0")
    cuda_call(ops.encode, x, w_e, Codec(bits=8))  # a valid value launches


@needs_kernels
@pytest.mark.parametrize("dtype, projection", DTYPE_PROJECTIONS)
@pytest.mark.parametrize("shape, codec", shape_codec_pairs(CODECS[:4]))
def test_encode_forward_norm(shape, dtype, codec, projection, monkeypatch):
    use_projection(monkeypatch, projection)
    n, d, k = shape
    gen = torch.Generator().manual_seed(3 * n + d)
    x = normal(n, d, dtype=dtype, gen=gen, device=DEVICE)
    w_e = normal(k, d, dtype=dtype, scale=d**-0.5, gen=gen, device=DEVICE)
    gamma = normal(d, dtype=dtype, scale=0.2, gen=gen, device=DEVICE).add_(1.0)
    got = cuda_call(ops.encode, x, w_e, codec, norm_weight=gamma, eps=1e-5, seed=3)
    want = ref.encode_forward(x.cpu(), w_e.cpu(), gamma.cpu(), 1e-5, codec, 3)
    assert_close_payload(got, want, codec, n, k)


@needs_kernels
@pytest.mark.parametrize("dtype, projection", DTYPE_PROJECTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_encode_forward_row_stats(shape, dtype, projection, monkeypatch):
    use_projection(monkeypatch, projection)
    check_encode_row_stats("cuda", DEVICE, shape, dtype)


@needs_kernels
def test_row_stats_from_cuda_feed_the_triton_backward():
    """``auto`` may run encode forward on one backend and encode backward on
    another: the CUDA forward's statistics give the Triton backward the
    reference gradients."""
    pytest.importorskip("triton")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend takes CPU tensors only under TRITON_INTERPRET=1")
    n, d, k = 150, 256, 32
    gen = torch.Generator().manual_seed(31)
    x = normal(n, d, dtype=torch.bfloat16, gen=gen, device=DEVICE)
    w_e = normal(k, d, dtype=torch.bfloat16, scale=d**-0.5, gen=gen, device=DEVICE)
    gamma = normal(d, dtype=torch.bfloat16, scale=0.2, gen=gen, device=DEVICE).add_(1.0)
    grad_payload = ref.write_payload(torch.randn(n, k, generator=gen), GRAD_CODEC, 4)
    stats = cuda_call(ops.encode, x, w_e, Codec(bits=8), norm_weight=gamma, return_row_stats=True)[1]
    with use_backend("triton"):
        got = ops.encode_backward(grad_payload.to(DEVICE), x, w_e, GRAD_CODEC, norm_weight=gamma, row_stats=stats)
    want = ref.encode_backward(grad_payload, x.cpu(), w_e.cpu(), gamma.cpu(), 1e-6, GRAD_CODEC)
    for name, a, b in zip(("grad_x", "grad_w_e", "grad_gamma"), got, want):
        assert rel_err(a, b) <= 4 * tol(torch.bfloat16), name


@needs_kernels
@pytest.mark.parametrize("dtype, projection", DTYPE_PROJECTIONS)
@pytest.mark.parametrize("shape, codec", shape_codec_pairs(CODECS))
def test_decode_forward(shape, dtype, codec, projection, monkeypatch):
    use_projection(monkeypatch, projection)
    n, d, k = shape
    gen = torch.Generator().manual_seed(n + d + k)
    payload = ref.write_payload(torch.randn(n, k, generator=gen), codec, 0)
    w_d = normal(d, k, dtype=dtype, scale=k**-0.5, gen=gen, device=DEVICE)
    for residual in (None, normal(n, d, dtype=dtype, gen=gen, device=DEVICE)):
        got = cuda_call(ops.decode, payload.to(DEVICE), w_d, codec, n, residual=residual, out_dtype=dtype)
        want = ref.decode_forward(payload, w_d.cpu(), None if residual is None else residual.cpu(), codec, n, dtype)
        assert got.dtype == dtype and got.shape == (n, d)
        assert torch.isfinite(got).all(), "unwritten (poisoned) elements"
        assert rel_err(got, want) <= tol(dtype)


@needs_kernels
def test_decode_forward_out_dtype_differs():
    gen = torch.Generator().manual_seed(3)
    codec = Codec(bits=8)
    payload = ref.write_payload(torch.randn(37, 32, generator=gen), codec, 0)
    w_d = normal(128, 32, dtype=torch.float32, gen=gen, device=DEVICE)
    got = cuda_call(ops.decode, payload.to(DEVICE), w_d, codec, 37, out_dtype=torch.bfloat16)
    want = ref.decode_forward(payload, w_d.cpu(), None, codec, 37, torch.bfloat16)
    assert rel_err(got, want) <= tol(torch.bfloat16)


@needs_kernels
@pytest.mark.parametrize("dtype, projection", DTYPE_PROJECTIONS)
def test_d_splits_with_a_short_last_run(dtype, projection, monkeypatch):
    """The row kernels split d between blocks while their row blocks leave SMs idle. On the
    emulator (4 SMs of one block; test_emulated_projection_splits) one row block and
    d = 832 give runs with a short last one and a partial last tile: 13 tiles of 64 columns
    4 + 4 + 4 + 1 (the wgmma projection's 7 of 128: 3 + 3 + 1; fp32's 26 of 32: 7 + 7 + 7 + 5),
    all four passes against the reference, encode backward through the row statistics
    (without them it has a pre-pass over x and does not split)."""
    use_projection(monkeypatch, projection)
    n, d, k = 24, 832, 32
    codec = Codec(bits=4, group_size=16)
    gen = torch.Generator().manual_seed(11)
    x = normal(n, d, dtype=dtype, gen=gen, device=DEVICE)
    w_e = normal(k, d, dtype=dtype, scale=d**-0.5, gen=gen, device=DEVICE)
    gamma = normal(d, dtype=dtype, scale=0.2, gen=gen, device=DEVICE).add_(1.0)
    payload, stats = cuda_call(ops.encode, x, w_e, codec, norm_weight=gamma, eps=1e-5, return_row_stats=True)
    want = ref.encode_forward(x.cpu(), w_e.cpu(), gamma.cpu(), 1e-5, codec, 0)
    assert_close_payload(payload, want, codec, n, k)

    w_d = normal(d, k, dtype=dtype, scale=k**-0.5, gen=gen, device=DEVICE)
    got = cuda_call(ops.decode, payload, w_d, codec, n, out_dtype=dtype)
    assert torch.isfinite(got).all(), "unwritten (poisoned) elements"
    assert rel_err(got, ref.decode_forward(payload.cpu(), w_d.cpu(), None, codec, n, dtype)) <= tol(dtype)

    grad_h = exact(n, d, dtype=dtype, gen=gen, device=DEVICE)  # exact: the gradient payload is bit-exact
    w_exact = exact(d, k, dtype=dtype, scale=1 / 16, gen=gen, device=DEVICE)
    gp, gw = cuda_call(ops.decode_backward, grad_h, payload, w_exact, codec, GRAD_CODEC, grad_seed=99)
    gp_ref, gw_ref = ref.decode_backward(grad_h.cpu(), payload.cpu(), w_exact.cpu(), codec, GRAD_CODEC, 99)
    assert torch.equal(gp.cpu(), gp_ref), "gradient payload differs"
    assert rel_err(gw, gw_ref) <= tol(dtype)

    got = cuda_call(ops.encode_backward, gp, x, w_e, GRAD_CODEC, norm_weight=gamma, eps=1e-5, row_stats=stats)
    want = ref.encode_backward(gp_ref, x.cpu(), w_e.cpu(), gamma.cpu(), 1e-5, GRAD_CODEC)
    for name, a, b in zip(("grad_x", "grad_w_e", "grad_gamma"), got, want):
        assert torch.isfinite(a).all(), f"{name}: unwritten (poisoned) elements"
        assert rel_err(a, b) <= 4 * tol(dtype), name


@needs_kernels
@pytest.mark.parametrize("projection", ("wgmma", "mma_sync"))
@pytest.mark.parametrize("k", (32, 128))
def test_projection_loop_refills_its_buffers(k, projection, monkeypatch):
    """Runs longer than the projection loop's buffers, so that each is refilled while the
    tensor cores may still read another (the wgmma loop keeps a tile's group in flight
    with four buffers): d = 1280 is 20 mma.sync tiles a block, 256 rows filling the emulated
    device's 4 SMs without a d split, and 10 / 20 wgmma tiles at k = 32 / 128, its two
    128-row blocks splitting d in two: 5 / 10 tiles a block. Encode
    forward through RMSNorm (the sums of squares read the same buffers) and decode
    backward's bit-exact gradient payload, against the reference."""
    use_projection(monkeypatch, projection)
    n, d, dtype = 256, 1280, torch.bfloat16
    gen = torch.Generator().manual_seed(k)
    x = normal(n, d, dtype=dtype, gen=gen, device=DEVICE)
    w_e = normal(k, d, dtype=dtype, scale=d**-0.5, gen=gen, device=DEVICE)
    gamma = normal(d, dtype=dtype, scale=0.2, gen=gen, device=DEVICE).add_(1.0)
    codec = Codec(bits=8)
    payload = cuda_call(ops.encode, x, w_e, codec, norm_weight=gamma, eps=1e-5)
    assert_close_payload(payload, ref.encode_forward(x.cpu(), w_e.cpu(), gamma.cpu(), 1e-5, codec, 0), codec, n, k)
    grad_h = exact(n, d, dtype=dtype, gen=gen, device=DEVICE)
    w_d = exact(d, k, dtype=dtype, scale=1 / 16, gen=gen, device=DEVICE)
    got, _ = cuda_call(ops.decode_backward, grad_h, payload, w_d, codec, GRAD_CODEC, grad_seed=5)
    want, _ = ref.decode_backward(grad_h.cpu(), payload.cpu(), w_d.cpu(), codec, GRAD_CODEC, 5)
    assert torch.equal(got.cpu(), want), "gradient payload differs"


@needs_kernels
@pytest.mark.parametrize("grad_codec", (GRAD_CODEC, Codec(bits=4, group_size=16, rounding="stochastic"),
                                        Codec(bits=8), Codec(bits=16)), ids=_ids)
@pytest.mark.parametrize("dtype, projection", DTYPE_PROJECTIONS + [
    pytest.param(dtype, "default", id=f"{_ids(dtype)}-default") for dtype in DTYPES if dtype != torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_decode_backward(shape, dtype, grad_codec, projection, monkeypatch):
    """default: the one pass whose default mixes the loops (the projection on wgmma, the
    weight gradient on mma.sync)."""
    use_projection(monkeypatch, projection)
    n, d, k = shape
    gen = torch.Generator().manual_seed(11)
    codec = Codec(bits=4, group_size=16)
    payload = ref.write_payload(torch.randn(n, k, generator=gen), codec, 0)
    grad_h = exact(n, d, dtype=dtype, gen=gen, device=DEVICE)
    w_d = exact(d, k, dtype=dtype, scale=1 / 16, gen=gen, device=DEVICE)
    gp, gw = cuda_call(ops.decode_backward, grad_h, payload.to(DEVICE), w_d, codec, grad_codec, grad_seed=99)
    gp_ref, gw_ref = ref.decode_backward(grad_h.cpu(), payload, w_d.cpu(), codec, grad_codec, 99)
    assert torch.equal(gp.cpu(), gp_ref), "gradient payload differs"
    assert gw.dtype == dtype and gw.shape == (d, k)
    assert rel_err(gw, gw_ref) <= tol(dtype)


@needs_kernels
@pytest.mark.parametrize("dtypes", ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)), ids=str)
def test_decode_backward_mixed_dtypes(dtypes):
    check_decode_backward_mixed_dtypes("cuda", DEVICE, *dtypes)


@needs_kernels
def test_boundary_under_autocast():
    check_boundary_under_autocast("cuda", DEVICE)


@needs_kernels
def test_seed_offset_is_read_on_the_device(monkeypatch):
    check_seed_offset_is_read_on_the_device("cuda", DEVICE, monkeypatch)


@needs_kernels
@pytest.mark.parametrize("grad_codec", (GRAD_CODEC, Codec(bits=2, group_size=16), Codec(bits=16)), ids=_ids)
@pytest.mark.parametrize("dtype, projection", DTYPE_PROJECTIONS)
@pytest.mark.parametrize("norm", (False, True, "row_stats"), ids=("plain", "norm", "norm-row-stats"))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_encode_backward(shape, norm, dtype, grad_codec, projection, monkeypatch):
    """norm-row-stats: with the row statistics of the CUDA encode forward (no pre-pass over x)."""
    use_projection(monkeypatch, projection)
    n, d, k = shape
    gen = torch.Generator().manual_seed(5)
    grad_payload = ref.write_payload(torch.randn(n, k, generator=gen), grad_codec, 4)
    x = normal(n, d, dtype=dtype, gen=gen, device=DEVICE)
    w_e = normal(k, d, dtype=dtype, scale=d**-0.5, gen=gen, device=DEVICE)
    gamma = normal(d, dtype=dtype, scale=0.2, gen=gen, device=DEVICE).add_(1.0) if norm else None
    stats = None
    if norm == "row_stats":
        stats = cuda_call(ops.encode, x, w_e, Codec(bits=8), norm_weight=gamma, eps=1e-5, return_row_stats=True)[1]
    got = cuda_call(ops.encode_backward, grad_payload.to(DEVICE), x, w_e, grad_codec, norm_weight=gamma, eps=1e-5,
                    row_stats=stats)
    want = ref.encode_backward(grad_payload, x.cpu(), w_e.cpu(), None if gamma is None else gamma.cpu(), 1e-5,
                               grad_codec)
    for name, a, b in zip(("grad_x", "grad_w_e", "grad_gamma"), got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: unwritten (poisoned) elements"
        assert rel_err(a, b) <= tol(dtype) * (4 if norm else 1), name


@needs_kernels
@pytest.mark.parametrize("k", (48, 80))
@pytest.mark.parametrize("switch_name", ("RESBM_CUDA_PREFETCH", "RESBM_CUDA_STAGE_X"))
@pytest.mark.parametrize("out_dtype", (torch.bfloat16, torch.float32), ids=_ids)
def test_epilogue_input_switches_change_no_result(out_dtype, switch_name, k, monkeypatch):
    """dequant_project asks for decode forward's residual a tile ahead into L2 from KPAD =
    64 on, and copies encode backward's x through its weight tiles' ring (or, with
    RESBM_CUDA_STAGE_X=0, prefetches it as the residual): the same bits either way
    (k = 48 and 80: KPAD = 64 and 128; d = 240: the last tile of 64 columns is partial,
    where the prefetch and the copies must stop)."""
    n, d = 70, 240
    gen = torch.Generator().manual_seed(21)
    codec = Codec(bits=8)
    payload = ref.write_payload(torch.randn(n, k, generator=gen), codec, 0).to(DEVICE)
    w = normal(d, k, dtype=torch.bfloat16, scale=k**-0.5, gen=gen, device=DEVICE)
    residual = normal(n, d, dtype=out_dtype, gen=gen, device=DEVICE)
    x = normal(n, d, dtype=torch.bfloat16, gen=gen, device=DEVICE)
    gamma = normal(d, dtype=torch.bfloat16, scale=0.2, gen=gen, device=DEVICE).add_(1.0)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv(switch_name, switch)
        h = cuda_call(ops.decode, payload, w, codec, n, residual=residual, out_dtype=out_dtype)
        grad_x = cuda_call(ops.encode_backward, payload, x, w.t().contiguous(), codec, norm_weight=gamma)[0]
        results.append((h, grad_x))
    want = ref.decode_forward(payload.cpu(), w.cpu(), residual.cpu(), codec, n, out_dtype)
    assert rel_err(results[0][0], want) <= tol(torch.bfloat16)  # (bf16 operands)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_kernels
@pytest.mark.parametrize("n, splits", ((150, 3), (4, 3), (100, 2), (150, 2), (200, 2)),
                         ids=("150-rows-3-splits", "4-rows-3-splits", "100-rows-2-splits", "150-rows-2-splits",
                              "200-rows-2-splits"))
@pytest.mark.parametrize("projection", ("wgmma", "mma_sync"))
def test_weight_grad_row_splits(monkeypatch, n, splits, projection):
    """Several row splits (the layout for N > 1024) with starts rounded to 32 rows, so some
    splits are short or empty: every split's partial is written (poisoned otherwise) and the
    (rscale * zhat)^T operand is read at the right rows. 16-bit inputs reduce 64 rows a
    step, so a split of 96 rows (150 in 2) ends its second step at the next split's first
    row: the rows past it must count as zeros; 200 in 2: two whole steps, then one and a
    partial one."""
    from resbm_kernels.backends import fast

    use_projection(monkeypatch, projection)
    monkeypatch.setattr(fast, "weight_grad_partials", lambda n, d, k, transpose, device, max_splits=8: fast.empty(
        (splits, d, k) if transpose else (splits, k, d), torch.float32, device))
    d, k = 96, 32
    gen = torch.Generator().manual_seed(n + splits)
    codec = Codec(bits=8)
    payload = ref.write_payload(torch.randn(n, k, generator=gen), codec, 0)
    grad_h = exact(n, d, dtype=torch.bfloat16, gen=gen, device=DEVICE)
    w_d = exact(d, k, dtype=torch.bfloat16, scale=1 / 16, gen=gen, device=DEVICE)
    gw = cuda_call(ops.decode_backward, grad_h, payload.to(DEVICE), w_d, codec, GRAD_CODEC, grad_seed=3)[1]
    gw_ref = ref.decode_backward(grad_h.cpu(), payload, w_d.cpu(), codec, GRAD_CODEC, 3)[1]
    assert rel_err(gw, gw_ref) <= tol(torch.bfloat16), "grad_w_d"
    x = normal(n, d, dtype=torch.bfloat16, gen=gen, device=DEVICE)
    w_e = normal(k, d, dtype=torch.bfloat16, scale=d**-0.5, gen=gen, device=DEVICE)
    gamma = normal(d, dtype=torch.bfloat16, scale=0.2, gen=gen, device=DEVICE).add_(1.0)
    got = cuda_call(ops.encode_backward, payload.to(DEVICE), x, w_e, codec, norm_weight=gamma)
    want = ref.encode_backward(payload, x.cpu(), w_e.cpu(), gamma.cpu(), 1e-6, codec)
    for name, a, b in zip(("grad_x", "grad_w_e", "grad_gamma"), got, want):
        assert rel_err(a, b) <= 4 * tol(torch.bfloat16), name


@needs_kernels
@pytest.mark.parametrize("splits", [3, 19])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("layout", FINISH_LAYOUTS)
def test_finish_weight_grad_exact(layout, dtype, splits):
    """finish_weight_grad_kernel bit for bit against torch on exact inputs (see
    exact_finish_case): the splits summed, and through RMSNorm M * gamma and
    grad_gamma = sum_c W_e * M, each rounded once; outputs start poisoned. 19
    splits: more than it loads at once (8), the last group short."""
    partial, _, w_e, gamma = exact_finish_case(layout, dtype, splits)
    want = finish_weight_grad_reference(partial, dtype, w_e, gamma)
    splits, rows, cols = partial.shape
    grad = torch.full((rows, cols), float("nan"), dtype=dtype, device=DEVICE)
    grad_gamma = None if gamma is None else torch.full((cols,), float("nan"), dtype=dtype, device=DEVICE)
    on = [None if t is None else t.to(DEVICE) for t in (partial, w_e, gamma)]
    ptr = [None if t is None else t.data_ptr() for t in (*on, grad_gamma)]
    code = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[dtype]
    cb._call("resbm_cuda_finish_weight_grad", torch.device(DEVICE), ptr[0], splits, rows, cols, grad.data_ptr(), code,
             ptr[2], ptr[1] if gamma is not None else None, ptr[3], code if gamma is not None else 0)
    assert torch.equal(grad.cpu(), want[0]), "gradient"
    if gamma is not None:
        assert torch.equal(grad_gamma.cpu(), want[1]), "grad_gamma"


@needs_kernels
def test_passes_launch_no_torch_kernels(monkeypatch):
    """Besides the library's kernels, a pass runs no torch op that does device
    work (a small kernel costs a few microseconds of a pass): the payload header
    and the weight gradients' finishing are kernels of the library too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from resbm_kernels.backends import fast

    for name, unpoisoned in FAST_ALLOCATORS.items():  # (the poisoning fills would count)
        monkeypatch.setattr(fast, name, unpoisoned)
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in NO_WORK_OPS:
                seen.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    calls = training_pass_calls(cb, DEVICE)
    for name, call in calls.items():
        seen.clear()
        with Ops():
            call()
        assert seen == [], (name, seen)


# ---- GPU only: streams, synchronisation, graphs ----------------------------------------------


@needs_gpu
def test_passes_do_not_synchronise():
    check_passes_do_not_synchronise("cuda")


@needs_gpu
def test_passes_replay_in_a_cuda_graph():
    check_passes_replay_in_a_cuda_graph("cuda")


@needs_gpu
def test_boundary_draws_anew_in_a_cuda_graph():
    check_boundary_draws_anew_in_a_cuda_graph("cuda")


@needs_gpu
def test_boundary_compiled_with_cuda_graphs():
    check_boundary_compiled_with_cuda_graphs("cuda")


@needs_kernels
@pytest.mark.parametrize("norm", (False, True), ids=("plain", "norm"))
def test_zero_rows(norm):
    """N = 0: every pass returns outputs of the right shapes (no kernel writes the payload's
    header then: it is the reference's), and zero weight gradients."""
    d, k, dtype = 64, 16, torch.bfloat16
    gen = torch.Generator().manual_seed(2)
    w_e = normal(k, d, dtype=dtype, gen=gen, device=DEVICE)
    w_d = normal(d, k, dtype=dtype, gen=gen, device=DEVICE)
    gamma = normal(d, dtype=dtype, gen=gen, device=DEVICE) if norm else None
    x = torch.empty(0, d, dtype=dtype, device=DEVICE)
    codec, want = Codec(bits=4, group_size=16), ref.write_payload(torch.empty(0, k), Codec(bits=4, group_size=16), 0)
    payload = cuda_call(ops.encode, x, w_e, codec, norm_weight=gamma)
    assert torch.equal(payload.cpu(), want)
    h = cuda_call(ops.decode, payload, w_d, codec, 0)
    assert h.shape == (0, d)
    grad_payload, grad_w_d = cuda_call(ops.decode_backward, x, payload, w_d, codec, codec)
    assert torch.equal(grad_payload.cpu(), want)
    assert grad_w_d.shape == (d, k) and not grad_w_d.any()
    grad_x, grad_w_e, grad_gamma = cuda_call(ops.encode_backward, payload, x, w_e, codec, norm_weight=gamma)
    assert grad_x.shape == (0, d) and grad_w_e.shape == (k, d) and not grad_w_e.any()
    assert (grad_gamma is None) if not norm else (grad_gamma.shape == (d,) and not grad_gamma.any())


@needs_gpu
def test_stream():
    """Kernels run on the caller's (non-default) stream."""
    w_e, codec = torch.randn(16, 64, device="cuda"), Codec()
    x = torch.randn(300, 64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # x is written on the default stream
    with torch.cuda.stream(s), use_backend("cuda"):
        got = ops.encode(x, w_e, codec)
    s.synchronize()
    assert_close_payload(got, ref.encode_forward(x.cpu(), w_e.cpu(), None, 1e-6, codec, 0), codec, 300, 16)


# ---- GPU: compute-sanitizer ----------------------------------------------------------------

# One run of each kernel family (and each pass), small shapes with row and d tails.
SANITIZE = {
    "project_quantize (encode forward)": "ops.encode(x, w_e, Codec(bits=4, group_size=16), norm_weight=g)",
    "project_quantize (decode backward) + weight_grad": "ops.decode_backward(x, p, w_d, Codec(bits=8), Codec(bits=8, rounding='stochastic'))",
    "dequant_project (decode forward)": "ops.decode(p, w_d, Codec(bits=8), 37, residual=x)",
    "dequant_project (encode backward) + weight_grad": "ops.encode_backward(p, x, w_e, Codec(bits=8), norm_weight=g)",
}
SANITIZE_SETUP = """\
import torch
from resbm_kernels import ops
from resbm_kernels.codec import Codec
from resbm_kernels.backends import use_backend
torch.manual_seed(0)
x = torch.randn(37, 96, device='cuda', dtype=torch.bfloat16)
w_e = torch.randn(32, 96, device='cuda', dtype=torch.bfloat16) / 10
w_d = torch.randn(96, 32, device='cuda', dtype=torch.bfloat16) / 10
g = torch.ones(96, device='cuda', dtype=torch.bfloat16)
with use_backend('reference'):
    p = ops.encode(x, w_e, Codec(bits=8))
"""


def sanitize_command(call: str) -> list[str]:
    code = SANITIZE_SETUP + f"with use_backend('cuda'):\n    {call}\ntorch.cuda.synchronize()\n"
    return ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c", code]


@needs_gpu
@pytest.mark.parametrize("what", list(SANITIZE))
def test_compute_sanitizer_memcheck(what):
    if shutil.which("compute-sanitizer") is None:
        pytest.skip("compute-sanitizer not on PATH")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(sanitize_command(SANITIZE[what]), capture_output=True, text=True, timeout=600, env=env)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    assert "ERROR SUMMARY: 0 errors" in log, log
