"""Backend selection.

A backend is a module exposing the four passes with the signatures of
:mod:`resbm_kernels.backends.reference` (``encode_forward``, ``decode_forward``,
``decode_backward``, ``encode_backward``) and a ``supports(device) -> bool``
function. The public ops in :mod:`resbm_kernels.ops` call :func:`select` for the
device of their inputs.

Choice, in order: the innermost :func:`use_backend` context, else the
``RESBM_BACKEND`` environment variable, else ``auto``. ``auto`` takes, for CUDA
tensors, the first available backend in ``AUTO_ORDER`` that supports the
device, and otherwise the reference (CPU tensors reach the Triton backend only
when it is named, under ``TRITON_INTERPRET=1``). Naming a backend that is
unavailable raises.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading

NAMES = ("auto", "reference", "triton", "cuda")
AUTO_ORDER = ("triton",)  # fastest measured first; cuda joins once it is measured

_MODULES = {"reference": ".reference", "triton": ".triton", "cuda": ".cuda"}
_local = threading.local()


def _load(name: str):
    """Import a backend module; returns (module or None, reason it is unavailable)."""
    try:
        return importlib.import_module(_MODULES[name], __name__), ""
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


def requested() -> str:
    """The backend name currently requested (context > environment > 'auto')."""
    stack = getattr(_local, "stack", None)
    name = stack[-1] if stack else os.environ.get("RESBM_BACKEND", "auto").strip().lower() or "auto"
    if name not in NAMES:
        raise ValueError(f"RESBM_BACKEND={name!r} is not one of {NAMES}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed ops on backend ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES}")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def select(device):
    """The backend module that runs ops for tensors on ``device``."""
    name = requested()
    if name == "reference":
        return _load("reference")[0]
    if name != "auto":
        module, why = _load(name)
        if module is None:
            raise RuntimeError(f"resbm backend {name!r} is not available: {why}")
        if not module.supports(device):
            raise RuntimeError(f"resbm backend {name!r} does not support device {device}")
        return module
    if getattr(device, "type", device) != "cuda":
        return _load("reference")[0]
    for candidate in AUTO_ORDER:
        module, _ = _load(candidate)
        if module is not None and module.supports(device):
            return module
    return _load("reference")[0]
