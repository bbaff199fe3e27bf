"""Start-up handshake: adjacent stages exchange a fixed-size int64
descriptor of everything the wire depends on and refuse to train on a
mismatch. Only integers cross; nothing received is unpickled or executed.

The descriptor's size is fixed (DESCRIPTOR_LEN values, the slots past FIELDS
zero): a field added later takes a reserved slot, so a peer of another
version differs in a named slot instead of in size. A message larger than
the buffer posted for it is not an error gloo can report: it aborts the
receiving process ("Received data size doesn't match expected size")."""

from __future__ import annotations

import torch

from ..codec import SCALE_DTYPES, WIRE_VERSION, Codec
from .config import PipelineConfig
from .schedule import SCHEDULES

MAGIC = 0x5245_5342_4D50_4950  # "RESBMPIP"
MAX_DIMS = 4
DESCRIPTOR_LEN = 32  # int64 values on the wire, whatever the version
FIELDS = (
    "magic", "wire_version", "num_stages", "d", "k",
    "codec_bits", "codec_group", "codec_scale_dtype",
    "grad_codec_bits", "grad_codec_group", "grad_codec_scale_dtype",
    "micro_batches", "schedule", "micro_batch_ndim",
) + tuple(f"micro_batch_dim{i}" for i in range(MAX_DIMS))
SLOTS = FIELDS + tuple(f"reserved slot {i}" for i in range(len(FIELDS), DESCRIPTOR_LEN))


def _codec_fields(codec: Codec, k: int) -> list[int]:
    return [codec.bits, codec.group(k) if codec.quantized else 0, SCALE_DTYPES[codec.scale_dtype] if codec.quantized else 0]


def fields(config: PipelineConfig, num_stages: int, micro_batch_shape: tuple[int, ...]) -> list[int]:
    """This stage's values of FIELDS (what a checkpoint records)."""
    if not 1 <= len(micro_batch_shape) <= MAX_DIMS:
        raise ValueError(f"micro_batch_shape {micro_batch_shape} must have 1..{MAX_DIMS} leading dims")
    dims = list(micro_batch_shape) + [0] * (MAX_DIMS - len(micro_batch_shape))
    return (
        [MAGIC, WIRE_VERSION, num_stages, config.d, config.k]
        + _codec_fields(config.codec, config.k)
        + _codec_fields(config.grad_codec, config.k)
        + [config.micro_batches, sorted(SCHEDULES).index(config.schedule), len(micro_batch_shape)]
        + dims
    )


def descriptor(config: PipelineConfig, num_stages: int, micro_batch_shape: tuple[int, ...]) -> torch.Tensor:
    """This stage's descriptor: an int64 tensor of ``DESCRIPTOR_LEN`` values,
    its FIELDS first, then zeros."""
    values = fields(config, num_stages, micro_batch_shape)
    return torch.tensor(values + [0] * (DESCRIPTOR_LEN - len(values)), dtype=torch.int64)


def compare(mine: torch.Tensor, theirs: torch.Tensor, *, stage: int, peer: int) -> None:
    """Raise ``ValueError`` naming the first field where the peer differs."""
    if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
        raise ValueError(f"handshake: stage {stage} got a malformed descriptor from stage {peer}")
    for name, a, b in zip(SLOTS, mine.tolist(), theirs.tolist()):
        if a != b and name not in FIELDS:
            raise ValueError(
                f"handshake: stage {peer} sets descriptor {name} to {b}, which stage {stage}'s version of "
                "resbm_kernels does not know; run every stage with the same version"
            )
        if a != b:
            if name == "schedule":  # (its index among the names)
                a, b = (sorted(SCHEDULES)[v] if 0 <= v < len(SCHEDULES) else v for v in (a, b))
            what = "is not a resbm pipeline peer (bad magic)" if name == "magic" else f"has {name}={b}"
            raise ValueError(
                f"handshake: stage {peer} {what}, but stage {stage} has {name}={a}; "
                "all stages must be started with the same pipeline configuration"
            )
