"""Input validation shared by every op: each check raises an exception that
names the argument and the problem, so bad input never reaches a kernel."""

from __future__ import annotations

import math
import numbers
import os

import torch

from .codec import HEADER_BYTES, Codec, check_header

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t, *, ndim: int, dtypes=FLOAT_DTYPES, device=None) -> None:
    """A tensor of the given rank and dtype, on ``device``, whose rows are
    dense (last-dim stride 1) and which has no stride-0 (expanded) dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (expected one of {list(dtypes)})")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: is on {t.device} but the other inputs are on {device}")
    if t.is_contiguous() and t.stride(-1) == 1:
        return  # (the usual case, decided in one call: every op checks each of its tensors)
    if t.numel() > 1 and (t.stride(-1) != 1 or any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape))):
        raise ValueError(
            f"{name}: needs contiguous rows without broadcast (stride-0) dims, got strides {t.stride()}; "
            "call .contiguous() first"
        )


def same_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from the activations' {dtype}")


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def integer(name: str, value, minimum: int | None = None) -> None:
    """An integer (not a bool or float; a SymInt under torch.compile), at least ``minimum`` when given."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt))):
        raise TypeError(f"{name}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")


def bottleneck(d: int, k: int, *codecs: Codec) -> None:
    """d and k positive integers, k dividing d (the identity path truncates/pads
    by whole channels), and each codec able to pack k channels."""
    integer("model width d", d, 1)
    integer("bottleneck width k", k, 1)
    if d % k:
        raise ValueError(f"bottleneck width k={k} must divide the model width d={d}")
    for codec in codecs:
        codec.group(k)


def rms_eps(value: float) -> None:
    """RMSNorm's epsilon: a finite number >= 0."""
    if not 0 <= value < math.inf:  # (NaN fails too)
        raise ValueError(f"eps={value}: RMSNorm's epsilon must be a finite number >= 0")


def encoder_inputs(x, w_e, norm_weight, codec: Codec, eps: float) -> None:
    tensor("x", x, ndim=2)
    tensor("w_e", w_e, ndim=2, device=x.device)
    same_dtype("w_e", w_e, x.dtype)
    k, d = w_e.shape
    if x.shape[1] != d:
        raise ValueError(f"x: has {x.shape[1]} channels but w_e expects d={d} (w_e is k x d = {tuple(w_e.shape)})")
    bottleneck(d, k, codec)
    if norm_weight is not None:
        tensor("norm_weight", norm_weight, ndim=1, device=x.device)
        same_dtype("norm_weight", norm_weight, x.dtype)
        shape("norm_weight", norm_weight, (d,))
        rms_eps(eps)


def row_stats_have_norm(norm_weight) -> None:
    """Row statistics exist only through RMSNorm (asked of encode forward or given to encode backward)."""
    if norm_weight is None:
        raise ValueError("row_stats: only the encoder with RMSNorm has row statistics; "
                         "without norm_weight there are none to return or pass")


def row_stats(t, x, w_e, norm_weight) -> None:
    """encode_backward's ``row_stats``: what encode forward returned for the
    same x through RMSNorm, (N, k+1) float32."""
    row_stats_have_norm(norm_weight)
    tensor("row_stats", t, ndim=2, dtypes=(torch.float32,), device=x.device)
    shape("row_stats", t, (x.shape[0], w_e.shape[0] + 1))


def decoder_weight(w_d, codec: Codec) -> None:
    tensor("w_d", w_d, ndim=2)
    d, k = w_d.shape
    bottleneck(d, k, codec)


def payload(p, codec: Codec, n: int, k: int, device, *, read_header: bool = True) -> None:
    """A 1-D uint8 payload of exactly the size ``codec`` gives for n x k; on
    the CPU its header is checked too, first, so that a payload made with
    another codec or shape is named by the field that differs (on a GPU that
    would cost a device sync per call, so receivers of peer data check it once
    per message)."""
    tensor("payload", p, ndim=1, dtypes=(torch.uint8,), device=device)
    if read_header and p.device.type == "cpu" and not _is_fake(p):
        check_header(p.numpy()[:HEADER_BYTES].tobytes(), codec, n, k)
    expected = codec.payload_bytes(n, k)
    if p.numel() != expected:
        what = "truncated" if p.numel() < expected else "too long"
        raise ValueError(
            f"payload: {p.numel()} bytes is {what}; codec {codec.spec} with {n} x {k} values needs {expected} bytes"
        )


def codes_fit(codes, bits: int) -> None:
    """Integer codes that ``bits``-bit two's complement holds (reads the values)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and bits < 8:
        least, most = (int(v) for v in codes.aminmax())
        if least < lo or most > hi:
            raise ValueError(f"codes: values from {least} to {most} do not fit {bits} bits ({lo} to {hi})")


def one_integer(t: torch.Tensor) -> bool:
    """Whether ``t`` holds exactly one integer (any integer dtype, any shape)."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool) and t.numel() == 1


def seed_offset(t, device) -> None:
    """An optional seed offset: a one-element integer tensor on ``device`` (the
    inputs'), where the kernels read it, or on the CPU (copied there)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"seed_offset: expected a torch.Tensor, got {type(t).__name__}")
    device = torch.device(device)
    if not one_integer(t) or t.device not in (device, torch.device("cpu")):
        where = "the CPU" if device.type == "cpu" else f"{device} or the CPU"
        raise ValueError(f"seed_offset: needs one integer on {where}, got a {t.dtype} tensor of shape "
                         f"{tuple(t.shape)} on {t.device}")


def switch(name: str, default: bool = False) -> bool:
    """An on/off environment switch: "1" on, "0" off, unset or empty the
    default; any other value raises ValueError naming it (a silent default
    would hide a typo such as "true")."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, not {value!r}")
    return default if value == "" else value == "1"


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta"
