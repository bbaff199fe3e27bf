"""A small pre-norm GPT that can be cut into pipeline stages.

Architecture (per block): ``x + Attn(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``;
causal attention through ``F.scaled_dot_product_attention`` with rotary
position embeddings (RoPE) on queries and keys; a final RMSNorm and a linear
head. Bias-free everywhere.

Three ways to use it, all with identical weights for the same seed:

* :class:`GPT` — the whole model in one module, ``forward(tokens) -> logits``.
* :func:`stage_modules` — the model cut into ``num_stages`` modules for the
  pipeline runtime (one per process; :class:`resbm_kernels.pipeline.PipelineStage`
  adds the ResBM encoder/decoder around them). Stage 0 maps token ids
  ``(B, T)`` to ``(B, T, d)``, middle stages ``(B, T, d) -> (B, T, d)``, the
  last ``(B, T, d) -> (B, T, vocab)`` logits.
* :class:`ResBMGPT` — the stages chained in one process with a boundary
  module (e.g. :class:`resbm_kernels.ResBMBoundary`) at every cut, for
  single-process research on the effect of compression.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class GPTConfig:
    """Model hyper-parameters.

    Attributes:
        vocab: vocabulary size (256 for bytes).
        d: model width (residual stream channels); the ResBM boundary width.
        n_layers: transformer blocks in total (split across stages).
        n_heads: attention heads; ``d / n_heads`` must be even (RoPE pairs).
        seq_len: maximum sequence length (RoPE tables are precomputed for it).
        mlp_ratio: SwiGLU hidden width as a multiple of ``d`` (8/3 keeps the
            parameter count of a 4x GELU MLP); rounded up to ``mlp_multiple``.
        mlp_multiple: the SwiGLU hidden width is a multiple of this.
        rope_base: RoPE frequency base.
        norm_eps: RMSNorm epsilon.
        init_std: standard deviation of the normal init of all matrices; the
            residual-output projections are scaled by ``1/sqrt(2 n_layers)``.
        tie_embeddings: share the embedding matrix with the head. Works only
            when the first and last stage live in one process (e.g.
            :class:`GPT`, :class:`ResBMGPT`), not across pipeline processes.
    """

    vocab: int = 256
    d: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    mlp_ratio: float = 8 / 3
    mlp_multiple: int = 32
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab", "d", "n_layers", "n_heads", "seq_len", "mlp_multiple"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig: {name}={getattr(self, name)} must be positive")
        if self.d % self.n_heads or (self.d // self.n_heads) % 2:
            raise ValueError(f"GPTConfig: d={self.d} must split into {self.n_heads} heads of even width")
        if self.mlp_ratio <= 0:
            raise ValueError(f"GPTConfig: mlp_ratio={self.mlp_ratio} must be positive")

    @property
    def head_dim(self) -> int:
        return self.d // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        h = int(math.ceil(self.d * self.mlp_ratio))
        return (h + self.mlp_multiple - 1) // self.mlp_multiple * self.mlp_multiple


def layer_split(n_layers: int, num_stages: int) -> list[int]:
    """Blocks per stage, as even as possible (earlier stages get the extra
    ones, since the last stage also carries the head)."""
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be >= 1")
    if n_layers < num_stages:
        raise ValueError(f"cannot cut {n_layers} layers into {num_stages} stages (need >= 1 block per stage)")
    base, extra = divmod(n_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


# ---- building blocks ------------------------------------------------------------


class Rotary(nn.Module):
    """cos/sin tables for RoPE (non-persistent buffers, rebuilt on load)."""

    def __init__(self, head_dim: int, seq_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if t > self.cos.shape[0]:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len={self.cos.shape[0]}")
        return self.cos[:t].to(dtype), self.sin[:t].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of x (B, H, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d, bias=False)
        self.out = nn.Linear(cfg.d, cfg.d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPTStage(nn.Module):
    """One contiguous slice of the model: [embedding] -> blocks -> [final norm + head].

    ``embed`` is set on the first stage only, ``norm``/``head`` on the last.
    """

    def __init__(self, cfg: GPTConfig, blocks: list[Block], *, embed: nn.Embedding | None = None,
                 norm: nn.Module | None = None, head: nn.Linear | None = None, index: int = 0):
        super().__init__()
        self.config, self.index = cfg, index
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base)

    @property
    def is_first(self) -> bool:
        return self.embed is not None

    @property
    def is_last(self) -> bool:
        return self.head is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            if x.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"stage {self.index}: expected token ids, got {x.dtype}")
            x = self.embed(x)
        cos, sin = self.rotary(x.shape[-2], x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x

    def extra_repr(self) -> str:
        return f"index={self.index}, blocks={len(self.blocks)}, first={self.is_first}, last={self.is_last}"


def _init_weights(model: nn.Module, cfg: GPTConfig) -> None:
    resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = resid_std if name.endswith(("attn.out", "mlp.down")) else cfg.init_std
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, cfg.init_std)


class GPT(nn.Module):
    """The whole model; ``forward(tokens (B, T) int64) -> logits (B, T, vocab)``.

    Initialisation is deterministic in ``seed`` and does not touch the global
    RNG. :meth:`stages` cuts it into stage modules that share its parameters.
    """

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(config.vocab, config.d)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.norm = nn.RMSNorm(config.d, eps=config.norm_eps)
            self.head = nn.Linear(config.d, config.vocab, bias=False)
            _init_weights(self, config)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.rotary = Rotary(config.head_dim, config.seq_len, config.rope_base)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self.rotary(x.shape[-2], x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))

    def stages(self, num_stages: int) -> list[GPTStage]:
        """Cut into ``num_stages`` :class:`GPTStage` modules (see :func:`layer_split`)
        that share this model's parameters."""
        sizes = layer_split(self.config.n_layers, num_stages)
        out, start = [], 0
        for s, n in enumerate(sizes):
            last = s == num_stages - 1
            out.append(GPTStage(
                self.config, list(self.blocks[start:start + n]),
                embed=self.embed if s == 0 else None,
                norm=self.norm if last else None,
                head=self.head if last else None,
                index=s,
            ))
            start += n
        return out


def stage_modules(config: GPTConfig, num_stages: int, seed: int = 0) -> list[GPTStage]:
    """The model of ``config`` (initialised from ``seed``, identical to
    ``GPT(config, seed)``) cut into ``num_stages`` stage modules.

    Stage 0: token ids ``(B, T)`` -> ``(B, T, d)`` (embedding + its blocks);
    middle stages: ``(B, T, d) -> (B, T, d)``; last stage: ``(B, T, d)`` ->
    logits ``(B, T, vocab)`` (blocks + final norm + head). Blocks are split as
    evenly as possible (:func:`layer_split`). With ``num_stages == 1`` the
    single stage maps tokens to logits.
    """
    if config.tie_embeddings and num_stages > 1:
        # Tied weights cannot be shared across pipeline processes; ResBMGPT
        # (one process) builds its stages from GPT directly and may tie.
        raise ValueError("stage_modules: tie_embeddings=True cannot be split across pipeline processes")
    return GPT(config, seed).stages(num_stages)


BoundaryFactory = Callable[[int], nn.Module]


class ResBMGPT(nn.Module):
    """The GPT cut into ``num_stages`` stages, chained in one process with a
    boundary module at each of the ``num_stages - 1`` cuts.

    Args:
        config: model hyper-parameters.
        num_stages: number of stages (>= 1).
        boundary_factory: ``factory(cut_index) -> nn.Module`` mapping
            ``(B, T, d) -> (B, T, d)``, e.g.
            ``lambda i: ResBMBoundary(d, k, codec=INT8, seed=i)``; ``None``
            (or a factory returning ``nn.Identity()``) gives the uncompressed
            model. Boundaries are built after the GPT under their own fork of
            the RNG seeded from ``seed``, so every arm of a study starts from
            the same GPT weights.
        seed: initialisation seed of the GPT (identical to ``GPT(config, seed)``).
    """

    def __init__(self, config: GPTConfig, num_stages: int, boundary_factory: BoundaryFactory | None = None,
                 seed: int = 0):
        super().__init__()
        self.config, self.num_stages = config, num_stages
        self.stages = nn.ModuleList(GPT(config, seed).stages(num_stages))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)
            self.boundaries = nn.ModuleList(
                boundary_factory(i) if boundary_factory is not None else nn.Identity()
                for i in range(num_stages - 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.stages[0](tokens)
        for boundary, stage in zip(self.boundaries, self.stages[1:]):
            x = stage(boundary(x))
        return x


def muon_param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split a GPT-family model's parameters for Muon: ``(matrices, rest)``.

    ``matrices`` are the 2-D weights inside transformer blocks (attention and
    MLP projections); ``rest`` is everything else (embedding, head, norms and
    any boundary parameters), to be trained with AdamW.
    """
    matrices, rest, seen = [], [], set()
    for module in model.modules():
        if isinstance(module, Block):
            for p in module.parameters():
                if id(p) not in seen and p.ndim == 2:
                    matrices.append(p)
                    seen.add(id(p))
    for p in model.parameters():
        if id(p) not in seen:
            rest.append(p)
            seen.add(id(p))
    return matrices, rest
