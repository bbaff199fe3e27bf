"""Per-stage checkpoints, written atomically, resumed from the last step
that every stage completed.

Layout: ``<dir>/step-<N>/stage-<s>.pt``. A file is written to a temporary
name, flushed to disk and renamed, so a stage killed mid-write leaves no
partial file. Each stage keeps its newest ``keep`` (at least 2: a stage may
be one checkpoint ahead of the others when one dies) checkpoints up to the
step it saves, and removes its checkpoints of later steps (left by a run that
resumed from an earlier one). On resume the stages agree (by all-reduce,
within the pipeline's ``timeout_s``) on the newest step all of them have.
Each file records the pipeline's handshake descriptor (stages, d, k, codecs,
micro-batches, schedule, shapes); resuming with another raises.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import re
import shutil
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from . import handshake
from .comm import PipelineError

if TYPE_CHECKING:
    from .stage import PipelineStage

_STEP = re.compile(r"step-(\d+)$")


def _stage_file(directory, step: int, stage: int) -> pathlib.Path:
    return pathlib.Path(directory) / f"step-{step:08d}" / f"stage-{stage}.pt"


def _local_steps(directory, stage: int) -> list[int]:
    root = pathlib.Path(directory)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP.match(p.name))]
    return sorted(s for s in steps if _stage_file(directory, s, stage).is_file())


def _descriptor(pipeline_stage: PipelineStage) -> list[int]:
    return handshake.descriptor(pipeline_stage.config, pipeline_stage.num_stages,
                                pipeline_stage.micro_batch_shape).tolist()


def save(directory: str | os.PathLike, pipeline_stage: PipelineStage, optimizer: torch.optim.Optimizer, *,
         extra: dict | None = None, keep: int = 2) -> pathlib.Path:
    """Write this stage's model, optimizer, step counter, RNG state and
    ``extra`` (e.g. a data sampler's state) for the steps done so far,
    keeping this stage's newest ``keep`` (>= 2) checkpoints up to this step."""
    if keep < 2:
        raise ValueError(f"checkpoint.save: keep={keep} must be at least 2 (a stage may be a checkpoint ahead "
                         "of another when one dies, and the stages resume from a step they all have)")
    step, stage = pipeline_stage.steps_done, pipeline_stage.stage
    path = _stage_file(directory, step, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "pipeline": _descriptor(pipeline_stage),
        "model": pipeline_stage.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    steps = _local_steps(directory, stage)
    for old in [s for s in steps if s > step] + [s for s in steps if s <= step][:-keep]:
        _stage_file(directory, old, stage).unlink(missing_ok=True)
        try:
            _stage_file(directory, old, stage).parent.rmdir()
        except OSError:
            pass  # other stages' files are still there
    return path


def load_latest(directory: str | os.PathLike, pipeline_stage: PipelineStage, optimizer: torch.optim.Optimizer,
                group: dist.ProcessGroup | None = None) -> dict | None:
    """Restore the newest step that every stage of the group (by default the
    stage's own) has; returns its ``extra`` dict, or None (and changes
    nothing) when there is none. Every stage of the group must call it; the
    agreement waits at most the pipeline's ``timeout_s`` for them."""
    group = pipeline_stage.group if group is None else group
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    steps = _local_steps(directory, pipeline_stage.stage)
    device = pipeline_stage.device
    try:
        # (only the group's ranks take part: several pipelines may resume side by side)
        agree = dist.new_group(ranks, timeout=datetime.timedelta(seconds=pipeline_stage.config.timeout_s),
                               use_local_synchronization=True)
        while True:
            newest = torch.tensor([steps[-1] if steps else -1], device=device)
            dist.all_reduce(newest, op=dist.ReduceOp.MIN, group=agree)
            candidate = int(newest.item())
            if candidate < 0:
                return None
            have = torch.tensor([int(candidate in steps)], device=device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN, group=agree)
            if have.item():
                break
            steps = [s for s in steps if s < candidate]
    except Exception as e:
        raise PipelineError(f"stage {pipeline_stage.stage}: checkpoint.load_latest: the stages did not agree on a "
                            f"step within {pipeline_stage.config.timeout_s:.1f} s (did every stage call it?): "
                            f"{e}") from e
    path = _stage_file(directory, candidate, pipeline_stage.stage)
    # on the CPU: RNG states must stay CPU byte tensors; load_state_dict moves the rest
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_pipeline(path, state.get("pipeline"), _descriptor(pipeline_stage))
    pipeline_stage.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    pipeline_stage.steps_done = state["step"]
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["extra"]


def _check_pipeline(path, saved, mine: list[int]) -> None:
    """Raise naming the first field where the checkpoint's pipeline differs from this one."""
    if saved is None or len(saved) != len(mine):
        raise ValueError(f"checkpoint {path}: written without this version's pipeline descriptor; "
                         "it cannot be checked against this pipeline")
    for name, theirs, ours in zip(handshake.FIELDS, saved, mine):
        if theirs != ours:
            raise ValueError(f"checkpoint {path}: written by a pipeline with {name}={theirs}, "
                             f"this one has {name}={ours}; resume with the configuration that wrote it")


def clear(directory) -> None:
    """Remove a checkpoint directory (e.g. to start a study over)."""
    shutil.rmtree(directory, ignore_errors=True)
