"""Thin pipeline-parallel runtime: stages over torch.distributed point-to-point
(NCCL on GPU, gloo on CPU) whose boundaries are ResBM boundaries, so only
compressed activations and activation gradients cross the network.

    stage = PipelineStage(my_layers, PipelineConfig(d=512, k=4, codec=INT8),
                          micro_batch_shape=(4, 256), loss_fn=...)
    result = stage.step(inputs, targets)   # then optimizer.step()
    loss = stage.evaluate(inputs, targets).loss   # forward only (last stage)
"""

from . import checkpoint, schedule
from .comm import CommStats, PipelineError
from .config import PipelineConfig
from .stage import PipelineStage, StepResult

__all__ = ["PipelineConfig", "PipelineStage", "StepResult", "CommStats", "PipelineError", "checkpoint", "schedule"]
