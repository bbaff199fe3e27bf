"""Launch configurations: a small autotune set on the GPU, one fixed large-block
config under TRITON_INTERPRET=1 (the interpreter's cost grows with the number
of block operations, and multi-config autotuning fails there).

GPU configs whose fp32 accumulator would need more than 32 registers per
thread are pruned for the k at hand: at 64 the epilogues spill on sm_80 and
sm_90 (measured with tests/test_triton_static.py).

``RESBM_TRITON_AUTOTUNE=0`` skips the timing: each kernel then uses the first
config that survives pruning (no autotuning delay on the first call of each
shape; the GPU test run uses it, and tests every config explicitly).
"""

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("RESBM_TRITON_AUTOTUNE", "1").strip() != "0"
MAX_ACC_REGS = 32


def _configs(gpu, interp):
    if INTERPRET:
        return [triton.Config(dict(zip(("BLOCK_N", "BLOCK_D"), interp)), num_warps=4, num_stages=1)]
    return gpu_configs(gpu)


def gpu_configs(table):
    """triton.Config objects for (BLOCK_N, BLOCK_D, num_warps, num_stages) rows."""
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s) for bn, bd, w, s in table]


def acc_regs(config, block_k, wgrad=False):
    """fp32 accumulator registers per thread of a config."""
    rows = config.kwargs["BLOCK_D"] if wgrad else config.kwargs["BLOCK_N"]
    return rows * block_k // (32 * config.num_warps)


def _pruner(wgrad):
    def prune(configs, named_args, **kwargs):
        block_k = kwargs.get("BLOCK_K", named_args.get("BLOCK_K"))
        kept = [c for c in configs if acc_regs(c, block_k, wgrad) <= MAX_ACC_REGS] or configs[-1:]
        return kept if AUTOTUNE else kept[:1]
    return prune


# (BLOCK_N, BLOCK_D, num_warps, num_stages); BLOCK_K is the padded k, not tuned.
# The last config of each list is the fallback for large k (no spills at k=128).
GPU_ROWS = ((64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3))
GPU_WGRAD = ((128, 64, 4, 3), (64, 128, 8, 3), (64, 64, 8, 4))
ROW_CONFIGS = _configs(GPU_ROWS, interp=(64, 128))
WGRAD_CONFIGS = _configs(GPU_WGRAD, interp=(64, 128))

_KEY = ["d", "k", "BITS"]
autotune_rows = triton.autotune(configs=ROW_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner(False)})
autotune_wgrad = triton.autotune(configs=WGRAD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner(True)})
