"""Float64 NumPy reference of a recurrent layer, independent of the kernels.

A plain Python loop over time calling the cell's own NumPy ``reference`` step:
no code shared with :mod:`kernrnn.backends`.  Gradients of the kernels are
checked against finite differences of these functions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_direction", "reference_rnn"]


def reference_direction(cell, x, W_ih, W_hh, b_ih, b_hh, h0, lengths=None, reverse=False):
    """One layer, one direction.  ``h0`` is a tuple of S ``[B, H]`` arrays.

    Returns ``(y [T, B, H], hn tuple)`` in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    T, B, _ = x.shape
    H = W_hh.shape[1]
    G = cell.n_gates
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    state = tuple(np.array(s, dtype=np.float64) for s in h0)
    y = np.zeros((T, B, H))
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        xw = x[t] @ np.asarray(W_ih, np.float64).T + b_ih
        hu = state[0] @ np.asarray(W_hh, np.float64).T + b_hh
        new = cell.reference(
            tuple(xw[:, g * H:(g + 1) * H] for g in range(G)),
            tuple(hu[:, g * H:(g + 1) * H] for g in range(G)),
            state,
        )
        active = (t < lengths)[:, None]
        state = tuple(np.where(active, n, s) for n, s in zip(new, state))
        y[t] = np.where(active, state[0], 0.0)
    return y, state


def reference_rnn(cell, params, x, h0=None, lengths=None, num_layers=1, bidirectional=False):
    """A whole (multi-layer, bidirectional) layer with PyTorch's parameter names.

    ``params`` maps ``weight_ih_l{k}[_reverse]`` etc. to arrays; ``h0`` is a
    tuple of S ``[num_layers*D, B, H]`` arrays or None.  Returns
    ``(y [T, B, D*H], hn tuple of [num_layers*D, B, H])``.
    """
    D = 2 if bidirectional else 1
    x = np.asarray(x, dtype=np.float64)
    T, B, _ = x.shape
    H = params["weight_hh_l0"].shape[1]
    if h0 is None:
        h0 = tuple(np.zeros((num_layers * D, B, H)) for _ in range(cell.n_state))
    hn = [np.zeros((num_layers * D, B, H)) for _ in range(cell.n_state)]
    inp = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            p = {k: np.asarray(params[f"{k}{sfx}"], np.float64)
                 for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            idx = layer * D + d
            y, st = reference_direction(
                cell, inp, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"],
                tuple(h[idx] for h in h0), lengths, reverse=bool(d),
            )
            outs.append(y)
            for s in range(cell.n_state):
                hn[s][idx] = st[s]
        inp = np.concatenate(outs, axis=2)
    return inp, tuple(hn)
