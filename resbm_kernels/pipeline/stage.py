"""One pipeline stage and the executor of its schedule.

Stage s runs ``[decoder] -> module -> [encoder]``: the first stage has no
decoder, the last no encoder (it applies ``loss_fn`` instead). Forward
payloads go to stage s+1, activation-gradient payloads come back from it;
both are packed with the configured codecs by the fused ops, so only
compressed bytes cross the network.

Each message is a payload followed by an 8-byte trailer naming its step (or
evaluation), micro-batch and direction; a receiver checks both the payload's
header and the trailer, so a message of the wrong codec, a short one (its
trailer is then what the buffer held before) and a stale or out-of-order one
fail the step with a :class:`PipelineError`. A step that raised leaves receives posted
that cannot be taken back: the stage refuses further steps (restart the
pipeline, e.g. from a checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..codec import HEADER_BYTES, header_bytes, header_tensor
from ..nn import ResBMDecoder, ResBMEncoder
from . import handshake, schedule
from .comm import BACKWARD, FORWARD, CommStats, Peers, PipelineError
from .config import PipelineConfig

TRAILER_BYTES = 8  # one int64 after each payload: step, micro-batch and direction (see _trailer)
TRAILER_TAG = 0x5253_4551 << 32  # "RSEQ": a zeroed or never-written trailer does not match


def message_bytes(codec, tokens: int, k: int) -> int:
    """Bytes of one message on the wire: the payload, padded to 8 bytes, and its trailer."""
    return -(-codec.payload_bytes(tokens, k) // TRAILER_BYTES) * TRAILER_BYTES + TRAILER_BYTES


@dataclasses.dataclass
class StepResult:
    """What :meth:`PipelineStage.step` returns: the mean micro-batch loss on
    the last stage (None elsewhere) and this stage's communication stats."""

    loss: float | None
    comm: CommStats


class PipelineStage(nn.Module):
    """Wraps a user's stage module with the ResBM boundary pieces and runs
    one optimizer step's worth of micro-batches per :meth:`step` (forward
    only, for a validation loss: :meth:`evaluate`).

    Args:
        module: the stage's own layers. The first stage's module takes the
            raw inputs (e.g. token ids); the others take (*micro_batch_shape, d)
            activations. All but the last return (*micro_batch_shape, d).
        config: the pipeline configuration (identical on every stage).
        micro_batch_shape: leading dims of one micro-batch's activations,
            e.g. (batch_per_micro_batch, seq_len).
        loss_fn: last stage only: ``loss_fn(output, targets) -> scalar``.
        group: process group (default: the world); stage s is the s-th rank
            of the group. Several pipelines may share a world (data-parallel
            replicas, each its own group): then every rank of the world
            constructs its stage at the same time (their link groups are
            created collectively).
        device: where activations and parameters live (default: CPU for
            gloo, the current CUDA device for NCCL).
        dtype: activation dtype at the boundaries.

    Construction performs the handshake with the neighbouring stages (a
    collective step: construct every stage at the same time).
    """

    def __init__(self, module: nn.Module, config: PipelineConfig, *, micro_batch_shape: tuple[int, ...],
                 loss_fn: Callable | None = None, group=None, device=None, dtype=torch.float32):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("PipelineStage needs torch.distributed initialised (e.g. launch with torchrun)")
        self.config = config
        self.group = group
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        self.stage, self.num_stages = ranks.index(dist.get_rank()), len(ranks)
        if self.num_stages < 2:
            raise ValueError("a pipeline needs at least 2 stages (world size >= 2)")
        self.is_first, self.is_last = self.stage == 0, self.stage == self.num_stages - 1
        if self.is_last and loss_fn is None:
            raise ValueError("the last stage needs a loss_fn")
        self.loss_fn = loss_fn
        self.device = torch.device(device) if device is not None else _default_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Triton launches and NCCL use the current device
        self.dtype = dtype
        self.micro_batch_shape = tuple(micro_batch_shape)
        self.tokens = math.prod(self.micro_batch_shape)
        d, k = config.d, config.k

        self.module = module.to(self.device)
        self.decoder = None if self.is_first else ResBMDecoder(d, k, device=self.device)
        self.encoder = None if self.is_last else ResBMEncoder(d, k, norm=config.norm, eps=config.eps, device=self.device)
        self.plan = schedule.build(config.schedule, self.num_stages, config.micro_batches)[self.stage]
        self.peers = Peers(self.stage, ranks, config.timeout_s, self.device)
        self.steps_done = 0
        self.evaluations_done = 0
        self._round = 0  # what trailers and seeds count: steps_done, or ~evaluations_done in evaluate()
        self._broken: str | None = None  # why a step failed (see step())

        m = config.micro_batches
        # one receive and one send buffer per micro-batch and direction, reused every step
        self._fwd_buffers = [] if self.is_first else [self._payload_buffer(config.codec) for _ in range(m)]
        self._bwd_buffers = [] if self.is_last else [self._payload_buffer(config.grad_codec) for _ in range(m)]
        self._fwd_send = [] if self.is_last else [self._payload_buffer(config.codec) for _ in range(m)]
        self._bwd_send = [] if self.is_first else [self._payload_buffer(config.grad_codec) for _ in range(m)]
        self._payload_bytes = {FORWARD: config.codec.payload_bytes(self.tokens, k),
                               BACKWARD: config.grad_codec.payload_bytes(self.tokens, k)}
        self._expected_headers = {
            FORWARD: self._header(config.codec), BACKWARD: self._header(config.grad_codec)}
        self._header_checks: list = []
        self._bad: dict = {}  # (direction, micro-batch) -> device bool: that received header was wrong
        self._defer_checks = self.device.type != "cpu"  # see _received
        self._warmed: set[str] = set()  # "step", "evaluate": run once in this process (see _run)
        self._handshake()

    # ---- set-up ---------------------------------------------------------------

    def _payload_buffer(self, codec) -> torch.Tensor:
        """A message buffer: the payload, then (8-byte aligned) its trailer."""
        return torch.empty(message_bytes(codec, self.tokens, self.config.k), dtype=torch.uint8, device=self.device)

    def _trailer(self, direction: str, micro_batch: int) -> int:
        """The trailer of this step's (or evaluation's) message for ``micro_batch`` in ``direction``."""
        return TRAILER_TAG ^ (((self._round << 20) + micro_batch) * 2 + (direction == BACKWARD))

    def _header(self, codec) -> torch.Tensor:
        return header_tensor(header_bytes(codec, self.tokens, self.config.k), self.device)

    def _handshake(self) -> None:
        """Exchange descriptors with the neighbours (this also opens every
        link's groups, see :meth:`Peers.exchange`)."""
        mine = handshake.descriptor(self.config, self.num_stages, self.micro_batch_shape).to(self.device)
        for peer, theirs in self.peers.exchange(mine).items():
            handshake.compare(mine.cpu(), theirs.cpu(), stage=self.stage, peer=peer)

    # ---- one optimizer step --------------------------------------------------

    def step(self, inputs=None, targets=None) -> StepResult:
        """Run forward and backward of every micro-batch; gradients accumulate
        into ``.grad`` (call your optimizer afterwards). The first stage needs
        ``inputs``, the last ``targets``, each a tensor whose first dim splits
        evenly into ``config.micro_batches``."""
        loss = self._run("step", self.plan, inputs, targets, self.steps_done)
        self.steps_done += 1
        return StepResult(loss=loss, comm=self.peers.take_stats())

    @torch.no_grad()
    def evaluate(self, inputs=None, targets=None) -> StepResult:
        """Forward only, without gradients (a validation loss): every
        micro-batch through the pipeline, nothing sent back, no ``.grad``
        touched; inputs and targets as for :meth:`step`. Like a step, every
        stage calls it at the same time. Training's stochastic-rounding seeds
        do not depend on evaluations, so a run's steps are the same with or
        without them."""
        forwards = [schedule.Action("F", i) for i in range(self.config.micro_batches)]
        loss = self._run("evaluate", forwards, inputs, targets, ~self.evaluations_done)
        self.evaluations_done += 1
        return StepResult(loss=loss, comm=self.peers.take_stats())

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of every stage together, by their total norm over
        the whole pipeline, as ``torch.nn.utils.clip_grad_norm_`` would clip the
        model's in one process; returns that norm, a float64 scalar tensor on
        the stage's device (as torch's returns a tensor). Every stage calls it
        (after :meth:`step`, before its optimizer); the stages combine their
        norms over the pipeline's links, each wait bounded by ``timeout_s``."""
        if not 0 <= max_norm < math.inf:
            raise ValueError(f"clip_grad_norm_: max_norm={max_norm} must be a finite number >= 0")
        if not norm_type > 0:
            raise ValueError(f"clip_grad_norm_: norm_type={norm_type} must be > 0 (or inf)")
        params = [p for p in self.parameters() if p.grad is not None]
        local = torch.zeros(1, dtype=torch.float64, device=self.device)
        if params:
            local += torch.nn.utils.get_total_norm([p.grad for p in params], norm_type).to(self.device)
        what = "clip_grad_norm_'s total norm (did every stage call it?)"
        if math.isinf(norm_type):
            total = self.peers.reduce(local, torch.maximum, what)
        else:
            total = self.peers.reduce(local ** norm_type, torch.add, what) ** (1 / norm_type)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total[0])
        return total[0]

    def _round_name(self) -> str:
        return f"step {self._round}" if self._round >= 0 else f"evaluation {~self._round}"

    def _run(self, mode: str, plan, inputs, targets, round_: int) -> float | None:
        """Run ``plan``'s actions; the mean micro-batch loss on the last stage."""
        if self._broken:
            raise PipelineError(f"stage {self.stage}: a step failed ({self._broken}); the receives it posted "
                                "cannot be taken back, so this stage takes no more steps: restart the pipeline "
                                "(e.g. from a checkpoint)")
        in_chunks = self._split("inputs", inputs, self.is_first)
        tgt_chunks = self._split("targets", targets, self.is_last)
        self._round = round_
        # Receives are posted at the start so they overlap compute -- except the first
        # time in this process (per mode): on a GPU, first calls may synchronise the
        # device (Triton autotuning, lazy module loading), which would wait forever for
        # a posted receive whose sender waits for us. Then each is posted when needed.
        ahead = mode in self._warmed
        backward = any(action.kind == "B" for action in plan)
        fwd_pending = [self._post(b, FORWARD, i, ahead) for i, b in enumerate(self._fwd_buffers)]
        bwd_pending = [self._post(b, BACKWARD, i, ahead) for i, b in enumerate(self._bwd_buffers)] if backward else []
        saved: dict[int, dict] = {}
        losses = []
        try:
            for action in plan:
                i = action.micro_batch
                if action.kind == "F":
                    state = self._forward(i, in_chunks[i] if self.is_first else None,
                                          None if self.is_first else fwd_pending[i],
                                          tgt_chunks[i] if self.is_last else None)
                    if self.is_last:
                        losses.append(state["loss"].detach())
                    if backward:
                        saved[i] = state
                else:
                    self._backward(i, saved.pop(i), None if self.is_last else bwd_pending[i])
            self.peers.flush()
        except Exception as e:
            self._bad.clear()
            self._broken = f"{type(e).__name__}: {e}"
            self._check_headers()  # a corrupt payload is the better explanation of a failure
            raise
        try:
            self._check_headers()
        except PipelineError as e:
            self._broken = str(e)
            raise
        self._bad.clear()
        self._warmed.add(mode)
        return torch.stack(losses).sum().item() if self.is_last else None  # each is already / m

    def _split(self, name, tensor, needed):
        if not needed:
            return None
        if tensor is None:
            raise ValueError(f"stage {self.stage}: step() needs {name}")
        m = self.config.micro_batches
        if tensor.shape[0] % m:
            raise ValueError(f"stage {self.stage}: {name} batch {tensor.shape[0]} does not split into {m} micro-batches")
        return tensor.to(self.device).chunk(m)

    def _seed(self, micro_batch: int, backward: bool) -> int:
        c = self.config
        mixed = ((c.seed * 1_000_003 + self.stage) * 1_000_003 + self._round) * 1_000_003 + micro_batch
        return (mixed * 2 + int(backward)) % 2**62

    def _post(self, buffer, direction, micro_batch, now: bool):
        """A posted receive, or (``now`` false) the arguments to post it with later."""
        return self.peers.recv(buffer, direction, micro_batch) if now else (buffer, direction, micro_batch)

    def _received(self, pending, direction, micro_batch) -> torch.Tensor:
        """Wait for a payload and check its header. On CUDA the check is
        deferred to the end of the step (one sync per step instead of one per
        message): a bad payload decodes to wrong numbers, never out of bounds,
        and every payload sent on from it gets a zeroed header (see
        :meth:`_send`), so the neighbours fail the same step too and no stage
        steps its optimizer on corrupted data."""
        if isinstance(pending, tuple):
            pending = self.peers.recv(*pending)
        message = self.peers.wait(pending)
        payload, trailer = self._split_message(message, direction)
        bad_header = (payload[:HEADER_BYTES] != self._expected_headers[direction]).any()
        bad = bad_header | (trailer != self._trailer(direction, micro_batch))
        self._bad[(direction, micro_batch)] = bad
        self._header_checks.append((direction, micro_batch, message, bad_header, bad))
        if not self._defer_checks:
            self._check_headers()
        return payload

    def _split_message(self, message, direction):
        """(payload view, trailer as a 1-element int64 view) of a message buffer."""
        n = self._payload_bytes[direction]
        return message[:n], message[-TRAILER_BYTES:].view(torch.int64)

    def _send(self, message, direction, micro_batch, *tainted) -> None:
        """Send ``message`` (its payload written) with its trailer, the payload's
        header zeroed if any received message it was computed from
        (``tainted``: (direction, micro-batch) keys) was bad."""
        payload, trailer = self._split_message(message, direction)
        trailer.fill_(self._trailer(direction, micro_batch))  # (a kernel argument on a GPU: no copy, no sync)
        flags = [self._bad[key] for key in tainted if key in self._bad]
        if flags:
            payload[:HEADER_BYTES].masked_fill_(torch.stack(flags).any(), 0)  # no host sync
        self.peers.send(message, direction, micro_batch)

    def _check_headers(self) -> None:
        """Raise for the first received message whose header or trailer was wrong."""
        checks, self._header_checks = self._header_checks, []
        if not checks or not torch.stack([bad for *_, bad in checks]).any().item():  # one sync
            return
        for direction, micro_batch, message, bad_header, bad in checks:
            if not bad.item():
                continue
            payload, trailer = self._split_message(message, direction)
            what = f"stage {self.stage}: {direction} %s for micro-batch {micro_batch}"
            if bad_header.item():
                expected = self._expected_headers[direction]
                raise PipelineError(
                    f"{what % 'payload'} has an unexpected header {payload[:HEADER_BYTES].tolist()} (expected "
                    f"{expected.tolist()}): corrupted, produced with another codec, or (all zero) computed from "
                    "a corrupt payload upstream")
            raise PipelineError(
                f"{what % 'message'} of {self._round_name()} has the trailer {int(trailer.item()):#x}, expected "
                f"{self._trailer(direction, micro_batch):#x}: shorter than its codec's payload (the trailer is "
                "what the buffer held), or sent for another step, evaluation or micro-batch (the stages are out "
                "of step)")

    def _forward(self, i, inputs, pending, targets) -> dict:
        c, state = self.config, {}
        if self.is_first:
            x = inputs
        else:
            payload = self._received(pending, FORWARD, i)
            h = ops.decode(payload, self.decoder.weight.detach().to(self.dtype), c.codec, self.tokens,
                           out_dtype=self.dtype)
            x = h.view(*self.micro_batch_shape, c.d).requires_grad_()
            state.update(payload=payload, h=x)
        out = self.module(x)
        if self.is_last:
            state["loss"] = self.loss_fn(out, targets) / c.micro_batches
            return state
        if tuple(out.shape) != self.micro_batch_shape + (c.d,):
            raise ValueError(f"stage {self.stage}: module returned shape {tuple(out.shape)}, "
                             f"expected {self.micro_batch_shape + (c.d,)}")
        x2d = out.reshape(self.tokens, c.d).to(self.dtype)
        enc = self.encoder
        gamma = None if enc.norm_weight is None else enc.norm_weight.detach().to(self.dtype)
        # with RMSNorm the encoder keeps its row statistics for a backward: it then reads x once less
        stats = gamma is not None and torch.is_grad_enabled()
        message = self._fwd_send[i]
        encoded = ops.encode(x2d.detach().contiguous(), enc.weight.detach().to(self.dtype), c.codec,
                             norm_weight=gamma, eps=c.eps, seed=self._seed(i, backward=False),
                             out=self._split_message(message, FORWARD)[0], return_row_stats=stats)
        row_stats = encoded[1] if stats else None
        self._send(message, FORWARD, i, (FORWARD, i))
        state.update(x2d=x2d, gamma=gamma, row_stats=row_stats)
        return state

    def _backward(self, i, state, pending) -> None:
        c = self.config
        if self.is_last:
            state["loss"].backward()
        else:
            grad_payload = self._received(pending, BACKWARD, i)
            enc, x2d = self.encoder, state["x2d"]
            grad_x, grad_w, grad_gamma = ops.encode_backward(
                grad_payload, x2d.detach().contiguous(), enc.weight.detach().to(self.dtype), c.grad_codec,
                norm_weight=state["gamma"], eps=c.eps, row_stats=state["row_stats"])
            _accumulate(enc.weight, grad_w)
            if grad_gamma is not None:
                _accumulate(enc.norm_weight, grad_gamma)
            if x2d.requires_grad:
                x2d.backward(grad_x)
        if not self.is_first:
            h = state["h"]
            grad_h = h.grad if h.grad is not None else torch.zeros_like(h)
            message = self._bwd_send[i]
            _, grad_w_d = ops.decode_backward(
                grad_h.reshape(self.tokens, c.d).contiguous(), state["payload"],
                self.decoder.weight.detach().to(self.dtype), c.codec, c.grad_codec,
                grad_seed=self._seed(i, backward=True), out=self._split_message(message, BACKWARD)[0])
            _accumulate(self.decoder.weight, grad_w_d)
            self._send(message, BACKWARD, i, (FORWARD, i), (BACKWARD, i))


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.add_(grad)


def _default_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
