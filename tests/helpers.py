"""Shared test helpers: tolerances derived from dtypes, fresh random inputs,
and an independent NumPy implementation of the codec to check the reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from resbm_kernels.codec import Codec, rng_key


# codecs every fast-backend test file runs each pass with: one scale per row and
# groups, every bits, fp32/fp16/bf16 scales, nearest and stochastic rounding
FAST_CODECS = (
    Codec(bits=16),
    Codec(bits=8),
    Codec(bits=8, group_size=16, scale_dtype=torch.float32),
    Codec(bits=4, group_size=16, scale_dtype=torch.float16),
    Codec(bits=4),
    Codec(bits=2, group_size=16),
    Codec(bits=8, rounding="stochastic"),
    Codec(bits=2, group_size=16, rounding="stochastic", scale_dtype=torch.float16),
)
GRAD_CODEC = Codec(bits=8, rounding="stochastic")


def tolerance(dtype: torch.dtype, reduction: int = 1) -> dict:
    """atol/rtol for comparing a result computed in ``dtype`` against a float32
    or float64 oracle: a few units of the dtype's epsilon, grown with the
    square root of the reduction length."""
    eps = torch.finfo(dtype).eps
    scale = 4 * max(1.0, reduction ** 0.5)
    return {"atol": eps * scale, "rtol": eps * scale}


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    """Random normal input (never zeros), optionally scaled per row so rows
    span several orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float32) * scale
    return x.to(dtype)


# ---- independent NumPy codec (checks the reference, which checks the kernels) ----

def np_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 round-to-nearest-even, returned as float32 values."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def np_to_scale(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.bfloat16:
        return np_to_bf16(x)
    if dtype == torch.float16:
        return x.astype(np.float16).astype(np.float32)
    return x.astype(np.float32)


def np_hash32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x = (x.astype(np.uint64) * 0x7FEB352D).astype(np.uint32)
    x ^= x >> np.uint32(15)
    x = (x.astype(np.uint64) * 0x846CA68B).astype(np.uint32)
    x ^= x >> np.uint32(16)
    return x


def np_quantize(z: np.ndarray, codec: Codec, seed: int = 0):
    """The codec of DESIGN.md written out in NumPy float32."""
    n, k = z.shape
    g = codec.group(k)
    zf = z.astype(np.float32).reshape(n, k // g, g)
    absmax = np.abs(zf).max(axis=-1)
    scale = np_to_scale(absmax / np.float32(codec.qmax), codec.scale_dtype)
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0)).astype(np.float32)
    y = (zf * inv[..., None]).reshape(n, k).astype(np.float32)
    if codec.stochastic:
        idx = (np.arange(n * k, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)
        u = (np_hash32(idx ^ np.uint32(rng_key(seed))) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
        q = np.floor((y + u.reshape(n, k)).astype(np.float32))
    else:
        q = np.rint(y)
    return np.clip(q, -codec.qmax, codec.qmax).astype(np.int8), scale


def poison_fast_outputs(monkeypatch) -> None:
    """Make the compiled backends' fresh outputs start as NaN / 0xFF instead of
    whatever was in memory, so elements a kernel never writes show up."""
    from resbm_kernels.backends import fast
    from resbm_kernels.codec import HEADER_BYTES, empty_payload, write_header

    def empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-1)

    def new_payload(codec, n, k, device, out=None):
        p = empty_payload(codec, n, k, device) if out is None else write_header(out, codec, n, k)
        p[HEADER_BYTES : HEADER_BYTES + n * k * codec.bits // 8] = 0xFF
        p[HEADER_BYTES + codec.code_bytes(n, k) :] = 0xFF
        return p

    monkeypatch.setattr(fast, "empty", empty)
    monkeypatch.setattr(fast, "new_payload", new_payload)


# ---- shared by the compiled-backend tests (Triton, CUDA) ---------------------------

def ids(v):
    """Readable pytest ids for codecs and dtypes."""
    return v.spec if isinstance(v, Codec) else str(v).replace("torch.", "")


def to_device(obj, device):
    """Tensors in ``obj`` (a tensor, or a tuple / list / dict of them) on ``device``; the rest as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {key: to_device(value, device) for key, value in obj.items()}
    return obj


def exact(*shape, dtype, scale=0.25, gen, device="cpu"):
    """Random non-zero small integers times a power of two: every product and
    sum of these is exact in fp32 in any order, so fused GEMMs give the
    reference's z bit for bit."""
    v = torch.randint(1, 8, shape, generator=gen) * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
    return (v * scale).to(dtype).to(device)


def normal(*shape, dtype, scale=1.0, gen, device="cpu"):
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


def rel_err(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rel_tol(dtype) -> float:
    """Relative tolerance of a result rounded to ``dtype`` once (a few ulps)."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def assert_close_payload(p, q, codec: Codec, n: int, k: int) -> None:
    """Same header; scales within a rounding step; dequantized values within 1.5
    quantization steps: each is within a step of its own z (half a step when
    rounding to nearest), and the two z may differ by rounding of the inputs.
    (Codes themselves may move by more than one near qmax when a scale rounded
    to the neighbouring value, while the values they stand for stay close.)"""
    from resbm_kernels.backends import reference as ref
    from resbm_kernels.codec import HEADER_BYTES, payload_views

    p, q = p.cpu(), q.cpu()
    assert torch.equal(p[:HEADER_BYTES], q[:HEADER_BYTES])
    if not codec.quantized:
        a = ref.read_payload(p, codec, n, k, torch.float32)
        b = ref.read_payload(q, codec, n, k, torch.float32)
        assert rel_err(a, b) < 1e-2
        return
    (_, sa), (_, sb) = payload_views(p, codec, n, k), payload_views(q, codec, n, k)
    assert torch.isfinite(sa.float()).all()
    torch.testing.assert_close(sa.float(), sb.float(), rtol=1e-2, atol=0)
    worst = ref.payload_steps(p, q, codec, n, k).max().item()
    assert worst <= 1.5, f"dequantized values differ by {worst:.2f} quantization steps"


# ---- the built CUDA library's kernels (no GPU needed) ----------------------------------

# the machine-code archs libresbm_cuda was asked for (90a: the wgmma kernels): the build's
# RESBM_CUDA_ARCHS (setup.py and CMake default "80;90a;90-virtual"), PTX-only entries left out
CUDA_ARCHS = tuple(arch for arch in os.environ.get("RESBM_CUDA_ARCHS", "80;90a;90-virtual").split(";")
                   if arch and not arch.endswith("-virtual"))


def cuda_library_path() -> str:
    """Path of the libresbm_cuda that the backend loads (tests using it are marked
    ``needs_cuda_library``). CI's install builds it with RESBM_CUDA=1, where a
    kernel that spills or fails to compile fails the build."""
    from resbm_kernels import native

    return os.path.abspath(native.library("cuda")._name)  # (RESBM_LIB_DIR may be relative; tools run elsewhere)


def cuda_library_resources() -> list[tuple[str, str, int, int, int]]:
    """(arch, function, registers, stack bytes, local bytes) of every kernel in the
    built library's machine code (``cuobjdump -res-usage``), printed as a table
    (shown with ``pytest -s``). Spilled registers live on the stack in local
    memory, so zero stack and local bytes means no spills."""
    import re
    import subprocess

    out = subprocess.run([sass_tool("cuobjdump"), "-res-usage", cuda_library_path()], capture_output=True,
                         text=True, check=True).stdout
    report, section, arch, fn = [], None, None, None
    for line in out.splitlines():
        if m := re.match(r"Fatbin (\w+) code:", line):
            section = m.group(1)
        elif m := re.match(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        elif (m := re.match(r"\s*Function (\S+):", line)) and section == "elf":
            fn = m.group(1)
        elif (m := re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)) and fn:
            report.append((arch, fn, *map(int, m.groups())))
            fn = None
    print(f"\n{'arch':6} {'regs':>4} {'stack':>5} {'local':>5}  kernel")
    for arch, fn, regs, stack, local in report:
        print(f"{arch:6} {regs:>4} {stack:>5} {local:>5}  {fn}")
    return report


def cuda_library_sass(out_dir) -> str:
    """nvdisasm listing of every sm_90a kernel in the built library."""
    import pathlib
    import subprocess

    subprocess.run([sass_tool("cuobjdump"), "-xelf", "all", cuda_library_path()], cwd=out_dir, check=True,
                   capture_output=True)
    # cuobjdump before CUDA 13 (Triton 3.6 bundles 12.8) names sm_90a images "*.sm_90.cubin"
    cubins = sorted(pathlib.Path(out_dir).glob("*.sm_90*.cubin"))
    assert cubins, f"no sm_90a machine code in {cuda_library_path()}"
    return "".join(subprocess.run([*nvdisasm_command(), str(c)], capture_output=True, text=True, check=True).stdout
                   for c in cubins)


# ---- reading compiled kernels (SASS) --------------------------------------------------


def sass_tool(name: str) -> str:
    """Path of a CUDA binary utility (cuobjdump, nvdisasm) as bundled with Triton
    (a dependency: a missing one is a broken install, reported as such)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} is not where Triton bundles it ({path}): reinstall triton")
    return path


def nvdisasm_command() -> list[str]:
    """nvdisasm printing code sections only, without its dataflow analysis: the
    same instructions and labels, a quarter faster (most of its ~0.5 s a call
    is start-up, paid once per cubin)."""
    return [sass_tool("nvdisasm"), "--print-code", "--no-dataflow"]


def sass_functions(sass: str) -> dict[str, str]:
    """nvdisasm output split by kernel: {mangled name: its SASS}."""
    import re

    parts = re.split(r"^//-+ \.text\.(\S+) -+$", sass, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _tensor_core_loops(sass: str):
    """(instructions, loops, targets) of one kernel's SASS (nvdisasm output):
    the (first, last) instruction index of each loop (a backward branch to an
    earlier label) holding tensor-core instructions, innermost first, and each
    instruction's branch target index (None where it does not branch to a label)."""
    import re

    body, loops, targets = sass_loops(sass)
    return body, [(first, last) for first, last in loops
                  if any(re.search(r"\bH(?:G)?MMA\.", x) for x in body[first:last + 1])], targets


def sass_loops(sass: str):
    """(instructions, loops, targets) as :func:`_tensor_core_loops`, every loop."""
    import re

    labels, body = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(body)
            continue
        ins = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if ins:
            body.append(ins.group(1))
    targets = [labels.get(m.group(1)) if m else None
               for m in (re.search(r"\bBRA\b.*?(\.L_x_\d+)", ins) for ins in body)]
    loops = [(target, end) for end, target in enumerate(targets) if target is not None and target <= end]
    return body, loops, targets


def main_loops(sass: str, *, steady: bool = False, opcode: str | None = None) -> list[int]:
    """Static instruction counts of the loops of one kernel's SASS that hold
    tensor-core instructions, innermost first. ``steady``: without the code a
    forward branch inside the loop can jump over (a path some iterations or
    programs skip, such as the identity path only the first d tiles take);
    ``opcode`` (e.g. "STS"): only the instructions with that opcode."""
    import re

    body, loops, targets = _tensor_core_loops(sass)
    counts = []
    for start, end in loops:
        skipped = set()
        if steady:
            for i in range(start, end):
                if targets[i] is not None and i < targets[i] <= end:
                    skipped.update(range(i + 1, targets[i]))
        kept = [ins for i, ins in enumerate(body[start:end + 1], start) if i not in skipped]
        if opcode is not None:
            kept = [ins for ins in kept if re.match(rf"(?:@!?U?P\w+\s+)?{opcode}\b", ins)]
        counts.append(len(kept))
    return counts


def loads_before_main_loop(sass: str) -> int:
    """Global loads (LDG; not cp.async's LDGSTS) in the code before a kernel's
    first tensor-core loop: its prologue, which every program runs before
    it streams anything (the whole kernel if it has no such loop)."""
    body, loops, _ = _tensor_core_loops(sass)
    return _global_loads(body[:min((first for first, _ in loops), default=len(body))])


def _global_loads(instructions: list[str]) -> int:
    """Global loads (LDG; not cp.async's LDGSTS) among ``instructions``."""
    import re

    return sum(1 for ins in instructions if re.search(r"\bLDG\.", ins))


def longest_run_of_loads(sass: str, breakers: str) -> int:
    """The most global loads (LDG) in a row of a kernel's SASS with no instruction
    matching ``breakers`` (an alternation of opcodes, e.g. "FADD" or "STS|STG")
    between them: loads a thread issues before it uses any of them."""
    import re

    best = run = 0
    for m in re.finditer(rf"\b(LDG|{breakers})(\.\w+)*\s", sass):
        run = run + 1 if m.group(1) == "LDG" else 0
        best = max(best, run)
    return best


def loads_before_first(sass: str, opcode: str) -> int:
    """Global loads (LDG) and cp.async copies (LDGSTS) a kernel issues before its
    first ``opcode`` instruction (e.g. FADD: the loads a reduction has in flight
    before it waits for one)."""
    import re

    body, _, _ = _tensor_core_loops(sass)
    first = next((i for i, ins in enumerate(body) if re.search(rf"\b{opcode}\b", ins)), len(body))
    return sum(1 for ins in body[:first] if re.search(r"\bLDG(?:STS)?\.", ins))


# ---- where the CUDA library's kernels run: the GPU, else the CPU emulator (libresbm_cuda_emu) ----

def _cuda_kernels():
    from resbm_kernels import native

    has_gpu = torch.cuda.is_available() and native.available("cuda")
    return has_gpu, has_gpu or native.available("cuda_emu")


HAS_CUDA_GPU, HAS_CUDA_KERNELS = _cuda_kernels()
CUDA_KERNELS_DEVICE = "cuda" if HAS_CUDA_GPU else "cpu"
# RESBM_CUDA=1 (as in CI) requires the install to build libresbm_cuda and libresbm_cuda_emu,
# so there a missing library fails the tests that need it instead of skipping them
CUDA_REQUIRED = os.environ.get("RESBM_CUDA", "").strip() == "1"
needs_cuda_kernels = pytest.mark.skipif(not HAS_CUDA_KERNELS and not CUDA_REQUIRED,
                                        reason="needs a CUDA GPU and libresbm_cuda, or libresbm_cuda_emu")


def _library_optional(which: str) -> bool:
    """Native library ``which`` is missing and nothing asked for it (see CUDA_REQUIRED)."""
    from resbm_kernels import native

    return not native.available(which) and not CUDA_REQUIRED


needs_cuda_library = pytest.mark.skipif(_library_optional("cuda"),
                                        reason="libresbm_cuda is not built (no nvcc at install time)")
needs_cuda_emulator = pytest.mark.skipif(_library_optional("cuda_emu"), reason="libresbm_cuda_emu is not built")


def emulate_cuda_without_gpu(monkeypatch) -> None:
    """Without a GPU, let CPU tensors take the CUDA code paths on the emulator."""
    if not HAS_CUDA_GPU:
        monkeypatch.setenv("RESBM_CUDA_EMULATE", "1")


def use_projection(monkeypatch, projection: str) -> None:
    """The CUDA row kernels' loop, read per launch: "wgmma" (every pass kernel, on sm_90
    with a library built for sm_90a, and on the emulator), "mma_sync" (none) or "default"
    (RESBM_CUDA_WGMMA unset: the projection alone on wgmma)."""
    if projection == "default":
        monkeypatch.delenv("RESBM_CUDA_WGMMA", raising=False)
    else:
        monkeypatch.setenv("RESBM_CUDA_WGMMA", "1" if projection == "wgmma" else "0")


# torch ops that launch no device work (allocation and views)
NO_WORK_OPS = {"empty", "empty_strided", "view", "_unsafe_view", "as_strided", "alias", "detach", "detach_", "t",
               "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "permute", "reshape", "lift_fresh"}


def training_pass_calls(backend, device, weights=torch.bfloat16, backward_stats=True) -> dict:
    """{pass name: a call of ``backend``'s pass} on bf16 activations (N=150, d=256,
    k=32) and ``weights``, as in training: encode forward keeps the row statistics
    encode backward uses (unless not ``backward_stats``: then it recomputes them);
    the payloads come from the backend's own forward passes."""
    gen = torch.Generator().manual_seed(21)
    n, d, k, dtype = 150, 256, 32, torch.bfloat16
    x, grad_h = (normal(n, d, dtype=dtype, gen=gen, device=device) for _ in range(2))
    w_e = normal(k, d, dtype=weights, scale=d**-0.5, gen=gen, device=device)
    w_d = normal(d, k, dtype=weights, scale=k**-0.5, gen=gen, device=device)
    gamma = normal(d, dtype=weights, scale=0.2, gen=gen, device=device).add_(1.0)
    codec, stats = Codec(bits=8), torch.empty(n, k + 1, device=device)
    payload = backend.encode_forward(x, w_e, gamma, 1e-6, codec, 1, row_stats=stats)
    grad_payload = backend.decode_backward(grad_h, payload, w_d, codec, GRAD_CODEC, 2)[0]
    return dict(
        encode_forward=lambda: backend.encode_forward(x, w_e, gamma, 1e-6, codec, 1, row_stats=stats),
        decode_forward=lambda: backend.decode_forward(payload, w_d, None, codec, n, dtype),
        decode_backward=lambda: backend.decode_backward(grad_h, payload, w_d, codec, GRAD_CODEC, 2),
        encode_backward=lambda: backend.encode_backward(grad_payload, x, w_e, gamma, 1e-6, GRAD_CODEC,
                                                        row_stats=stats if backward_stats else None),
    )


FINISH_LAYOUTS = ("decoder", "encoder", "encoder-norm")


def exact_finish_case(layout: str, dtype, splits: int = 3):
    """Inputs of a weight-gradient finishing kernel on which every sum is exact in
    any order (integers) while the results need rounding to 16 bits: (partials
    over ``splits`` splits, transpose, w_e, gamma or None); k and d not powers of two."""
    k, d = 48, 80
    gen = torch.Generator().manual_seed(11)
    transpose, norm = layout == "decoder", layout == "encoder-norm"
    partial = torch.randint(-3000, 3000, (splits, d, k) if transpose else (splits, k, d), generator=gen).float()
    w_e = torch.randint(-8, 8, (k, d), generator=gen).to(dtype)
    gamma = torch.randint(1, 60, (d,), generator=gen).to(dtype)
    return partial, transpose, w_e, gamma if norm else None


def finish_weight_grad_reference(partial, dtype, w_e=None, gamma=None):
    """What finishing a weight gradient means, in torch ops: (grad, grad_gamma or
    None) with M the sum of the partials: grad = M in ``dtype``, or through the
    encoder's RMSNorm M * gamma, and grad_gamma = sum over k of W_e * M."""
    m = partial.sum(0)
    if gamma is None:
        return m.to(dtype), None
    grad_gamma = (w_e.to(torch.float32) * m).sum(0)
    return (m * gamma.to(torch.float32)).to(dtype), grad_gamma.to(gamma.dtype)


def check_decode_backward_mixed_dtypes(backend: str, device: str, grad_dtype, w_dtype) -> None:
    """A fast backend's decode backward with grad_h and w_d of different dtypes
    (the ops accept them) against the reference: payload bit-exact on exact inputs."""
    from resbm_kernels import ops
    from resbm_kernels.backends import reference, use_backend

    n, d, k = 37, 128, 32
    gen = torch.Generator().manual_seed(12)
    codec, grad_codec = Codec(bits=8), GRAD_CODEC
    payload = reference.write_payload(torch.randn(n, k, generator=gen), codec, 0)
    grad_h = exact(n, d, dtype=grad_dtype, gen=gen)
    w_d = exact(d, k, dtype=w_dtype, scale=1 / 16, gen=gen)
    with use_backend(backend):
        gp, gw = ops.decode_backward(grad_h.to(device), payload.to(device), w_d.to(device), codec, grad_codec,
                                     grad_seed=9)
    gp_ref, gw_ref = reference.decode_backward(grad_h, payload, w_d, codec, grad_codec, 9)
    assert torch.equal(gp.cpu(), gp_ref), "gradient payload differs"
    assert gw.dtype == w_dtype and rel_err(gw, gw_ref) <= rel_tol(torch.bfloat16)


def check_boundary_under_autocast(backend: str, device: str, dtype=torch.bfloat16) -> None:
    """ops.boundary of float32 inputs under torch.autocast == the same call with
    x and the weights cast to the autocast dtype and h in float32 (out_dtype),
    bit for bit: payload, h and every gradient, which stay float32. And the
    autocast payload is not the float32 call's (autocast changed the GEMMs)."""
    from resbm_kernels import ops
    from resbm_kernels.backends import use_backend

    n, d, k = 37, 128, 32
    gen = torch.Generator().manual_seed(21)
    inputs = (normal(n, d, dtype=torch.float32, gen=gen), normal(k, d, dtype=torch.float32, scale=d**-0.5, gen=gen),
              1 + normal(d, dtype=torch.float32, scale=0.1, gen=gen),
              normal(d, k, dtype=torch.float32, scale=k**-0.5, gen=gen), normal(n, d, dtype=torch.float32, gen=gen))
    grad_h = normal(n, d, dtype=torch.float32, gen=gen).to(device)
    codec = Codec(bits=8)

    def run(how):
        x, w_e, gamma, w_d, residual = leaves = [t.to(device).requires_grad_() for t in inputs]
        cast = (lambda t: t.to(dtype)) if how == "cast" else (lambda t: t)
        autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=how == "autocast")
        with use_backend(backend), autocast:
            h, payload = ops.boundary(cast(x), cast(w_e), cast(w_d), codec, GRAD_CODEC, norm_weight=cast(gamma),
                                      residual=residual, seed=3, grad_seed=4, out_dtype=torch.float32)
        with use_backend(backend):
            h.backward(grad_h)
        return [payload, h] + [t.grad for t in leaves]

    got, want, plain = run("autocast"), run("cast"), run("float32")
    assert all(t.dtype == torch.float32 for t in got[1:])
    for name, a, b in zip(("payload", "h", "grad x", "grad w_e", "grad norm_weight", "grad w_d", "grad residual"),
                          got, want):
        assert torch.equal(a, b), f"{name} under autocast differs from the explicitly cast call's"
    assert not torch.equal(got[0], plain[0]), "autocast did not change the encoder's GEMM"


def check_encode_row_stats(backend: str, device: str, shape, dtype) -> None:
    """A fast backend's encode forward with ``return_row_stats``: the payload is
    the one it writes without them, and the statistics are the reference's
    [RMSNorm(x) W_e^T | 1/rms(x)] (the projection within a rounding of the
    gamma-folded weights to the input dtype, 1/rms within fp32 summation order)."""
    from resbm_kernels import ops
    from resbm_kernels.backends import use_backend

    n, d, k = shape
    gen = torch.Generator().manual_seed(n + k)
    x = normal(n, d, dtype=dtype, gen=gen)
    w_e = normal(k, d, dtype=dtype, scale=d**-0.5, gen=gen)
    gamma = normal(d, dtype=dtype, scale=0.2, gen=gen).add_(1.0)
    codec = Codec(bits=8)
    with use_backend(backend):
        args = (x.to(device), w_e.to(device), codec)
        payload, stats = ops.encode(*args, norm_weight=gamma.to(device), seed=3, return_row_stats=True)
        plain = ops.encode(*args, norm_weight=gamma.to(device), seed=3)
    assert torch.equal(payload.cpu(), plain.cpu())
    with use_backend("reference"):
        want = ops.encode(x, w_e, codec, norm_weight=gamma, seed=3, return_row_stats=True)[1]
    assert stats.dtype == torch.float32 and stats.shape == (n, k + 1)
    assert rel_err(stats[:, :k], want[:, :k]) <= rel_tol(dtype), "projection"
    assert rel_err(stats[:, k], want[:, k]) <= rel_tol(torch.float32), "1/rms"


def _gpu_training_step(seed: int, row_stats: bool):
    """(inputs, step): CUDA float32 inputs (N=300, d=256, k=32) and a function
    running the four public passes on them as a training step does (encode,
    decode, decode backward, encode backward through RMSNorm; encode forward
    returns the row statistics, which encode backward uses with ``row_stats``,
    else it recomputes them from x)."""
    from resbm_kernels import ops

    gen = torch.Generator().manual_seed(seed)
    n, d, k = 300, 256, 32
    codec, grad_codec = Codec(bits=8), GRAD_CODEC
    x, grad_h = (torch.randn(n, d, generator=gen).cuda() for _ in range(2))
    w_e, w_d = torch.randn(k, d, generator=gen).cuda() * 0.1, torch.randn(d, k, generator=gen).cuda() * 0.1
    gamma = torch.rand(d, generator=gen).cuda() + 0.5
    inputs = dict(x=x, grad_h=grad_h, w_e=w_e, w_d=w_d, gamma=gamma)

    def step():
        p, stats = ops.encode(x, w_e, codec, norm_weight=gamma, seed=1, return_row_stats=True)
        h = ops.decode(p, w_d, codec, n)
        gp, gw_d = ops.decode_backward(grad_h, p, w_d, codec, grad_codec, grad_seed=2)
        grads = ops.encode_backward(gp, x, w_e, grad_codec, norm_weight=gamma, row_stats=stats if row_stats else None)
        return (p, stats, h, gp, gw_d, *grads)
    return inputs, step


def check_passes_do_not_synchronise(backend: str) -> None:
    """The four passes of a fast backend on CUDA tensors, called again after a
    warm-up (compilation, autotuning, cached headers), never wait for the GPU:
    ``torch.cuda.set_sync_debug_mode("error")`` turns any synchronising call
    into an error."""
    from resbm_kernels.backends import use_backend

    _, passes = _gpu_training_step(14, row_stats=False)
    with use_backend(backend):
        passes()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            passes()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def check_passes_replay_in_a_cuda_graph(backend: str) -> None:
    """The four passes of a fast backend, captured in a CUDA graph after a warm-up
    (compilation, autotuning, cached headers) and replayed on new values written
    into the same input tensors, give bit for bit what eager calls give on those
    values (a pass that synchronised, copied from the host or kept a pointer it
    should not would fail the capture or the comparison). Replaying a captured
    training step removes the host's per-call cost (Python, dispatch, launches)."""
    from resbm_kernels.backends import use_backend

    inputs, step = _gpu_training_step(15, row_stats=True)
    gen = torch.Generator().manual_seed(16)
    with use_backend(backend):
        step()  # warm-up: compile, autotune
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for t in inputs.values():  # new values, same tensors
            t.copy_(torch.randn(t.shape, generator=gen).to(t.device) * t.abs().mean())
        graph.replay()
        eager = step()
    torch.cuda.synchronize()
    names = ("payload", "row stats", "h", "gradient payload", "grad w_d", "grad x", "grad w_e", "grad gamma")
    for name, got, want in zip(names, captured, eager):
        assert torch.equal(got, want), f"{backend}: {name} of the replayed graph differs from an eager call"


# (seed, offset) pairs whose sums wrap modulo 2**64 as the kernels' do: past 2**63 - 1, below 0
SEED_OFFSET_CASES = ((5, 2**33 + 7), (2**63 - 3, 5), (7, -9), (-(2**62), -(2**62) - 11))


def as_int64(value: int) -> int:
    """``value`` modulo 2**64 as a signed 64-bit integer (a seed plus its offset)."""
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


def check_seed_offset_is_read_on_the_device(backend: str, device, monkeypatch) -> None:
    """Encode and decode backward of ``backend`` with stochastic codecs, given
    ``seed`` and a ``seed_offset`` tensor on ``device``, give bit for bit what
    they give for the int seed + offset (modulo 2**64: sums that wrap, negative
    offsets), and never read the offset on the host (that would wait for the
    device, and a CUDA graph would replay the captured value)."""
    from resbm_kernels import ops
    from resbm_kernels.backends import reference, use_backend

    gen = torch.Generator().manual_seed(21)
    n, d, k = 37, 64, 32
    x, grad_h = (normal(n, d, dtype=torch.bfloat16, gen=gen).to(device) for _ in range(2))
    w_e = normal(k, d, dtype=torch.bfloat16, scale=d**-0.5, gen=gen).to(device)
    w_d = normal(d, k, dtype=torch.bfloat16, scale=k**-0.5, gen=gen).to(device)
    codec, grad_codec = Codec(bits=4, group_size=16, rounding="stochastic"), Codec(bits=8, rounding="stochastic")
    payload = reference.write_payload(normal(n, k, dtype=torch.float32, gen=gen), Codec(bits=8), 0).to(device)

    def passes(seed, offset=None):
        return (ops.encode(x, w_e, codec, seed=seed, seed_offset=offset),
                *ops.decode_backward(grad_h, payload, w_d, Codec(bits=8), grad_codec, grad_seed=seed,
                                     seed_offset=offset))

    def read_on_the_host(*args, **kwargs):
        raise AssertionError("seed_offset was read on the host")

    with use_backend(backend):
        for seed, offset in SEED_OFFSET_CASES:
            want = passes(as_int64(seed + offset))
            on_device = torch.tensor(offset, dtype=torch.int64, device=device)
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "__int__", "__index__"):
                    m.setattr(torch.Tensor, name, read_on_the_host)
                got = passes(seed, on_device)
            for what, a, b in zip(("payload", "gradient payload", "grad w_d"), got, want):
                assert torch.equal(a, b), f"{backend}: {what} with seed {seed} and offset {offset}"
        assert not torch.equal(passes(5)[0], passes(6)[0])  # (the seed matters at all)


def stochastic_boundary_on_gpu():
    """(boundary, step, names): a bf16 ResBMBoundary with stochastic codecs on the GPU,
    and step(module), a forward and backward of fixed inputs through ``module`` (the
    boundary, or a compiled one) returning h and every leaf's gradient, named by
    ``names``."""
    from resbm_kernels.nn import ResBMBoundary

    torch.manual_seed(17)
    n, d, k = 96, 256, 32
    boundary = ResBMBoundary(d, k, codec=Codec(bits=4, group_size=16, rounding="stochastic"), grad_codec=GRAD_CODEC,
                             device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    leaves = (x, *boundary.parameters())

    def step(module):
        for t in leaves:
            t.grad = None
        h = module(x)
        h.backward(grad_h)
        # detached: a kept autograd graph would keep the leaves' AccumulateGrad nodes of the
        # capture's stream alive into the eager steps (torch warns of a stream mismatch)
        return [h.detach(), *(t.grad for t in leaves)]

    return boundary, step, ["h", "grad x", *(f"grad {name}" for name, _ in boundary.named_parameters())]


def check_boundary_draws_anew_in_a_cuda_graph(backend: str) -> None:
    """A ResBMBoundary with stochastic codecs, its forward and backward captured
    in a CUDA graph, draws new seeds at every replay (its call counter is
    incremented in the graph and read by the kernels on the device): replay i
    gives bit for bit what eager call i from the same count gives."""
    from resbm_kernels.backends import use_backend

    boundary, step, names = stochastic_boundary_on_gpu()
    with use_backend(backend):
        side = torch.cuda.Stream()  # warm-up (compilation, autotuning) on a side stream, as torch advises
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(boundary)
        torch.cuda.current_stream().wait_stream(side)
        start = boundary.calls
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step(boundary)
        replays = []
        for _ in range(3):
            graph.replay()
            replays.append([t.clone() for t in captured])
        assert boundary.calls == start + 3, "the replays did not count their calls"
        boundary.calls = start
        for i, replayed in enumerate(replays):
            for what, got, want in zip(names, replayed, step(boundary)):
                assert torch.equal(got, want), f"{backend}: replay {i}'s {what} differs from eager call {i}"
    assert not torch.equal(replays[0][0], replays[1][0]), "the replays drew the same seeds"


def check_boundary_compiled_with_cuda_graphs(backend: str) -> None:
    """torch.compile(mode="reduce-overhead") of a ResBMBoundary with stochastic codecs
    runs its forward and backward as CUDA graphs (inductor skips none) and call i
    gives bit for bit what the eager call of the same count gives: the graphs draw
    new seeds at every call, as the eager module does."""
    from torch._dynamo.utils import counters

    from resbm_kernels.backends import use_backend

    boundary, step, names = stochastic_boundary_on_gpu()
    compiled = torch.compile(boundary, mode="reduce-overhead")
    skips = counters["inductor"]["cudagraph_skips"]
    with use_backend(backend):
        calls = []
        for i in range(4):  # (cudagraph trees record at the second call, replay from the third)
            start = boundary.calls
            calls.append([t.clone() for t in step(compiled)])
            assert boundary.calls == start + 1, f"{backend}: compiled call {i} did not count itself"
            boundary.calls = start
            for what, got, want in zip(names, calls[-1], step(boundary)):
                assert torch.equal(got, want), f"{backend}: compiled call {i}'s {what} differs from the eager one"
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor ran the boundary without CUDA graphs"
    assert not torch.equal(calls[2][0], calls[3][0]), "two replays drew the same seeds"
