"""Functional API: one layer, one direction, explicit forward and backward.

For researchers building their own models: :func:`rnn_forward` returns the
output, the final state and a context object; :func:`rnn_backward` takes that
context and the output gradients and returns the input, initial-state and
parameter gradients.  States are tuples of S arrays ``[B, H]`` (``(h,)`` or
``(h, c)``).  The backend is chosen by the arrays' device.
"""

from __future__ import annotations

import numpy as np

from kernrnn import _checks
from kernrnn.backends import device_of, get_backend
from kernrnn.scalar import check_cell_compiles

__all__ = ["rnn_forward", "rnn_backward", "resolve_cell"]


def resolve_cell(cell):
    """A :class:`~kernrnn.cell.Cell` from a cell or a registered name."""
    from kernrnn.cell import Cell
    from kernrnn.plugins import get_registry

    if isinstance(cell, Cell):
        return cell
    if isinstance(cell, str):
        return get_registry().get(cell)
    raise TypeError(f"cell must be a registered name or a kernrnn.Cell, got {type(cell).__name__}")


def rnn_forward(cell, x, weight_ih, weight_hh, bias_ih, bias_hh, h0=None, lengths=None,
                reverse=False, training=True):
    """Run ``cell`` over ``x`` ``[T, B, I]``.

    Returns ``(y [T, B, H], hn, ctx)``; ``hn`` is a tuple of S ``[B, H]``
    arrays, ``ctx`` what :func:`rnn_backward` needs (None if not ``training``).
    With ``lengths``, outputs past a sequence's length are zero and ``hn`` is
    taken at its own last step; ``reverse=True`` runs from that last step back.
    """
    cell = resolve_cell(cell)
    backend = get_backend(device_of(x))
    shape, dtype = _checks.array_attrs(x, "x")
    dtype = _checks.as_dtype(dtype, "x.dtype")
    check_cell_compiles(cell, dtype)
    _checks.check_array(x, "x", (None, None, None), dtype, finite=True)
    T, B, I = shape
    GH = weight_ih.shape[0] if hasattr(weight_ih, "shape") and weight_ih.ndim == 2 else None
    H = weight_hh.shape[1] if hasattr(weight_hh, "shape") and weight_hh.ndim == 2 else None
    if GH is None or H is None or GH != cell.n_gates * H:
        raise ValueError(
            f"cell {cell.name!r} has {cell.n_gates} gates: weight_ih must be [{cell.n_gates}*H, {I}] "
            f"and weight_hh [{cell.n_gates}*H, H], got {list(getattr(weight_ih, 'shape', []))} and "
            f"{list(getattr(weight_hh, 'shape', []))}"
        )
    G = cell.n_gates
    _checks.check_array(weight_ih, "weight_ih", (G * H, I), dtype)
    _checks.check_array(weight_hh, "weight_hh", (G * H, H), dtype)
    _checks.check_array(bias_ih, "bias_ih", (G * H,), dtype)
    _checks.check_array(bias_hh, "bias_hh", (G * H,), dtype)
    h0 = _state_array(backend, h0, cell, B, H, dtype, "h0")
    lens = _checks.check_lengths(lengths, B, T)
    y, hn, ctx = backend.forward(
        cell, backend.asarray(x), backend.asarray(weight_ih), backend.asarray(weight_hh),
        backend.asarray(bias_ih), backend.asarray(bias_hh), h0, backend.lengths(lens),
        bool(reverse), bool(training),
    )
    return y, tuple(hn[s] for s in range(cell.n_state)), ctx


def rnn_backward(ctx, dy, dhn=None):
    """Backpropagation through time for one :func:`rnn_forward` call.

    Returns ``(dx, dh0, grads)``: ``dh0`` a tuple of S arrays, ``grads`` a dict
    with keys ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``.
    """
    if ctx is None:
        raise ValueError("rnn_backward needs the ctx of a forward call made with training=True, "
                         "got None (that forward ran with training=False)")
    backend = get_backend(ctx.device)
    T, B, _ = ctx.x.shape
    H = ctx.W_hh.shape[1]
    _checks.check_array(dy, "dy", (T, B, H), ctx.x.dtype)
    dhn = _state_array(backend, dhn, ctx.cell, B, H, ctx.x.dtype, "dhn")
    dx, dh0, grads = backend.backward(ctx, backend.asarray(dy), dhn)
    return dx, tuple(dh0[s] for s in range(ctx.cell.n_state)), grads


def _state_array(backend, state, cell, B, H, dtype, name):
    """Stack a tuple of S ``[B, H]`` arrays into ``[S, B, H]`` (zeros if None)."""
    S = cell.n_state
    if state is None:
        return backend.xp.zeros((S, B, H), dtype=dtype)
    if not isinstance(state, (tuple, list)) or len(state) != S:
        raise TypeError(
            f"{name} must be a tuple of {S} arrays {cell.state} of shape [{B}, {H}] for cell "
            f"{cell.name!r}, got {type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else "")
        )
    for s, part in zip(cell.state, state):
        _checks.check_array(part, f"{name}[{s}]", (B, H), dtype, finite=True)
    return backend.xp.stack([backend.asarray(p) for p in state])


_ = np
