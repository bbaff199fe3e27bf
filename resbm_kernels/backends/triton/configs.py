"""Launch configurations: a small autotune set per kernel on the GPU, one fixed
large-block config under TRITON_INTERPRET=1 (the interpreter's cost grows with
the number of block operations, and multi-config autotuning fails there).

Each set is ordered fastest first as measured by bench/sweep_configs.py (H200,
2026-11-26, d=4096, N=16384, k in {32, 128}, bf16, int8; tables below).

On the GPU a config is launchable for a k when the fp32 tiles its kernel keeps
in registers (see :func:`tile_regs`, by kernel family) need at most
``MAX_TILE_REGS`` registers per thread, and its tiles fit the device's shared
memory (an upper estimate, see :func:`smem_bytes`). The last config of each
set is small enough for every k up to 256 (the most the backend takes) and is
the fallback. Checked
ahead of time by tests/test_triton_static.py (same rule, real cubins): no
spills for bf16 and fp16; fp32 inputs (3xTF32) spill in the backward
kernels at large k.

``RESBM_TRITON_AUTOTUNE=0`` skips the timing: each kernel then uses the first
launchable config (no autotuning delay on the first call of each shape; the
GPU test run uses it, and tests every config explicitly).
"""

import functools
import os

import triton

from ... import checks

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = checks.switch("RESBM_TRITON_AUTOTUNE", default=True)
# registers per thread for the tiles of tile_regs, by kernel family (above it sm_90 spills)
MAX_TILE_REGS = {"project": 32, "dequant": 96, "wgrad": 96}
SMEM_FALLBACK = 99 * 1024  # when the device does not say: the smallest opt-in limit since sm_80


def _configs(gpu, interp):
    if INTERPRET:
        return [triton.Config(dict(zip(("BLOCK_N", "BLOCK_D"), interp)), num_warps=4, num_stages=1)]
    return gpu_configs(gpu)


def gpu_configs(table):
    """triton.Config objects for (BLOCK_N, BLOCK_D, num_warps, num_stages[, maxnreg][, meta])
    rows, meta a dict of the kernel's further tuned constants (dequant_project's D_SPLIT)."""
    def config(bn, bd, w, s, *extra):
        meta = next((e for e in extra if isinstance(e, dict)), {})
        limit = next((e for e in extra if isinstance(e, int)), None)
        return triton.Config({"BLOCK_N": bn, "BLOCK_D": bd, **meta}, num_warps=w, num_stages=s, maxnreg=limit)
    return [config(*row) for row in table]


def tile_regs(config, block_k, kind, has_norm=False, fused_wgrad=0):
    """Registers per thread of the fp32 tiles a ``kind`` of kernel holds:
    "project" (project_quantize, grad_operand) its (BLOCK_N, k) accumulator;
    "dequant" (dequant_project) its (BLOCK_N, k) dequantized operand and
    (BLOCK_N, BLOCK_D) output tile, and with ``has_norm`` (encode backward's
    grad_x through RMSNorm) the x tile beside it; "wgrad" (weight_grad) its
    (k, BLOCK_D) accumulator. With ``fused_wgrad`` (nonzero: the weight
    gradient's programs in a project or dequant kernel's grid) the larger of the
    kernel's and a wgrad program's (k, BLOCK_D) accumulator."""
    bn, bd = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_D"]
    elems = {"project": bn * block_k, "dequant": bn * (block_k + bd * (2 if has_norm else 1)),
             "wgrad": bd * block_k}[kind]
    if fused_wgrad:
        elems = max(elems, bd * block_k)
    return elems // (32 * config.num_warps)


def smem_bytes(config, block_k, elem_bytes, kind, fused_wgrad=0):
    """Upper estimate of a config's shared memory: ``num_stages`` copies of the
    (BLOCK_N + BLOCK_K) x BLOCK_D tiles (rows kernels: input and weight) or
    BLOCK_N x (BLOCK_D + BLOCK_K) tiles (weight gradient: input and Z),
    plus a quarter for layout scratch, plus for the rows kernels one
    (BLOCK_N, k) fp32 tile staged through shared memory (a register operand of
    wgmma, the epilogue's layout change); four of them for dequant_project on
    TF32 (its dequantized operand in 3xTF32 parts: 256 KB compiled at
    BLOCK_N=64, k=256, fp32, where one tile is 64 KB).
    With ``fused_wgrad`` (the weight-gradient programs' operand bytes, see
    :func:`launchable`) the larger of the kernel's own and such a program's
    (the compiler shares the memory of the two kinds of programs).
    tests/test_triton_static.py checks it bounds the compiled kernels."""
    bn, bd = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_D"]
    if fused_wgrad:
        return max(smem_bytes(config, block_k, elem_bytes, kind), smem_bytes(config, block_k, fused_wgrad, "wgrad"))
    if kind == "wgrad":
        return config.num_stages * bn * (bd + block_k) * elem_bytes * 5 // 4
    staged = 4 if kind == "dequant" and elem_bytes == 4 else 1
    return config.num_stages * (bn + block_k) * bd * elem_bytes * 5 // 4 + staged * bn * block_k * 4


def launchable(configs, block_k, elem_bytes, smem_limit, kind, has_norm=False, writes_z=False, arch=90,
               fused_wgrad=0):
    """The configs that fit (registers and shared memory), else the last one.
    ``fused_wgrad``: 0, or with the weight gradient's programs in the kernel's
    launch their operands' bytes per element (:func:`operand_bytes` of a
    dequantized operand: 4 for fp16 on TF32, where the kernel's own are 2). A config
    with a register limit (maxnreg) fits only sm_90 (``arch``: compute capability x 10;
    by default the lent GPUs' 90), 16-bit operands and a kernel that does not also write
    Z (decode backward's project_quantize): elsewhere it spills (sm_80, fp32) or was not
    measured. A 16-warp config (an SM's 64 K registers over 512 threads: 128 a thread)
    fits only sm_90 and 16-bit operands too, whether or not the kernel writes Z (it
    compiles without spills there)."""
    fit = [c for c in configs
           if tile_regs(c, block_k, kind, has_norm, fused_wgrad) <= MAX_TILE_REGS[kind]
           and smem_bytes(c, block_k, elem_bytes, kind, fused_wgrad) <= smem_limit
           and (c.maxnreg is None or (arch == 90 and elem_bytes == 2 and not writes_z))
           and (c.num_warps < 16 or (arch == 90 and elem_bytes == 2))]
    return fit or configs[-1:]


@functools.lru_cache(maxsize=None)
def device_arch(device) -> int:
    """Compute capability x 10 of a CUDA device (90 for an H100)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def smem_limit(device) -> int:
    """Opt-in shared memory per block of a CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", SMEM_FALLBACK)


@functools.lru_cache(maxsize=None)
def programs_at_once(device) -> int:
    """Programs the device runs at once, roughly: one per SM on CUDA; 4 under
    the interpreter (small, so that the test shapes also take the split paths)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers (triton.cdiv is a constexpr function since
    Triton 3.5, about 1 µs per host call; the launchers call this several times per op)."""
    return -(-a // b)


def d_splits(n, d, device) -> int:
    """Programs to split d between for each block of rows: more than one only
    while N gives fewer blocks of 64 rows than :func:`programs_at_once` (small
    N). The same for every launch config (so a d split's partials can be summed
    without knowing which config ran); each program walks an equal run of the
    config's BLOCK_D tiles, the last runs possibly empty."""
    return max(1, min(cdiv(d, 128), cdiv(programs_at_once(device), max(1, cdiv(n, 64)))))


# input bytes per chunk of a fused backward launch (weight_grad.fused_row_block): a third of an H100's L2
FUSED_CHUNK_BYTES = 16 << 20


def fused_chunk_rows(d: int, elem_bytes: int, device) -> int:
    """Rows per chunk of a fused backward launch: about FUSED_CHUNK_BYTES of the
    (N, d) input, a power of two of at least 128 rows (so every config's
    BLOCK_N divides it); 128 under the interpreter (two of its 64-row blocks),
    so that the tests' shapes span several chunks."""
    import torch

    if torch.device(device).type != "cuda":
        return 128
    return max(128, 1 << ((FUSED_CHUNK_BYTES // (d * elem_bytes)).bit_length() - 1))


def operand_bytes(dtype, dequant: bool) -> int:
    """Bytes per element of the GEMM operand tiles: 4 for fp32, and for fp16
    in the kernels whose dot runs on TF32 (a dequantized operand), else 2."""
    import torch

    return 4 if dtype == torch.float32 or (dequant and dtype == torch.float16) else 2


def _pruner(kind, dequant, operand):
    """Early config pruning for a kernel whose GEMM operand dtype is that of argument ``operand``."""
    def prune(configs, named_args, **kwargs):
        block_k = kwargs.get("BLOCK_K", named_args.get("BLOCK_K"))
        t = named_args[operand]
        limit, arch = (smem_limit(t.device), device_arch(t.device)) if t.is_cuda else (SMEM_FALLBACK, 90)
        has_norm = kwargs.get("HAS_NORM", named_args.get("HAS_NORM", False))
        writes_z = bool(kwargs.get("ZBITS", named_args.get("ZBITS", 0)))
        fused = kwargs.get("FUSED_WGRAD", named_args.get("FUSED_WGRAD", False))
        if fused:  # (a one-dimensional grid: no d split)
            configs = [c for c in configs if c.kwargs.get("D_SPLIT", 1) == 1]
        kept = launchable(configs, block_k, operand_bytes(t.dtype, dequant), limit, kind, has_norm, writes_z, arch,
                          operand_bytes(t.dtype, dequant=True) if fused else 0)
        return kept if AUTOTUNE else kept[:1]
    return prune


# (BLOCK_N, BLOCK_D, num_warps, num_stages[, maxnreg]); BLOCK_K is the padded k, not tuned. Pass times (us) of
# the first config chosen at k=32 / k=128 and the previous common first config, N=16384 (sweep above):
# project_quantize, grad_operand: encode fwd 56.5 / 85.1 (was 89.9), decode bwd k=128 107.6 (127.8);
# (BLOCK_N, k) accumulators above 32 registers spill (64x64 w4 at k=128: 18 instructions). (Two such
# configs' wrong encode forward results on the H200 had another cause, found on the H100: tiles.project_rows.)
GPU_PROJECT = ((64, 128, 4, 4), (64, 64, 8, 4), (64, 128, 8, 3), (128, 128, 8, 3), (64, 32, 8, 3))
# project_quantize's own: at k=128 (the first row's accumulator too big) the 64x64 w8 config needs
# 162 registers, so an SM holds one program; limited to 128 it holds two: encode forward 99.3 ->
# 75.1 us (H100 sweep, 2026-11-27, N=16384, d=4096, int8; decode backward 130.4 either way)
# The 128-row, 16-warp config (not yet timed, session 29): a program reads each (BLOCK_D, k)
# weight tile from L2 once per 128 rows, not 64; at k=128 the 64-row configs read twice
# x's bytes of weights (268 MB at N=16384, d=4096) beside x's 134 MB from memory. Its 128
# registers a thread (16 warps) hold an SM to one program: 16 warps, as two of 64x64 w8.
GPU_PROJECT_QUANTIZE = (GPU_PROJECT[:1] + ((64, 64, 8, 4, 128),) + GPU_PROJECT[1:-1] + ((128, 64, 16, 4),)
                        + GPU_PROJECT[-1:])
# dequant_project (decode forward; encode backward's grad_x, not swept apart): decode fwd 44.5 / 59.7 (was
# 41.9 / 90.6); BLOCK_N=32 is fastest at N=4096, k=32; the last, the fallback, is the only tile that fits
# TF32 operands at k=256 (128 KB). D_SPLIT n: each row block's d split between n programs, on top of the
# launcher's small-N split (d_splits). Unsplit at N=16384 the grid holds about two programs an SM (ncu,
# H200 2026-11-28: 7.7 warps an SM in decode forward), and Triton waits for each tile's wgmma before the
# epilogue that reads it, so only an SM's other programs overlap a program's tensor-core work with its
# stores. Splits not swept, the autotuner decides (three splits of grad_x: encode backward 7-9 % faster at
# k <= 64, slower at k=128, H100 2026-11-27). Not yet timed: 128x64 w16 (session 29; weight tiles read
# from L2 once per 128 rows) and 64x64 w4 in two splits (session 30: 512 programs, four an SM, one wave
# on 132 SMs; two stages at k=128, 57 KB).
GPU_DEQUANT = ((64, 64, 4, 4), (64, 128, 4, 4), (64, 128, 8, 3), (64, 64, 8, 4), (32, 256, 4, 4), (64, 32, 8, 3),
               (64, 64, 8, 4, {"D_SPLIT": 2}), (64, 64, 8, 4, {"D_SPLIT": 3}), (64, 64, 4, 4, {"D_SPLIT": 3}),
               (64, 64, 4, 4, {"D_SPLIT": 2}), (64, 64, 4, 2, {"D_SPLIT": 2}), (128, 64, 16, 3), (32, 32, 4, 2))
# weight_grad (decode backward's, swept; encode backward's too): 88.3 / 128.5 (was 94.1 / 128.5): each d-tile
# program re-reads the (N, k) operand Z, so at large k wide BLOCK_D tiles halve that L2 traffic; the
# two-stage fallback fits fp32 operands at k=256 on an A100 (147 KB; three stages need 221 KB)
GPU_WGRAD = ((128, 128, 4, 4), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 4), (64, 32, 8, 3), (64, 32, 8, 2))
GPU_TABLES = dict(project_quantize=GPU_PROJECT_QUANTIZE, grad_operand=GPU_PROJECT, dequant_project=GPU_DEQUANT,
                  weight_grad=GPU_WGRAD)  # by kernel
INTERPRET_BLOCKS = (64, 128)

# the flags that change a kernel's tiles or epilogue are part of the key (names a kernel lacks are
# ignored); SPLIT_D too: a small-N d split runs a short loop per program and tunes apart
_KEY = ["d", "k", "BITS", "HAS_NORM", "HAS_RES", "STOCHASTIC", "ZBITS", "WRITE_STATS", "HAS_STATS", "SPLIT_D",
        "FUSED_WGRAD"]


class LoopConstants(triton.runtime.autotuner.Heuristics):
    """The constants of a kernel's loop over d in BLOCK_D tiles: EVEN_D = d %
    BLOCK_D == 0 (whole tiles need no column test) and, for a kernel that
    takes them (:mod:`.dequant_project`), STAGES, the launch config's
    num_stages (a loop that sets its own pipelining depth), and D_SPLIT, 1
    unless the config sets it. Triton's heuristics ``run`` builds a dict of
    every argument per call for them (~10 µs of host time a launch here); this
    one reads d where it is."""

    def __init__(self, fn):
        super().__init__(fn, fn.arg_names, {"EVEN_D": lambda args: args["d"] % args["BLOCK_D"] == 0})
        self.d_at = fn.arg_names.index("d")
        self.loop_args = "STAGES" in fn.arg_names  # (and D_SPLIT)

    def run(self, *args, **kwargs):
        d = args[self.d_at] if self.d_at < len(args) else kwargs["d"]
        if self.loop_args:
            kwargs["STAGES"] = kwargs["num_stages"]
            kwargs.setdefault("D_SPLIT", 1)
        return self.fn.run(*args, EVEN_D=d % kwargs["BLOCK_D"] == 0, **kwargs)


class Autotuner(triton.runtime.autotuner.Autotuner):
    """Triton's autotuner with a short path for the calls it has tuned.

    Triton's ``run`` forms the tuning key on every call from dicts of all the
    kernel's arguments (~40 here): ~43 µs of host time per launch with several
    configs on a 2-core EPYC (launch stubbed), 12 µs with one, and a pass makes
    up to three launches. This ``run`` forms the same key from the arguments
    as given (:meth:`key_of`) and launches the config chosen for it directly;
    a key not tuned yet goes through Triton's (pruning, timing on the GPU)
    unless pruning leaves one config, which it then launches untimed:
    Triton 3.6 (the GPUs' version) would time that config alone, ~100 ms a
    new key with RESBM_TRITON_AUTOTUNE=0."""

    def __init__(self, fn, arg_names, configs, key, **kwargs):
        super().__init__(fn, arg_names, configs, key, None, None, **kwargs)
        # where key_of finds the key arguments (fixed by the kernel's signature)
        self.key_at = [(name, arg_names.index(name)) for name in key if name in arg_names]
        self.named = frozenset(arg_names)

    def run(self, *args, **kwargs):
        if len(self.configs) == 1:
            config = self.configs[0]
        else:
            key = self.key_of(args, kwargs)
            config = self.cache.get(key)
            if config is None:  # a new key: with one launchable config there is nothing to time
                self.nargs = dict(zip(self.arg_names, args))  # (prune_configs reads it)
                kept = self.prune_configs(kwargs)
                if len(kept) == 1:  # (Triton 3.6 would time it)
                    config = self.cache[key] = kept[0]
        if config is None or config.pre_hook is not None:
            return super().run(*args, **kwargs)
        self.best_config = config
        return self.fn.run(*args, **kwargs, **config.all_kwargs())

    def key_of(self, args, kwargs) -> tuple:
        """The key Triton's ``run`` forms for a call: the values of the key
        arguments present, then the dtype (as a string) of each argument that
        has one, the positional ones first, then those passed by name."""
        given = len(args)
        values = [args[at] if at < given else kwargs[name] for name, at in self.key_at
                  if at < given or name in kwargs]
        values += [str(a.dtype) for a in args if hasattr(a, "dtype")]
        values += [str(v.dtype) for name, v in kwargs.items() if hasattr(v, "dtype") and name in self.named]
        return tuple(values)


def _autotune(table, kind, dequant, operand):
    prune = {"early_config_prune": _pruner(kind, dequant, operand)}
    return lambda fn: Autotuner(fn, fn.arg_names, _configs(table, INTERPRET_BLOCKS), _KEY, prune_configs_by=prune)


autotune_project_quantize = _autotune(GPU_PROJECT_QUANTIZE, "project", dequant=False, operand="a_ptr")
autotune_grad_operand = _autotune(GPU_PROJECT, "project", dequant=False, operand="a_ptr")
autotune_dequant = _autotune(GPU_DEQUANT, "dequant", dequant=True, operand="w_ptr")
autotune_wgrad = _autotune(GPU_WGRAD, "wgrad", dequant=True, operand="a_ptr")
