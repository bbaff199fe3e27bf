import sys, re
sys.path.insert(0, "tests")
import torch, triton
import test_triton_static as S
from resbm_kernels.backends.triton import KERNELS, TILE_KINDS, configs
case = S.CASES[int(sys.argv[1]) if len(sys.argv) > 1 else 4]
print(case["what"])
autotuner = KERNELS[case["kernel"]]
fn = autotuner.fn
while not isinstance(fn, triton.runtime.JITFunction):
    fn = fn.fn
cfg = autotuner.configs[0]
cfg = next(c for c in autotuner.configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) == configs.GPU_PROJECT[0])
constexprs = dict(case["constexprs"], UPCAST=False, PRECISION="tf32x3", BLOCK_K=case["k"], **cfg.kwargs)
constexprs.update({name: 1 for name in case["ones"]})
if "EVEN_D" in fn.arg_names: constexprs["EVEN_D"] = True
compiled, regs, stack, sass = S._compile(fn, case, constexprs, cfg, 90)
ptx = compiled.asm["ptx"]
for pat in ["fence.proxy.async", "cp.async.ca", "cp.async.cg", "cp.async.wait", "cp.async.bulk", "wgmma.wait_group", "bar.sync", "barrier.sync", "mbarrier"]:
    print(pat, len(re.findall(re.escape(pat), ptx)))
open("/tmp/prof/triton_pq.ptx","w").write(ptx)
open("/tmp/prof/triton_pq.ttgir","w").write(compiled.asm["ttgir"])
print("regs", regs, "smem", compiled.metadata.shared)
