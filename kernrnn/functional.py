"""Functional API: one layer, one direction, explicit forward and backward.

For researchers building their own models: :func:`rnn_forward` returns the
output, the final state and a context object; :func:`rnn_backward` takes that
context and the output gradients and returns the input, initial-state and
parameter gradients.  States are tuples of S arrays ``[B, H]`` (``(h,)`` or
``(h, c)``).  The backend is chosen by the arrays' device.
"""

from __future__ import annotations

from collections.abc import Mapping

from kernrnn import _checks
from kernrnn.backends import device_of, get_backend
from kernrnn.backends import resets as _resets
from kernrnn.backends.cpu import tiers
from kernrnn.plugins import resolve_cell
from kernrnn.scalar import check_cell_compiles

# resolve_cell lives with the registry (kernrnn.plugins); it stays importable from here.
__all__ = ["rnn_forward", "rnn_backward", "resolve_cell"]


def rnn_forward(cell, x, weight_ih=None, weight_hh=None, bias_ih=None, bias_hh=None, h0=None,
                lengths=None, reverse=False, training=True, cell_args=None, resets=None):
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
    ``[G*H, P]``, and ``y``, ``h0[0]`` and ``hn[0]`` have P units.  ``cell_args``:
    the cell's hyperparameters by name (the defaults for those left out).
    ``resets`` (bool ``[T, B]``): True where step t of row b starts a new
    episode; the state entering it is ``h0`` (with ``reverse``: the state
    entering step t-1 from step t), and :func:`rnn_backward` sends its
    gradient to ``dh0`` (see :class:`kernrnn.RNN`).
    """
    cell = resolve_cell(cell)
    hyper = {"hyper": cell.hyper_vector(cell_args)} if cell.hyper or cell_args else {}
    backend = get_backend(device_of(x))
    shape, dtype = _checks.array_attrs(x, "x")
    dtype = _checks.as_dtype(dtype, "x.dtype")
    if not tiers.defers_compile_check(cell, device_of(x)):
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
    cell.check_hidden_size(H)  # before the projection's checks
    P = _projection(cell, params.get("weight_hr"), H)
    shapes = direction_shapes(cell, I, H, P)
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
    rplan = _resets.plan(backend, _checks.check_resets(resets, (T, B)), lens)
    params, stored = effective_params(cell, {k: backend.asarray(params[k]) for k in shapes},
                                      backend.xp, cell_args)
    args = (cell, backend.asarray(x), params, h0)
    if rplan is None:
        y, hn, ctx = backend.forward(*args, backend.lengths(lens), bool(reverse), bool(training),
                                     **hyper)
    else:  # cut at the resets (kernrnn.backends.resets)
        y, hn, ctx = _resets.forward(backend, rplan, *args, bool(reverse), bool(training),
                                     **hyper)
    if ctx is not None:
        ctx.stored_weight_hh = stored
    return y, unstack_states(hn, cell, P), ctx


def rnn_backward(ctx, dy, dhn=None):
    """Backpropagation through time for one :func:`rnn_forward` call.

    Returns ``(dx, dh0, grads)``: ``dh0`` a tuple of S arrays, ``grads`` a dict
    with the keys of the forward call's parameters (``weight_ih``, ...).  The
    call consumes ``ctx``: the forward's buffers go back to the backend for
    the next call, so each forward call gets one backward.
    """
    if ctx is None:
        raise ValueError("rnn_backward needs the ctx of a forward call made with training=True, "
                         "got None (that forward ran with training=False)")
    if ctx.released:
        raise ValueError("rnn_backward got a ctx that an earlier rnn_backward call consumed "
                         "(its buffers were reused); run rnn_forward again for another backward")
    backend = get_backend(ctx.device)
    T, B, _ = ctx.x.shape
    H, P = ctx.hidden_size, ctx.proj_size
    _checks.check_array(dy, "dy", (T, B, P or H), ctx.x.dtype)
    dhn = _state_array(backend, dhn, ctx.cell, B, H, ctx.x.dtype, "dhn", P)
    dx, dh0, grads = _resets.backward(backend, ctx, backend.asarray(dy), dhn)
    stored_weight_grad(ctx.cell, ctx, grads, backend.xp)
    _resets.release(backend, ctx)
    return dx, unstack_states(dh0, ctx.cell, P), grads


# -- a parametrised recurrent weight (kernrnn.cell.RecurrentWeight) ----------------------
# The backends see only the effective W_hh; these wrap a call of one layer direction.


def effective_params(cell, params: dict, xp, cell_args=None):
    """``(params, stored)``: ``params`` with ``weight_hh`` replaced by the cell's effective
    weight (computed once, before the time loop), and ``(stored weight_hh, hyperparameter
    values)`` to chain its gradient with; ``(params, None)`` for other cells."""
    if cell.recurrent_weight is None or "weight_hh" not in params:
        return params, None
    W, values = params["weight_hh"], cell.hyper_values(cell_args)
    return {**params, "weight_hh": cell.effective_weight_hh(W, xp, values)}, (W, values)


def stored_weight_grad(cell, ctx, grads: dict, xp) -> None:
    """Replace, in place, the effective weight's gradient in ``grads`` by the stored one's
    (``recurrent_weight.vjp``), for a forward context made through :func:`effective_params`."""
    stored = getattr(ctx, "stored_weight_hh", None)
    if stored is not None and "weight_hh" in grads:
        W, values = stored
        grads["weight_hh"] = cell.weight_hh_vjp(W, grads["weight_hh"], xp, values)


# -- PyTorch-style states and parameter shapes <-> what the backends take ------------
# Shared with kernrnn.layer, whose states carry one more leading axis (layers x directions).


def direction_shapes(cell, input_size: int, hidden_size: int, proj_size: int = 0) -> dict:
    """One layer direction's parameter shapes by the cell's names (no suffix).

    With a projection (PyTorch's LSTMP, ``proj_size`` P > 0) ``weight_hh``
    reads the P projected units and ``weight_hr [P, H]`` comes last.
    """
    shapes = cell.param_shapes(input_size, hidden_size)
    if proj_size:
        shapes["weight_hh"] = (shapes["weight_hh"][0], proj_size)
        shapes["weight_hr"] = (proj_size, hidden_size)
    return shapes


def stack_states(backend, parts, cell, lead: tuple, B: int, H: int, P: int, dtype, labels):
    """The backend's ``[S, *lead, B, H]`` from the S arrays ``[*lead, B, H]`` in ``parts``.

    Each part is checked (shape, dtype, finite) under its name in ``labels``.
    With a projection (``P`` > 0) ``parts[0]`` is ``[*lead, B, P]`` and fills
    the first P columns of ``h``, the rest zeros.
    """
    for k, (label, part) in enumerate(zip(labels, parts)):
        _checks.check_array(part, label, (*lead, B, P or H) if k == 0 else (*lead, B, H), dtype,
                            finite=True)
    out = backend.xp.zeros((cell.n_state, *lead, B, H), dtype=dtype)
    for k, part in enumerate(parts):
        out[k, ..., :part.shape[-1]] = backend.asarray(part)
    return out


def unstack_states(st, cell, P: int) -> tuple:
    """The S states of the backend's ``[S, ..., B, H]``; with a projection ``h`` is the
    first P columns of ``st[0]``."""
    parts = [st[s] for s in range(cell.n_state)]
    if P:
        parts[0] = parts[0][..., :P]
    return tuple(parts)


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


def _state_array(backend, state, cell, B, H, dtype, name, P=0):
    """``[S, B, H]`` from a tuple of S ``[B, H]`` arrays (zeros if None); with an LSTMP's
    ``P``, ``state[0]`` is ``[B, P]``."""
    S = cell.n_state
    if state is None:
        return backend.xp.zeros((S, B, H), dtype=dtype)
    if not isinstance(state, (tuple, list)) or len(state) != S:
        raise TypeError(
            f"{name} must be a tuple of {S} arrays {cell.state} of shape [{B}, {H}] for cell "
            f"{cell.name!r}, got {type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else "")
        )
    return stack_states(backend, state, cell, (), B, H, P, dtype,
                        [f"{name}[{s}]" for s in cell.state])
