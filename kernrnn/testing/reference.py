"""Float64 NumPy reference of a recurrent layer, independent of the kernels.

A plain Python loop over time calling the cell's own NumPy ``reference`` step:
no code shared with :mod:`kernrnn.backends`.  The recurrence forms, per-unit
parameters and normalisations of the cell contract are written out here a
second time, directly from their definitions (:mod:`kernrnn.cell`).  Gradients
of the kernels are checked against finite differences of these functions.
"""

from __future__ import annotations

import numpy as np

from kernrnn.cell import reference_norm

__all__ = ["reference_direction", "reference_rnn", "reference_recurrent_product"]


def _norm_blocks(v, norm, n_blocks: int):
    """Normalise ``v [B, n_blocks*H]`` per gate block or per row (gain 1, bias 0)."""
    if norm.over == "row":
        return reference_norm(v, 1.0, 0.0, norm.kind)
    H = v.shape[1] // n_blocks
    return np.concatenate([reference_norm(v[:, g * H:(g + 1) * H], 1.0, 0.0, norm.kind)
                           for g in range(n_blocks)], axis=1)


def reference_recurrent_product(cell, h, W_hh):
    """``[B, Gr*H]`` recurrent products in gate-major order (gate r, unit j at ``r*H + j``).

    ``"dense"``: ``h @ W_hh.T``; ``"heads"``: head k's units ``k*dh:(k+1)*dh``
    times its block ``W_hh[k]`` (rows ``r*dh + i``), scattered back to units.
    """
    if cell.recurrent == "dense":
        return h @ W_hh.T
    NH, Grdh, dh = W_hh.shape
    Gr = Grdh // dh
    B, H = h.shape
    out = np.zeros((B, Gr * H))
    for k in range(NH):
        hk = h[:, k * dh:(k + 1) * dh] @ W_hh[k].T  # [B, Gr*dh], gate-major within the head
        for r in range(Gr):
            out[:, r * H + k * dh:r * H + (k + 1) * dh] = hk[:, r * dh:(r + 1) * dh]
    return out


def reference_direction(cell, x, params, h0, lengths=None, reverse=False, reg=None,
                        cell_args=None, resets=None):
    """One layer, one direction.  ``params`` maps the cell's parameter names to arrays.

    ``h0`` is a tuple of S ``[B, H]`` arrays; ``reg`` a
    :class:`~kernrnn.regularization.RegularizationCall` (its masks regenerated
    here from the same generator) or None; ``cell_args`` the cell's hyperparameters
    (defaults for those left out), passed to its ``reference`` by name (and to its
    :class:`~kernrnn.cell.RecurrentWeight`, whose forward gives ``W_hh``).  Returns
    ``(y [T, B, H], hn tuple)`` in float64.  With ``params["weight_hr"]`` ``[P, H]``
    (LSTMP) the state the recurrence and the output read is ``h = W_hr h_cell``:
    ``h0[0]``, ``y`` and ``hn[0]`` are ``[.., P]``.  ``resets`` (bool ``[T, B]``, or
    None): the state entering a flagged active step t is ``h0`` again (reverse: the
    state entering step t-1 from step t), one step at a time.
    """
    from kernrnn import regularization as R

    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)
    T, B, I = x.shape
    H0 = np.asarray(h0[0]).shape[1]
    Mr = None
    if reg is not None and reg.input_dropout:
        x = x * R.input_mask(np, reg.seed, reg.layer, reg.direction, B, I,
                             reg.settings.input_dropout, np.float64)[None]
    if reg is not None and reg.recurrent_dropout:
        Mr = R.recurrent_mask(np, reg.seed, reg.layer, reg.direction, B, H0,
                              reg.settings.recurrent_dropout, np.float64)
    G = cell.n_gates
    H = p["weight_ih"].shape[0] // G
    W_hr = p.get("weight_hr")
    rec = cell.recurrent_gate_indices
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    state = tuple(np.array(s, dtype=np.float64) for s in h0)
    hp = None
    if W_hr is not None:  # the projected h; the cell's own h starts at zero (it is not read)
        hp, state = state[0], (np.zeros((B, H)),) + state[1:]
    start, hp_start = state, hp
    unit_params = []
    for prm in cell.params:
        v = p[prm.name]
        unit_params.append(tuple(v[k * H:(k + 1) * H] for k in range(prm.blocks)))
    kwargs = dict(cell.hyper_values(cell_args))
    if cell.has_recurrent:  # a parametrised W_hh: the effective weight from the stored one
        p["weight_hh"] = cell.effective_weight_hh(p["weight_hh"], np, kwargs)
    if cell.normalize:
        def norm(name, z):
            return reference_norm(z, p[f"norm_{name}_weight"], p[f"norm_{name}_bias"],
                                  cell.normalize_kind)
        kwargs["norm"] = norm
    if cell.products:
        def matmul(name, m):  # W_m m + b_m over the row, split into the G_m gate blocks
            out = m @ p[f"weight_h{name}"].T + p[f"bias_h{name}"]
            return tuple(out[:, g * H:(g + 1) * H] for g in range(out.shape[1] // H))
        kwargs["matmul"] = matmul
    y = np.zeros((T, B, H if W_hr is None else W_hr.shape[0]))
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        r = t + 1 if reverse else t  # a flag at r separates steps r-1 and r
        if resets is not None and 0 < r < T:
            flag = (np.asarray(resets[r]) & (r < lengths))[:, None]
            state = tuple(np.where(flag, s0, s) for s0, s in zip(start, state))
            if hp is not None:
                hp = np.where(flag, hp_start, hp)
        xw = x[t] @ p["weight_ih"].T
        if cell.input_norm is not None:
            xw = _norm_blocks(xw, cell.input_norm, G) * p["norm_ih_weight"]
        xw = xw + p["bias_ih"]
        args = [tuple(xw[:, g * H:(g + 1) * H] for g in range(G))]
        if cell.has_recurrent:
            h_in = state[0] if hp is None else hp
            h_in = h_in if Mr is None else h_in * Mr
            if not cell.reads_h_only:  # W_hh [Gr*H, R*H] reads the states side by side
                h_in = np.concatenate([state[s] for s in cell.recurrent_state_indices], axis=1)
            hr = reference_recurrent_product(cell, h_in, p["weight_hh"])
            if cell.recurrent_norm is not None:
                hr = _norm_blocks(hr, cell.recurrent_norm, len(rec)) * p["norm_hh_weight"]
            hr = hr + p["bias_hh"]
            zero = np.zeros((B, H))
            args.append(tuple(hr[:, rec.index(g) * H:(rec.index(g) + 1) * H] if g in rec
                              else zero for g in range(G)))
        args.append(state)
        if cell.raw_input:  # x_t itself, element-wise (I == H), after input dropout
            kwargs["x"] = x[t]
        new = cell.reference(*args, *unit_params, **kwargs)
        if reg is not None and reg.zoneout:
            zo = reg.settings.zoneout
            if reg.training:  # a unit keeps its previous value with probability z_s
                new = tuple(np.where(R.zoneout_keep(reg.seed, reg.layer, reg.direction, s, t, B,
                                                    H, zo[s]), state[s], n)
                            for s, n in enumerate(new))
            else:  # the expectation
                new = tuple(zo[s] * state[s] + (1 - zo[s]) * n for s, n in enumerate(new))
        active = (t < lengths)[:, None]
        if hp is not None:
            hp = np.where(active, new[0] @ W_hr.T, hp)
        state = tuple(np.where(active, n, s) for n, s in zip(new, state))
        y[t] = np.where(active, state[0] if hp is None else hp, 0.0)
    return y, state if hp is None else (hp,) + state[1:]


def reference_rnn(cell, params, x, h0=None, lengths=None, num_layers=1, bidirectional=False,
                  regularization=None, seed=0, training=True, cell_args=None, resets=None):
    """A whole (multi-layer, bidirectional) layer with PyTorch's parameter names.

    ``params`` maps ``weight_ih_l{k}[_reverse]`` etc. to arrays (with
    ``weight_hr_l{k}``: an LSTMP, whose ``h`` is ``[.., P]``); ``h0`` is a
    tuple of S ``[num_layers*D, B, H]`` arrays or None; ``regularization`` a
    :class:`~kernrnn.regularization.Regularization` applied with the call seed
    ``seed``; ``cell_args`` the cell's hyperparameters; ``resets`` a bool ``[T, B]`` of
    episode starts, the same in every layer (see :class:`kernrnn.RNN`).  Returns
    ``(y [T, B, D*H], hn tuple of [num_layers*D, B, H])``.
    """
    from kernrnn.regularization import RegularizationCall

    D = 2 if bidirectional else 1
    x = np.asarray(x, dtype=np.float64)
    T, B, _ = x.shape
    H = np.asarray(params["bias_ih_l0"]).shape[0] // cell.n_gates
    widths = [H] * cell.n_state
    if "weight_hr_l0" in params:
        widths[0] = np.asarray(params["weight_hr_l0"]).shape[0]
    if h0 is None:
        h0 = tuple(np.zeros((num_layers * D, B, w)) for w in widths)
    hn = [np.zeros((num_layers * D, B, w)) for w in widths]
    inp = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            kinds = list(cell.param_shapes(inp.shape[2], H))
            if f"weight_hr{sfx}" in params:
                kinds.append("weight_hr")
            p = {k: params[f"{k}{sfx}"] for k in kinds}
            idx = layer * D + d
            reg = None
            if regularization is not None and regularization.active:
                reg = RegularizationCall(regularization, seed, layer, d, training)
            y, st = reference_direction(cell, inp, p, tuple(h[idx] for h in h0), lengths,
                                        reverse=bool(d), reg=reg, cell_args=cell_args,
                                        resets=resets)
            outs.append(y)
            for s in range(cell.n_state):
                hn[s][idx] = st[s]
        inp = np.concatenate(outs, axis=2)
    return inp, tuple(hn)
