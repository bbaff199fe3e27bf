"""Static GPU check of the Triton kernels, without a GPU.

Every kernel is compiled ahead of time for sm_90 and sm_80 (each GPU autotune
config that survives pruning for the case's k) and the cubin is inspected with
Triton's bundled ``cuobjdump -res-usage`` and ``nvdisasm``: the GEMMs must run on
tensor cores (HGMMA / wgmma on sm_90, HMMA on sm_80), with their operands copied
ahead (cp.async, from the TTGIR) when they have stages to, and nothing may spill
(nor in the GEMM-free second kernels: ``finish_rows_kernel`` of a d split,
``finish_weight_grad_kernel`` of the weight gradients).
The table (visible with ``pytest -s``) is also written to
``$RESBM_STATIC_REPORT`` or ``<tmp>/triton_static.txt``. Its ``loop`` column
counts the instructions of each main loop (a loop holding the tensor-core
instructions) per KiB of the big input one iteration streams, summed over the
loops, all warps counted (static counts, so a branch taken only for the
first tiles counts in full); ``steady`` leaves out the code that a forward
branch inside a loop jumps over (the identity path, which only the programs
of the first d tiles take); ``issue TB/s`` is the input bandwidth at which
an H100 (132 SMs at 1.755 GHz, 4 warp instructions per SM and cycle, a
bound never reached) would run out of instruction issue in the steady loop:
a kernel whose bound is not well above the ~3 TB/s of HBM cannot be
memory-bound. Reported, not asserted (performance is measured on a GPU, bench/).
``pre LDG`` counts the global loads before the first main loop, the prologue
every program runs before it streams (asserted for decode forward's payload tile);
``LDG<FADD`` (finish_weight_grad_kernel) those before its first add, the partials
a thread has in flight before it waits for one (asserted); ``in-loop`` the 2-D tiles of
floating-point data loaded in a loop by plain loads rather than copied ahead with cp.async
(asserted none for dequant_project's x or residual).

The compilation runs in a subprocess with TRITON_INTERPRET unset, because
the rest of the suite sets it in this process.
"""

import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")


ARCHS = (90, 80)
SMEM_LIMIT = {90: 232448, 80: 166912}  # opt-in shared memory per block: H100, A100
H100_ISSUE_PER_S = 132 * 4 * 1.755e9  # warp instructions per second, all SMs

# pointer dtypes by role: A = activations, F = fp32, U = payloads (u8: codes and scales at offsets),
# Z = the weight-gradient operand
# "ones": integer args equal to 1 at run time (Triton specialises them to constants)
# "div16": integer args the launcher guarantees divisible by 16 (specialised too)
# W is read as k x d: w_e directly (stride_wd == 1), w_d transposed (stride_wk == 1)


def project(what, k, bits, *, encoder, norm=False, stats=False, stochastic=False, group=None, split_d=False,
            fused=False, act="bf16"):
    """A project_quantize case: encode forward (encoder; ``stats``: also writing
    the RMSNorm row statistics, as in training) or decode backward (which also
    dequantizes an int8/row forward payload into Z, or with ``fused`` forms the
    weight gradient in the same launch from a Z written before); ``split_d``: the
    partials of a d split (small N)."""
    unit, strided = ("stride_wd", "stride_wk") if encoder else ("stride_wk", "stride_wd")
    return dict(kernel="project_quantize", what=what, k=k, act=act,
                ptrs=dict(a_ptr="A", w_ptr="A", payload_ptr="U", zpayload_ptr="U", z_ptr="Z", stats_ptr="F",
                          part_ptr="F", wgrad_ptr="F", seed_offset_ptr="L"),
                ones=[unit], div16=["d", "k", "stride_a", strided, "scales_at", "zscales_at", "chunk_rows"],
                constexprs=dict(HAS_NORM=norm, BITS=bits, GROUP_RESHAPE=group or k, SCALE_KIND=2,
                                STOCHASTIC=stochastic, SEED_OFFSET=stochastic, ZBITS=0 if encoder or fused else 8,
                                ZGROUP=k, ZSCALE_KIND=2,
                                WRITE_STATS=stats, SPLIT_D=split_d, FUSED_WGRAD=fused))


def dequant(what, k, *, residual=False, split_d=False, encoder=False, norm=False, fused=False, act="bf16", bits=8,
            group=None, stats=False, write_z=False):
    """A dequant_project case: decode forward (W = w_d transposed; ``split_d``: d
    split between programs, small N) or encode backward's grad_x (``encoder``:
    W = w_e; ``norm``: through RMSNorm, x read as the residual, with ``stats``
    alpha from the forward's row statistics; ``write_z``: also writing the
    weight gradient's operand; ``fused``: with the weight gradient's programs in
    the launch), of a ``bits`` payload with one scale per ``group`` columns
    (default: per row)."""
    unit, strided = ("stride_wd", "stride_wk") if encoder else ("stride_wk", "stride_wd")
    return dict(kernel="dequant_project", what=what, k=k, act=act,
                ptrs=dict(payload_ptr="U", w_ptr="A", res_ptr="A", out_ptr="A", r_ptr="F",
                          gamma_ptr="A", alpha_ptr="F", stats_ptr="F", z_ptr="Z", wgrad_ptr="F"),
                ones=[unit], div16=["d", "k", strided, "stride_res", "stride_out", "scales_at", "chunk_rows"],
                constexprs=dict(BITS=bits, GROUP=group or k, SCALE_KIND=2, HAS_RES=residual, HAS_NORM=norm,
                                HAS_STATS=stats, WRITE_Z=write_z,
                                OUT_KIND={"bf16": 2, "fp16": 1, "fp32": 0}[act],
                                SPLIT_D=split_d, FUSED_WGRAD=fused))


def operand(what, k, *, act="bf16"):
    """A grad_operand case (encode backward through RMSNorm without the forward's
    row statistics: Z and alpha from a pass over x; given them, or without the
    norm, the kernel does no GEMM and is not listed)."""
    return dict(kernel="grad_operand", what=what, k=k, act=act,
                ptrs=dict(payload_ptr="U", a_ptr="A", w_ptr="A", stats_ptr="F",
                          z_ptr="Z", r_ptr="F", alpha_ptr="F"),
                ones=["stride_wd"], div16=["d", "k", "stride_a", "stride_wk", "scales_at"],
                constexprs=dict(BITS=8, GROUP=k, SCALE_KIND=2, HAS_NORM=True, HAS_STATS=False))


def wgrad(what, k, *, encoder, act="bf16"):
    """A weight_grad case: grad W_e (encoder: (k, d) partials) or grad W_d ((d, k))."""
    unit, strided = ("stride_od", "stride_ok") if encoder else ("stride_ok", "stride_od")
    return dict(kernel="weight_grad", what=what, k=k, act=act, ptrs=dict(a_ptr="A", z_ptr="Z", out_ptr="F"),
                ones=[unit], div16=["d", "k", "stride_a", "stride_os", strided], constexprs={})


CASES = [
    project("encode fwd bf16 int8/row norm+stats k=128", 128, 8, encoder=True, norm=True, stats=True),
    project("encode fwd fp16 int8/row norm+stats k=128", 128, 8, encoder=True, norm=True, stats=True, act="fp16"),
    project("decode bwd fp16 int4/g32 stochastic k=64", 64, 4, encoder=False, stochastic=True, group=32, act="fp16"),
    # the benchmarks' decode backward (int8 forward payload, int8 stochastic gradient) at the target k
    project("decode bwd bf16 int8/row stochastic k=128", 128, 8, encoder=False, stochastic=True),
    project("decode bwd bf16 int8/row stochastic k=32", 32, 8, encoder=False, stochastic=True),
    # the same with the weight gradient's programs in the launch (RESBM_TRITON_FUSED_WGRAD=1, opt-in: one
    # case per kernel, at the k with the most registers)
    project("decode bwd bf16 int8/row stochastic k=128, fused", 128, 8, encoder=False, stochastic=True, fused=True),
    project("encode fwd bf16 passthrough k=32", 32, 16, encoder=True),
    project("encode fwd bf16 int8/row norm+stats k=64", 64, 8, encoder=True, norm=True, stats=True),
    project("encode fwd bf16 int8/row norm+stats k=128, d split", 128, 8, encoder=True, norm=True, stats=True,
            split_d=True),
    dequant("decode fwd bf16 int8/row +residual k=128", 128, residual=True),
    dequant("decode fwd bf16 int8/row k=64", 64),
    dequant("decode fwd bf16 int8/row k=32", 32),
    dequant("decode fwd bf16 int8/row k=32, d split", 32, split_d=True),
    # the codes of 4- and 2-bit payloads unpacked in registers, scales per group
    dequant("decode fwd bf16 int4/row k=128", 128, bits=4),
    dequant("decode fwd bf16 int2/g16 k=64", 64, bits=2, group=16),
    operand("encode bwd Z, alpha bf16 int8/row k=128", 128),
    # encode backward's grad_x as training runs it, given the forward's row statistics: alpha
    # from them and Z (the weight gradient's operand) written in the prologue; without them
    # (norm, no +stats) r and alpha come from grad_operand's pass over x
    dequant("encode bwd grad_x bf16 int8/row norm+stats k=128", 128, encoder=True, norm=True, stats=True,
            write_z=True),
    dequant("encode bwd grad_x bf16 int8/row norm k=128", 128, encoder=True, norm=True),
    dequant("encode bwd grad_x bf16 int8/row k=32", 32, encoder=True, write_z=True),
    dequant("encode bwd grad_x bf16 int8/row norm+stats k=64", 64, encoder=True, norm=True, stats=True, write_z=True),
    dequant("encode bwd grad_x bf16 int8/row norm+stats k=32, d split", 32, encoder=True, norm=True, stats=True,
            write_z=True, split_d=True),
    dequant("encode bwd grad_x bf16 int8/row norm k=128, fused", 128, encoder=True, norm=True, fused=True),
    wgrad("grad W_e bf16 k=128", 128, encoder=True),
    # k=256 (d/32 at d=8192): only the fallback configs fit
    project("encode fwd bf16 int8/row norm+stats k=256", 256, 8, encoder=True, norm=True, stats=True),
    project("decode bwd bf16 int4/row stochastic k=256", 256, 4, encoder=False, stochastic=True),
    dequant("decode fwd bf16 int8/row k=256", 256),
    operand("encode bwd Z, alpha bf16 int8/row k=256", 256),
    dequant("encode bwd grad_x bf16 int8/row norm+stats k=256", 256, encoder=True, norm=True, stats=True,
            write_z=True),
    wgrad("grad W_d bf16 k=256", 256, encoder=False),
    wgrad("grad W_d bf16 k=64", 64, encoder=False),
    wgrad("grad W_d bf16 k=32", 32, encoder=False),
    # fp32 activations (3xTF32)
    project("encode fwd fp32 int8/row norm k=64", 64, 8, encoder=True, norm=True, act="fp32"),
    operand("encode bwd Z, alpha fp32 int8/row k=64", 64, act="fp32"),
    dequant("encode bwd grad_x fp32 int8/row norm+stats k=64", 64, encoder=True, norm=True, stats=True, write_z=True,
            act="fp32"),
    wgrad("grad W_e fp32 k=64", 64, encoder=True, act="fp32"),
    # k=144 fp32 decoded by one row (a random case): the fallback, the only config that fits
    dequant("decode fwd fp32 int8/row k=256, d split", 256, split_d=True, act="fp32"),
    # fp16: the GEMMs with dequantized operands run on TF32
    operand("encode bwd Z, alpha fp16 int8/row k=128", 128, act="fp16"),
    dequant("encode bwd grad_x fp16 int8/row norm+stats k=128", 128, encoder=True, norm=True, stats=True,
            write_z=True, act="fp16"),
    wgrad("grad W_e fp16 k=128", 128, encoder=True, act="fp16"),
]


def finish(what, k, bits, *, norm=False, stats=False, zbits=0, stochastic=False):
    """A finish_rows_kernel case (after a d-split project_quantize launch; no GEMM,
    one fixed launch config): checked for spills only. ``stochastic``: rounding
    keyed on a seed offset read from memory (a boundary's gradients at small N)."""
    return dict(kernel="finish_rows", what=what, k=k, act="bf16",
                ptrs=dict(a_ptr="A", part_ptr="F", payload_ptr="U", zpayload_ptr="U", z_ptr="Z", stats_ptr="F",
                          seed_offset_ptr="L"),
                ones=[], div16=["d", "k", "stride_a", "scales_at", "zscales_at"],
                constexprs=dict(HAS_NORM=norm, BITS=bits, GROUP_RESHAPE=k, SCALE_KIND=2, STOCHASTIC=stochastic,
                                SEED_OFFSET=stochastic, ZBITS=zbits, ZGROUP=k, ZSCALE_KIND=2, WRITE_STATS=stats))


def finish_wgrad(what, k, *, norm):
    """A finish_weight_grad_kernel case (sums a weight gradient's row-split
    partials; no GEMM, one launch config per k): the encoder's (k, d) layout
    with ``norm``, else the decoder's (d, k). Checked for spills and for its
    splits' partials loaded together (test_weight_grad_partials_loaded_together)."""
    ones = ["stride_pd", "stride_wd", "stride_od"] if norm else ["stride_pk", "stride_ok"]
    return dict(kernel="finish_weight_grad", what=what, k=k, act="bf16",
                ptrs=dict(part_ptr="F", w_ptr="A", gamma_ptr="A", out_ptr="A", grad_gamma_ptr="A"),
                ones=ones, div16=["d", "k", "stride_ps", *({"stride_pk", "stride_pd", "stride_wk", "stride_ok",
                                                             "stride_od"} - set(ones))],
                constexprs=dict(HAS_NORM=norm, OUT_KIND=2, GAMMA_KIND=2))


FINISH_CASES = [
    finish("finish encode fwd int8/row norm+stats k=256", 256, 8, norm=True, stats=True),
    finish("finish encode fwd int8/row norm+stats k=32", 32, 8, norm=True, stats=True),
    finish("finish encode fwd int8/row norm+stats k=128", 128, 8, norm=True, stats=True),
    finish("finish decode bwd int4/row k=256", 256, 4, zbits=8),
    finish("finish decode bwd int8/row stochastic k=256", 256, 8, zbits=8, stochastic=True),
    finish_wgrad("finish grad W_e, gamma k=256", 256, norm=True),
    finish_wgrad("finish grad W_d k=32", 32, norm=False),
    finish_wgrad("finish grad W_d k=128", 128, norm=False),
]


def _compile(fn, case, constexprs, cfg, arch):
    """(compiled kernel, registers, stack bytes, SASS) of ``fn`` for one case, config and arch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from helpers import nvdisasm_command, sass_tool

    act = "*" + case["act"]
    types = dict(A=act, F="*fp32", U="*u8", Z="*bf16" if case["act"] == "bf16" else "*fp32", L="*i64")
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in case["ptrs"]:
            signature[name] = types[case["ptrs"][name]]
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
    aligned = list(case["ptrs"]) + case["div16"]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, enable_fp_fusion=False),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([sass_tool("cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([*nvdisasm_command(), f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return compiled, regs, stack, sass


def _worker(arch: int):
    """Compile every case for every config on ``arch``; print one JSON row each."""
    import torch
    import triton

    from helpers import loads_before_first, loads_before_main_loop, main_loops
    from resbm_kernels.backends.triton import KERNELS, TILE_KINDS, WGRAD_SPLITS, configs
    from resbm_kernels.backends.triton import finish_rows_launch, finish_weight_grad_launch
    from resbm_kernels.backends.triton.project_quantize import finish_rows_kernel
    from resbm_kernels.backends.triton.weight_grad import finish_weight_grad_kernel

    def row(case, arch, config, compiled, regs, stack, sass, **extra):
        # by loop: the software pipeliner's multi-buffered shared-memory allocations (buffers x
        # rows x columns, allocated empty ahead of the loop) and whether the loop leaves a wgmma
        # running while it goes on (waited for with pendings >= 1 in its body, before the next loop)
        pieces = re.split(r"\bscf\.for\b", compiled.asm["ttgir"])
        alloc = re.compile(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x")
        in_flight = re.compile(r"warp_group_dot_wait [^\n]*\{pendings = [1-9]")
        loops = [(sorted({int(b) for b in alloc.findall(ahead)}), bool(in_flight.search(body)))
                 for ahead, body in zip(pieces, pieces[1:])]
        buffers = [counts for counts, running in loops if running and counts]  # those of in-flight loops
        # 2-D tiles of floating-point data at least 32 columns wide (not a payload's scales) loaded
        # in or after the first loop by plain loads, not copied ahead with cp.async: x or a
        # residual that the pipeliner left out
        in_loop_tiles = len(re.findall(r"\btt\.load [^\n]*: tensor<\d+x(?:[3-9]\d|\d{3,})x!tt\.ptr<(?:bf16|f16|f32)>",
                                       "scf.for".join(pieces[1:])))
        wgmma_in_flight = any(running for _, running in loops)
        return dict(kernel=case["kernel"], what=case["what"], arch=arch, act=case["act"], config=config,
                    regs=regs, stack=stack, smem=compiled.metadata.shared, buffers=buffers,
                    wgmma_in_flight=wgmma_in_flight,
                    async_copies=compiled.asm["ttgir"].count("ttg.async_copy_global_to_local"),
                    in_loop_tiles=in_loop_tiles,
                    spill_ops=len(re.findall(r"\b(?:STL|LDL)\b", sass)),
                    hgmma=len(re.findall(r"\bHGMMA\.", sass)), hmma=len(re.findall(r"\bHMMA\.", sass)), **extra)

    for case in CASES:
        autotuner = KERNELS[case["kernel"]]
        fn = autotuner.fn
        while not isinstance(fn, triton.runtime.JITFunction):  # under the heuristics (LoopConstants)
            fn = fn.fn
        kind = TILE_KINDS[case["kernel"]]
        block_k = case["k"]
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[case["act"]]
        elem = configs.operand_bytes(dtype, dequant=kind in ("dequant", "wgrad"))
        has_norm = case["constexprs"].get("HAS_NORM", False)
        writes_z = bool(case["constexprs"].get("ZBITS", 0))
        fused = configs.operand_bytes(dtype, dequant=True) if case["constexprs"].get("FUSED_WGRAD") else 0
        compiled_tiles = set()
        for cfg in configs.launchable(autotuner.configs, block_k, elem, SMEM_LIMIT[arch], kind, has_norm, writes_z,
                                      arch, fused):
            # a dequant_project config with D_SPLIT > 1 runs the d-split case's code (its SPLIT_D path):
            # each tile, warps and stages compiled once, unsplit, here and in the d-split cases
            tile = {name: v for name, v in cfg.kwargs.items() if name != "D_SPLIT"}
            key = (*tile.values(), cfg.num_warps, cfg.num_stages, cfg.maxnreg)
            if key in compiled_tiles:
                continue
            compiled_tiles.add(key)
            constexprs = dict(case["constexprs"], UPCAST=False, PRECISION="tf32x3", BLOCK_K=block_k, **tile)
            constexprs.update({name: 1 for name in case["ones"]})
            if "EVEN_D" in fn.arg_names:
                constexprs["EVEN_D"] = True  # d a multiple of BLOCK_D, as at every benchmarked shape
            if "STAGES" in fn.arg_names:  # (configs.LoopConstants)
                constexprs["STAGES"] = cfg.num_stages
                constexprs.setdefault("D_SPLIT", 1)
            compiled, regs, stack, sass = _compile(fn, case, constexprs, cfg, arch)
            tile_kib = cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_D"] * (4 if case["act"] == "fp32" else 2) / 1024
            print(json.dumps(row(
                case, arch, f"N{cfg.kwargs['BLOCK_N']} D{cfg.kwargs['BLOCK_D']} K{block_k} "
                            f"w{cfg.num_warps} s{cfg.num_stages}" + (f" r{cfg.maxnreg}" if cfg.maxnreg else ""),
                compiled, regs, stack, sass,
                gemm=True, smem_estimate=configs.smem_bytes(cfg, block_k, elem, kind, fused),
                loop_per_kib=round(sum(main_loops(sass)) * cfg.num_warps / tile_kib),
                steady_per_kib=round(sum(main_loops(sass, steady=True)) * cfg.num_warps / tile_kib),
                steady_shared_stores=sum(main_loops(sass, steady=True, opcode="STS")),
                prologue_loads=loads_before_main_loop(sass),
            )), flush=True)
    for case in FINISH_CASES:
        ones = dict.fromkeys(case["ones"], 1)
        if case["kernel"] == "finish_rows":  # as the launchers run them (default stages), 8 d splits
            launch = finish_rows_launch(case["k"], 8)
            fn, warps = finish_rows_kernel, launch.pop("num_warps")
            constexprs = dict(case["constexprs"], BLOCK_K=case["k"], **launch, **ones)
            config = f"N{launch['BLOCK_N']} K{case['k']} w{warps} x{launch['AT_ONCE']}"
        else:  # a GPU's separate weight-gradient pass: WGRAD_SPLITS partials
            launch = finish_weight_grad_launch(case["k"], WGRAD_SPLITS)
            fn, warps = finish_weight_grad_kernel, launch.pop("num_warps")
            constexprs = dict(case["constexprs"], **launch, **ones)
            config = f"D{launch['BLOCK_D']} K{case['k']} w{warps} x{launch['AT_ONCE']}"
        cfg = triton.Config({}, num_warps=warps)
        compiled, regs, stack, sass = _compile(fn, case, constexprs, cfg, arch)
        print(json.dumps(row(case, arch, config, compiled, regs, stack, sass, gemm=False, smem_estimate=None,
                             loop_per_kib=0, steady_per_kib=0, prologue_loads=loads_before_main_loop(sass),
                             loads_before_add=loads_before_first(sass, "FADD"),
                             shared_stores=len(re.findall(r"\bSTS\b", sass)))),
              flush=True)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    # one process per arch, side by side (the compiles are CPU-bound and independent)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(arch)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for arch in ARCHS]
    rows = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=1200)
            assert proc.returncode == 0, err[-4000:]
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finally:
        for proc in procs:  # the other one, when one failed
            proc.kill()
    header = f"{'kernel':17} {'case':42} {'sm':>3} {'config':22} {'regs':>4} {'stack':>5} {'smem':>6} " \
             f"{'spill':>5} {'HGMMA':>5} {'HMMA':>5} {'loop':>5} {'steady':>6} {'issue TB/s':>10} {'pre LDG':>7} " \
             f"{'LDG<FADD':>8} {'in-loop':>7}"
    lines = [header] + [
        f"{r['kernel']:17} {r['what']:42} {r['arch']:>3} {r['config']:22} {r['regs']:>4} {r['stack']:>5} "
        f"{r['smem']:>6} {r['spill_ops']:>5} {r['hgmma']:>5} {r['hmma']:>5} {r['loop_per_kib']:>5} "
        f"{r['steady_per_kib']:>6} "
        f"{H100_ISSUE_PER_S * 1024 / r['steady_per_kib'] / 1e12 if r['steady_per_kib'] else float('nan'):>10.1f} "
        f"{r['prologue_loads']:>7} {r.get('loads_before_add', ''):>8} {r['in_loop_tiles']:>7}"
        for r in rows
    ]
    table = "\n".join(lines)
    path = os.environ.get("RESBM_STATIC_REPORT") or os.path.join(tempfile.gettempdir(), "triton_static.txt")
    with open(path, "w") as f:
        f.write(table + "\n")
    print(f"\n{table}\n(written to {path})")
    return rows


def test_every_case_compiled(report):
    compiled = {(r["what"], r["arch"]) for r in report}
    assert compiled == {(c["what"], a) for c in CASES + FINISH_CASES for a in ARCHS}


def test_tensor_cores(report):
    """HGMMA (wgmma) on sm_90, HMMA on sm_80. wgmma needs an M of 64: the weight
    gradient's dot has M = k, the other dots M = BLOCK_N, so below 64 they run on
    HMMA (mma.sync) on sm_90 too."""
    for r in filter(lambda r: r["gemm"], report):
        block_n, block_k = (int(field[1:]) for field in r["config"].split()[0:3:2])
        small_m = block_n < 64 or (r["kernel"].startswith("weight_grad") and block_k < 64)
        if r["arch"] == 90 and not small_m:
            assert r["hgmma"] > 0, f"no HGMMA (wgmma) in {r}"
        else:
            assert r["hmma"] > 0, f"no HMMA in {r}"


def test_pipelined_operands_equally_buffered(report):
    """Where a wgmma stays in flight while the loop copies the next tiles, every
    multi-buffered tile gets the same number of buffers. With one buffer fewer
    for an operand that also fed other work (the sums of squares), Triton's
    pipeliner let the copy of a later tile overwrite the one an asynchronous
    wgmma was still reading: wrong rows on an H100 (2026-11-26), seen in the
    TTGIR as 3 buffers for A beside 4 for W. (A loop that waits for each wgmma
    may buffer its operands differently, as does the weight-gradient loop of a
    fused backward kernel: counts are compared loop by loop.)"""
    in_flight = [r for r in report if r["gemm"] and r["wgmma_in_flight"]]
    assert in_flight, "no kernel keeps a wgmma in flight: the check has nothing to look at"
    for r in in_flight:
        assert all(len(counts) == 1 for counts in r["buffers"]), f"buffer counts {r['buffers']} differ in {r}"


def test_shared_memory_fits(report):
    """Every config the pruner lets through fits the device, and the pruner's
    estimate bounds what the compiler allocated."""
    for r in report:
        assert r["smem"] <= SMEM_LIMIT[r["arch"]], f"needs more shared memory than sm_{r['arch']} has: {r}"
        if r["gemm"]:  # the autotuned kernels (finish_rows_kernel is not pruned)
            assert r["smem"] <= r["smem_estimate"], f"configs.smem_bytes underestimates: {r}"


# fp32 activations run the GEMMs as 3xTF32, which splits the operands in registers: the weight
# gradient spills in one config on sm_80 from k=64 (3 instructions), and at k >= 128 more fp32
# backward kernels do (not listed), as does decode forward's fallback at k=256 (about 240
# instructions: the one config whose shared memory fits there), and on sm_80 grad_x through
# RMSNorm at k=64 in 64x64 4-warp tiles, whose two-stage config (for 16-bit operands on sm_90:
# four programs an SM) is the one of them whose shared memory fits an A100 (183 instructions).
# Correct (tested against the reference), slower; bf16 and fp16 are the fast paths.
SPILLS_ALLOWED = {"grad W_e fp32 k=64", "decode fwd fp32 int8/row k=256, d split"}
SPILLS_ALLOWED_CONFIGS = {("encode bwd grad_x fp32 int8/row norm+stats k=64", 80, "N64 D64 K64 w4 s2")}
# Triton 3.6 (the lent GPU machines' version, with torch 2.11) also spills a 16-bit config on sm_80
# that 3.8 compiles clean (2026-11-27): a weight gradient's 64x32 tiles (3 instructions; until the
# payload tiles were loaded whole, also decode forward's 64x128 4-warp tiles with a d split).
# Correct; autotuning times it beside the others. (case, arch, config) by version:
SPILLS_ALLOWED_BY_TRITON = {
    "3.6": {("grad W_e fp16 k=128", 80, "N64 D32 K128 w8 s3")},
}


def _allowed_here() -> set:
    """The (case, arch, config) allowed to spill with this Triton."""
    import triton

    return SPILLS_ALLOWED_CONFIGS | SPILLS_ALLOWED_BY_TRITON.get(".".join(triton.__version__.split(".")[:2]), set())


def test_no_spills(report):
    allowed_here = _allowed_here()
    for r in report:
        if r["what"] not in SPILLS_ALLOWED and (r["what"], r["arch"], r["config"]) not in allowed_here:
            assert r["stack"] == 0 and r["spill_ops"] == 0, f"spills in {r}"


def test_allowed_spills_still_needed(report):
    """The exceptions above are no wider than the compiler makes them: drop one once it compiles clean."""
    for what in SPILLS_ALLOWED:
        assert any(r["spill_ops"] for r in report if r["what"] == what), f"{what} no longer spills"
    for case in _allowed_here():
        assert any(r["spill_ops"] for r in report if (r["what"], r["arch"], r["config"]) == case), f"{case} no longer spills"


def test_no_string_defaults_in_jit_functions():
    """Triton 3.6 (the lent GPUs' version) fails to compile a call that leaves out a
    parameter whose default is a string ("'str' object has no attribute 'type'";
    int, bool and None defaults compile), which 3.8 and the interpreter accept: from
    2026-11-26 to 27 that kept the passes' main kernels from compiling there while
    CI was green."""
    import triton

    import resbm_kernels.backends.triton as package

    wrappers = (triton.runtime.autotuner.Autotuner, triton.runtime.autotuner.Heuristics)

    found, checked = set(), 0
    for info in pkgutil.iter_modules(package.__path__):
        for name, obj in vars(importlib.import_module(f"{package.__name__}.{info.name}")).items():
            if not (type(obj).__module__.startswith("triton.") or isinstance(obj, wrappers)):
                continue  # not a Triton function (jit or interpreted, or under an autotuner or heuristics)
            while hasattr(obj, "fn"):
                obj = obj.fn
            if not inspect.isfunction(obj):
                continue  # a tl.constexpr
            checked += 1
            found |= {f"{name}({p.name}={p.default!r})" for p in inspect.signature(obj).parameters.values()
                      if isinstance(p.default, str)}
    assert checked >= 20, f"only {checked} Triton functions found"
    assert not found, f"string defaults in Triton functions: {sorted(found)}"


def test_gemm_operands_prefetched(report):
    """Every GEMM kernel compiled with two or more stages copies its tensor-core
    operands ahead with cp.async: Triton's software pipeliner gives up silently on
    a loop it cannot schedule (e.g. a tile read two iterations ahead in registers,
    tried on grad_x on 2026-11-27), and the loop then waits for W from L2 in every
    iteration: still correct, much slower, visible only here."""
    for r in filter(lambda r: r["gemm"], report):
        stages = int(r["config"].split()[4][1:])
        if stages >= 2:
            assert r["async_copies"] > 0, f"no cp.async operand prefetch (pipelining gave up) in {r}"


def test_epilogue_input_copied_ahead(report):
    """dequant_project's x (encode backward's grad_x through RMSNorm) or residual
    (decode forward) is copied ahead with cp.async like W, STAGES - 1 tiles in
    flight, not loaded in the loop: Triton's software pipeliner takes a load that
    feeds no dot only in a loop given its own num_stages (tl.range). Without it
    the tile came one iteration ahead in registers at best, and on the H200 of
    2026-11-27 the grad_x kernel ran at 46 % of DRAM bandwidth with its warps
    waiting on global loads half their cycles (ncu, 64x64 w4)."""
    checked = 0
    for r in report:
        # (not the fused launch: its weight-gradient programs' loop loads Z in registers on sm_80)
        if r["kernel"] == "dequant_project" and ("norm" in r["what"] or "+residual" in r["what"]) \
                and "fused" not in r["what"] and int(r["config"].split()[4][1:]) >= 2:
            assert r["in_loop_tiles"] == 0, f"x or the residual loaded in the loop: {r}"
            checked += 1
    assert checked >= 40


def test_payload_tiles_loaded_whole(report):
    """Decode forward dequantizes its rows' (BLOCK_N, k) payload tile before its
    main loop, which every program of a launch runs at once: the packed bytes
    and each row's scale come in wide loads, at least 4 bytes of codes a load on
    average (codec.load_payload). Loaded one element at a time, each with its own
    byte and scale address, a 64 x 64 4-warp program took 17 / 34 / 68 loads a
    thread at k = 32 / 64 / 128 (int8; 2 / 4 / 8 now) and 2-3x the prologue's
    instructions, and with Triton 3.6 223 registers at k=64 (now 104)."""
    checked = 0
    for r in report:
        if r["kernel"] == "dequant_project" and r["what"].startswith("decode fwd") and "+residual" not in r["what"]:
            rows, k, warps = (int(v) for v in re.search(r"N(\d+) D\d+ K(\d+) w(\d+)", r["config"]).groups())
            assert r["prologue_loads"] <= rows * k // (4 * 32 * warps) + 1, f"payload loaded in pieces: {r}"
            checked += 1
    assert checked >= 10


def test_grad_x_converts_x_as_16_bit(report):
    """Encode backward's grad_x (through RMSNorm) takes its x tile into the
    product's MMA layout through shared memory as the 16-bit tile it loaded, as
    decode forward does its residual: no more shared stores in the steady loop
    than that kernel with the same config. Written as x * alpha then subtracted,
    Triton moved the fp32 product instead (twice the bytes: 6 shared stores and
    10 barriers a trip where the residual takes 4 and 7, sm_90, k=128, 64x64 w8)."""
    residual = {(r["arch"], r["config"]): r["steady_shared_stores"] for r in report
                if r["what"] == "decode fwd bf16 int8/row +residual k=128"}
    checked = 0
    for r in report:
        # (not the fused case: its weight-gradient loop holds tensor-core instructions too)
        if r["what"] in ("encode bwd grad_x bf16 int8/row norm+stats k=128", "encode bwd grad_x bf16 int8/row norm k=128"):
            if (r["arch"], r["config"]) in residual:
                assert r["steady_shared_stores"] <= residual[r["arch"], r["config"]], f"x converted in fp32: {r}"
                checked += 1
    assert checked >= 6


def test_weight_grad_partials_loaded_together(report):
    """finish_weight_grad_kernel has several splits' partial tiles in flight and
    sums them in registers. Summed one split per loop trip, each add waited for
    its own load (two 16-byte loads in flight a thread), and the kernel took
    16-21 us for the 16 MB of partials at k=128, d=4096 on the H200 of 2026-11-27
    (ncu: 16-22 % of DRAM bandwidth). Loaded as one (splits, k, 16) tile and
    summed along its first axis, Triton 3.6 (the GPUs') put the warps on the
    splits, so the sum crossed warps through shared memory: 144 shared stores a
    thread at k=128 for the decoder's (d, k) partials, 64 KB, 178 registers, and
    decode backward 101 -> 137 us on the H200 of 2026-11-28 (Triton 3.8 kept the
    sum within threads). Now the loop copies the next splits' tiles ahead with
    cp.async: loads in flight before the first add, and no shared-memory
    reduction but the norm's over k (3-10 shared stores a thread), in at most the
    99 KB of shared memory every GPU since sm_80 gives a block."""
    from resbm_kernels.backends.triton.configs import SMEM_FALLBACK

    rows = [r for r in report if r["kernel"] == "finish_weight_grad"]
    assert rows
    for r in rows:
        assert r["async_copies"] > 0, f"partials not copied ahead: {r}"
        assert r["loads_before_add"] > 2, f"partials' loads not in flight together: {r}"
        assert r["shared_stores"] <= 16, f"the sum over splits crosses threads through shared memory: {r}"
        assert r["smem"] <= SMEM_FALLBACK, f"more shared memory than some GPUs since sm_80 have: {r}"


def test_main_loop_found(report):
    """Every GEMM kernel has a main loop around its tensor-core instructions (the
    table's loop column measures something)."""
    for r in filter(lambda r: r["gemm"], report):
        assert r["loop_per_kib"] > 0, f"no loop with tensor-core instructions in {r}"


if __name__ == "__main__":
    _worker(int(sys.argv[1]))
