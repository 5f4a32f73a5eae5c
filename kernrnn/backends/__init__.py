"""Backends: compiled kernels for one layer and one direction.

``cpu`` builds Numba ``@njit`` kernels, ``cuda`` Numba-CUDA kernels.  Both are
generated from a cell's single definition by :mod:`kernrnn.backends.codegen`;
:mod:`kernrnn.backends.common` holds what both do the same way around their
time loops (input projection, normalisation, weight gradients).

A backend is a module with the functions of :class:`Backend`; the layer
(:mod:`kernrnn.layer`) and the functional API (:mod:`kernrnn.functional`)
check every argument first and call nothing else.
"""

from __future__ import annotations

import importlib
from typing import Protocol

__all__ = ["DEVICES", "Backend", "get_backend", "device_of", "check_device"]

DEVICES = ("cpu", "cuda")


def check_device(device) -> str:
    """Normalise a device name (``"cpu"``, ``"cuda"``, ``"cuda:0"``)."""
    if not isinstance(device, str):
        raise TypeError(f"device must be 'cpu' or 'cuda', got {type(device).__name__} {device!r}")
    base = device.split(":", 1)[0].lower()
    if base not in DEVICES:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return base


class Backend(Protocol):
    """What a backend module provides: one layer, one direction, arguments already checked.

    Both ``kernrnn.backends.cpu`` and ``kernrnn.backends.cuda`` are modules of
    this shape (checked structurally, nothing inherits from it).  The CUDA
    backend adds ``require()`` (:func:`get_backend` calls it: it raises,
    naming what is missing, where CUDA cannot run) and ``from_host(a)`` (a
    host array copied to the device, used by :meth:`kernrnn.layer.RNN.to`).
    """

    #: The array module of the backend's arrays (NumPy on the CPU, CuPy on a GPU).
    xp: object

    def asarray(self, a):
        """The backend's array for ``a`` without a dtype change (C-contiguous on the CPU;
        CuPy or DLPack device arrays, never a host copy, on the GPU)."""

    def lengths(self, lens):
        """The sequence lengths ``int64 [B]`` (a NumPy array) where the kernels read them."""

    def forward(self, cell, x, params, h0, lengths, reverse: bool, training: bool, *, y=None,
                reg=None):
        """Run ``cell`` over ``x [T, B, I]``; returns ``(y, hn, ctx)``.

        ``params`` maps the cell's parameter names (``weight_ih``, ...; with
        ``weight_hr`` an LSTMP projection) to arrays, ``h0`` is ``[S, B, H]``,
        ``lengths`` what :meth:`lengths` gave.  ``y``: an optional (possibly
        strided) ``[T, B, H]`` view to write the output into; ``reg``: the
        call's :class:`~kernrnn.regularization.RegularizationCall` or None.
        ``hn`` is ``[S, B, H]``; ``ctx`` (a
        :class:`~kernrnn.backends.common.ForwardContext`) is None unless
        ``training``.
        """

    def backward(self, ctx, dy, dhn):
        """BPTT for one forward call: ``(dx, dh0, grads)``, ``grads`` keyed as its ``params``.

        ``dy`` is ``[T, B, H]`` (may be a strided view), ``dhn`` ``[S, B, H]``.
        """

    def release(self, ctx) -> None:
        """``ctx`` will not be used again: its buffers may serve the next call."""


def get_backend(device: str) -> Backend:
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
