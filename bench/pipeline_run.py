"""Run a small ResBM pipeline over gloo under real bandwidth limits and
measure its training throughput.

    python bench/pipeline_run.py --stages 2 --rates unlimited,80mbit,10mbit --out result.json

With ``--netns auto`` (default) the script re-runs itself inside a private
network namespace (``unshare -n``: needs root or unprivileged user
namespaces) and brings its loopback up. All stage processes run in that
namespace and talk gloo over its loopback; rank 0 (root inside the
namespace) sets the link rate with a token-bucket filter on it::

    tc qdisc add dev lo root tbf rate RATE burst BURST latency 100ms

and removes it for ``unlimited``. Every byte between stages goes through the
one shaped link: all boundaries of a 4-stage pipeline share it (as if every
stage sat behind one link of that rate; see bench/README.md). The host's
network is untouched. ``--netns off`` runs on the host's loopback, unshaped.

What one launch does, in the same stage processes:

1. builds one PipelineStage per variant (d=256, one pre-norm MLP block per
   stage, byte embedding on the first stage and a head on the last, 1F1B, 4
   micro-batches of 1 x 128 tokens, SGD);
2. repeats ``reps`` rounds; each round visits every rate (the order rotates
   from round to round) and at each rate runs, for every variant, ``warmup``
   unmeasured steps then ``steps`` measured ones. Interleaving rates and
   variants spreads the load of a shared machine evenly over all points;
3. the first time at each rate, a link check: rank 0 sends rank 1 two equal
   messages back to back, and the second one's time gives the rate the link
   really delivers (the first drains the token bucket's burst).

Each rank stamps the end of every step (``perf_counter`` after
``optimizer.step()``); a step's time is the interval since the previous
stamp, the maximum over ranks; tokens/s = tokens per step / median step time
over all measured steps of a point. Steps within a segment run back to back
as in training; segments are separated by barriers.

Variants: ``uncompressed`` is a full-width boundary (k = d, bf16 both
directions): exactly the bf16 activations (plus a 16-byte header per
message) cross the link, but the encoder and decoder still run as d x d
GEMMs (compute a real no-bottleneck baseline would not do; at d=256 small
next to the stage's own block). The ResBM variants use the presets' codecs
with the default gradient codec GRAD_INT8: ``bf16_k2`` (k = d/128, the
paper's 128x), ``int8_k8`` and ``int4_k8`` (k = d/32; int4 with one scale per
token, because the INT4 preset's 32-channel groups do not divide k = 8).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

VOCAB = 256
RATES = ("unlimited", "1gbit", "200mbit", "80mbit", "10mbit")


def variants(d: int) -> dict:
    from resbm_kernels import BF16, GRAD_INT8, INT8, Codec

    return {
        "uncompressed": dict(k=d, codec=BF16, grad_codec=BF16),
        f"bf16_k{d // 128}": dict(k=d // 128, codec=BF16, grad_codec=GRAD_INT8),
        f"int8_k{d // 32}": dict(k=d // 32, codec=INT8, grad_codec=GRAD_INT8),
        f"int4_k{d // 32}": dict(k=d // 32, codec=Codec(bits=4), grad_codec=GRAD_INT8),
    }


def rate_bits(rate: str) -> float | None:
    """'80mbit' -> 80e6 bits/s; 'unlimited' -> None."""
    if rate == "unlimited":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: expected 'unlimited' or e.g. '80mbit', '1gbit'")
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def tbf_args(rate: str) -> list[str]:
    """tbf parameters: the burst must exceed lo's 64 KiB MTU (else gloo hangs)
    and hold rate/HZ at high rates; the queue holds 100 ms of traffic."""
    bps = rate_bits(rate)
    burst = max(256 * 1024, int(bps / 8 / 100))
    return ["rate", rate, "burst", str(burst), "latency", "100ms"]


def _tc(*args, check=True) -> str:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _qdisc_counters() -> dict:
    """Sent bytes, drops and overlimits of lo's root qdisc."""
    text = _tc("-s", "qdisc", "show", "dev", "lo", check=False)
    m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", text)
    if not m:
        return dict(sent_bytes=0, packets=0, dropped=0, overlimits=0)
    return dict(zip(("sent_bytes", "packets", "dropped", "overlimits"), map(int, m.groups())))


def set_rate(rate: str) -> str | None:
    """Replace lo's root qdisc (inside the namespace); returns the command."""
    _tc("qdisc", "del", "dev", "lo", "root", check=False)  # none yet is fine
    if rate == "unlimited":
        return None
    cmd = ["qdisc", "add", "dev", "lo", "root", "tbf", *tbf_args(rate)]
    _tc(*cmd)
    return "tc " + " ".join(cmd)


# ---- the model -------------------------------------------------------------------------


def stage_module(stage: int, stages: int, d: int, layers: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    torch.manual_seed(1000 + stage)
    mods = [nn.Embedding(VOCAB, d)] if stage == 0 else []
    mods += [Block() for _ in range(layers)]
    if stage == stages - 1:
        mods += [nn.LayerNorm(d), nn.Linear(d, VOCAB)]
    return nn.Sequential(*mods)


def loss_fn(logits, targets):
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


# ---- workers ------------------------------------------------------------------------------


def _link_check(rank: int, rate: str) -> dict | None:
    import torch
    import torch.distributed as dist

    bps = rate_bits(rate)
    size = 64 << 20 if bps is None else int(min(64 << 20, max(1 << 20, bps / 8 * 0.3)))
    out = None
    if rank == 0:
        a, b = torch.ones(size, dtype=torch.uint8), torch.ones(size, dtype=torch.uint8)
        for w in [dist.isend(a, 1, tag=7), dist.isend(b, 1, tag=8)]:
            w.wait()
    elif rank == 1:
        a, b = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
        wa, wb = dist.irecv(a, 0, tag=7), dist.irecv(b, 0, tag=8)
        wa.wait()
        t0 = time.perf_counter()
        wb.wait()
        dt = time.perf_counter() - t0
        out = dict(message_bytes=size, second_message_s=dt, measured_mbit_s=size * 8 / dt / 1e6)
    return out


class _Variant:
    """One variant's stage on this rank, kept across the whole launch."""

    def __init__(self, rank, stages, spec, args):
        import torch

        from resbm_kernels.pipeline import PipelineConfig, PipelineStage

        self.rank, self.stages = rank, stages
        config = PipelineConfig(d=args["d"], k=spec["k"], codec=spec["codec"], grad_codec=spec["grad_codec"],
                                micro_batches=args["micro_batches"], schedule="1f1b", timeout_s=args["timeout_s"])
        module = stage_module(rank, stages, args["d"], args["layers"])
        torch.manual_seed(10_000 + rank)
        self.stage = PipelineStage(module, config, micro_batch_shape=(1, args["seq"]),
                                   loss_fn=loss_fn if rank == stages - 1 else None)
        self.opt = torch.optim.SGD(self.stage.parameters(), lr=0.05)
        self.gen = torch.Generator().manual_seed(0)
        self.mb, self.seq = args["micro_batches"], args["seq"]
        self.losses = []

    def step(self):
        import torch

        tokens = torch.randint(0, VOCAB, (self.mb, self.seq + 1), generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        first, last = self.rank == 0, self.rank == self.stages - 1
        result = self.stage.step(tokens[:, :-1] if first else None, tokens[:, 1:] if last else None)
        self.opt.step()
        if result.loss is not None:
            self.losses.append(result.loss)
        return result.comm


def _segment(v: _Variant, warmup: int, steps: int) -> dict:
    import torch.distributed as dist

    dist.barrier()
    for _ in range(warmup):
        v.step()
    stamps, comm = [time.perf_counter()], []
    for _ in range(steps):
        comm.append(v.step())
        stamps.append(time.perf_counter())
    return dict(periods=[b - a for a, b in zip(stamps[:-1], stamps[1:])],
                blocked=[c.blocked_s for c in comm], overlap=[c.overlap for c in comm],
                bytes=[c.bytes_sent + c.bytes_received for c in comm])


def _worker(rank, stages, port, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = dict(points={}, rates={})
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=stages,
                                timeout=datetime.timedelta(seconds=args["timeout_s"]))
        specs = variants(args["d"])
        built = {name: _Variant(rank, stages, specs[name], args) for name in args["variants"]}
        rates = list(args["rates"])
        for rep in range(args["reps"]):
            order = rates[rep % len(rates):] + rates[:rep % len(rates)]
            for rate in order:
                info = result["rates"].setdefault(rate, {})
                if rank == 0 and args["shape"]:
                    info["qdisc"] = set_rate(rate)
                    before = _qdisc_counters()
                dist.barrier()
                if "link" not in info:
                    info["link"] = _link_check(rank, rate)
                for name in (args["variants"] if rep % 2 == 0 else args["variants"][::-1]):
                    seg = _segment(built[name], args["warmup"], args["steps"])
                    result["points"].setdefault(rate, {}).setdefault(name, []).append(seg)
                dist.barrier()
                if rank == 0 and args["shape"]:
                    after = _qdisc_counters()
                    for key, val in after.items():
                        info[key] = info.get(key, 0) + val - before.get(key, 0) if info.get("qdisc") else 0
        for name, v in built.items():
            result.setdefault("losses", {})[name] = v.losses
        if rank == 0 and args["shape"]:
            set_rate("unlimited")
    except BaseException as e:  # report every failure to the parent
        result["error"] = f"{type(e).__name__}: {e}"
        result["trace"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # skip process-group teardown, which can block on a dead peer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _combine(ranks: list[dict], args) -> dict:
    tokens_per_step = args["micro_batches"] * args["seq"]
    out = {}
    for rate in args["rates"]:
        rate_info = dict(ranks[0]["rates"][rate])
        rate_info["link"] = ranks[1]["rates"][rate]["link"]
        points = {}
        for name in args["variants"]:
            segs = [r["points"][rate][name] for r in ranks]  # [rank][rep]
            steps = [max(segs[rk][rep]["periods"][j] for rk in range(len(ranks)))
                     for rep in range(args["reps"]) for j in range(args["steps"])]
            first = [s for seg in segs[0] for s in seg["bytes"]]
            step_s = statistics.median(steps)
            losses = ranks[-1]["losses"][name]
            points[name] = dict(
                step_s=step_s, steps_s=steps, tokens_per_step=tokens_per_step, tokens_per_s=tokens_per_step / step_s,
                tokens_per_s_best_step=tokens_per_step / min(steps),
                per_rank_median_step_s=[statistics.median(p for seg in s for p in seg["periods"]) for s in segs],
                blocked_s_per_step_rank0=statistics.median(b for seg in segs[0] for b in seg["blocked"]),
                overlap_rank0=statistics.median(o for seg in segs[0] for o in seg["overlap"]),
                wire_bytes_per_step_per_boundary=statistics.median(first),
                wire_bytes_per_token_per_boundary=statistics.median(first) / tokens_per_step,
                loss_first=losses[0], loss_last=losses[-1],
            )
        out[rate] = dict(net=rate_info, variants=points)
    return out


def run_inside(args) -> dict:
    """Set up the (already private) network, launch the stages, combine."""
    args["shape"] = args["netns"] == "inside"
    if args["shape"]:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    elif set(args["rates"]) != {"unlimited"}:
        raise RuntimeError("--netns off cannot shape the link (it would shape the host's loopback)")
    out_dir = tempfile.mkdtemp(prefix="resbm-pipe-")
    # import once here and fork the stages (no torch op has run yet, so no
    # thread pool exists to be lost in the fork): saves one torch import per stage
    import resbm_kernels.pipeline  # noqa: F401
    import torch  # noqa: F401

    ctx = mp.get_context("fork")
    port = _free_port()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(r, args["stages"], port, args, out_dir)) for r in range(args["stages"])]
    for p in procs:
        p.start()
    deadline = time.monotonic() + args["launch_timeout_s"]
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    ranks = []
    for r in range(args["stages"]):
        path = os.path.join(out_dir, f"{r}.json")
        ranks.append(json.load(open(path)) if os.path.exists(path) else {"error": "hung" if r in hung else "died"})
    shutil.rmtree(out_dir, ignore_errors=True)
    result = dict(args=dict(args), namespace=args["shape"], wall_s=time.perf_counter() - t0)
    errors = {r: res["error"] for r, res in enumerate(ranks) if "error" in res}
    if errors:
        result["errors"] = errors
        result["traces"] = {r: ranks[r].get("trace") for r in errors}
        return result
    result["rates"] = _combine(ranks, args)
    return result


def run(stages: int, rates=RATES, *, netns: str = "auto", variant_names=None, d: int = 256, layers: int = 1,
        seq: int = 128, micro_batches: int = 4, reps: int = 5, warmup: int = 1, steps: int = 3,
        timeout_s: float = 120.0, launch_timeout_s: float = 900.0) -> dict:
    """One launch at every rate; returns the combined result (``errors`` set if a stage failed)."""
    rates = list(rates)
    for r in rates:
        rate_bits(r)
    args = dict(stages=stages, rates=rates, netns=netns, variants=list(variant_names or variants(d)), d=d,
                layers=layers, seq=seq, micro_batches=micro_batches, reps=reps, warmup=warmup, steps=steps,
                timeout_s=timeout_s, launch_timeout_s=launch_timeout_s)
    if netns == "auto":
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp, "out.json")
            cmd = ["unshare", "-n", sys.executable, os.path.abspath(__file__), "--inside", json.dumps(args), str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=launch_timeout_s + 60, env=_child_env())
            if proc.returncode != 0 or not out.exists():
                raise NamespaceError(f"`unshare -n` launch failed (rc {proc.returncode}): "
                                     f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
            return json.loads(out.read_text())
    return run_inside(args)


def _child_env() -> dict:
    """This environment, with the resbm_kernels this process imports on the path."""
    import resbm_kernels

    root = str(pathlib.Path(resbm_kernels.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class NamespaceError(RuntimeError):
    """The private network namespace or the shaping could not be set up."""


def namespace_problem() -> str | None:
    """None if `unshare -n` + `tc tbf` work here, else why not."""
    for tool in ("unshare", "ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = ("ip link set lo up && tc qdisc add dev lo root tbf rate 10mbit burst 256kb latency 100ms "
             "&& tc qdisc del dev lo root")
    try:
        proc = subprocess.run(["unshare", "-n", "sh", "-c", probe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare -n` failed: {e}"
    if proc.returncode != 0:
        return f"`unshare -n` + tc tbf not permitted here (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--inside":  # re-executed under unshare -n
        args = json.loads(argv[1])
        args["netns"] = "inside"
        pathlib.Path(argv[2]).write_text(json.dumps(run_inside(args)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--rates", default=",".join(RATES), help="comma-separated: unlimited or tc rates (80mbit, 1gbit)")
    p.add_argument("--netns", default="auto", choices=("auto", "off"))
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="write the JSON result here (default: stdout)")
    a = p.parse_args(argv)
    res = run(a.stages, a.rates.split(","), netns=a.netns,
              variant_names=a.variants.split(",") if a.variants else None,
              reps=a.reps, steps=a.steps, warmup=a.warmup)
    text = json.dumps(res, indent=1)
    if a.out:
        pathlib.Path(a.out).write_text(text)
    else:
        print(text)
    return 1 if "errors" in res else 0


if __name__ == "__main__":
    sys.exit(main())
