"""The first tier: one layer direction's time loop in NumPy, while the kernels compile.

A new cell's fused kernels take seconds to compile (``kernrnn bench
--startup``); this loop takes none.  It runs the derived step on ``[B, H]``
arrays (:attr:`kernrnn.autodiff.differentiate.Derived.array_forward` / ``array_backward``:
the same graph the kernels are generated from, written for NumPy) with one
BLAS product per step, and BPTT in reverse with the weight gradients as large
products after the loop, as the kernels do.  :mod:`~kernrnn.backends.cpu.tiers`
decides when it runs; it has the call interface of
:mod:`~kernrnn.backends.cpu.host`.  Results agree with the kernels to
rounding (summation order differs), not bit for bit.

It covers the cells whose step is one stage, with a dense, per-head or no
recurrent product and per-unit parameters (:func:`supports`); anything else
(normalisations, regularisation, a projection, a hand-written backward)
waits for the kernels as before.
"""

from __future__ import annotations

import numpy as np

from kernrnn.backends import common

__all__ = ["supports", "forward", "backward", "PATH"]

#: ``ForwardContext.path`` of a context this tier made.
PATH = "first tier"


def supports(cell, reg=None, proj: bool = False) -> bool:
    """True when this tier runs ``cell`` exactly as the kernels define it."""
    d = cell.derivation() if cell.derived_backward else None
    return (d is not None and d.array_forward is not None and reg is None and not proj
            and cell.input_norm is None and cell.recurrent_norm is None
            and not cell.normalize and cell.recurrent in ("dense", "heads", "none")
            # stage products wait for the kernels (a parametrised W_hh is applied above
            # the backends; the raw input and several recurrent states run here)
            and not cell.products)


def _unit_tuples(cell, params, H: int, hyper, dtype) -> list[tuple]:
    """The step's trailing arguments: each per-unit parameter as the tuple of ``[H]``
    blocks, then the hyperparameters (``hyper``, None: the defaults) in ``dtype``."""
    units = [tuple(params[p.name][k * H:(k + 1) * H] for k in range(p.blocks))
             for p in cell.params]
    return units + [tuple(dtype.type(v) for v in a) for a in cell.hyper_args(hyper)]


def _full(values, shape, dtype) -> list:
    """The step's results as arrays of ``shape`` (a derived constant, such as the zero
    gradient of an unused input, comes back as a number)."""
    return [np.broadcast_to(np.asarray(v, dtype=dtype), shape) for v in values]


def _product_input(cell, prev):
    """What the recurrent product reads: h, or the named states side by side ``[B, R*H]``."""
    if cell.reads_h_only:
        return prev[0]
    return np.concatenate([prev[k] for k in cell.recurrent_state_indices], axis=1)


def _recurrent(cell, W, h):
    """``h @ W_hh`` of one step as ``[B, Gr, H]`` (gate ``r`` of unit ``j``); ``h`` is
    :func:`_product_input`'s."""
    B = h.shape[0]
    if cell.recurrent == "dense":
        return (h @ W.T).reshape(B, cell.n_recurrent_gates, -1)
    H = h.shape[1]
    NH, Grdh, dh = W.shape
    hu = np.einsum("bkd,ked->bke", h.reshape(B, NH, dh), W)  # [B, NH, Gr*dh]
    return hu.reshape(B, NH, Grdh // dh, dh).transpose(0, 2, 1, 3).reshape(B, -1, H)


def _recurrent_backward(cell, W, dhu, h):
    """``(dh, dW)`` of :func:`_recurrent` for one step, ``dhu [B, Gr, H]``."""
    B, Gr, H = dhu.shape
    if cell.recurrent == "dense":  # (h: the product's input, [B, R*H] for several states)
        d = dhu.reshape(B, Gr * H)
        return d @ W, d.T @ h
    NH, _, dh = W.shape
    d = dhu.reshape(B, Gr, NH, dh).transpose(0, 2, 1, 3).reshape(B, NH, Gr * dh)
    hk = h.reshape(B, NH, dh)
    return (np.einsum("bke,ked->bkd", d, W).reshape(B, H),
            np.einsum("bke,bkd->ked", d, hk))


def _steps(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


def forward(cell, x, params, h0, lengths, reverse, training, y=None, hyper=None):
    """:func:`kernrnn.backends.cpu.host.forward` in NumPy (no regularisation, no projection)."""
    T, B, I = x.shape
    S, H, G, dtype = cell.n_state, h0.shape[2], cell.n_gates, x.dtype
    d = cell.derivation()
    rec = cell.has_recurrent
    rgates = cell.recurrent_gate_indices
    XW = (x.reshape(T * B, I) @ params["weight_ih"].T).reshape(T, B, G, H)
    XW += params["bias_ih"].reshape(G, H)
    W = common.recurrent_weights(cell, params, H)[0] if cell.recurrent == "dense" else \
        params.get("weight_hh")
    b_hh = params["bias_hh"].reshape(-1, H) if rec else None
    units = _unit_tuples(cell, params, H, hyper, dtype)
    States = np.empty((S, T + 1, B, H), dtype=dtype)
    States[:, T if reverse else 0] = h0
    if y is None:
        y = np.empty((T, B, H), dtype=dtype)
    zero = np.zeros((B, H), dtype=dtype)
    saved = [None] * T
    active = lengths[None, :] > np.arange(T)[:, None]  # [T, B]: step t of row b runs
    for t in _steps(T, reverse):
        p, n = (t + 1, t) if reverse else (t, t + 1)
        prev = tuple(States[:, p])
        xw = tuple(XW[t, :, g] for g in range(G))
        args = (xw,)
        if rec:
            hu_r = _recurrent(cell, W, _product_input(cell, prev)) + b_hh
            hu = [zero] * G
            for r, g in enumerate(rgates):
                hu[g] = hu_r[:, r]
            args += (tuple(hu),)
        raw = ((x[t],),) if cell.raw_input else ()  # x_t itself (I == H), after the rest
        new, sv = d.array_forward(*args, prev, *units, *raw)
        a = active[t][:, None]
        every = bool(a.all())  # no row has ended: no masking
        for s, v in enumerate(new):
            States[s, n] = v if every else np.where(a, v, prev[s])
        y[t] = States[0, n] if every else np.where(a, States[0, n], 0)
        if training:  # the step's own arrays (or views of inputs no later step writes)
            saved[t] = sv
    hn = States[:, 0 if reverse else T].copy()
    if not training:
        return y, hn, None
    buf = common.TimeBuffers(States=States, Saved=saved, Mid=None, Zhat=None, Rz=None,
                             HU=None, Rhh=None)
    ctx = common.ForwardContext(cell, x, params, None, buf, lengths, reverse, path=PATH,
                                hyper=hyper)
    return y, hn, ctx


def backward(ctx, dy, dhn):
    """:func:`kernrnn.backends.cpu.host.backward` of a :func:`forward` context."""
    cell, x, params, buf = ctx.cell, ctx.x, ctx.params, ctx.buffers
    T, B, I = x.shape
    H, G, dtype = dhn.shape[2], cell.n_gates, x.dtype
    d = cell.derivation()
    rec = cell.has_recurrent
    rgates = list(cell.recurrent_gate_indices)
    W = params.get("weight_hh")
    units = _unit_tuples(cell, params, H, ctx.hyper, dtype)
    dS = [np.array(v, dtype=dtype) for v in dhn]
    dXW = np.zeros((T, B, G, H), dtype=dtype)
    dHU = np.zeros((T, B, len(rgates), H), dtype=dtype) if rec else None
    dW_hh = np.zeros_like(W) if rec else None
    dunits = [np.zeros((p.blocks, H), dtype=dtype) for p in cell.params]
    dx_raw = np.zeros((T, B, H), dtype=dtype) if cell.raw_input else None
    active = ctx.lengths[None, :] > np.arange(T)[:, None]
    for t in reversed(_steps(T, ctx.reverse)):
        p = t + 1 if ctx.reverse else t
        prev = tuple(buf.States[:, p])
        a = active[t][:, None]
        every = bool(a.all())
        dnew = list(dS)
        dnew[0] = dS[0] + dy[t]
        out = d.array_backward(tuple(buf.Saved[t]), prev, tuple(dnew), *units)
        dxw, rest = out[0], out[1:]
        for g, v in enumerate(dxw):
            dXW[t, :, g] = v if every else np.where(a, v, 0)
        if rec:
            dhu, rest = rest[0], rest[1:]
            for r, g in enumerate(rgates):
                dHU[t, :, r] = dhu[g] if every else np.where(a, dhu[g], 0)
        if cell.raw_input:  # the raw input's gradient comes last
            (v,) = _full(rest[-1], (B, H), dtype)
            dx_raw[t] = v if every else np.where(a, v, 0)
            rest = rest[:-1]
        dprev, dps = _full(rest[0], (B, H), dtype), rest[1:]
        for acc, dp in zip(dunits, dps):  # (hyperparameters have no gradient)
            for k, v in enumerate(_full(dp, (B, H), dtype)):
                acc[k] += (v if every else np.where(a, v, 0)).sum(axis=0)
        if rec:
            dh, dW = _recurrent_backward(cell, W, dHU[t], _product_input(cell, prev))
            dW_hh += dW
            for k, s in enumerate(cell.recurrent_state_indices):  # back to each state read
                dprev[s] = dprev[s] + dh[:, k * H:(k + 1) * H]
        dS = list(dprev) if every else [np.where(a, v, dS[s]) for s, v in enumerate(dprev)]
    dXW2 = dXW.reshape(T * B, G * H)
    grads = {"weight_ih": dXW2.T @ x.reshape(T * B, I), "bias_ih": dXW2.sum(axis=0)}
    if rec:
        grads["weight_hh"] = dW_hh
        grads["bias_hh"] = dHU.sum(axis=(0, 1)).reshape(-1)
    for p, acc in zip(cell.params, dunits):
        grads[p.name] = acc.reshape(-1)
    dx = (dXW2 @ params["weight_ih"]).reshape(T, B, I)
    if cell.raw_input:
        dx += dx_raw
    return dx, np.stack(dS), {k: np.asarray(v, dtype=dtype) for k, v in grads.items()}
