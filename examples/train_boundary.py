"""Train a small byte-level GPT with a ResBM boundary in the middle, in one process.

The GPT is cut in two and joined by a ``ResBMBoundary`` (encoder -> wire ->
decoder, with the numerics a two-stage pipeline has: activations cross with
``--codec``, gradients come back with ``--grad-codec``). Text: the Python
standard library's own source (:mod:`resbm_kernels.data`). Prints the loss
going down, the bytes that would cross the wire and the compression ratio.

    python examples/train_boundary.py --steps 400
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from resbm_kernels import Codec, ResBMBoundary
from resbm_kernels.data import batch, load_corpus
from resbm_kernels.models.gpt import GPTConfig, ResBMGPT


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--width", type=int, default=128, help="model width d")
    p.add_argument("--bottleneck", type=int, default=8, help="bottleneck width k (divides d)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--codec", default="int8/row/bf16/nearest", help="forward wire codec spec")
    p.add_argument("--grad-codec", default="int8/row/bf16/stochastic", help="backward wire codec spec")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    d, k = args.width, args.bottleneck
    codec, grad_codec = Codec.parse(args.codec), Codec.parse(args.grad_codec)
    config = GPTConfig(d=d, n_layers=args.layers, n_heads=max(1, d // 64), seq_len=args.seq)
    model = ResBMGPT(config, 2, lambda i: ResBMBoundary(d, k, codec=codec, grad_codec=grad_codec, seed=i),
                     seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train, val = load_corpus("train"), load_corpus("val")

    def loss_on(tokens, targets):
        return nn.functional.cross_entropy(model(tokens).reshape(-1, config.vocab), targets.reshape(-1))

    def val_loss():
        with torch.no_grad():
            return sum(loss_on(*batch(val, i, args.batch, args.seq, seed=12345)).item() for i in range(4)) / 4

    print(model.boundaries[0])
    before, start = val_loss(), time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step", mininterval=0.1 if sys.stderr.isatty() else 10.0)
    for step in bar:
        loss = loss_on(*batch(train, step, args.batch, args.seq, args.seed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    elapsed = time.perf_counter() - start

    tokens = args.batch * args.seq
    fwd, bwd, raw = codec.payload_bytes(tokens, k), grad_codec.payload_bytes(tokens, k), 2 * d * tokens
    print(f"validation loss: {before:.3f} -> {val_loss():.3f} after {args.steps} steps "
          f"({args.steps * tokens / elapsed:,.0f} tokens/s on the CPU)")
    print(f"wire per step ({tokens} tokens): forward {fwd:,} B ({codec.spec}), backward {bwd:,} B "
          f"({grad_codec.spec}); bf16 activations would be {raw:,} B each way, "
          f"{(2 * raw - fwd - bwd) * args.steps / 1e6:,.1f} MB saved over the run")
    print(f"compression ratio: forward {raw / fwd:.1f}x, backward {raw / bwd:.1f}x "
          f"(d={d}, k={k}; scales and header included)")


if __name__ == "__main__":
    main()
