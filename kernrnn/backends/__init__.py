"""Backends: compiled kernels for one layer and one direction.

``cpu`` builds Numba ``@njit`` kernels, ``cuda`` Numba-CUDA kernels.  Both are
generated from a cell's single definition by :mod:`kernrnn.backends.codegen`.
"""

from __future__ import annotations

import importlib

__all__ = ["DEVICES", "get_backend", "device_of", "check_device", "input_and_weight_gradients"]

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


def input_and_weight_gradients(ctx, dXW, dHU):
    """``(dx, dW_ih, dW_hh)`` after the BPTT loop, for any backend.

    Large GEMMs over all T*B rows (``@`` dispatches to NumPy's or CuPy's
    BLAS); ``ctx`` is a backend's forward context (x, W_ih, W_hh, States,
    reverse), ``dXW``/``dHU`` the ``[T, B, G*H]`` pre-activation gradients.
    """
    x = ctx.x
    T, B, I = x.shape
    H = ctx.W_hh.shape[1]
    GH = dXW.shape[2]
    # the state each step started from: time boundary t (forward) or t+1 (reverse)
    Hprev = ctx.States[0, 1:] if ctx.reverse else ctx.States[0, :T]
    dXW2 = dXW.reshape(T * B, GH)
    dHU2 = dHU.reshape(T * B, GH)
    dx = (dXW2 @ ctx.W_ih).reshape(T, B, I)
    return dx, dXW2.T @ x.reshape(T * B, I), dHU2.T @ Hprev.reshape(T * B, H)
