"""Per-stage checkpoints, written atomically, resumed from the last step
that every stage completed.

Layout: ``<dir>/step-<N>/stage-<s>.pt``. A file is written to a temporary
name, flushed to disk and renamed, so a stage killed mid-write leaves no
partial file. Each stage keeps its newest ``keep`` (at least 2: a stage may
be one checkpoint ahead of the others when one dies) checkpoints up to the
step it saves, and removes its checkpoints of later steps (left by a run that
resumed from an earlier one). On resume the stages agree (by all-reduce,
over the pipeline's links, within its ``timeout_s``) on the newest step all
of them have.
Each file records the fields of the pipeline's handshake descriptor (stages, d, k, codecs,
micro-batches, schedule, shapes); resuming with another raises. Pipelines side
by side (data-parallel replicas) each take a directory of their own: the
files are named by stage, not by rank.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from typing import TYPE_CHECKING

import torch

from . import handshake

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
    return handshake.fields(pipeline_stage.config, pipeline_stage.num_stages, pipeline_stage.micro_batch_shape)


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


def load_latest(directory: str | os.PathLike, pipeline_stage: PipelineStage,
                optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore the newest step that every stage of the pipeline has; returns
    its ``extra`` dict, or None (and changes nothing) when there is none.
    Every stage must call it (between steps); the stages agree over the
    pipeline's own links, each wait bounded by ``timeout_s``."""
    steps = _local_steps(directory, pipeline_stage.stage)
    agree = pipeline_stage.peers.agree_min
    what = "checkpoint.load_latest's agreement (did every stage call it?)"
    while True:
        candidate = agree(steps[-1] if steps else -1, pipeline_stage.device, what)
        if candidate < 0:
            return None
        if agree(int(candidate in steps), pipeline_stage.device, what):
            break
        steps = [s for s in steps if s < candidate]
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
