"""Byte-level text data from the Python standard library's own sources.

Every machine that runs this package has the corpus already: the ``.py``
files under ``sysconfig.get_paths()["stdlib"]`` (test suites and
``site-packages`` excluded). Files are split into train / validation by a
deterministic hash of their path *relative to the stdlib root*, so the split
is the same on every machine with the same Python version and never mixes a
file into both sides. Tokens are bytes (vocabulary 256).

    from resbm_kernels.data import load_corpus, batch
    train = load_corpus("train")                  # uint8 1-D tensor
    x, y = batch(train, step=0, batch_size=16, seq_len=128, seed=0)

:func:`batch` is a pure function of ``(data, step, batch_size, seq_len,
seed)``: two runs with the same seed see the same data order, and a run
resumed at step s sees exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import sysconfig

import torch

SPLITS = ("train", "val")
#: Path components that exclude a file (test suites, third-party packages, caches).
EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
#: Fraction of files (by path hash) that go to the validation split, in 1/1000.
VAL_PER_MILLE = 100
#: Bytes inserted between files when they are concatenated.
SEPARATOR = b"\n\n"


def stdlib_root() -> pathlib.Path:
    """The directory of this interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """``"train"`` or ``"val"`` for a POSIX path relative to the stdlib root:
    SHA-1 of the path, first 8 bytes as an integer, modulo 1000, below
    :data:`VAL_PER_MILLE` goes to validation (about 10%)."""
    h = int.from_bytes(hashlib.sha1(relative_path.encode("utf-8")).digest()[:8], "big")
    return "val" if h % 1000 < VAL_PER_MILLE else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"data: split must be one of {SPLITS}, got {split!r}")


def stdlib_files(split: str, root: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """Sorted absolute paths of the stdlib ``.py`` files in ``split``.

    A file is excluded if any component of its path relative to ``root``
    (default :func:`stdlib_root`) is in :data:`EXCLUDED_PARTS`. Sorting is by
    the relative POSIX path, so the order is machine-independent.
    """
    _check_split(split)
    root = pathlib.Path(root) if root is not None else stdlib_root()
    chosen = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS.intersection(rel.parts) or not path.is_file():
            continue
        rel_posix = rel.as_posix()
        if split_of(rel_posix) == split:
            chosen.append((rel_posix, path))
    chosen.sort()
    return [p for _, p in chosen]


@functools.lru_cache(maxsize=4)
def _corpus_bytes(split: str, root: str | None) -> bytes:
    files = stdlib_files(split, root)
    if not files:
        raise RuntimeError(f"data: no .py files for split {split!r} under {root or stdlib_root()}")
    return SEPARATOR.join(p.read_bytes() for p in files)


def load_corpus(split: str, max_bytes: int | None = None, root: str | pathlib.Path | None = None) -> torch.Tensor:
    """The files of ``split`` concatenated (in :func:`stdlib_files` order,
    separated by :data:`SEPARATOR`) as a 1-D ``torch.uint8`` tensor, truncated
    to ``max_bytes`` if given. The bytes are cached per process."""
    _check_split(split)
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"data: max_bytes must be positive, got {max_bytes}")
    raw = _corpus_bytes(split, None if root is None else str(root))
    if max_bytes is not None:
        raw = raw[:max_bytes]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"resbm-data/{int(seed)}/{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def batch(data: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number ``step``: ``batch_size`` random windows of ``seq_len + 1``
    bytes from ``data``; returns ``(inputs, targets)``, both int64
    ``(batch_size, seq_len)``, targets shifted by one byte.

    Deterministic in ``(seed, step)`` (a private generator seeded from a hash
    of both; the global RNG is untouched), so any step can be regenerated
    without replaying the ones before it. Windows start below
    ``len(data) - seq_len - 1``, so the last byte is never drawn: kept so that
    the committed convergence runs (bench/results) reproduce.
    """
    if data.dim() != 1:
        raise ValueError(f"data: expected a 1-D tensor of bytes, got shape {tuple(data.shape)}")
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"data: batch_size={batch_size} and seq_len={seq_len} must be positive")
    if data.numel() < seq_len + 2:
        raise ValueError(f"data: {data.numel()} bytes is too short for windows of {seq_len + 1}")
    gen = torch.Generator().manual_seed(_step_seed(seed, step))
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]
