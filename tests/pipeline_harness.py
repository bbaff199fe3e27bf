"""Multi-process harness for the pipeline tests: spawn one process per stage
on gloo/CPU, collect each rank's result or error, and tolerate ranks that die
(which ``torch.multiprocessing.spawn`` would not)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback

import torch
import torch.distributed as dist
from torch import nn

VOCAB = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        torch.save({"ok": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException as e:  # report every failure to the test
        torch.save({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        os._exit(0)  # skip process-group teardown, which can block on a dead peer


def spawn(fn, world: int, *args, out_dir: str, timeout: float = 240.0) -> list[dict]:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; returns one dict
    per rank: {"ok": result}, {"error": message}, or {"died": exitcode}."""
    os.makedirs(out_dir, exist_ok=True)
    # forked from a server process that imported torch once (as "spawn" would import it in
    # every process: seconds of CPU each); the server starts with the first call
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "resbm_kernels.pipeline", fn.__module__])
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            results.append({"died": "hung"})
            continue
        path = os.path.join(out_dir, f"{r}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path) else {"died": p.exitcode})
    return results


# ---- a tiny byte-level model cut into stages ---------------------------------------

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def stage_module(stage: int, num_stages: int, d: int, seed: int = 0) -> nn.Module:
    """Deterministic stage layers: embedding on the first stage, a head on the last."""
    torch.manual_seed(seed * 100 + stage)
    layers = [nn.Embedding(VOCAB, d)] if stage == 0 else []
    layers.append(Block(d))
    if stage == num_stages - 1:
        layers += [nn.LayerNorm(d), nn.Linear(d, VOCAB)]
    return nn.Sequential(*layers)


def loss_fn(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def batch(step: int, batch_size: int, seq: int):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (batch_size, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]
