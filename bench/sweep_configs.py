"""Sweep Triton launch configs beyond the autotune set, to choose that set from timings.

    python bench/sweep_configs.py --out sweep.json [--jobs 14] [--budget-s 150]

For each fused pass and each Triton kernel it launches, every candidate
(BLOCK_N, BLOCK_D, num_warps, num_stages) of a wide grid runs in place of
that kernel's configs (the pass's other kernels keep their first config), at
d=4096, k in {32, 64, 128}, int8 (--bits) and bf16 (the benchmark inputs), for each N;
the pass is checked against the reference and for the same bits on a second
call, then timed (median of CUDA event times over rotating input sets, as the
kernel benchmarks do). Recorded
per candidate: time, fraction of the copy bandwidth over the pass's roofline
bytes, registers and spills of the compiled kernel, error vs the reference, or
why it could not run. The table printed at the end gives, per (pass, kernel,
k, N), the fastest candidate next to the current first config; a candidate
within the tolerance but much further from the reference than the first
config (``flag_suspect``) is listed apart and never chosen.

Candidates are pruned with the backend's own estimates (configs.tile_regs at
up to twice today's cap, configs.smem_bytes against the device limit), so a
wider register cap can be judged by its timings and spills. ``--maxnreg
0,128`` also runs each candidate under a register limit (ptxas maxnreg; 0:
none), e.g. 128 per thread for two 8-warp programs per SM (one SM has 64K
registers; several first configs compile to 132-240). ``--jobs J``
first compiles every candidate in J worker processes (Triton's on-disk cache
then serves the timing process), which is what makes the sweep fit one device
call. ``--programs-per-sm 1,2,4`` also runs each candidate with the small-N
d split aiming at that many programs per SM (configs.programs_at_once; 1 is
the backend's rule, which splits d only while there are fewer row blocks
than SMs): whether more, shorter programs help at N=16384 too;
``--first-only`` keeps only the config the backend runs untuned, so that
question costs few items. GPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("RESBM_TRITON_AUTOTUNE", "0")  # the kernels not swept run their first config

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
from test_bench_kernels import (  # noqa: E402
    BITS, KernelCase, _call, _comparable, _disagreement, _inputs, _same_bits, _set_bytes, roofline)

from resbm_kernels.backends import use_backend  # noqa: E402
from resbm_kernels.backends.triton import KERNELS, TILE_KINDS, _block_k, configs  # noqa: E402

PASS_KERNELS = {
    "encode_forward": ("project_quantize",),
    "decode_forward": ("dequant_project",),
    "decode_backward": ("project_quantize", "weight_grad"),
    # (given the forward's row statistics, as the benchmarks do, grad_x's kernel forms Z and alpha:
    # grad_operand does not run)
    "encode_backward": ("dequant_project", "weight_grad"),
}
# 16 warps (for tiles of at least 128 x 64): four warpgroups, so a (128, k=128) accumulator takes
# the 64x64 wgmma shape at 32 registers per thread (with 8 warps it is one 64x128 per warpgroup
# at 64 registers); bigger tiles
# re-read the small operand (W in the rows kernels, Z in the weight gradient) from L2 less often
GRID = dict(BLOCK_N=(32, 64, 128), BLOCK_D=(64, 128, 256), num_warps=(4, 8, 16), num_stages=(3, 4))
REGISTERS_PER_SM = 65536


def candidates(kernel: str, k: int, smem_limit: int, maxnregs=(0,)) -> list:
    """The grid's configs that the backend's estimates do not rule out for this
    kernel, each under every register limit in ``maxnregs`` (0: none)."""
    kind = TILE_KINDS[kernel]
    table = itertools.product(*GRID.values())
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=r or None)
            for c in configs.gpu_configs(table) for r in maxnregs
            if configs.tile_regs(c, _block_k(k), kind) <= 2 * configs.MAX_TILE_REGS[kind]
            and configs.smem_bytes(c, _block_k(k), 2, kind) <= smem_limit
            and r < REGISTERS_PER_SM // (32 * c.num_warps)  # (a limit the warps imply anyway: no variant)
            and (c.num_warps < 16 or c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"] >= 128 * 64)]  # 16 warps: big tiles


@contextlib.contextmanager
def programs_per_sm(m: int):
    """The d-split rule aiming at ``m`` programs per SM (1: the backend's own rule)."""
    saved = configs.programs_at_once
    if m != 1:
        configs.programs_at_once = lambda device: m * saved(device)
    try:
        yield
    finally:
        configs.programs_at_once = saved


def first_config(pass_: str, kernel: str, k: int, smem_limit: int):
    """The config the backend launches untuned (RESBM_TRITON_AUTOTUNE=0) in ``pass_``
    (flags as the benchmarks set them: see configs.tile_regs)."""
    has_norm = pass_ in ("encode_forward", "encode_backward")  # (the benchmarks' encoder runs through RMSNorm)
    writes_z = pass_ == "decode_backward" and kernel == "project_quantize"
    return configs.launchable(KERNELS[kernel].configs, _block_k(k), 2, smem_limit, TILE_KINDS[kernel], has_norm,
                              writes_z)[0]


def label(c, per_sm: int = 1) -> str:
    limit = f" r{c.maxnreg}" if c.maxnreg else ""
    aim = f" p{per_sm}" if per_sm != 1 else ""
    split = f" d{c.kwargs['D_SPLIT']}" if c.kwargs.get("D_SPLIT", 1) > 1 else ""
    return f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_D']} w{c.num_warps} s{c.num_stages}{limit}{split}{aim}"


class Swapped:
    """Run one kernel with a given config; record the kernel Triton compiled for it."""

    def __init__(self, name: str, config):
        self.tuner, self.config, self.compiled = KERNELS[name], config, None

    def __enter__(self):
        self.saved = self.tuner.configs
        self.tuner.configs = [self.config]  # one config: the autotuner launches it as given
        inner = self.tuner.fn

        def spy(*args, **kwargs):
            self.compiled = type(inner).run(inner, *args, **kwargs)
            return self.compiled
        inner.run = spy
        return self

    def __exit__(self, *exc):
        self.tuner.configs = self.saved
        del self.tuner.fn.run

    def resources(self) -> dict:
        c = self.compiled
        return dict(regs=getattr(c, "n_regs", None), spills=getattr(c, "n_spills", None))


def swept_kernels(args, pass_) -> tuple:
    """The kernels of a pass whose configs vary; with ``--first-only`` one stands for
    all (every kernel then runs its first config, the runs would be the same)."""
    return PASS_KERNELS[pass_][:1] if args.first_only else PASS_KERNELS[pass_]


def pass_candidates(args, pass_, kernel, k, smem_limit) -> list:
    """The configs to run for one kernel of a pass: its first config, then the
    grid's others (with ``--first-only``, only the first one's ``--maxnreg`` variants)."""
    first = first_config(pass_, kernel, k, smem_limit)
    if args.first_only:  # with its register-limited variants
        return [first] + [triton.Config(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages, maxnreg=r)
                          for r in args.maxnreg if 0 < r < REGISTERS_PER_SM // (32 * first.num_warps)]
    return [first] + [c for c in candidates(kernel, k, smem_limit, args.maxnreg) if label(c) != label(first)]


def work_items(args, smem_limit):
    """(pass, kernel, k, bits, config, programs per SM) in a fixed order (the workers split it by index)."""
    for pass_ in PASS_KERNELS:
        if pass_ not in args.passes:
            continue
        for kernel, k, bits in itertools.product(swept_kernels(args, pass_), args.k, args.bits):
            for c, per_sm in itertools.product(pass_candidates(args, pass_, kernel, k, smem_limit),
                                               args.programs_per_sm):
                yield pass_, kernel, k, bits, c, per_sm


def precompile(args, dev, smem_limit, shard: int) -> None:
    """Worker: launch this shard's items once (fills Triton's cache), at one N of
    each kind the sweep times (d split between programs, or not)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    inputs_key, inputs = None, None
    launched = set()
    for n in sorted(args.N):
        for i, (pass_, kernel, k, bits, c, per_sm) in enumerate(work_items(args, smem_limit)):
            with programs_per_sm(per_sm):
                split = configs.d_splits(n, args.d, dev) > 1
            if i % args.jobs != shard or (i, split) in launched:
                continue
            launched.add((i, split))
            case = KernelCase(pass_, "triton", n, args.d, k, bits, "sweep")
            if inputs_key != (pass_, k, bits, n):  # one input set at a time: a worker per core shares the GPU
                inputs_key, inputs = (pass_, k, bits, n), _inputs(case, dev, 1, gen)
            w, (s,) = inputs
            try:
                with use_backend("triton"), Swapped(kernel, c), programs_per_sm(per_sm):
                    _call(case, None, w, s)
            except Exception as e:  # noqa: BLE001 -- reported again (and recorded) by the timing process
                print(f"precompile {pass_} {kernel} k={k} bits={bits} N={n} {label(c, per_sm)}: "
                      f"{type(e).__name__}", flush=True)


def time_item(case, kernel, c, per_sm, w, per_set, sets, ref, dev) -> dict:
    row = dict(pass_=case.pass_, kernel=kernel, k=case.k, bits=case.bits, N=case.N, config=label(c, per_sm),
               first=False)
    try:
        with use_backend("triton"), Swapped(kernel, c) as sw, programs_per_sm(per_sm):
            row["d_splits"] = configs.d_splits(case.N, case.d, dev)
            call = lambda i: _call(case, None, w, per_set[i % sets])  # noqa: E731
            got = call(0)
            found, problem = _disagreement(case, got, ref)  # rel_errs: per output, which one is off
            row.update(found)
            if problem:
                row["error"] = problem
                return row
            if not _same_bits(_comparable(case, got), _comparable(case, call(0))):
                row["error"] = "two calls on the same inputs differ (a race: the H100's miscompile of 2026-11-26 did)"
                return row
            reps, _ = benchlib.adaptive_reps(call, dev, target_s=0.05, lo=10, hi=60, warmup=2)
            times = benchlib.time_calls(call, dev, warmup=0, reps=reps)
            row.update(sw.resources())
    except Exception as e:  # noqa: BLE001 -- e.g. out of shared memory: recorded, the sweep goes on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return row
    row["median_us"] = benchlib.summary(times)["median_s"] * 1e6
    return row


SUSPECT_RATIO = 3.0  # an output's error this many times the first config's (and above 1e-3): suspect


def flag_suspect(row: dict, first_errs: list) -> None:
    """Mark a config whose result, though within the tolerance, is much further from
    the reference than the first config's on the same inputs (as some configs of encode
    forward at k=128 on the H200, 2026-11-26: 0.025-0.029 against 0.0049, a miscompile
    found later, see tiles.project_rows): such a config is not chosen as the fastest."""
    worse = [i for i, (e, e0) in enumerate(zip(row["rel_errs"], first_errs)) if e > max(SUSPECT_RATIO * e0, 1e-3)]
    if worse:
        errs = ", ".join(f"{row['rel_errs'][i]:.3g}" for i in worse)
        firsts = ", ".join(f"{first_errs[i]:.3g}" for i in worse)
        row["suspect"] = f"output(s) {worse}: relative errors {errs} against the first config's {firsts}"


def sweep(args, dev, smem_limit) -> list[dict]:
    """Time every candidate; each (pass, k, N) group gets an equal share of the
    budget (plus what earlier groups left), so a cut spares no pass entirely."""
    copy = benchlib.copy_bandwidth(dev)["copy_GBps"]
    groups = [(p, k, n, bits) for n in args.N for bits in args.bits for p in PASS_KERNELS if p in args.passes
              for k in args.k]
    deadline = time.monotonic()
    rows = []
    gen = torch.Generator(device=dev).manual_seed(1)
    for pass_, k, n, bits in groups:
        deadline += args.budget_s / len(groups)
        case = KernelCase(pass_, "triton", n, args.d, k, bits, "sweep")
        sets = benchlib.rotation(_set_bytes(case), dev)
        w, per_set = _inputs(case, dev, sets, gen)
        with use_backend("reference"):
            ref = _call(case, None, w, per_set[0])
        nbytes = roofline(case)[0]
        for kernel in swept_kernels(args, pass_):
            cands = pass_candidates(args, pass_, kernel, k, smem_limit)
            first_errs = None
            for c, per_sm in itertools.product(cands, args.programs_per_sm):
                if time.monotonic() > deadline:
                    print(f"{pass_} k={k} N={n} bits={bits}: its share of the budget is used, next group", flush=True)
                    break
                row = time_item(case, kernel, c, per_sm, w, per_set, sets, ref, dev)
                row["first"] = c is cands[0] and per_sm == 1
                if row["first"]:
                    first_errs = row.get("rel_errs")
                elif first_errs and row.get("rel_errs"):
                    flag_suspect(row, first_errs)
                if "median_us" in row:
                    row["frac_copy_bw"] = nbytes / (row["median_us"] * 1e-6) / 1e9 / copy
                rows.append(row)
                print(json.dumps(row), flush=True)
        del w, per_set, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def report(rows: list[dict]) -> None:
    """Per (pass, kernel, k, bits, N): the fastest candidate against the first config."""
    print("\n| pass | kernel | k | bits | N | first config | us | best config | us | regs/spills | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    groups = {}
    for r in rows:
        groups.setdefault((r["pass_"], r["kernel"], r["k"], r["bits"], r["N"]), []).append(r)
    for (p, kern, k, bits, n), rs in groups.items():
        timed = [r for r in rs if "median_us" in r]
        first = next((r for r in timed if r["first"]), None)
        if not timed or first is None:
            continue
        best = min((r for r in timed if "suspect" not in r), key=lambda r: r["median_us"])
        print(f"| {p} | {kern} | {k} | {bits} | {n} | {first['config']} | {first['median_us']:.1f} | {best['config']} | "
              f"{best['median_us']:.1f} | {best.get('regs')}/{best.get('spills')} | "
              f"{first['median_us'] / best['median_us']:.2f}x |")
    suspects = [r for r in rows if "suspect" in r]
    if suspects:
        print(f"\n{len(suspects)} configs within the tolerance but suspect (never chosen as fastest above):")
        for r in suspects:
            print(f"  {r['pass_']} {r['kernel']} k={r['k']} N={r['N']} {r['config']}: {r['suspect']}")


def main(argv=None) -> int:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--N", type=ints, default=[16384, 4096])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--k", type=ints, default=[32, 64, 128])
    parser.add_argument("--bits", type=ints, default=[8], help=f"comma-separated, from {sorted(BITS)}")
    parser.add_argument("--passes", default=",".join(PASS_KERNELS))
    parser.add_argument("--maxnreg", type=ints, default=[0], help="register limits per thread, 0: none (e.g. 0,128)")
    parser.add_argument("--programs-per-sm", type=ints, default=[1],
                        help="programs per SM the d-split rule aims at, 1: the backend's rule (e.g. 1,2,4)")
    parser.add_argument("--first-only", action="store_true", help="only each kernel's untuned first config")
    parser.add_argument("--jobs", type=int, default=0, help="compile first in this many worker processes")
    parser.add_argument("--shard", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--compile-budget-s", type=float, default=120.0, help="stop the compile workers after this")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop timing after this many seconds")
    parser.add_argument("--out", default="sweep.json")
    args = parser.parse_args(argv)
    args.passes = [p for p in args.passes.split(",") if p]
    if min(args.programs_per_sm) < 1:
        parser.error("--programs-per-sm: counts of at least 1")
    args.programs_per_sm = sorted(set(args.programs_per_sm) | {1})  # 1, the backend's rule: the reference point
    if set(args.bits) - set(BITS):
        parser.error(f"--bits: choose from {sorted(BITS)}")
    if not torch.cuda.is_available():
        parser.error("the config sweep needs a CUDA GPU (Triton launch configs mean nothing in the interpreter)")
    dev = torch.device("cuda")
    smem_limit = configs.smem_limit(dev)
    if args.shard >= 0:
        precompile(args, dev, smem_limit, args.shard)
        return 0
    if args.jobs > 0:
        t0 = time.monotonic()
        own_args = sys.argv[1:] if argv is None else argv
        workers = [subprocess.Popen([sys.executable, __file__, *own_args, "--shard", str(i)]) for i in range(args.jobs)]
        for p in workers:
            try:
                p.wait(timeout=max(1.0, args.compile_budget_s - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                p.kill()  # what it did not compile, the timing process compiles (within its budget)
        n_items = sum(1 for _ in work_items(args, smem_limit))
        print(f"precompile of {n_items} (pass, kernel, k, config) items: {time.monotonic() - t0:.0f}s "
              f"on {args.jobs} workers", flush=True)
    rows = sweep(args, dev, smem_limit)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(dev), d=args.d, rows=rows), f, indent=1)
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
