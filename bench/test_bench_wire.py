"""Wire benchmarks: bytes per token and compression ratio of each codec preset
against bf16 activations, scales and the 16-byte header included.

Each item writes a real payload (the reference codec: quantize + pack +
header, on the benchmark device) for N=4096 tokens of k channels and counts
its bytes; the time is that encode's. The ratio is ``2*d*N / payload bytes``
(bf16 activations of width d over what crosses the wire). The
``uncompressed`` rows are full-width bf16 payloads (k = d): what the pipeline
benchmark's uncompressed baseline sends.
"""

from __future__ import annotations

import pytest
import torch

import benchlib
from benchlib import REPLAY
from resbm_kernels import BF16, GRAD_INT8, INT2, INT4, INT8
from resbm_kernels.backends import reference as R
from resbm_kernels.codec import HEADER_BYTES

TOKENS = 4096
PRESETS = {"BF16": BF16, "INT8": INT8, "INT4": INT4, "INT2": INT2, "GRAD_INT8": GRAD_INT8}


def _carries(codec, k: int) -> bool:
    """Whether ``codec`` can pack k values (its scale group divides k): INT4 and
    INT2 (groups of 32) cannot carry k=16, i.e. d=2048 at the 128x ratio."""
    try:
        codec.group(k)
    except ValueError:
        return False
    return True


CASES = [("uncompressed", d, d) for d in (2048, 4096, 8192)] + [
    (name, d, d // r) for name in PRESETS for d in (2048, 4096, 8192) for r in (128, 32)
    if _carries(PRESETS[name], d // r)]


@pytest.mark.benchmark(timer=REPLAY)
@pytest.mark.parametrize("preset, d, k", CASES, ids=[f"{p}-d{d}-k{k}" for p, d, k in CASES])
def test_wire(benchmark, preset, d, k, bench_device):
    codec = BF16 if preset == "uncompressed" else PRESETS[preset]
    benchmark.group = f"wire d={d}"
    dev = bench_device
    gen = torch.Generator(device=dev).manual_seed(d + k)
    sets = benchlib.rotation(TOKENS * k * 4, dev)
    zs = [torch.randn(TOKENS, k, generator=gen, device=dev) for _ in range(sets)]
    payload = R.write_payload(zs[0], codec, 0)
    nbytes = payload.numel()
    assert nbytes == codec.payload_bytes(TOKENS, k)  # the formula the README quotes is what is written
    back = R.read_payload(payload, codec, TOKENS, k, torch.float32)
    rel = ((back - zs[0]).norm() / zs[0].norm()).item()
    reps, _ = benchlib.adaptive_reps(lambda i: R.write_payload(zs[i % sets], codec, 0), dev,
                                     target_s=0.1, lo=5, hi=50, warmup=2)
    times = benchlib.time_calls(lambda i: R.write_payload(zs[i % sets], codec, 0), dev, warmup=0, reps=reps)
    scales = codec.scale_count(TOKENS, k) * codec.scale_bytes
    benchmark.extra_info.update(
        suite="wire", preset=preset, codec=codec.spec, d=d, k=k, tokens=TOKENS, device=str(dev),
        payload_bytes=nbytes, header_bytes=HEADER_BYTES, scale_bytes=scales,
        code_bytes=nbytes - HEADER_BYTES - scales,
        bytes_per_token=nbytes / TOKENS, bytes_per_token_without_header=(nbytes - HEADER_BYTES) / TOKENS,
        bf16_bytes_per_token=2 * d, compression_ratio=2 * d * TOKENS / nbytes,
        roundtrip_rel_err=rel, **benchlib.summary(times),
    )
    benchlib.record(benchmark, times)
