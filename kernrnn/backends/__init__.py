"""Backends: compiled kernels for one layer and one direction.

``cpu`` builds Numba ``@njit`` kernels, ``cuda`` Numba-CUDA kernels.  Both are
generated from a cell's single definition by :mod:`kernrnn.backends.codegen`;
:mod:`kernrnn.backends.common` holds what both do the same way around their
time loops (input projection, normalisation, weight gradients).
"""

from __future__ import annotations

import importlib

__all__ = ["DEVICES", "get_backend", "device_of", "check_device"]

DEVICES = ("cpu", "cuda")


def check_device(device) -> str:
    """Normalise a device name (``"cpu"``, ``"cuda"``, ``"cuda:0"``)."""
    if not isinstance(device, str):
        raise TypeError(f"device must be 'cpu' or 'cuda', got {type(device).__name__} {device!r}")
    base = device.split(":", 1)[0].lower()
    if base not in DEVICES:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return base


def get_backend(device: str):
    """The backend module for ``device``; ``cuda`` explains what is missing."""
    device = check_device(device)
    if device == "cpu":
        return importlib.import_module("kernrnn.backends.cpu")
    module = importlib.import_module("kernrnn.backends.cuda")
    module.require()
    return module


def device_of(array) -> str:
    """``"cuda"`` for arrays living on a GPU, else ``"cpu"``."""
    if hasattr(array, "__cuda_array_interface__"):
        return "cuda"
    dev = getattr(array, "device", None)
    if dev is not None and getattr(dev, "type", None) == "cuda":  # torch tensors
        return "cuda"
    return "cpu"
