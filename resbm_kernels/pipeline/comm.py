"""Point-to-point messages between adjacent stages over ``torch.distributed``.

Every message is posted asynchronously (``isend``/``irecv``) and waited on
with a deadline, so a dead or stalled peer becomes a :class:`PipelineError`
naming the stage, peer, direction and micro-batch instead of a hang.

Every link (boundary between stage b and b+1) and direction has its own
two-rank process group. NCCL runs the point-to-point operations of one
communicator in order on one stream, so a receive posted early in one
direction would otherwise block sends queued behind it in the other (and,
on a middle stage, sends to the next stage behind receives from the
previous one); with one group per link and direction each group carries
traffic one way between two ranks and receives can be posted ahead. Creating
a group is collective over the whole world: with several pipelines side by
side every rank creates every pipeline's groups, in one order, after the
ranks have gathered which pipeline each belongs to. On CUDA
the messages are issued from a dedicated communication stream ordered with
the compute stream, so compute of the next micro-batch runs while this one
is on the wire.

NCCL creates a communicator (and its connections) lazily, at the first
message, and both ranks must take part; :meth:`Peers.exchange` sends one
message per group in its direction, link by link in ascending order, before
any receive is posted ahead (the start-up handshake uses it).
"""

from __future__ import annotations

import dataclasses
import datetime
import time

import torch
import torch.distributed as dist

FORWARD, BACKWARD = "forward activations", "backward gradients"


class PipelineError(RuntimeError):
    """A pipeline peer failed, stalled or sent something invalid."""


@dataclasses.dataclass
class CommStats:
    """Per-step communication accounting of one stage.

    ``blocked_s`` is the host time spent waiting for messages (receives and
    the end-of-step wait for sends); ``overlap`` is the fraction of the
    receives' time in flight that was hidden behind compute:
    1 - recv_blocked / in_flight (1.0 when nothing was received; about 0 in
    a process's first step, whose receives are posted only when needed, see
    :meth:`PipelineStage.step <resbm_kernels.pipeline.PipelineStage.step>`).
    Bytes count whole messages (payloads and their trailers).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    blocked_s: float = 0.0
    recv_blocked_s: float = 0.0
    in_flight_s: float = 0.0

    @property
    def overlap(self) -> float:
        return 1.0 - self.recv_blocked_s / self.in_flight_s if self.in_flight_s > 0 else 1.0


class _Pending:
    def __init__(self, work, tensor, what: str, posted: float):
        self.work, self.tensor, self.what, self.posted = work, tensor, what, posted


class Peers:
    """Messages to and from the previous and next stage of ``stage``."""

    def __init__(self, stage: int, ranks: list[int], timeout_s: float, device: torch.device):
        self.stage, self.ranks, self.timeout_s = stage, ranks, timeout_s
        self._poll = dist.get_backend() == "nccl"  # see _complete
        # gloo: a stage that never arrives fails group creation after timeout_s; NCCL keeps
        # its default, which also bounds every operation from its posting (see _complete)
        limit = {} if self._poll else {"timeout": datetime.timedelta(seconds=timeout_s)}
        self.groups = {}
        try:
            # collective over the whole world: every rank creates every pipeline's groups, in
            # one order (pipelines as gathered, links in order, forward then backward)
            for pipeline in self._pipelines(ranks, device):
                for link in range(len(pipeline) - 1):
                    for direction in (FORWARD, BACKWARD):
                        group = dist.new_group([pipeline[link], pipeline[link + 1]], **limit)
                        if pipeline == ranks:
                            self.groups[(link, direction)] = group
        except PipelineError:
            raise
        except Exception as e:
            raise PipelineError(f"stage {stage}: creating the pipeline's process groups failed (did every stage "
                                f"start?): {e}") from e
        self.stats = CommStats()
        self._sends: list[_Pending] = []
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _pipelines(self, ranks: list[int], device) -> list[list[int]]:
        """Every pipeline of the world (its ranks, stage order), the same list on
        every rank: this one alone when it spans the world; else gathered from
        every rank (pipelines side by side, e.g. data-parallel replicas), each
        rank's report checked."""
        world = dist.get_world_size()
        if len(ranks) == world:
            return [ranks]
        mine = torch.full((world,), -1, dtype=torch.int64)
        mine[: len(ranks)] = torch.tensor(ranks)
        reports = [torch.empty(world, dtype=torch.int64, device=device) for _ in range(world)]
        work = dist.all_gather(reports, mine.to(device), async_op=True)
        what = (f"stage {self.stage}: gathering the pipelines of every rank (with several pipelines every rank of "
                "the world starts its stage at the same time)")
        self._complete(_Pending(work, mine, what, time.perf_counter()), time.perf_counter())
        pipelines: list[list[int]] = []
        for rank, report in enumerate(torch.stack(reports).cpu().tolist()):
            pipeline = [r for r in report if r >= 0]
            if (rank not in pipeline or len(set(pipeline)) != len(pipeline) or max(pipeline) >= world
                    or report[len(pipeline):] != [-1] * (world - len(pipeline))
                    or any(set(pipeline) & set(p) and pipeline != p for p in pipelines)):
                raise PipelineError(f"stage {self.stage}: rank {rank} reported the pipeline {pipeline}, which does "
                                    f"not hold it or overlaps another ({pipelines})")
            if pipeline not in pipelines:
                pipelines.append(pipeline)
        return pipelines

    def _peer(self, direction: str, outgoing: bool) -> int:
        toward_next = (direction == FORWARD) == outgoing
        return self.stage + 1 if toward_next else self.stage - 1

    def _describe(self, verb: str, direction: str, micro_batch: int, peer: int) -> str:
        prep = "to" if verb == "send" else "from"
        what = f"{direction} for micro-batch {micro_batch}" if micro_batch >= 0 else "the start-up handshake"
        return (f"stage {self.stage}: {verb} of {what} "
                f"{prep} stage {peer} (rank {self.ranks[peer]})")

    def exchange(self, mine: torch.Tensor) -> dict[int, torch.Tensor]:
        """Send ``mine`` to both neighbours and receive theirs (same shape and
        dtype), one message per link and direction, in the groups' directions,
        links in ascending order; returns {neighbour stage: its tensor}."""
        theirs = {}
        for peer in sorted(p for p in (self.stage - 1, self.stage + 1) if 0 <= p < len(self.ranks)):
            for direction in (FORWARD, BACKWARD):
                if peer == self._peer(direction, outgoing=True):
                    self._send_now(mine, direction, peer, self._describe("send", direction, -1, peer))
                else:
                    theirs[peer] = self._receive_now(torch.empty_like(mine), direction, peer,
                                                     self._describe("receive", direction, -1, peer))
        self.stats = CommStats()
        return theirs

    def reduce(self, value: torch.Tensor, combine, what: str) -> torch.Tensor:
        """``combine`` (e.g. ``torch.minimum``, ``torch.add``) folded over every
        stage's ``value`` (same shape and dtype on every stage): passed down the
        pipeline and back, one message per link and direction, every wait
        bounded by the timeout; ``what`` names the reduction in errors."""
        mine = value
        prev, next_ = self.stage - 1, self.stage + 1
        sending = f"stage {self.stage}: send of {what} to stage %d"
        receiving = f"stage {self.stage}: receive of {what} from stage %d"
        if prev >= 0:
            mine = combine(mine, self._receive_now(torch.empty_like(mine), FORWARD, prev, receiving % prev))
        if next_ < len(self.ranks):
            self._send_now(mine, FORWARD, next_, sending % next_)
            mine = self._receive_now(torch.empty_like(mine), BACKWARD, next_, receiving % next_)
        if prev >= 0:
            self._send_now(mine, BACKWARD, prev, sending % prev)
        self.stats = CommStats()
        return mine

    def agree_min(self, value: int, device, what: str) -> int:
        """The smallest ``value`` of all stages (see :meth:`reduce`)."""
        return int(self.reduce(torch.tensor([value], dtype=torch.int64, device=device), torch.minimum, what).item())

    def _send_now(self, tensor: torch.Tensor, direction: str, peer: int, what: str) -> None:
        """Send and wait for it (bounded by the timeout); ``what`` names it in errors."""
        self._sends.append(self._post(dist.isend, tensor, peer, direction, what))
        self.flush()

    def _receive_now(self, buffer: torch.Tensor, direction: str, peer: int, what: str) -> torch.Tensor:
        """Receive into ``buffer`` and wait for it (bounded by the timeout); returns it."""
        self._complete(self._post(dist.irecv, buffer, peer, direction, what), time.perf_counter())
        return buffer

    def _post(self, op, tensor: torch.Tensor, peer: int, direction: str, what: str) -> _Pending:
        """Post ``op`` (isend / irecv), as a PipelineError naming ``what`` if that fails."""
        try:
            work = self._issue(op, tensor, peer, direction)
        except Exception as e:  # a broken connection can fail at post time
            raise PipelineError(f"{what} failed: {e}") from e
        return _Pending(work, tensor, what, time.perf_counter())

    def _issue(self, op, tensor: torch.Tensor, peer: int, direction: str):
        group = self.groups[(min(self.stage, peer), direction)]
        if self._stream is None:
            return op(tensor, self.ranks[peer], group=group)
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self._stream):
            tensor.record_stream(self._stream)
            return op(tensor, self.ranks[peer], group=group)

    def send(self, tensor: torch.Tensor, direction: str, micro_batch: int) -> None:
        """Post a send; it completes in the background (see :meth:`flush`)."""
        peer = self._peer(direction, outgoing=True)
        self._sends.append(self._post(dist.isend, tensor, peer, direction,
                                      self._describe("send", direction, micro_batch, peer)))
        self.stats.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, buffer: torch.Tensor, direction: str, micro_batch: int) -> _Pending:
        """Post a receive into ``buffer``; :meth:`wait` it before use."""
        peer = self._peer(direction, outgoing=False)
        return self._post(dist.irecv, buffer, peer, direction, self._describe("receive", direction, micro_batch, peer))

    def wait(self, pending: _Pending) -> torch.Tensor:
        """Block until a receive lands (bounded by the timeout); returns its buffer."""
        start = time.perf_counter()
        self._complete(pending, start)
        end = time.perf_counter()
        self.stats.blocked_s += end - start
        self.stats.recv_blocked_s += end - start
        self.stats.in_flight_s += end - pending.posted
        self.stats.bytes_received += pending.tensor.numel() * pending.tensor.element_size()
        return pending.tensor

    def flush(self) -> None:
        """Wait for every posted send (end of step, before buffers are reused)."""
        start = time.perf_counter()
        for pending in self._sends:
            self._complete(pending, start)
        self._sends.clear()
        self.stats.blocked_s += time.perf_counter() - start

    def take_stats(self) -> CommStats:
        stats, self.stats = self.stats, CommStats()
        return stats

    def _complete(self, pending: _Pending, start: float) -> None:
        remaining = max(self.timeout_s - (time.perf_counter() - start), 1e-3)
        try:
            if self._poll:
                # NCCL: a wait's timeout counts from when the operation was posted, so
                # poll against our own deadline, then wait (orders the current stream)
                while not pending.work.is_completed():
                    if time.perf_counter() - start >= self.timeout_s:
                        raise TimeoutError(f"not completed after {self.timeout_s:.1f} s")
                    time.sleep(1e-4)
                pending.work.wait()
            # gloo: wait(timeout) blocks the host up to the deadline (is_completed()
            # never turns true for gloo p2p before wait)
            elif pending.work.wait(timeout=datetime.timedelta(seconds=remaining)) is False:
                raise TimeoutError("wait returned False")
        except Exception as e:
            timed_out = time.perf_counter() - start >= self.timeout_s * 0.99 or "imeout" in str(e)
            reason = (f"timed out after {self.timeout_s:.1f} s (the peer died or stalled)" if timed_out
                      else "failed (the peer died or broke the connection)")
            raise PipelineError(f"{pending.what} {reason}: {e}") from e
