"""Pipeline configuration: every field documented, combinations validated here."""

from __future__ import annotations

import dataclasses
import math

from .. import checks
from ..codec import BF16, GRAD_INT8, Codec
from .schedule import SCHEDULES


@dataclasses.dataclass
class PipelineConfig:
    """Settings shared by every stage of one pipeline (the handshake checks
    that adjacent stages agree on the wire-relevant ones).

    Attributes:
        d: model width at the stage boundaries.
        k: bottleneck width (divides d); what crosses the wire per token.
        codec: forward (activation) codec, or its string spec.
        grad_codec: backward (activation-gradient) codec.
        micro_batches: micro-batches per optimizer step; the batch given to
            ``step`` is split evenly into this many.
        schedule: ``"1f1b"`` (bounded activation memory) or ``"gpipe"``.
        norm: RMSNorm before the encoder (folded into the encode pass).
        eps: that RMSNorm's epsilon.
        timeout_s: bound on every wait for a peer; a dead or stalled peer
            raises an error naming stage, peer, direction and micro-batch.
        seed: base seed for stochastic rounding (mixed with boundary, step
            and micro-batch, so runs are reproducible).
    """

    d: int
    k: int
    codec: Codec | str = BF16
    grad_codec: Codec | str = GRAD_INT8
    micro_batches: int = 4
    schedule: str = "1f1b"
    norm: bool = True
    eps: float = 1e-6
    timeout_s: float = 120.0
    seed: int = 0

    def __post_init__(self):
        self.codec = Codec.parse(self.codec)
        self.grad_codec = Codec.parse(self.grad_codec)
        checks.bottleneck(self.d, self.k, self.codec, self.grad_codec)
        checks.integer("PipelineConfig: micro_batches", self.micro_batches, 1)
        checks.integer("PipelineConfig: seed", self.seed)
        checks.rms_eps(self.eps)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PipelineConfig: schedule={self.schedule!r} is not one of {sorted(SCHEDULES)}")
        if not 0 < self.timeout_s < math.inf:
            raise ValueError(f"PipelineConfig: timeout_s={self.timeout_s} must be a finite number of seconds > 0")
