"""Conformance check for a cell: kernels vs the float64 reference.

:func:`check_cell` is what a plugin author runs on a new cell (and what the
test-suite runs on every registered one): on random problems it compares

* the layer's output and final state, in float64 and float32, with the
  reference built from the cell's NumPy ``reference`` step;
* every gradient (each parameter, the input, each initial-state component)
  with a central finite difference of the reference loss along a random
  direction per tensor, in float64;
* for a cell with a hand-written backward, that backward with the one kernrnn
  derives from the forward (:func:`compare_backward`), element by element on
  sample values, naming the first gradient on which they disagree;
* for a parametrised recurrent weight (:class:`~kernrnn.cell.RecurrentWeight`),
  its ``vjp`` with finite differences of its ``forward``
  (:func:`check_recurrent_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernrnn._checks import to_host
from kernrnn.errors import CellError
from kernrnn.layer import RNN
from kernrnn.plugins import resolve_cell
from kernrnn.regularization import Regularization
from kernrnn.scalar_math import NORM_EPS, reference_norm
from kernrnn.testing import tolerances as tol
from kernrnn.testing.reference import reference_rnn

__all__ = ["check_cell", "ConformanceReport", "ConformanceError", "random_problem", "LAYER_SEED",
           "run_layer", "forward_errors", "gradient_errors", "compare_backward",
           "check_recurrent_weight"]


class ConformanceError(AssertionError):
    """A kernel disagrees with the reference beyond the tolerance."""


@dataclass
class ConformanceReport:
    """Largest errors :func:`check_cell` saw; ``str()`` gives a one-line summary."""

    cell: str
    device: str
    examples: int = 0
    max_forward_error: dict = field(default_factory=lambda: {"float64": 0.0, "float32": 0.0})
    max_gradient_error: float = 0.0
    #: Largest difference of a hand-written backward from the derived one (relative to
    #: ``max(1, abs(value))``); None for a derived backward or when none was compared.
    max_backward_difference: float | None = None
    #: Why a hand-written backward was not compared with a derived one ("" otherwise).
    backward_note: str = ""
    #: Largest relative error of a parametrised W_hh's vjp against finite differences of
    #: its forward; None for a cell without one.
    max_recurrent_weight_error: float | None = None

    def __str__(self) -> str:
        text = (f"cell {self.cell!r} on {self.device}: {self.examples} problems, max forward "
                f"error float64 {self.max_forward_error['float64']:.2e}, float32 "
                f"{self.max_forward_error['float32']:.2e}, max gradient error "
                f"(vs finite differences) {self.max_gradient_error:.2e}")
        if self.max_backward_difference is not None:
            text += (f", hand-written backward vs derived: max difference "
                     f"{self.max_backward_difference:.2e}")
        elif self.backward_note:
            text += f", {self.backward_note}"
        if self.max_recurrent_weight_error is not None:
            text += (f", recurrent_weight vjp vs finite differences "
                     f"{self.max_recurrent_weight_error:.2e}")
        return text


def random_problem(rng: np.random.Generator, max_T=8, max_B=4, max_I=6, max_H=6, max_layers=2,
                   cell=None):
    """A random :class:`~kernrnn.testing.strategies.Problem` drawn with ``rng`` (no hypothesis).

    With ``cell``, H fits it (a multiple of its number of heads), and a cell with
    ``raw_input`` gets I == H (see :func:`~kernrnn.testing.strategies.problems`).
    """
    from kernrnn.testing.strategies import Problem, hidden_multiple, raw_input_sizes

    T, B = int(rng.integers(1, max_T + 1)), int(rng.integers(1, max_B + 1))
    lengths = tuple(int(v) for v in rng.integers(0, T + 1, B)) if rng.random() < 0.5 else None
    m = hidden_multiple(cell)
    H = m * int(rng.integers(1, max(1, max_H // m) + 1))
    I, L = int(rng.integers(1, max_I + 1)), int(rng.integers(1, max_layers + 1))
    bi = bool(rng.random() < 0.5)
    I, L = raw_input_sizes(cell, I, H, L, bi)
    return Problem(T, B, I, H, L, bi, lengths, bool(rng.random() < 0.5),
                   int(rng.integers(0, 2**32 - 1)))


def _state_tuple(cell, s):
    return (s,) if cell.n_state == 1 else tuple(s)


#: The layer seed of :func:`run_layer`: its first call's masks are
#: ``RNN(..., seed=LAYER_SEED).mask_seed(0)``.
LAYER_SEED = 0


def run_layer(cell, p, params, x, h0, device="cpu", dy=None, dhn=None, regularization=None,
              cell_args=None):
    """Forward (and backward when ``dy`` is given) through :class:`kernrnn.RNN`.

    ``regularization``: keyword arguments of the layer (``recurrent_dropout``,
    ``input_dropout``, ``zoneout``); the call's masks come from seed
    :data:`LAYER_SEED`.  ``cell_args``: the cell's hyperparameters.  Returns host
    arrays ``(y, hn, dx, dh0, grads)`` (the last three None without ``dy``); states
    as tuples.
    """
    layer = RNN(cell, p.I, p.H, num_layers=p.num_layers, bidirectional=p.bidirectional,
                dtype=x.dtype, device=device, seed=LAYER_SEED, proj_size=p.proj_size,
                cell_args=cell_args, **(regularization or {}))
    be = layer._backend
    layer.load_state_dict({k: be.from_host(v) if device == "cuda" else v
                           for k, v in params.items()})
    put = (lambda a: be.from_host(a)) if device == "cuda" else (lambda a: a)
    h0_arg = None
    if h0 is not None:
        h0_arg = put(h0[0]) if cell.n_state == 1 else tuple(put(h) for h in h0)
    y, hn = layer(put(x), h0_arg, p.lengths)
    if dy is None:
        return to_host(y), tuple(to_host(h) for h in _state_tuple(cell, hn)), None, None, None
    dhn_arg = dhn[0] if cell.n_state == 1 else tuple(dhn)
    if device == "cuda":
        dhn_arg = put(dhn_arg) if cell.n_state == 1 else tuple(put(h) for h in dhn_arg)
    dx, dh0 = layer.backward(put(dy), dhn_arg)
    return (to_host(y), tuple(to_host(h) for h in _state_tuple(cell, hn)), to_host(dx),
            tuple(to_host(h) for h in _state_tuple(cell, dh0)),
            {k: to_host(v) for k, v in layer.grads.items()})


def _scaled_error(got, want, tolerance):
    """max |got - want| / (atol + rtol |want|): <= 1 means within tolerance."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ConformanceError(f"shape {got.shape} differs from the reference's {want.shape}")
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - want) / (tolerance["atol"] + tolerance["rtol"] * np.abs(want))))


def _reference(cell, p, regularization, cell_args=None):
    """The reference of problem ``p`` with the masks of :func:`run_layer`'s first call."""
    if not regularization:
        return lambda params, x, h0: reference_rnn(cell, params, x, h0, p.lengths, p.num_layers,
                                                   p.bidirectional, cell_args=cell_args)
    settings = Regularization.build(cell, **regularization)
    seed = RNN(cell, p.I, p.H, dtype=np.float64, seed=LAYER_SEED).mask_seed(0)
    return lambda params, x, h0: reference_rnn(cell, params, x, h0, p.lengths, p.num_layers,
                                               p.bidirectional, settings, seed, True,
                                               cell_args=cell_args)


def forward_errors(cell, p, dtype, device="cpu", regularization=None, cell_args=None):
    """(scaled error, absolute error) of output and final state vs the reference.

    ``regularization``: the layer's regularisation keywords (masks of the first call);
    ``cell_args``: the cell's hyperparameters.
    """
    from kernrnn.testing.strategies import make_arrays

    params, x, h0 = make_arrays(cell, p, np.float64)
    ref_y, ref_hn = _reference(cell, p, regularization, cell_args)(params, x, h0)
    cast = {k: v.astype(dtype) for k, v in params.items()}
    y, hn, *_ = run_layer(cell, p, cast, x.astype(dtype),
                          None if h0 is None else tuple(h.astype(dtype) for h in h0), device,
                          regularization=regularization, cell_args=cell_args)
    t = tol.forward_tolerance(dtype)
    scaled = max([_scaled_error(y, ref_y, t)] + [_scaled_error(a, b, t) for a, b in zip(hn, ref_hn)])
    absolute = max([float(np.max(np.abs(y - ref_y), initial=0))]
                   + [float(np.max(np.abs(a - b), initial=0)) for a, b in zip(hn, ref_hn)])
    return scaled, absolute


def gradient_errors(cell, p, device="cpu", regularization=None, cell_args=None):
    """Largest relative error of directional derivatives vs finite differences.

    One random direction per tensor: each parameter, ``x`` and each component
    of ``h0`` (when the problem has one).  The loss is ``sum(y*dy) + sum(hn*dhn)``
    with random ``dy``, ``dhn``; with ``regularization`` the masks are those of
    the layer's first call, fixed; ``cell_args``: the cell's hyperparameters.
    """
    from kernrnn.testing.strategies import make_arrays

    params, x, h0 = make_arrays(cell, p, np.float64)
    rng = np.random.default_rng(p.seed ^ 0x5EED)
    D = 2 if p.bidirectional else 1
    dy = rng.uniform(-1, 1, (p.T, p.B, D * p.out_size))
    dhn = tuple(rng.uniform(-1, 1, (p.num_layers * D, p.B, p.out_size if s == 0 else p.H))
                for s in range(cell.n_state))
    _, _, dx, dh0, grads = run_layer(cell, p, params, x, h0, device, dy, dhn,
                                     regularization=regularization, cell_args=cell_args)
    reference = _reference(cell, p, regularization, cell_args)

    def loss(params_, x_, h0_):
        y, hn = reference(params_, x_, h0_)
        return float(np.sum(y * dy) + sum(np.sum(a * b) for a, b in zip(hn, dhn)))

    worst = 0.0
    targets = [("param", k) for k in params] + [("x", None)]
    if h0 is not None:
        targets += [("h0", s) for s in range(cell.n_state)]
    for kind, key in targets:
        if kind == "param":
            base, grad = params[key], grads[key]
        elif kind == "x":
            base, grad = x, dx
        else:
            base, grad = h0[key], dh0[key]
        # A wrong gradient disagrees along almost every direction; a kink of the
        # loss (a max or relu switching within the step, e.g. sLSTM's
        # stabiliser) spoils only the directions that cross it.  So a second
        # random direction is tried before a disagreement counts.
        for _direction in range(2):
            v = rng.standard_normal(base.shape)

            def shifted(eps):
                moved = base + eps * v
                if kind == "param":
                    return loss({**params, key: moved}, x, h0)
                if kind == "x":
                    return loss(params, moved, h0)
                return loss(params, x, tuple(moved if s == key else h0[s]
                                             for s in range(len(h0))))

            fd = tol.directional_derivative(shifted)
            analytic = float(np.sum(grad * v))
            err = abs(analytic - fd) / (tol.FD["atol"] + tol.FD["rtol"] * max(abs(fd), 1.0))
            if err <= 1:
                break
        if err > 1:
            raise ConformanceError(
                f"cell {cell.name!r}: gradient of {kind} {key!r} disagrees with finite differences: "
                f"directional derivative {analytic!r} vs {fd!r} on {p} (two random directions)"
            )
        worst = max(worst, abs(analytic - fd) / max(abs(fd), 1.0))
    return worst


def check_cell(cell, device="cpu", examples=10, seed=0, regularized=True,
               derived_backward=True, cell_args=None) -> ConformanceReport:
    """Run the conformance checks on ``cell`` (a Cell or a registered name).

    With ``regularized`` the last example runs with recurrent dropout (where
    the cell has a recurrent product), input dropout and zoneout on, the masks
    regenerated by the reference.  With ``derived_backward``, a hand-written
    backward is first compared with the derived one (:func:`compare_backward`;
    a forward the differentiator cannot read is noted in the report, not an
    error).  ``cell_args``: hyperparameters of the layers (default: the cell's
    defaults).  Raises :class:`ConformanceError` at the first disagreement;
    returns a report of the largest errors seen otherwise.
    """
    cell = resolve_cell(cell)
    rng = np.random.default_rng(seed)
    report = ConformanceReport(cell.name, device)
    if cell.recurrent_weight is not None:
        report.max_recurrent_weight_error = check_recurrent_weight(cell, seed=seed,
                                                                   cell_args=cell_args)
    if derived_backward and not cell.derived_backward:
        try:
            report.max_backward_difference = compare_backward(cell, seed=seed)
        except CellError as exc:
            report.backward_note = f"hand-written backward not compared with a derived one: {exc}"
    for example in range(examples):
        p = random_problem(rng, cell=cell)
        reg = None
        if regularized and example == examples - 1:
            # recurrent dropout masks h before W_hh: only for a product on h alone
            rdrop = 0.3 if cell.has_recurrent and cell.reads_h_only else 0.0
            reg = dict(recurrent_dropout=rdrop, input_dropout=0.2, zoneout=0.25)
        for dtype in (np.float64, np.float32):
            scaled, absolute = forward_errors(cell, p, dtype, device, regularization=reg,
                                              cell_args=cell_args)
            if scaled > 1:
                raise ConformanceError(
                    f"cell {cell.name!r} on {device}, {np.dtype(dtype)}: forward differs from the "
                    f"reference by {absolute:.3e} (tolerance {tol.forward_tolerance(dtype)}) on {p}"
                    + (f" with regularisation {reg}" if reg else "")
                )
            key = np.dtype(dtype).name
            report.max_forward_error[key] = max(report.max_forward_error[key], absolute)
        report.max_gradient_error = max(report.max_gradient_error,
                                        gradient_errors(cell, p, device, regularization=reg,
                                                        cell_args=cell_args))
        report.examples += 1
    return report


# -- a parametrised recurrent weight ----------------------------------------------------------


def check_recurrent_weight(cell, seed: int = 0, cell_args=None, hidden_size: int = 3,
                           examples: int = 3) -> float:
    """Check a :class:`~kernrnn.cell.RecurrentWeight`'s ``vjp`` against its ``forward``.

    On ``examples`` random stored weights (``hidden_size`` units, float64 NumPy) the
    directional derivative of ``sum(G * forward(W))`` along a random direction, by
    finite differences, must equal ``sum(vjp(W, G) * V)``.  Raises
    :class:`ConformanceError` naming the cell, both values and the hyperparameters;
    returns the largest relative error (0.0 for a cell without a parametrised weight).
    """
    cell = resolve_cell(cell)
    if cell.recurrent_weight is None:
        return 0.0
    values = cell.hyper_values(cell_args)
    rng = np.random.default_rng(seed)
    shape = cell.param_shapes(hidden_size, hidden_size * cell.n_heads)["weight_hh"]
    worst = 0.0
    for example in range(examples):
        W, V, G = (rng.standard_normal(shape) for _ in range(3))

        def loss(eps):
            return float(np.sum(G * cell.effective_weight_hh(W + eps * V, np, values)))

        fd = tol.directional_derivative(loss)
        analytic = float(np.sum(cell.weight_hh_vjp(W, G, np, values) * V))
        err = abs(analytic - fd) / (tol.FD["atol"] + tol.FD["rtol"] * max(abs(fd), 1.0))
        if not err <= 1:
            raise ConformanceError(
                f"cell {cell.name!r}: recurrent_weight.vjp disagrees with finite differences of "
                f"recurrent_weight.forward: directional derivative {analytic!r} (vjp) vs "
                f"{fd!r} (finite differences), on a weight_hh {list(shape)} (example "
                f"{example}, hyperparameters {values})")
        worst = max(worst, abs(analytic - fd) / max(abs(fd), 1.0))
    return worst


# -- a hand-written backward against the derived one -----------------------------------------


def compare_backward(cell, examples: int = 10, seed: int = 0, rtol: float = 1e-8) -> float:
    """Compare ``cell``'s hand-written backward with the one derived from its forward.

    On ``examples`` rows of 3 units of random sample values (inputs in [-2, 2],
    states from the cell's sampler, per-unit parameters and normalisation gains
    random), both backwards are run after their own forwards, through both stages
    and the normalisation's backward for a two-stage step, in float64 Python.
    Raises :class:`ConformanceError` naming the first gradient (``dxw[k]``, ``dhu[k]``,
    ``dprev[s]`` or ``d<param>[b]``) whose values differ by more than ``rtol``
    relative to ``max(1, abs(value))``; the recurrent gradient of a gate without a recurrent
    part is not compared.  Returns the largest such difference.  Raises
    :class:`~kernrnn.errors.CellError` when the forward cannot be derived.
    """
    cell = resolve_cell(cell)
    derived = cell.derivation()
    rng = np.random.default_rng(seed)
    G, S, H = cell.n_gates, cell.n_state, 3
    rec = set(cell.recurrent_gate_indices)
    labels = ([f"dxw[{k}] (gate {cell.gate_labels[k]!r})" for k in range(G)]
              + [f"dhu[{k}] (gate {cell.gate_labels[k]!r})" for k in range(G)]
              + [f"dprev[{s}] (state {cell.state[s]!r})" for s in range(S)]
              + [f"d{p.name}[{b}]" for p in cell.params for b in range(p.blocks)]
              + (["dx (the raw input)"] if cell.raw_input else []))
    compared = [k not in range(G, 2 * G) or k - G in rec for k in range(len(labels))]
    worst = 0.0
    for example in range(examples):
        rows = _sample_rows(cell, rng, H)
        norms = {v: (rng.uniform(0.5, 1.5, H), rng.uniform(-0.5, 0.5, H)) for v in cell.normalize}
        hand = _row_gradients(cell, cell, rows, norms)
        mine = _row_gradients(derived, cell, rows, norms)
        for j in range(H):
            for label, ok, a, b in zip(labels, compared, hand[j], mine[j]):
                if not ok:
                    continue
                err = abs(a - b) / max(1.0, abs(a), abs(b))
                if not err <= rtol:
                    raise ConformanceError(
                        f"cell {cell.name!r}: the hand-written backward disagrees with the one "
                        f"derived from the forward at {label}: hand-written {a!r}, derived {b!r} "
                        f"(unit {j} of sample {example}; the derived one is the gradient of "
                        f"the forward)")
                worst = max(worst, err)
    return worst


def _sample_rows(cell, rng, H):
    """(xw, hu, prev, params, dstate, x) per unit of one row, as tuples of floats (x: the
    raw input as a 1-tuple, None without ``raw_input``)."""
    def draw(n, lo=-1.0, hi=1.0):
        return tuple(float(v) for v in rng.uniform(lo, hi, n))

    rec = set(cell.recurrent_gate_indices)
    states = cell.sample_states(rng, (H,))
    rows = []
    for j in range(H):
        hu = tuple(v if k in rec else 0.0 for k, v in enumerate(draw(cell.n_gates, -2, 2)))
        rows.append((draw(cell.n_gates, -2, 2), hu if cell.has_recurrent else None,
                     tuple(float(v[j]) for v in states), tuple(draw(p.blocks) for p in cell.params),
                     draw(cell.n_state), draw(1, -2, 2) if cell.raw_input else None))
    return rows


def _row_gradients(math_, cell, rows, norms) -> list[list[float]]:
    """Per unit, the flat gradients (dxw, dhu, dprev, dparams[, dx]; dhu zeros without
    ``hu``) of ``math_``'s forward/backward (and second stage), run over one row."""
    G = cell.n_gates

    def flat(out, dprev=None, dparams=None):
        dxw, dhu, dprev0, dparams0 = cell.split_backward(out)
        dprev = dprev0 if dprev is None else dprev
        dparams = dparams0 if dparams is None else dparams
        dx = cell.raw_input_grad(out) or ()
        return [float(v) for v in (*dxw, *(dhu if dhu is not None else (0.0,) * G), *dprev,
                                   *(v for d in dparams for v in d), *dx)]

    if not cell.normalize:
        out = []
        for xw, hu, prev, params, dstate, x in rows:
            _, saved = math_.forward(*cell.forward_args(xw, hu, prev, params, x))
            out.append(flat(math_.backward(saved, prev, dstate, *params)))
        return out
    firsts = [math_.forward(*cell.forward_args(xw, hu, prev, params, x))
              for xw, hu, prev, params, _, x in rows]
    Z = np.array([z for z, _ in firsts], dtype=np.float64)  # [H, NZ]
    ZN = np.stack([reference_norm(Z[:, k], *norms[v], cell.normalize_kind)
                   for k, v in enumerate(cell.normalize)], axis=1)
    seconds = []
    for j, (_, _, prev, params, dstate, _) in enumerate(rows):
        zn, mid = tuple(float(v) for v in ZN[j]), firsts[j][1]
        _, saved = math_.forward2(zn, mid, prev, *params)
        seconds.append(math_.backward2(saved, zn, mid, prev, dstate, *params))
    dZN = np.array([b[0] for b in seconds], dtype=np.float64)
    dZ = np.stack([_norm_backward(Z[:, k], dZN[:, k], norms[v][0], cell.normalize_kind)
                   for k, v in enumerate(cell.normalize)], axis=1)
    out = []
    for j, (_, _, prev, params, _, _) in enumerate(rows):
        b2 = seconds[j]
        back = math_.backward(firsts[j][1], prev, tuple(float(v) for v in dZ[j]), b2[1], *params)
        _, _, dprev, dparams = cell.split_backward(back)
        dprev = tuple(a + b for a, b in zip(dprev, b2[2]))
        dparams = tuple(tuple(a + b for a, b in zip(p, q)) for p, q in zip(dparams, b2[3:]))
        out.append(flat(back, dprev, dparams))
    return out


def _norm_backward(z, dzn, gain, kind):
    """The gradient of ``z`` from that of ``reference_norm(z, gain, bias, kind)``, over a row."""
    zc = z - z.mean() if kind == "layer" else z
    rstd = 1.0 / np.sqrt((zc * zc).mean() + NORM_EPS)
    xhat = zc * rstd
    g = dzn * gain
    m1 = g.mean() if kind == "layer" else 0.0
    return rstd * (g - m1 - xhat * (g * xhat).mean())
