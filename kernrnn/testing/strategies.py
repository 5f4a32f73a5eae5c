"""Hypothesis strategies for recurrent-layer problems, and the problems' arrays.

``problems()`` draws shapes (T, B, I, H from 1 up), layers, directions,
lengths, whether there is an initial state, and a seed; the arrays themselves
come from a seeded NumPy generator (bounded values) so that shrinking works on
the shape and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Problem", "problems", "make_arrays", "hidden_multiple", "raw_input_sizes"]


@dataclass(frozen=True)
class Problem:
    """Sizes, layout and seed of one test problem (arrays come from :func:`make_arrays`)."""

    T: int
    B: int
    I: int
    H: int
    num_layers: int
    bidirectional: bool
    lengths: tuple[int, ...] | None
    with_h0: bool
    seed: int
    proj_size: int = 0  # LSTMP: the projected h's size (0: none)

    @property
    def out_size(self) -> int:
        """Units of ``h`` (and of the output) per direction."""
        return self.proj_size or self.H


def problems(max_T=8, max_B=4, max_I=6, max_H=6, max_layers=2, bidirectional=None,
             variable_lengths=True, cell=None, projection=False):
    """A hypothesis strategy of random problems; ``bidirectional=None`` draws it too.

    With ``cell``, H fits it (a multiple of its number of heads), and for a
    cell with ``raw_input`` I == H and a stack only where the layers above the
    first get H inputs (one direction, no projection).  With ``projection``, an
    LSTMP problem: H >= 2 and ``proj_size`` in [1, H-1].  Hypothesis is imported
    here, so the rest of this module (and :func:`kernrnn.testing.check_cell`) works
    without it.
    """
    from hypothesis import strategies as st

    @st.composite
    def draw_problem(draw):
        T = draw(st.integers(1, max_T))
        B = draw(st.integers(1, max_B))
        I = draw(st.integers(1, max_I))
        m = hidden_multiple(cell)
        H = m * draw(st.integers(1, max(1, max_H // m)))
        L = draw(st.integers(1, max_layers))
        bi = draw(st.booleans()) if bidirectional is None else bidirectional
        lengths = None
        if variable_lengths and draw(st.booleans()):
            lengths = tuple(draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
        with_h0 = draw(st.booleans())
        seed = draw(st.integers(0, 2**32 - 1))
        P = 0
        if projection:
            H = max(H, 2)
            P = draw(st.integers(1, H - 1))
        I, L = raw_input_sizes(cell, I, H, L, bi, P)
        return Problem(T, B, I, H, L, bi, lengths, with_h0, seed, P)

    return draw_problem()


def raw_input_sizes(cell, I: int, H: int, L: int, bidirectional: bool, P: int = 0):
    """``(I, L)`` a cell with ``raw_input`` runs with: I == H, and one layer where the
    layers above the first would get D*P or 2*H inputs; unchanged for other cells."""
    if cell is None or not getattr(cell, "raw_input", False):
        return I, L
    return H, (1 if (bidirectional or P) else L)


def hidden_multiple(cell) -> int:
    """The hidden sizes ``cell`` runs with are multiples of this (its heads; else 1)."""
    if cell is None or getattr(cell, "recurrent", "dense") != "heads":
        return 1
    return cell.heads


def make_arrays(cell, p: Problem, dtype=np.float64, scale=1.0):
    """Parameters (PyTorch names), input and initial state for problem ``p``.

    Weights and biases are uniform in +-scale/sqrt(H) (PyTorch's init for
    scale=1), per-unit parameters in [-1, 1], normalisation gains in
    [0.5, 1.5] and their biases in [-0.5, 0.5], inputs and states in [-1, 1].
    Returns ``(params, x, h0)`` with ``h0`` a tuple of S ``[L*D, B, H]`` arrays
    or None (with ``p.proj_size``: ``weight_hr`` and a ``[L*D, B, P]`` h).
    """
    rng = np.random.default_rng(p.seed)
    D = 2 if p.bidirectional else 1
    H = p.H
    bound = scale / np.sqrt(H)
    unit = {prm.name for prm in cell.params}
    params = {}
    for layer in range(p.num_layers):
        in_size = p.I if layer == 0 else D * p.out_size
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            shapes = cell.param_shapes(in_size, H)
            if p.proj_size:
                shapes["weight_hh"] = (shapes["weight_hh"][0], p.proj_size)
                shapes["weight_hr"] = (p.proj_size, H)
            for kind, shape in shapes.items():
                if kind in unit:
                    v = rng.uniform(-1, 1, shape)
                elif kind.startswith("norm_") and kind.endswith("_weight"):
                    v = rng.uniform(0.5, 1.5, shape)
                elif kind.startswith("norm_"):
                    v = rng.uniform(-0.5, 0.5, shape)
                else:
                    v = rng.uniform(-bound, bound, shape)
                params[f"{kind}{sfx}"] = v.astype(dtype)
    x = rng.uniform(-1, 1, (p.T, p.B, p.I)).astype(dtype)
    h0 = None
    if p.with_h0:
        h0 = tuple(v.astype(dtype) for v in cell.sample_states(rng, (p.num_layers * D, p.B, H)))
        if p.proj_size:
            h0 = (h0[0][..., :p.proj_size].copy(),) + h0[1:]
    return params, x, h0
