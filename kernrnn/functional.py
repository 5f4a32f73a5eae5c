"""Functional API: one layer, one direction, explicit forward and backward.

For researchers building their own models: :func:`rnn_forward` returns the
output, the final state and a context object; :func:`rnn_backward` takes that
context and the output gradients and returns the input, initial-state and
parameter gradients.  States are tuples of S arrays ``[B, H]`` (``(h,)`` or
``(h, c)``).  The backend is chosen by the arrays' device.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def rnn_forward(cell, x, weight_ih=None, weight_hh=None, bias_ih=None, bias_hh=None, h0=None,
                lengths=None, reverse=False, training=True):
    """Run ``cell`` over ``x`` ``[T, B, I]``.

    The parameters are either the four PyTorch arrays (``weight_ih``,
    ``weight_hh``, ``bias_ih``, ``bias_hh``) or, for any cell, one dict by the
    cell's parameter names (:meth:`kernrnn.cell.Cell.param_shapes`) passed as
    ``weight_ih``.  Returns ``(y [T, B, H], hn, ctx)``; ``hn`` is a tuple of S
    ``[B, H]`` arrays, ``ctx`` what :func:`rnn_backward` needs (None if not
    ``training``).  With ``lengths``, outputs past a sequence's length are zero
    and ``hn`` is taken at its own last step; ``reverse=True`` runs from that
    last step back.  A dict with ``weight_hr`` ``[P, H]`` makes an LSTMP step
    (see :class:`kernrnn.RNN`'s ``proj_size``): ``weight_hh`` is then
    ``[G*H, P]``, and ``y``, ``h0[0]`` and ``hn[0]`` have P units.
    """
    cell = resolve_cell(cell)
    backend = get_backend(device_of(x))
    shape, dtype = _checks.array_attrs(x, "x")
    dtype = _checks.as_dtype(dtype, "x.dtype")
    check_cell_compiles(cell, dtype)
    _checks.check_array(x, "x", (None, None, None), dtype, finite=True)
    T, B, I = shape
    if isinstance(weight_ih, Mapping):
        params = dict(weight_ih)
    else:
        params = {"weight_ih": weight_ih, "weight_hh": weight_hh, "bias_ih": bias_ih,
                  "bias_hh": bias_hh}
    G = cell.n_gates
    b = params.get("bias_ih")
    if not (hasattr(b, "shape") and len(b.shape) == 1 and b.shape[0] % G == 0 and b.shape[0]):
        raise ValueError(
            f"cell {cell.name!r} has {G} gates: bias_ih must be [{G}*H], got "
            f"{list(getattr(b, 'shape', [])) if b is not None else None}"
        )
    H = b.shape[0] // G
    shapes = cell.param_shapes(I, H)
    P = _projection(cell, params.get("weight_hr"), H)
    if P:
        shapes["weight_hh"] = (shapes["weight_hh"][0], P)
        shapes["weight_hr"] = (P, H)
    missing = [k for k in shapes if params.get(k) is None]
    extra = [k for k in params if k not in shapes and params[k] is not None]
    if missing or extra:
        raise ValueError(f"cell {cell.name!r} takes the parameters {list(shapes)}; missing "
                         f"{missing}, unexpected {extra}")
    for name, want in shapes.items():
        try:
            _checks.check_array(params[name], name, want, dtype)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"cell {cell.name!r} with H={H} (from bias_ih): {exc}") from None
    h0 = _state_array(backend, h0, cell, B, H, dtype, "h0", P)
    lens = _checks.check_lengths(lengths, B, T)
    y, hn, ctx = backend.forward(
        cell, backend.asarray(x), {k: backend.asarray(params[k]) for k in shapes}, h0,
        backend.lengths(lens), bool(reverse), bool(training),
    )
    return y, _state_tuple(hn, cell, P), ctx


def rnn_backward(ctx, dy, dhn=None):
    """Backpropagation through time for one :func:`rnn_forward` call.

    Returns ``(dx, dh0, grads)``: ``dh0`` a tuple of S arrays, ``grads`` a dict
    with the keys of the forward call's parameters (``weight_ih``, ...).
    """
    if ctx is None:
        raise ValueError("rnn_backward needs the ctx of a forward call made with training=True, "
                         "got None (that forward ran with training=False)")
    backend = get_backend(ctx.device)
    T, B, _ = ctx.x.shape
    H = ctx.States.shape[3]
    P = ctx.buffers.Hp.shape[2] if ctx.buffers.Hp is not None else 0
    _checks.check_array(dy, "dy", (T, B, P or H), ctx.x.dtype)
    dhn = _state_array(backend, dhn, ctx.cell, B, H, ctx.x.dtype, "dhn", P)
    dx, dh0, grads = backend.backward(ctx, backend.asarray(dy), dhn)
    return dx, _state_tuple(dh0, ctx.cell, P), grads


def _projection(cell, weight_hr, H: int) -> int:
    """P of a ``weight_hr [P, H]`` given to :func:`rnn_forward` (0 without one)."""
    if weight_hr is None:
        return 0
    shape = tuple(getattr(weight_hr, "shape", ()))
    if len(shape) != 2 or not 0 < shape[0] < H or shape[1] != H:
        raise ValueError(f"weight_hr must be [P, {H}] with 0 < P < {H} (H={H} from bias_ih), "
                         f"got {list(shape)}")
    cell.check_projection()
    return shape[0]


def _state_tuple(st, cell, P: int) -> tuple:
    """The S states of ``[S, B, H]``; an LSTMP's h is the first P columns of ``st[0]``."""
    parts = [st[s] for s in range(cell.n_state)]
    if P:
        parts[0] = parts[0][:, :P]
    return tuple(parts)


def _state_array(backend, state, cell, B, H, dtype, name, P=0):
    """Stack a tuple of S ``[B, H]`` arrays into ``[S, B, H]`` (zeros if None).

    With an LSTMP's ``P``, ``state[0]`` is ``[B, P]`` and fills the first P columns.
    """
    S = cell.n_state
    if state is None:
        return backend.xp.zeros((S, B, H), dtype=dtype)
    if not isinstance(state, (tuple, list)) or len(state) != S:
        raise TypeError(
            f"{name} must be a tuple of {S} arrays {cell.state} of shape [{B}, {H}] for cell "
            f"{cell.name!r}, got {type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else "")
        )
    for k, (s, part) in enumerate(zip(cell.state, state)):
        _checks.check_array(part, f"{name}[{s}]", (B, P or H) if k == 0 else (B, H), dtype,
                            finite=True)
    out = backend.xp.zeros((S, B, H), dtype=dtype)
    for k, part in enumerate(state):
        out[k, :, :part.shape[1]] = backend.asarray(part)
    return out


_ = np
