"""Reference models for studies and examples (not needed by the kernels)."""

from .gpt import GPT, GPTConfig, GPTStage, ResBMGPT, layer_split, muon_param_groups, stage_modules

__all__ = ["GPT", "GPTConfig", "GPTStage", "ResBMGPT", "layer_split", "muon_param_groups", "stage_modules"]
