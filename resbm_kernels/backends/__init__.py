"""Backend selection.

A backend is a module exposing the four passes with the signatures of
:mod:`resbm_kernels.backends.reference` (``encode_forward``, ``decode_forward``,
``decode_backward``, ``encode_backward``), ``supports(device) -> bool`` and
``unsupported(case) -> str | None`` (why it cannot run a :class:`Case`, or
None). The public ops in :mod:`resbm_kernels.ops` call :func:`select` with the
device of their inputs and the case at hand.

Choice, in order: the innermost :func:`use_backend` context, else the
``RESBM_BACKEND`` environment variable, else ``auto``. The context is
process-wide, not per thread: the autograd engine runs the backward of CUDA
tensors on its own threads, and those must see it too. A named backend that is
unavailable, does not support the device or cannot run the case raises,
saying why (its own argument checks name the limits it cannot meet).
``auto`` runs CPU tensors on the reference; for CUDA tensors it tries the backends in the order measured fastest for this GPU and pass (the
``measured.json`` shipped with the package, written by
``bench/rank_backends.py`` from a benchmark run on that card), or
:data:`DEFAULT_ORDER` on a GPU nobody has measured, and takes the first one
that is available and can run the case; the reference is the last resort, so
``auto`` never fails for want of a kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import pathlib
from collections.abc import Iterator

NAMES = ("auto", "reference", "triton", "cuda")
RANKED = ("reference", "triton", "cuda")  # what a measured ranking may list
DEFAULT_ORDER = ("triton",)  # unmeasured GPUs: the CUDA backend joins only where it measured faster
MEASURED = pathlib.Path(__file__).with_name("measured.json")

_MODULES = {"reference": ".reference", "triton": ".triton", "cuda": ".cuda"}
_stack: list[tuple[object, str]] = []  # (token, name) of the open use_backend contexts
_imported: dict = {}  # name -> backend module, once imported


@dataclasses.dataclass(frozen=True)
class Case:
    """What one pass is asked to do: enough for a backend to say whether it can.

    ``op`` is the pass name, ``d``/``k`` the bottleneck widths, ``dtypes`` the
    floating dtypes involved (inputs, weights, output), ``codecs`` the codecs
    of the payloads read or written.
    """

    op: str
    d: int
    k: int
    dtypes: tuple = ()
    codecs: tuple = ()


def _load(name: str):
    """Import a backend module; returns (module or None, reason it is unavailable).
    A module once imported is kept here (select() runs on every op call; a
    failed import is tried again)."""
    module = _imported.get(name)
    if module is not None:
        return module, ""
    try:
        module = _imported[name] = importlib.import_module(_MODULES[name], __name__)
        return module, ""
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


def requested() -> str:
    """The backend name currently requested (context > environment > 'auto')."""
    stack = list(_stack)
    name = stack[-1][1] if stack else os.environ.get("RESBM_BACKEND", "auto").strip().lower() or "auto"
    if name not in NAMES:
        raise ValueError(f"RESBM_BACKEND={name!r} is not one of {NAMES}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops on backend ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES}")
    token = (object(), name)
    _stack.append(token)
    try:
        yield
    finally:
        _stack.remove(token)


def _available(name: str, device):
    """(module, None) if backend ``name`` imports and supports ``device``, else (None, reason)."""
    module, why = _load(name)
    if module is None:
        return None, f"is not available: {why}"
    if not module.supports(device):
        switch = getattr(module, "CPU_SWITCH", None) if getattr(device, "type", device) == "cpu" else None
        return None, f"does not support device {device}" + (f" (on the CPU it runs with {switch})" if switch else "")
    return module, None


def select(device, case: Case | None = None):
    """The backend module that runs ``case`` for tensors on ``device``.

    A named backend that cannot run the case raises from its own argument
    checks (TypeError / ValueError naming the limit); ``auto`` skips it.
    """
    name = requested()
    if name == "auto":
        if getattr(device, "type", device) == "cuda":
            for candidate in auto_order(device_name(device), case.op if case else None):
                module, _ = _available(candidate, device)
                if module is not None and (case is None or module.unsupported(case) is None):
                    return module
        name = "reference"
    module, why = _available(name, device)
    if module is None:
        raise RuntimeError(f"resbm backend {name!r} {why}")
    return module


# ---- measured ranking -----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def device_name(device) -> str:
    """The CUDA device's name, the key of the measured ranking (asked once per
    device: select() runs on every op call)."""
    import torch

    return torch.cuda.get_device_name(device)


@functools.lru_cache(maxsize=None)
def measured(path: pathlib.Path = MEASURED) -> dict:
    """{device name: {pass: [backends, fastest first]}} from ``measured.json``;
    an unreadable file is an error (it ships with the package)."""
    data = json.loads(pathlib.Path(path).read_text())
    if data.get("format") != 1:
        raise ValueError(f"{path}: unknown format {data.get('format')!r} (expected 1)")
    table = {}
    for device, entry in data["devices"].items():
        table[device] = {op: [b for b in order if b in RANKED] for op, order in entry["passes"].items()}
    return table


def auto_order(device_name: str, op: str | None) -> tuple:
    """Backends ``auto`` tries, in order, for pass ``op`` on GPU ``device_name``
    (a measured ranking may put the reference first where it was fastest)."""
    ranking = measured().get(device_name, {})
    return tuple(ranking.get(op, ())) or DEFAULT_ORDER
