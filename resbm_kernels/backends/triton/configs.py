"""Launch configurations: a small autotune set on the GPU, one fixed large-block
config under TRITON_INTERPRET=1 (the interpreter's cost grows with the number
of block operations, and multi-config autotuning fails there).

On the GPU a config is launchable for a k when its fp32 accumulators need at
most 32 registers per thread in the rows kernels (which hold more tiles in
registers; more spills on sm_80 and sm_90) or 96 in the weight gradient
(whose operands both stay in shared memory; its (k, BLOCK_D) tile, plus in
encode backward the (BLOCK_N, BLOCK_D) grad_x tile), and its tiles fit the device's
shared memory (an upper estimate, see :func:`smem_bytes`). The last config of each
list is small enough for every k up to 256 and is the fallback. Checked
ahead of time by tests/test_triton_static.py (same rule, real cubins): no
spills for bf16 and fp16; fp32 inputs (3xTF32) spill in the backward
kernels at large k.

``RESBM_TRITON_AUTOTUNE=0`` skips the timing: each kernel then uses the first
launchable config (no autotuning delay on the first call of each shape; the
GPU test run uses it, and tests every config explicitly).
"""

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("RESBM_TRITON_AUTOTUNE", "1").strip() != "0"
MAX_TILE_REGS = {False: 32, True: 96}  # by wgrad
SMEM_FALLBACK = 99 * 1024  # when the device does not say: the smallest opt-in limit since sm_80


def _configs(gpu, interp):
    if INTERPRET:
        return [triton.Config(dict(zip(("BLOCK_N", "BLOCK_D"), interp)), num_warps=4, num_stages=1)]
    return gpu_configs(gpu)


def gpu_configs(table):
    """triton.Config objects for (BLOCK_N, BLOCK_D, num_warps, num_stages) rows."""
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s) for bn, bd, w, s in table]


def tile_regs(config, block_k, wgrad=False, grad_x=False):
    """Registers per thread of a config's fp32 accumulators: (BLOCK_N, k) in
    the rows kernels, (k, BLOCK_D) in the weight gradient, plus the
    (BLOCK_N, BLOCK_D) grad_x tile when it also writes grad_x."""
    bn, bd = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_D"]
    elems = (bd * block_k + (bn * bd if grad_x else 0)) if wgrad else bn * block_k
    return elems // (32 * config.num_warps)


def smem_bytes(config, block_k, elem_bytes, wgrad=False, grad_x=False):
    """Upper estimate of a config's shared memory: ``num_stages`` copies of the
    (BLOCK_N + BLOCK_K) x BLOCK_D tiles (rows kernels: input and weight) or
    BLOCK_N x (BLOCK_D + BLOCK_K) tiles (weight gradient: input and Z),
    plus a quarter for layout scratch, plus for the rows kernels one
    (BLOCK_N, k) fp32 tile staged through shared memory (a register operand of
    wgmma, the epilogue's layout change), for the weight gradient writing
    grad_x its weight tile and one fp32 (BLOCK_N, BLOCK_D) tile.
    tests/test_triton_static.py checks it bounds the compiled kernels."""
    bn, bd = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_D"]
    if wgrad:
        extra = block_k * bd * elem_bytes + bn * bd * 4 if grad_x else 0
        return config.num_stages * bn * (bd + block_k) * elem_bytes * 5 // 4 + extra
    return config.num_stages * (bn + block_k) * bd * elem_bytes * 5 // 4 + bn * block_k * 4


def launchable(configs, block_k, elem_bytes, smem_limit, wgrad=False, grad_x=False):
    """The configs that fit (registers and shared memory), else the last one."""
    fit = [c for c in configs
           if tile_regs(c, block_k, wgrad, grad_x) <= MAX_TILE_REGS[wgrad]
           and smem_bytes(c, block_k, elem_bytes, wgrad, grad_x) <= smem_limit]
    return fit or configs[-1:]


def smem_limit(device) -> int:
    """Opt-in shared memory per block of a CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", SMEM_FALLBACK)


def operand_bytes(dtype, dequant: bool) -> int:
    """Bytes per element of the GEMM operand tiles: 4 for fp32, and for fp16
    in the kernels whose dot runs on TF32 (a dequantized operand), else 2."""
    import torch

    return 4 if dtype == torch.float32 or (dequant and dtype == torch.float16) else 2


def _pruner(wgrad, dequant, operand):
    """Early config pruning for a kernel whose GEMM operand dtype is that of argument ``operand``."""
    def prune(configs, named_args, **kwargs):
        block_k = kwargs.get("BLOCK_K", named_args.get("BLOCK_K"))
        t = named_args[operand]
        limit = smem_limit(t.device) if t.is_cuda else SMEM_FALLBACK
        elem = operand_bytes(t.dtype, dequant)
        grad_x = bool(kwargs.get("GRAD_X", named_args.get("GRAD_X", False)))
        kept = launchable(configs, block_k, elem, limit, wgrad, grad_x)
        return kept if AUTOTUNE else kept[:1]
    return prune


# (BLOCK_N, BLOCK_D, num_warps, num_stages); BLOCK_K is the padded k, not tuned.
GPU_ROWS = ((64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3), (64, 32, 8, 3))
# the weight gradient's first (untuned) choice is BLOCK_D=128: each d-tile program re-reads the
# (N, k) operand Z, so wider tiles halve that L2 traffic (and its loop issues fewest instructions)
# the two-stage fallback fits fp32 operands at k=256 on an A100 (147 KB; three stages need 221 KB)
GPU_WGRAD = ((64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 4), (64, 32, 8, 3), (64, 32, 8, 2))
ROW_CONFIGS = _configs(GPU_ROWS, interp=(64, 128))
WGRAD_CONFIGS = _configs(GPU_WGRAD, interp=(64, 128))

# the flags that change a kernel's tiles or epilogue are part of the key (names a kernel lacks are ignored)
_KEY = ["d", "k", "BITS", "HAS_NORM", "HAS_RES", "STOCHASTIC", "ZBITS", "GRAD_X", "WRITE_STATS", "HAS_STATS"]


# for the kernels that loop over d in BLOCK_D tiles: whole tiles need no column test
even_d = triton.heuristics({"EVEN_D": lambda args: args["d"] % args["BLOCK_D"] == 0})


def _autotune(configs, wgrad, dequant, operand):
    return triton.autotune(configs=configs, key=_KEY,
                           prune_configs_by={"early_config_prune": _pruner(wgrad, dequant, operand)})


autotune_project = _autotune(ROW_CONFIGS, wgrad=False, dequant=False, operand="a_ptr")
autotune_dequant = _autotune(ROW_CONFIGS, wgrad=False, dequant=True, operand="w_ptr")
autotune_wgrad = _autotune(WGRAD_CONFIGS, wgrad=True, dequant=True, operand="a_ptr")
