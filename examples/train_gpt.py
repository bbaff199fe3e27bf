"""Train a small byte-level GPT split over pipeline stages with ResBM boundaries.

One process per stage; launch with torchrun (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --steps 100
    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --device cuda --optimizer muon --bottleneck 16

(one GPU per stage: NCCL refuses two ranks on one GPU). On CUDA the fused
kernels need d and k multiples of 16; other widths run on the reference ops.

Multi-node: use torchrun's rendezvous flags (``--nnodes``, ``--rdzv-endpoint``)
instead of ``--standalone``. ``--replicas R`` runs R pipelines side by side
(data parallel: world size / R stages each, every replica its own batches,
gradients averaged across replicas before each optimizer step). Text is the
Python standard library's own source (:mod:`resbm_kernels.data`). Only
compressed payloads cross between stages; the last stage (of the first
replica) shows a progress bar and prints a summary (tokens/s, wire bytes per
token, compression ratio, training and validation loss). With
``--checkpoint-dir`` every stage checkpoints atomically and a restarted job
resumes where all stages last completed a step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch import nn
from tqdm import tqdm

from resbm_kernels.data import batch, load_corpus
from resbm_kernels.models.gpt import GPTConfig, muon_param_groups, stage_modules
from resbm_kernels.pipeline import PipelineConfig, PipelineStage, checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--width", type=int, default=256, help="model width d")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks in total")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b")
    p.add_argument("--bottleneck", type=int, default=8, help="bottleneck width k (divides d)")
    p.add_argument("--codec", default="int8/row/bf16/nearest", help="forward codec spec")
    p.add_argument("--grad-codec", default="int8/row/bf16/stochastic", help="backward codec spec")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the whole model's gradient norm (0: off)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a peer")
    p.add_argument("--val-batches", type=int, default=4,
                   help="batches of the validation split evaluated after training (forward only)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--replicas", type=int, default=1, help="data-parallel pipelines side by side (divides the world)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def layout(rank: int, world: int, replicas: int):
    """(replica, stage index, this pipeline's process group or None, this
    stage's group across replicas or None): pipelines of consecutive ranks.
    Every rank creates every group (group creation is collective)."""
    if replicas < 1 or world % replicas or world // replicas < 2:
        raise SystemExit(f"--replicas {replicas} must split the {world} ranks into pipelines of >= 2 stages")
    if replicas == 1:
        return 0, rank, None, None
    stages = world // replicas
    pipelines = [dist.new_group(list(range(r * stages, (r + 1) * stages))) for r in range(replicas)]
    across = [dist.new_group(list(range(s, world, stages))) for s in range(stages)]
    replica, stage = divmod(rank, stages)
    return replica, stage, pipelines[replica], across[stage]


def average_gradients(stage: PipelineStage, group) -> None:
    """Mean of the replicas' gradients (the same on every replica afterwards)."""
    for p in stage.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= dist.get_world_size(group)


def make_optimizer(stage: PipelineStage, args) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return torch.optim.AdamW(stage.parameters(), lr=args.lr, weight_decay=0.0)
    matrices, rest = muon_param_groups(stage.module)
    rest += list(p for name, p in stage.named_parameters() if not name.startswith("module."))
    return _Both(torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=args.lr, weight_decay=0.0))


class _Both:
    """Muon for the block matrices, AdamW for the rest, stepped together
    (the optimizer interface the loop and the checkpoints use)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def state_dict(self):
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, state):
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(state[str(i)])


def _bf16_autocast(module: nn.Module) -> nn.Module:
    """Run a stage module under bf16 autocast on CUDA (fp32 master weights,
    bf16 activations at the boundaries). Wraps ``forward`` instead of adding a
    wrapper module, so parameter names (and checkpoints) match the CPU run."""
    forward = module.forward

    def autocast_forward(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return forward(x).to(torch.bfloat16)

    module.forward = autocast_forward
    return module


def validation_loss(stage: PipelineStage, args) -> float | None:
    """Mean loss over ``--val-batches`` fixed batches of the validation split
    (on the last stage; None elsewhere), forward only."""
    data = load_corpus("val") if stage.is_first or stage.is_last else None
    stage.eval()
    losses = []
    for i in range(args.val_batches):
        x, y = batch(data, i, args.batch, args.seq, args.seed) if data is not None else (None, None)
        losses.append(stage.evaluate(x if stage.is_first else None, y if stage.is_last else None).loss)
    stage.train()
    return sum(losses) / len(losses) if stage.is_last and losses else None


@record  # torchrun's summary then shows the failing rank's exception, not only its exit code
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # on a peer failure, abort the communicators but let the PipelineError reach the user
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    replica, stage_index, pipeline_group, replica_group = layout(rank, world, args.replicas)
    num_stages = world // args.replicas
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    gpt = GPTConfig(d=args.width, n_layers=args.layers, n_heads=args.heads, seq_len=args.seq)
    config = PipelineConfig(d=args.width, k=args.bottleneck, codec=args.codec, grad_codec=args.grad_codec,
                            micro_batches=args.micro_batches, schedule=args.schedule,
                            timeout_s=args.timeout, seed=args.seed)
    if args.batch % args.micro_batches:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --micro-batches {args.micro_batches}")
    module = stage_modules(gpt, num_stages, seed=args.seed)[stage_index]
    if args.device == "cuda":
        module = _bf16_autocast(module)
    torch.manual_seed(args.seed + 1 + stage_index)  # encoder/decoder init (the same on every replica)
    stage = PipelineStage(
        module, config, micro_batch_shape=(args.batch // args.micro_batches, args.seq),
        loss_fn=lambda logits, y: nn.functional.cross_entropy(logits.float().reshape(-1, gpt.vocab), y.reshape(-1)),
        group=pipeline_group, device=device, dtype=dtype)
    opt = make_optimizer(stage, args)
    checkpoint_dir = args.checkpoint_dir
    if checkpoint_dir and args.replicas > 1:
        checkpoint_dir = os.path.join(checkpoint_dir, f"replica-{replica}")  # (files are named by stage)
    if checkpoint_dir:
        checkpoint.load_latest(checkpoint_dir, stage, opt)
    reports = stage.is_last and replica == 0
    data = load_corpus("train") if stage.is_first or stage.is_last else None

    bar = tqdm(total=args.steps, initial=stage.steps_done, unit="step", disable=not reports, desc="train",
               mininterval=0.1 if sys.stderr.isatty() else 10.0)  # (a log gets a line every 10 s)
    first_loss = loss = None
    sent = blocked = 0.0
    start, start_step = time.perf_counter(), stage.steps_done
    while stage.steps_done < args.steps:
        draw = stage.steps_done * args.replicas + replica  # (each replica its own batches)
        x, y = (batch(data, draw, args.batch, args.seq, args.seed) if data is not None else (None, None))
        opt.zero_grad()
        result = stage.step(x if stage.is_first else None, y if stage.is_last else None)
        if replica_group is not None:
            average_gradients(stage, replica_group)
        if args.grad_clip > 0:
            stage.clip_grad_norm_(args.grad_clip)  # (every stage: the norm is the whole pipeline's)
        opt.step()
        sent += result.comm.bytes_sent
        blocked += result.comm.blocked_s
        if reports:
            first_loss = result.loss if first_loss is None else first_loss
            loss = result.loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", overlap=f"{result.comm.overlap:.2f}", refresh=False)
        if checkpoint_dir and stage.steps_done % args.checkpoint_every == 0:
            checkpoint.save(checkpoint_dir, stage, opt)
    bar.close()
    elapsed = time.perf_counter() - start
    steps = stage.steps_done - start_step
    val_loss = validation_loss(stage, args)

    if reports and steps:
        tokens = steps * args.batch * args.seq * args.replicas
        fwd = config.codec.payload_bytes(stage.tokens, args.bottleneck) / stage.tokens
        bwd = config.grad_codec.payload_bytes(stage.tokens, args.bottleneck) / stage.tokens
        layout_text = f"{args.replicas} pipelines x {num_stages} stages" if args.replicas > 1 else f"{world} stages"
        print(f"{layout_text} on {args.device}, {steps} steps, {tokens:,} tokens in {elapsed:.1f} s: "
              f"{tokens / elapsed:,.0f} tokens/s")
        validation = f", validation loss {val_loss:.3f}" if val_loss is not None else ""
        print(f"loss {first_loss:.3f} -> {loss:.3f}{validation}")
        print(f"wire per token per boundary: forward {fwd:.1f} B ({config.codec.spec}), "
              f"backward {bwd:.1f} B ({config.grad_codec.spec}); bf16 activations: {2 * args.width} B")
        print(f"compression ratio (scales + header included): forward {2 * args.width / fwd:.1f}x, "
              f"backward {2 * args.width / bwd:.1f}x; this stage waited {blocked:.2f} s on the network "
              f"and sent {sent / 1e6:.2f} MB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
