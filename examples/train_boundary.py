"""Train a tiny byte-level language model with a ResBM boundary in the middle.

The model is two halves of a small pre-norm transformer joined by a
``ResBMBoundary`` (encoder -> wire -> decoder in one process, with the same
numerics a two-stage pipeline would have). Text: the Python standard
library's own source, present on every machine. Prints the loss going down,
the bytes that would cross the wire and the compression ratio.

    python examples/train_boundary.py --steps 200 --codec int8/row/bf16/nearest
"""

from __future__ import annotations

import argparse
import pathlib
import sysconfig
import time

import torch
from torch import nn
from tqdm import tqdm

from resbm_kernels import Codec, ResBMBoundary


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of the stdlib's .py sources (tests excluded), in a fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def blocks(d: int, layers: int, heads: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class TinyLM(nn.Module):
    """embedding -> blocks -> ResBM boundary -> blocks -> head."""

    def __init__(self, d: int, k: int, seq: int, codec: Codec, grad_codec: Codec):
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.first = blocks(d, 2, 4)
        self.boundary = ResBMBoundary(d, k, codec=codec, grad_codec=grad_codec)
        self.second = blocks(d, 2, 4)
        self.head = nn.Linear(d, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.first(h, mask=self.mask, is_causal=True)
        h = self.boundary(h)
        return self.head(self.second(h, mask=self.mask, is_causal=True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--d", type=int, default=128, help="model width")
    p.add_argument("--k", type=int, default=16, help="bottleneck width (divides d)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--codec", default="int8/row/bf16/nearest", help="forward wire codec spec")
    p.add_argument("--grad-codec", default="int8/row/bf16/stochastic", help="backward wire codec spec")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    data = stdlib_bytes(2_000_000)
    codec, grad_codec = Codec.parse(args.codec), Codec.parse(args.grad_codec)
    model = TinyLM(args.d, args.k, args.seq, codec, grad_codec)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)

    tokens_per_step = args.batch * args.seq
    start, first_loss = time.perf_counter(), None
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for _ in bar:
        idx = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=gen)
        window = torch.stack([data[i : i + args.seq + 1] for i in idx.tolist()])
        logits = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first_loss = first_loss if first_loss is not None else loss.item()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = time.perf_counter() - start

    fwd = model.boundary.wire_bytes(tokens_per_step)
    bwd = grad_codec.payload_bytes(tokens_per_step, args.k)
    raw = 2 * args.d * tokens_per_step
    print(f"loss: {first_loss:.3f} -> {loss.item():.3f} over {args.steps} steps "
          f"({args.steps * tokens_per_step / elapsed:,.0f} tokens/s on {torch.device('cpu')})")
    print(f"wire per step: forward {fwd:,} B ({codec.spec}), backward {bwd:,} B ({grad_codec.spec}); "
          f"bf16 activations would be {raw:,} B each way")
    print(f"compression ratio: forward {raw / fwd:.1f}x, backward {raw / bwd:.1f}x "
          f"(d={args.d}, k={args.k}; scales and header included)")


if __name__ == "__main__":
    main()
