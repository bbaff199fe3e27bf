"""ResBM modules: the encoder and decoder that sit at a pipeline-stage
boundary, and a single-process boundary for training without a cluster.

Activations may have any leading shape (..., d); they are flattened to
(N, d) tokens for the ops. The linear encoder/decoder run through the fused
passes of :mod:`resbm_kernels.ops`; the MLP variant computes its projection
with PyTorch and sends it through :func:`~resbm_kernels.ops.wire_roundtrip`.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
import torch.utils.checkpoint
from torch import nn

from . import checks, ops
from .codec import BF16, GRAD_INT8, Codec


def _cast(p: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Parameters follow the activations' dtype (autograd casts the gradient back)."""
    return None if p is None else p.to(dtype)


def _tokens(t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    """Activations (..., width) as contiguous (N, width) tokens for the ops."""
    if t.shape[-1] != width:
        raise ValueError(f"{name} has {t.shape[-1]} channels, expected {width}")
    return t.reshape(-1, width).contiguous()


def _init_linear(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class _SiLUMLP(nn.Module):
    """in -> hidden -> out with SiLU, bias-free."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dtype=None, device=None):
        super().__init__()
        checks.integer("mlp_hidden", hidden, 1)
        self.up = nn.Linear(d_in, hidden, bias=False, dtype=dtype, device=device)
        self.down = nn.Linear(hidden, d_out, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        return self.down(nn.functional.silu(self.up(x)))


class ResBMEncoder(nn.Module):
    """Sender side: z = E(RMSNorm(x)) + x[..., :k].

    Args:
        d: model width; k: bottleneck width (must divide d).
        mlp_hidden: None for the linear encoder (default, fused path) or the
            hidden width of an MLP encoder d -> h -> k with SiLU.
        norm: apply a learnable RMSNorm before E (folded into the GEMM).
        eps: RMSNorm epsilon.
    """

    def __init__(self, d: int, k: int, *, mlp_hidden: int | None = None, norm: bool = True,
                 eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        checks.bottleneck(d, k)
        checks.rms_eps(eps)
        self.d, self.k, self.eps = d, k, eps
        self.norm_weight = nn.Parameter(torch.empty(d, dtype=dtype, device=device)) if norm else None
        if mlp_hidden is None:
            self.weight = nn.Parameter(torch.empty(k, d, dtype=dtype, device=device))
            self.mlp = None
        else:
            self.weight = None
            self.mlp = _SiLUMLP(d, mlp_hidden, k, dtype=dtype, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise this module's own parameters (RMSNorm weight ones, linear
        E as nn.Linear's; an MLP's layers reset themselves), as after
        ``to_empty`` from the meta device."""
        if self.norm_weight is not None:
            nn.init.ones_(self.norm_weight)
        if self.weight is not None:
            _init_linear(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """z (..., k) for activations (..., d), without the wire."""
        return self.project(_tokens(x, self.d, "ResBMEncoder: input")).reshape(*x.shape[:-1], self.k)

    def project(self, x2d: torch.Tensor) -> torch.Tensor:
        """z for (N, d) tokens, without the wire (MLP variant or codec-free use)."""
        gamma = _cast(self.norm_weight, x2d.dtype)
        if self.mlp is None:
            return ops.encode_project(x2d, _cast(self.weight, x2d.dtype), norm_weight=gamma, eps=self.eps)
        u = x2d if gamma is None else nn.functional.rms_norm(x2d, (self.d,), gamma, self.eps)
        return self.mlp(u) + x2d[:, : self.k]

    def extra_repr(self) -> str:
        kind = "linear" if self.mlp is None else f"mlp(hidden={self.mlp.up.out_features})"
        return f"d={self.d}, k={self.k}, {kind}, norm={self.norm_weight is not None}"


class ResBMDecoder(nn.Module):
    """Receiver side: h = D(zhat) + pad_d(zhat) (+ residual).

    Args:
        d: model width; k: bottleneck width (must divide d).
        mlp_hidden: None for the linear decoder (default, fused path) or the
            hidden width of an MLP decoder k -> h -> d with SiLU.
    """

    def __init__(self, d: int, k: int, *, mlp_hidden: int | None = None, dtype=None, device=None):
        super().__init__()
        checks.bottleneck(d, k)
        self.d, self.k = d, k
        if mlp_hidden is None:
            self.weight = nn.Parameter(torch.empty(d, k, dtype=dtype, device=device))
            self.mlp = None
        else:
            self.weight = None
            self.mlp = _SiLUMLP(k, mlp_hidden, d, dtype=dtype, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the linear D as nn.Linear's (an MLP's layers reset themselves)."""
        if self.weight is not None:
            _init_linear(self.weight)

    def forward(self, zhat: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """h (..., d) for bottleneck values (..., k) (+ residual (..., d)), without the wire."""
        r2d = None if residual is None else _tokens(residual, self.d, "ResBMDecoder: residual")
        return self.project(_tokens(zhat, self.k, "ResBMDecoder: input"), r2d).reshape(*zhat.shape[:-1], self.d)

    def project(self, zhat: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """h for (N, k) bottleneck values, without the wire."""
        if self.mlp is None:
            return ops.decode_project(zhat, _cast(self.weight, zhat.dtype), residual=residual)
        h = self.mlp(zhat) + nn.functional.pad(zhat, (0, self.d - self.k))
        return h if residual is None else h + residual

    def extra_repr(self) -> str:
        kind = "linear" if self.mlp is None else f"mlp(hidden={self.mlp.up.out_features})"
        return f"d={self.d}, k={self.k}, {kind}"


_call_seeded: weakref.WeakSet = weakref.WeakSet()  # every CallSeeded module alive (activation_checkpoint)


class CallSeeded(nn.Module):
    """A module that draws its stochastic-rounding seeds from ``seed`` and a
    count of its calls, so that a run is reproducible; the count is part of
    its ``state_dict`` (module extra state), so a run resumed from a saved
    state draws the seeds the uninterrupted run would have.

    The count is an int64 buffer (as BatchNorm's ``num_batches_tracked``; not
    persistent: the extra state carries it) that moves with the module. Each
    call increments it where it lives and hands the ops ``2 * count`` as their
    ``seed_offset``, which the kernels read on the device: a torch.compile'd
    model takes it as a graph input (an int would be a constant of the graph,
    recompiled at every call), and a captured CUDA graph draws new seeds at
    each replay, as eager calls do.
    """

    def __init__(self, seed: int = 0, device=None):
        super().__init__()
        checks.integer("seed", seed)
        self.seed = seed
        self.register_buffer("_calls", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        _call_seeded.add(self)

    def __setstate__(self, state) -> None:  # (copy.deepcopy and unpickling do not call __init__)
        super().__setstate__(state)
        _call_seeded.add(self)

    def reset_parameters(self) -> None:
        """Zero the call count: this module's own state (after ``to_empty``,
        FSDP's deferred initialisation calls this on every module that has it;
        submodules reset their own parameters)."""
        self._calls.zero_()

    @property
    def calls(self) -> int:
        """Calls so far (the next call draws the seeds of call ``calls + 1``)."""
        return int(self._calls)

    @calls.setter
    def calls(self, value: int) -> None:
        checks.integer("calls", value, 0)
        self._calls.fill_(value)

    def _seeds(self) -> dict:
        """The ops' seed arguments for the next call: seed, grad_seed and the
        seed_offset added to both (2 * calls: forward and gradient seeds differ
        in the last bit)."""
        try:
            self._calls.add_(1)
        except RuntimeError as e:
            if not torch._C._are_functorch_transforms_active():
                raise
            raise RuntimeError(f"{type(self).__name__} counts its calls in its buffer _calls (its stochastic-"
                               "rounding seeds); under a torch.func transform pass the module's buffers with its "
                               "parameters: torch.func.functional_call(module, (params, buffers), args)") from e
        base = self.seed * 2_000_006
        return dict(seed=base, grad_seed=base + 1, seed_offset=self._calls * 2)

    def get_extra_state(self) -> dict:
        # the count as a tensor (a copy): no wait for the device, and a meta module has a state_dict
        return {"calls": self._calls.clone()}

    def set_extra_state(self, state: dict) -> None:
        calls = state["calls"]
        if isinstance(calls, torch.Tensor):
            if not checks.one_integer(calls):
                raise ValueError(f"calls: expected one integer, got a {calls.dtype} tensor of shape "
                                 f"{tuple(calls.shape)}")
            self._calls.copy_(calls.reshape(()))
        else:  # (a state saved before 2026-11-28)
            self.calls = int(calls)


@torch.compiler.disable(recursive=False)
def activation_checkpoint(function, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
    **kwargs)`` whose recomputation also replays the call counters of the
    :class:`CallSeeded` modules (ResBMBoundary): the recomputed forward draws
    the stochastic-rounding seeds of the original one and leaves the counters
    as it found them. (torch's checkpoint restores torch's RNG state, not these
    counters: its recomputation counts as a call and draws the next seeds, so
    with a stochastic forward codec the gradient is taken through another
    payload than the forward's.) The counters are copied on their devices;
    nothing waits for a GPU. torch.compile does not trace it (a graph break:
    torch's checkpoint traced there recomputes with other seeds), so the
    checkpointed function runs as given: pass a compiled one,
    ``activation_checkpoint(torch.compile(block), x)``, to compile it."""
    if "context_fn" in kwargs or kwargs.get("use_reentrant", False):
        raise ValueError("activation_checkpoint is non-reentrant and supplies its own context_fn (the call "
                         "counters' replay); for use_reentrant=True or another context_fn use torch.utils.checkpoint")
    kwargs.pop("use_reentrant", None)
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=_replay_call_counts,
                                             **kwargs)


def _replay_call_counts():
    """(forward context, recomputation context) for torch's checkpoint: the
    first notes every CallSeeded module's count, the second sets them back to
    those counts for the recomputation and restores the current ones after it."""
    at_forward = {}

    @contextlib.contextmanager
    def forward():
        at_forward.update((m, m._calls.clone()) for m in list(_call_seeded))
        yield

    @contextlib.contextmanager
    def recompute():
        now = {m: m._calls.clone() for m in at_forward}
        for m, count in at_forward.items():
            m._calls.copy_(count)
        try:
            yield
        finally:
            for m, count in now.items():
                m._calls.copy_(count)

    return forward(), recompute()


class ResBMBoundary(CallSeeded):
    """Encoder -> wire -> decoder in one process, with the pipeline's exact
    numerics: forward values cross the wire with ``codec``, gradients come
    back with ``grad_codec`` (straight-through estimator).

    Parameters are cast to the activations' dtype (so fp32 master weights work
    with bf16 activations). Under ``torch.autocast`` the linear boundary's
    GEMMs run in the autocast dtype and h keeps x's dtype (see
    :func:`resbm_kernels.ops.boundary`); the MLP variants' layers autocast as
    ``nn.Linear`` does. Stochastic rounding draws a fresh seed each call (see
    :class:`CallSeeded`).

    Args:
        d: model width; k: bottleneck width (must divide d).
        codec: forward (activation) wire codec or its spec (default bf16).
        grad_codec: backward (activation-gradient) codec (default int8 per
            token, stochastic rounding).
        mlp_hidden, norm, eps: as :class:`ResBMEncoder` (the decoder takes
            the same ``mlp_hidden``).
        seed: base of the stochastic-rounding seeds.

    Example::

        boundary = ResBMBoundary(d=512, k=4, codec=INT8)
        h = boundary(x)                      # x: (batch, seq, 512)
        print(boundary.compression_ratio(tokens=x.shape[0] * x.shape[1]))
    """

    def __init__(self, d: int, k: int, *, codec: Codec | str = BF16, grad_codec: Codec | str = GRAD_INT8,
                 mlp_hidden: int | None = None, norm: bool = True, eps: float = 1e-6, seed: int = 0,
                 dtype=None, device=None):
        super().__init__(seed, device)
        self.encoder = ResBMEncoder(d, k, mlp_hidden=mlp_hidden, norm=norm, eps=eps, dtype=dtype, device=device)
        self.decoder = ResBMDecoder(d, k, mlp_hidden=mlp_hidden, dtype=dtype, device=device)
        self.codec, self.grad_codec = Codec.parse(codec), Codec.parse(grad_codec)
        checks.bottleneck(d, k, self.codec, self.grad_codec)

    @property
    def d(self) -> int:
        return self.encoder.d

    @property
    def k(self) -> int:
        return self.encoder.k

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """h (..., d) for activations x (..., d) after the round trip over the
        wire, plus ``residual`` (..., d) when given (added in the decode pass)."""
        lead = x.shape[:-1]
        x2d = _tokens(x, self.d, "ResBMBoundary: input")
        r2d = None if residual is None else _tokens(residual, self.d, "ResBMBoundary: residual")
        seeds = self._seeds()
        if self.encoder.mlp is None and self.decoder.mlp is None:
            h, _ = ops.boundary(
                x2d, _cast(self.encoder.weight, x.dtype), _cast(self.decoder.weight, x.dtype),
                self.codec, self.grad_codec, norm_weight=_cast(self.encoder.norm_weight, x.dtype), residual=r2d,
                eps=self.encoder.eps, **seeds,
            )
        else:
            z = ops.wire_roundtrip(self.encoder.project(x2d), self.codec, self.grad_codec, **seeds)
            h = self.decoder.project(z, r2d)
        return h.reshape(*lead, self.d)

    def wire_bytes(self, tokens: int) -> int:
        """Bytes one forward message of ``tokens`` tokens puts on the wire."""
        return self.codec.payload_bytes(tokens, self.k)

    def compression_ratio(self, tokens: int) -> float:
        """bf16 activations over the forward wire bytes (header included)."""
        return self.codec.compression_ratio(self.d, self.k, tokens)

    def extra_repr(self) -> str:
        return f"codec={self.codec.spec}, grad_codec={self.grad_codec.spec}"
