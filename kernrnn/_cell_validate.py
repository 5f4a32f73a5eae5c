"""A cell's math run on sample values: the part of :meth:`kernrnn.cell.Cell.validate`
that calls the plugin's functions, and the sampling behind
:meth:`~kernrnn.cell.Cell.check_projection`.

Plain Python and NumPy, no compilation, so registering cells stays cheap.
Every problem raises :class:`~kernrnn.errors.CellError` through the ``fail``
the caller passes in (it names the cell and its source).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass

import numpy as np

from kernrnn.errors import CellError, describe_source
from kernrnn.scalar_math import reference_norm


@dataclass(frozen=True)
class CellFacts:
    """What only the cell's math tells: how many values it saves for backward
    (``n_saved``, K) and, for a two-stage step, passes from stage 1 to stage 2 (``n_mid``);
    per gate, whether ``dxw`` and ``dhu`` are one and the same gradient (``same_grads``,
    empty without ``hu``: see :attr:`kernrnn.cell.Cell.same_grads`)."""

    n_saved: int
    n_mid: int = 0
    same_grads: tuple = ()


def shared_gradients(cell) -> tuple:
    """Per gate: does the hand-written ``backward`` return one expression for ``dxw[k]``
    and ``dhu[k]``?  Read from its source: ``return d, d, ...`` (all gates) or two
    tuple literals compared entry by entry; anything else (an unreadable source, several
    returns) counts as not shared, which is always safe."""
    G = cell.n_gates
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cell.backward)))
    except (OSError, TypeError, SyntaxError):
        return (False,) * G
    returns = [n for n in ast.walk(tree.body[0]) if isinstance(n, ast.Return)]
    if len(returns) != 1 or not isinstance(returns[0].value, ast.Tuple) or \
            len(returns[0].value.elts) < 2:
        return (False,) * G
    dxw, dhu = returns[0].value.elts[:2]
    if ast.dump(dxw) == ast.dump(dhu):
        return (True,) * G
    if isinstance(dxw, ast.Tuple) and isinstance(dhu, ast.Tuple) and \
            len(dxw.elts) == len(dhu.elts) == G:
        return tuple(ast.dump(a) == ast.dump(b) for a, b in zip(dxw.elts, dhu.elts))
    return (False,) * G


def sample_math(cell, fail) -> CellFacts:
    """Run ``cell``'s math on sample values; ``fail(message)`` raises.

    Checks that forward, backward (and the second stage of a two-stage step)
    return tuples of the sizes the contract gives, that ``reference`` agrees
    with ``forward`` and, for ``linear=True``, that the step is affine in the
    state.  Returns the sizes only the math reveals.
    """
    if cell.staged:
        return _sample_staged(cell, fail)
    G, S, NZ = cell.n_gates, cell.n_state, cell.n_norm
    rng = np.random.default_rng(0)

    def sample(n):
        return tuple(float(v) for v in rng.uniform(-1, 1, n))

    H = 3  # one row of a few units: enough for the normalisation and the reference
    xw = [sample(G) for _ in range(H)]
    hu_full = [sample(G) for _ in range(H)]
    rec = set(cell.recurrent_gate_indices)
    hu = [tuple(v if g in rec else 0.0 for g, v in enumerate(row)) for row in hu_full]
    states = cell.sample_states(rng, (H,))
    prev = [tuple(float(v[j]) for v in states) for j in range(H)]
    pvals = [tuple(sample(p.blocks) for p in cell.params) for _ in range(H)]
    gains = {v: (np.array(sample(H)) + 1.5, np.array(sample(H))) for v in cell.normalize}
    raw = [sample(1) if cell.raw_input else None for _ in range(H)]  # x_t as 1-tuples

    def call(which, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            fail(f"{which} failed on sample input ({G} gates, state {cell.state}): "
                 f"{type(exc).__name__}: {exc}")

    def two_tuples(out, which, what):
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], tuple)
                and isinstance(out[1], tuple)):
            fail(f"{which} must return {what}, two tuples of scalars; got {out!r}")
        return out

    new_rows, saved_rows, mid_rows, zn_rows = [], [], [], []
    n_mid = 0
    if cell.normalize:
        firsts = [two_tuples(call("forward", cell.forward,
                                  *cell.forward_args(xw[j], hu[j], prev[j], pvals[j], raw[j])),
                             "forward", "(z, mid) for a cell with normalize")
                  for j in range(H)]
        for z, _ in firsts:
            if len(z) != NZ:
                fail(f"forward (stage 1) returned {len(z)} values to normalise, the cell "
                     f"declares normalize={cell.normalize!r}: the normalised value "
                     f"{cell.normalize[min(len(z), NZ - 1)]!r} must be produced by the step")
        Z = np.array([z for z, _ in firsts])  # [H, NZ]
        ZN = np.stack([reference_norm(Z[:, k], *gains[v], cell.normalize_kind)
                       for k, v in enumerate(cell.normalize)], axis=1)
        n_mid = len(firsts[0][1])
        for j in range(H):
            zn = tuple(float(v) for v in ZN[j])
            mid = firsts[j][1]
            new, saved = two_tuples(call("forward2", cell.forward2, zn, mid, prev[j],
                                         *pvals[j], *cell.hyper_args()), "forward2",
                                    "(new_state, saved)")
            new_rows.append(new)
            saved_rows.append(saved)
            mid_rows.append(mid)
            zn_rows.append(zn)
    else:
        for j in range(H):
            new, saved = two_tuples(call("forward", cell.forward,
                                         *cell.forward_args(xw[j], hu[j], prev[j], pvals[j],
                                                            raw[j])),
                                    "forward", "(new_state, saved)")
            new_rows.append(new)
            saved_rows.append(saved)
    if any(len(n) != S for n in new_rows):
        fail(f"forward returned a state of {len(new_rows[0])} values, the cell declares "
             f"{S} ({cell.state})")
    n_saved = len(saved_rows[0])
    _check_backward(cell, fail, call, n_mid, saved_rows, mid_rows, zn_rows, prev, pvals,
                    new_rows)
    _check_reference(cell, fail, xw, hu, prev, pvals, gains, new_rows, raw)
    if cell.linear:
        _check_linear(cell, fail, xw, pvals, raw)
    return CellFacts(n_saved=n_saved, n_mid=n_mid)


def _sample_staged(cell, fail) -> CellFacts:
    """:func:`sample_math` for a step cut by recurrent products: its stages on a row of a few
    units with random product weights, each result of the size the contract gives, the
    final state against ``reference`` (given a ``matmul`` over the same weights), then the
    backwards in reverse."""
    G, S, H = cell.n_gates, cell.n_state, 3
    rng = np.random.default_rng(0)
    d = cell._derivation
    fns = d.functions
    K = d.n_stages
    rec = set(cell.recurrent_gate_indices)
    xw = [tuple(float(v) for v in rng.uniform(-1, 1, G)) for _ in range(H)]
    hu = [tuple(float(v) if g in rec else 0.0 for g, v in enumerate(rng.uniform(-1, 1, G)))
          for _ in range(H)]
    states = cell.sample_states(rng, (H,))
    prev = [tuple(float(v[j]) for v in states) for j in range(H)]
    pvals = [tuple(tuple(float(v) for v in rng.uniform(-1, 1, p.blocks)) for p in cell.params)
             for _ in range(H)]
    weights = {p.name: (rng.uniform(-1, 1, (p.n_gates * H, H)), rng.uniform(-1, 1, p.n_gates * H))
               for p in cell.products}

    def product(name, m):  # m [.., H] -> G_m arrays [.., H]
        W, b = weights[name]
        out = np.asarray(m, dtype=np.float64) @ W.T + b
        return tuple(out[..., k * H:(k + 1) * H] for k in range(W.shape[0] // H))

    def call(which, *args):
        try:
            out = fns[which](*args)
        except Exception as exc:
            fail(f"{which} failed on sample input ({G} gates, state {cell.state}): "
                 f"{type(exc).__name__}: {exc}")
        if not (isinstance(out, tuple) and all(isinstance(v, tuple) for v in out)):
            fail(f"{which} must return tuples of scalars, got {out!r}")
        return out

    hyper = cell.hyper_args()
    rows = [call("forward", *cell.forward_args(xw[j], hu[j], prev[j], pvals[j]))
            for j in range(H)]
    history = []  # per stage: (zn rows, mid rows fed to it)
    for s in range(1, K):
        bnd = d.boundaries[s - 1]
        Z = np.array([r[0] for r in rows])  # [H, products at the boundary]
        zn = np.concatenate([np.stack(product(name, Z[:, i]), axis=1)
                             for i, (name, _) in enumerate(bnd)], axis=1)  # [H, sum G_m]
        zn_rows = [tuple(float(v) for v in zn[j]) for j in range(H)]
        mids = [r[1] for r in rows]
        history.append((zn_rows, mids))
        rows = [call(f"forward{s + 1}", zn_rows[j], mids[j], prev[j], *pvals[j], *hyper)
                for j in range(H)]
    new_rows = [r[0] for r in rows]
    if any(len(n) != S for n in new_rows):
        fail(f"the last stage returned a state of {len(new_rows[0])} values, the cell declares "
             f"{S} ({cell.state})")
    # backward on the first row, stage by stage in reverse
    dstate = tuple(float(v) for v in rng.uniform(-1, 1, S))
    out = call(f"backward{K}", rows[0][1], history[-1][0][0], history[-1][1][0], prev[0],
               dstate, *pvals[0], *hyper)
    for s in range(K - 2, -1, -1):
        nz = len(d.boundaries[s])
        dz = tuple(float(v) for v in rng.uniform(-1, 1, nz))
        own = history[s][1][0]  # mid_s of row 0
        if s == 0:
            out = call("backward", own, prev[0], dz, out[1], *pvals[0], *hyper)
        else:
            out = call(f"backward{s + 1}", own, history[s - 1][0][0], history[s - 1][1][0],
                       prev[0], dz, out[1], *pvals[0], *hyper)
    want = [G] + ([G] if cell.has_recurrent else []) + [S] + [p.blocks for p in cell.params]
    if [len(v) for v in out] != want:
        fail(f"backward returned tuples of sizes {[len(v) for v in out]}, expected {want}")
    _check_reference(cell, fail, xw, hu, prev, pvals, {}, new_rows, matmul=product)
    return CellFacts(n_saved=len(rows[0][1]), n_mid=0)


def _check_backward(cell, fail, call, n_mid, saved_rows, mid_rows, zn_rows, prev, pvals,
                    new_rows) -> None:
    """backward (and backward2) on the first sample row return tuples of the contract's sizes."""
    G, S = cell.n_gates, cell.n_state
    want = [("dxw", G)] + ([("dhu", G)] if cell.has_recurrent else []) + [("dprev", S)]
    dparams = [(f"d{p.name}", p.blocks) for p in cell.params]
    want += dparams + ([("dx", 1)] if cell.raw_input else [])

    def check(out, which, sizes):
        if not (isinstance(out, tuple) and len(out) == len(sizes)
                and all(isinstance(b, tuple) for b in out)):
            names = ", ".join(n for n, _ in sizes)
            fail(f"{which} must return ({names}), {len(sizes)} tuples; got {out!r}")
        for (label, size), got in zip(sizes, out):
            if len(got) != size:
                fail(f"{which} returned {len(got)} values for {label}, expected {size}")

    j = 0
    if cell.normalize:
        out2 = call("backward2", cell.backward2, saved_rows[j], zn_rows[j], mid_rows[j],
                    prev[j], new_rows[j], *pvals[j], *cell.hyper_args())
        check(out2, "backward2", [("dzn", cell.n_norm), ("dmid", n_mid),
                                  ("dprev", S)] + dparams)
        out = call("backward", cell.backward, mid_rows[j], prev[j], zn_rows[j], out2[1],
                   *pvals[j], *cell.hyper_args())
    else:
        out = call("backward", cell.backward, saved_rows[j], prev[j], new_rows[j],
                   *pvals[j], *cell.hyper_args())
    check(out, "backward", want)


def _check_reference(cell, fail, xw, hu, prev, pvals, gains, new_rows, raw=None,
                     matmul=None) -> None:
    """``reference`` on the sample rows as ``[1, H]`` arrays gives forward's new states."""
    G, S = cell.n_gates, cell.n_state

    def rows(vals, n):
        return tuple(np.array([[row[k] for row in vals]]) for k in range(n))

    args = [rows(xw, G)] + ([rows(hu, G)] if cell.has_recurrent else []) + [rows(prev, S)]
    for i, p in enumerate(cell.params):
        args.append(tuple(np.array([row[i][k] for row in pvals]) for k in range(p.blocks)))
    kwargs = dict(cell.hyper_values())
    if cell.raw_input:
        kwargs["x"] = np.array([[row[0] for row in raw]])
    if cell.normalize:
        def norm(name, z):
            if name not in gains:
                raise KeyError(f"normalize declares {cell.normalize!r}, got {name!r}")
            return reference_norm(z, *gains[name], cell.normalize_kind)
        kwargs["norm"] = norm
    if matmul is not None:
        kwargs["matmul"] = matmul
    try:
        ref = cell.reference(*args, **kwargs)
    except Exception as exc:
        fail(f"reference failed on sample input: {type(exc).__name__}: {exc}")
    if not isinstance(ref, tuple) or len(ref) != S:
        fail(f"reference must return a tuple of {S} arrays, got {ref!r}")
    for k, r in enumerate(ref):
        r = np.asarray(r, dtype=np.float64).reshape(-1)
        f = np.array([row[k] for row in new_rows], dtype=np.float64)
        if r.shape != f.shape or not np.all(np.isfinite(f)) or np.any(
                np.abs(r - f) > 1e-9 * np.maximum(1.0, np.abs(r))):
            fail(f"forward and reference disagree on state {cell.state[k]!r}: "
                 f"{f.tolist()!r} vs {r.tolist()!r} on the same sample input")


def _check_linear(cell, fail, xw, pvals, raw) -> None:
    """new_s = a_s * prev_s + b_s: check on samples that the step is affine per component."""
    S = cell.n_state
    rng = np.random.default_rng(1)
    for j in range(len(xw)):
        def step(prev):
            return cell.forward(*cell.forward_args(xw[j], None, tuple(prev), pvals[j],
                                                   raw[j]))[0]

        b = step([0.0] * S)
        a = [step([1.0 if s == k else 0.0 for s in range(S)])[k] - b[k] for k in range(S)]
        for _ in range(3):
            prev = [float(v) for v in rng.uniform(-2, 2, S)]
            got = step(prev)
            for k in range(S):
                want = a[k] * prev[k] + b[k]
                if not abs(got[k] - want) <= 1e-9 * max(1.0, abs(want)):
                    fail(f"linear=True, but state {cell.state[k]!r} is not a*prev + b in "
                         f"the previous state: at prev={prev} the step gives {got[k]!r}, "
                         f"the affine fit {want!r}")


def check_projection(cell) -> None:
    """Raise :class:`CellError` unless ``cell``'s step reads ``h_(t-1)`` only through ``W_hh``.

    See :meth:`kernrnn.cell.Cell.check_projection`; checked with the cell's
    reference step on two states that differ in ``h`` alone.
    """
    def fail(why):
        raise CellError(f"cell {cell.name!r}{describe_source(cell)}: proj_size needs {why}")

    if cell.recurrent != "dense":
        fail(f"a dense recurrence (the projected h feeds W_hh), got recurrent="
             f"{cell.recurrent!r}")
    if not cell.reads_h_only:
        fail(f"a recurrent product on h alone (the projected h feeds W_hh), got "
             f"recurrent_states={cell.recurrent_states!r}")
    if cell.staged:
        fail(f"a step of one stage, got recurrent products between stages "
             f"{tuple(p.name for p in cell.products)!r}")
    if cell.n_state < 2:
        fail(f"a state besides h (like the LSTM's c), got state={cell.state}")
    rng = np.random.default_rng(0)
    B, H, G = 2, 3, cell.n_gates
    xw = tuple(rng.uniform(-1, 1, (B, H)) for _ in range(G))
    hu = tuple(rng.uniform(-1, 1, (B, H)) for _ in range(G))
    prev = cell.sample_states(rng, (B, H))
    params = [tuple(rng.uniform(-1, 1, H) for _ in range(p.blocks)) for p in cell.params]
    kwargs = dict(cell.hyper_values())
    if cell.normalize:
        kwargs["norm"] = lambda name, z: reference_norm(z, 1.0, 0.0, cell.normalize_kind)
    if cell.raw_input:
        kwargs["x"] = rng.uniform(-1, 1, (B, H))
    other = (cell.sample_states(rng, (B, H))[0],) + tuple(prev[1:])
    a = cell.reference(xw, hu, prev, *params, **kwargs)
    b = cell.reference(xw, hu, other, *params, **kwargs)
    if not all(np.allclose(u, v, rtol=1e-12, atol=1e-12) for u, v in zip(a, b)):
        fail(f"a step that reads h_(t-1) only through W_hh; this cell's step changes "
             f"with h_(t-1) itself (its state {cell.state})")
