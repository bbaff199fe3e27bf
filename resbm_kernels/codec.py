"""Codec configuration and the versioned wire format.

A :class:`Codec` says how the bottleneck activations ``z`` (N x k) are turned
into bytes: ``bits`` per value (16 = bf16 passthrough, or signed integers of
8, 4 or 2 bits), one symmetric absmax scale per ``group_size`` consecutive
channels stored as ``scale_dtype``, and nearest-even or stochastic rounding.

Wire format, version 1 (all integers little-endian)::

    offset 0   4 bytes  magic b"RBM" + version byte (1)
    offset 4   1 byte   bits (16, 8, 4 or 2)
    offset 5   1 byte   scale dtype code (0 none, 1 float32, 2 float16, 3 bfloat16)
    offset 6   2 bytes  group size (0 for bits=16)
    offset 8   4 bytes  rows N
    offset 12  4 bytes  channels k
    offset 16           codes: N rows of k*bits/8 bytes, row-major; for bits < 8
                        value j of a byte sits at bits [j*bits, (j+1)*bits)
                        (first value in the lowest bits), two's complement;
                        for bits=16 the bf16 values themselves.
                        The region is zero-padded to a multiple of 16 bytes.
    then                scales: N x (k / group_size) values of scale_dtype.

Payload bytes = 16 + align16(N*k*bits/8) + N*(k/group_size)*scale_bytes.
Rounding is not part of the format: a payload decodes the same either way.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import struct
from typing import NamedTuple

import torch

MAGIC = b"RBM"
WIRE_VERSION = 1
HEADER_BYTES = 16
CODES_ALIGN = 16

SCALE_DTYPES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
SCALE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_NAME_TO_SCALE = {v: k for k, v in SCALE_NAMES.items()}
ROUNDINGS = ("nearest", "stochastic")
SUPPORTED_BITS = (16, 8, 4, 2)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclasses.dataclass(frozen=True)
class Codec:
    """How bottleneck values are quantized and packed for the wire.

    Args:
        bits: 16 (bf16 passthrough, no scales), 8, 4 or 2 (signed symmetric
            integers in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``).
        group_size: channels sharing one scale; ``None`` means one scale per
            token (the group is the whole row). Must divide k, and
            ``group_size * bits`` must be a multiple of 8 so groups are whole bytes.
        scale_dtype: storage dtype of the scales (bf16 by default: fp16's range
            underflows on small gradients, fp32 costs twice the bytes).
        rounding: ``"nearest"`` (round half to even, deterministic) or
            ``"stochastic"`` (unbiased; reproducible from a seed, identical on
            every backend).
    """

    bits: int = 8
    group_size: int | None = None
    scale_dtype: torch.dtype = torch.bfloat16
    rounding: str = "nearest"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"Codec: unsupported bits={self.bits}; choose one of {SUPPORTED_BITS}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"Codec: rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"Codec: scale_dtype must be one of {list(SCALE_NAMES)}, got {self.scale_dtype}"
            )
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
                raise ValueError(f"Codec: group_size must be a positive int or None, got {self.group_size!r}")
            if self.bits != 16 and (self.group_size * self.bits) % 8:
                raise ValueError(
                    f"Codec: group_size={self.group_size} x bits={self.bits} is not a whole number of bytes"
                )

    # ---- derived quantities -------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True for integer codecs (which carry scales)."""
        return self.bits != 16

    @property
    def qmax(self) -> int:
        """Largest code magnitude: 127, 7 or 1."""
        return (1 << (self.bits - 1)) - 1

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    @property
    def scale_bytes(self) -> int:
        return self.scale_dtype.itemsize if self.quantized else 0

    def group(self, k: int) -> int:
        """The effective group size for k channels (validated)."""
        if k <= 0:
            raise ValueError(f"Codec: k={k} channels; a bottleneck needs at least one")
        g = k if self.group_size is None else self.group_size
        if self.quantized and k % g:
            per_row = dataclasses.replace(self, group_size=None).spec
            raise ValueError(f"Codec: group_size={g} does not divide k={k} (choose a group that does, "
                             f"or group_size=None for one scale per row: {per_row!r})")
        if (k * self.bits) % 8:
            raise ValueError(f"Codec: k={k} x bits={self.bits} is not a whole number of bytes per row")
        return g

    def code_bytes(self, n: int, k: int) -> int:
        """Bytes of the (aligned) codes region for n rows of k channels."""
        self.group(k)
        return _align(n * k * self.bits // 8, CODES_ALIGN)

    def scale_count(self, n: int, k: int) -> int:
        return n * (k // self.group(k)) if self.quantized else 0

    def payload_bytes(self, n: int, k: int) -> int:
        """Total wire bytes of one message carrying n x k values (under
        torch.compile n and k may be symbolic: then not cached)."""
        cached = type(n) is int and type(k) is int
        return (payload_layout if cached else _layout)(self, n, k).nbytes

    def bytes_per_token(self, k: int) -> float:
        """Codes + scales per token, without the per-message header."""
        return k * self.bits / 8 + (k // self.group(k) if self.quantized else 0) * self.scale_bytes

    def compression_ratio(self, d: int, k: int, n: int = 1) -> float:
        """bf16 activations (2*d bytes/token) over this codec's wire bytes for
        n-token messages, header included."""
        return 2 * d * n / self.payload_bytes(n, k)

    # ---- string form used in op schemas --------------------------------------
    @property
    def spec(self) -> str:
        """Compact string, e.g. ``"int8/g32/bf16/nearest"`` or ``"bf16"``."""
        if not self.quantized:
            return "bf16"
        g = "row" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}/{g}/{SCALE_NAMES[self.scale_dtype]}/{self.rounding}"

    @classmethod
    def parse(cls, spec: str | Codec) -> Codec:
        """Inverse of :attr:`spec`; also accepts a Codec (returned as is)."""
        if isinstance(spec, Codec):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"codec: expected a Codec or a spec string such as 'int8/row/bf16/nearest', "
                            f"got {type(spec).__name__}")
        return _parse_spec(spec)

    def __str__(self) -> str:
        return self.spec


@functools.lru_cache(maxsize=256)
def _parse_spec(spec: str) -> Codec:
    """Cached, since every op call parses its codec strings."""
    if spec == "bf16":
        return Codec(bits=16)
    m = re.fullmatch(r"int(\d+)/(row|g\d+)/(fp32|fp16|bf16)/(nearest|stochastic)", spec)
    if not m:
        raise ValueError(f"Codec: cannot parse spec {spec!r} (expected e.g. 'int8/row/bf16/nearest' or 'bf16')")
    bits, g, sd, rnd = m.groups()
    return Codec(
        bits=int(bits),
        group_size=None if g == "row" else int(g[1:]),
        scale_dtype=_NAME_TO_SCALE[sd],
        rounding=rnd,
    )


# Sensible presets: activations forward with nearest rounding, gradients back
# with stochastic rounding (unbiased), as in DESIGN.md.
BF16 = Codec(bits=16)
INT8 = Codec(bits=8)
INT4 = Codec(bits=4, group_size=32)
INT2 = Codec(bits=2, group_size=32)
GRAD_INT8 = Codec(bits=8, rounding="stochastic")


# ---- header ---------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def header_bytes(codec: Codec, n: int, k: int) -> bytes:
    """The 16-byte header of a payload carrying n x k values (cached)."""
    group = codec.group(k)  # (validates k for every codec)
    group = group if codec.quantized else 0
    if not (0 <= n < 2**32 and 0 < k < 2**32):
        raise ValueError(f"wire: shape ({n}, {k}) does not fit the header")
    scale_code = SCALE_DTYPES[codec.scale_dtype] if codec.quantized else 0
    if group >= 2**16:
        raise ValueError(f"wire: group size {group} does not fit the header (max 65535)")
    return (
        MAGIC
        + bytes([WIRE_VERSION, codec.bits, scale_code])
        + group.to_bytes(2, "little")
        + n.to_bytes(4, "little")
        + k.to_bytes(4, "little")
    )


@functools.lru_cache(maxsize=1024)
def header_words(codec: Codec, n: int, k: int) -> tuple[int, int, int, int]:
    """The header as four little-endian int32 words, for kernels that write it
    themselves (no device copy of the bytes; the third word is n). Cached: the
    kernel backends ask on every call."""
    return struct.unpack("<4i", header_bytes(codec, n, k))


@dataclasses.dataclass(frozen=True)
class Header:
    version: int
    bits: int
    scale_code: int
    group: int
    n: int
    k: int


def parse_header(raw: bytes) -> Header:
    """Decode a header, raising ``ValueError`` naming what is wrong."""
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"wire: payload of {len(raw)} bytes is shorter than the {HEADER_BYTES}-byte header")
    if raw[:3] != MAGIC:
        raise ValueError(f"wire: bad magic {bytes(raw[:3])!r} (expected {MAGIC!r}); not a ResBM payload")
    if raw[3] != WIRE_VERSION:
        raise ValueError(f"wire: payload has format version {raw[3]}, this library reads version {WIRE_VERSION}")
    return Header(
        version=raw[3],
        bits=raw[4],
        scale_code=raw[5],
        group=int.from_bytes(raw[6:8], "little"),
        n=int.from_bytes(raw[8:12], "little"),
        k=int.from_bytes(raw[12:16], "little"),
    )


def check_header(raw: bytes, codec: Codec, n: int | None, k: int) -> int:
    """Check a received header against what the reader expects; return N.

    ``n=None`` accepts any row count. Raises ``ValueError`` naming the first
    field that differs.
    """
    if n is not None and raw[:HEADER_BYTES] == header_bytes(codec, n, k):
        return n  # (the usual case, decided without parsing: every op call on CPU tensors checks)
    h = parse_header(raw)
    want = parse_header(header_bytes(codec, h.n if n is None else n, k))
    for field in ("bits", "scale_code", "k", "group", "n"):
        if getattr(h, field) != getattr(want, field):
            name, got, exp = field, getattr(h, field), getattr(want, field)
            if field == "scale_code":  # (0: no scales, bits=16)
                name, got, exp = "scale_dtype", _SCALE_BY_CODE.get(got, got), _SCALE_BY_CODE.get(exp, exp)
            raise ValueError(
                f"wire: payload {name}={got} but the reader expects {name}={exp} "
                f"(the payload holds {_header_spec(h)} for {h.n} x {h.k} values; "
                f"the reader, codec {codec.spec} for {'any' if n is None else n} x {k})"
            )
    return h.n


_DTYPE_BY_CODE = {code: dtype for dtype, code in SCALE_DTYPES.items()}
_SCALE_BY_CODE = {0: "none", **{code: SCALE_NAMES[dtype] for code, dtype in _DTYPE_BY_CODE.items()}}


def _header_spec(h: Header) -> str:
    """The codec a header describes, as a spec without its rounding (not on the wire)."""
    try:
        codec = Codec(bits=h.bits, group_size=None if h.group == h.k else h.group,
                      scale_dtype=_DTYPE_BY_CODE.get(h.scale_code, torch.bfloat16))
    except ValueError:  # not a codec this library writes
        return f"bits={h.bits}, scale code {h.scale_code}, group {h.group}"
    return codec.spec if h.bits == 16 else codec.spec.rsplit("/", 1)[0]


# ---- payload layout (shared by every backend) ------------------------------------

def empty_payload(codec: Codec, n: int, k: int, device) -> torch.Tensor:
    """A uint8 payload buffer with its header written and the padding zeroed."""
    payload = torch.empty(codec.payload_bytes(n, k), dtype=torch.uint8, device=device)
    return write_header(payload, codec, n, k)


def write_header(payload: torch.Tensor, codec: Codec, n: int, k: int) -> torch.Tensor:
    """Write the header and zero the codes padding of an existing payload
    buffer of the right size (e.g. a reused send buffer); returns it."""
    payload[:HEADER_BYTES].copy_(header_tensor(header_bytes(codec, n, k), payload.device))
    raw = n * k * codec.bits // 8
    payload[HEADER_BYTES + raw : HEADER_BYTES + codec.code_bytes(n, k)].zero_()
    return payload


@functools.lru_cache(maxsize=256)
def header_tensor(raw: bytes, device: torch.device) -> torch.Tensor:
    """A header as a tensor on ``device``, copied there once (shared: do not
    write to it): a copy from pageable host memory on every call would make
    each op wait for the GPU."""
    with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


class Layout(NamedTuple):
    """Where the regions of a payload for n x k values lie, in bytes."""

    nbytes: int  # the whole payload
    row_bytes: int  # codes of one row: k * bits / 8
    scales_at: int  # offset of the scales (after the padded codes)
    groups: int  # scales per row (0 for bits=16)


def _layout(codec: Codec, n: int, k: int) -> Layout:
    """The :class:`Layout` of a payload for n x k values (validated as :meth:`Codec.group`)."""
    scales_at = HEADER_BYTES + codec.code_bytes(n, k)
    groups = k // codec.group(k) if codec.quantized else 0
    return Layout(scales_at + n * groups * codec.scale_bytes, k * codec.bits // 8, scales_at, groups)


# cached for int sizes (every op call asks; a bad codec or k raises, which is not cached)
payload_layout = functools.lru_cache(maxsize=1024)(_layout)


def payload_views(payload: torch.Tensor, codec: Codec, n: int, k: int):
    """(codes, scales) views into a payload: codes is uint8 (n, k*bits/8),
    scales is (n, k/group) of the scale dtype, or None for bits=16."""
    lay = payload_layout(codec, n, k)
    codes = payload[HEADER_BYTES : HEADER_BYTES + n * lay.row_bytes].view(n, lay.row_bytes)
    if not codec.quantized:
        return codes, None
    return codes, payload[lay.scales_at : lay.nbytes].view(codec.scale_dtype).view(n, lay.groups)


def rng_key(seed: int) -> int:
    """32-bit key for stochastic rounding, mixed from a (up to 64-bit) seed.

    Element i of a message (i = row*k + col, modulo 2**32) is rounded with
    u = (hash32(i ^ key) >> 8) * 2**-24 and q = floor(y + u); every backend
    uses this same counter-based stream, so a seed reproduces bit for bit.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return hash32((seed & 0xFFFFFFFF) ^ hash32(seed >> 32))


def hash32(x: int) -> int:
    """The 'lowbias32' integer hash (Wellons), on Python ints."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x
