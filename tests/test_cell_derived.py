"""Cells written as a forward step only: kernrnn derives backward, saved values and reference.

* Shipped cells through the public layer in float64 (2 layers, both directions, variable
  lengths, an initial state, random per-unit parameters and norm gains, dropout and
  zoneout masks fixed): the derived gradients equal those of the hand-written math the
  cell had before (tests/hand_written_cells.py) to 1e-12 relative.  One cell per feature
  of the contract (LAYER_CELLS), since each cell costs two cold kernel compiles (about
  30 s); every shipped cell is compared element by element in tests/test_derive.py, and
  through the layer by ``python -m benchmarks.derived`` (its gradient column).
* The Cell API: a forward-only cell is derived at construction; ``dataclasses.replace``
  and pickling (in a fresh process too) derive again from the step; a hand-written backward
  stays as the override, with or without a reference; ``same_grads`` per gate.
* check_cell compares a hand-written backward with the derived one and names the first
  gradient on which they disagree.
"""

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hand_written_cells import MATH, hand_written
from hypothesis import given, settings
from hypothesis import strategies as st

from kernrnn.cell import Cell, CellError, sigmoid, tanh
from kernrnn.plugins import get_registry
from kernrnn.testing import ConformanceError, check_cell
from kernrnn.testing.conformance import compare_backward, run_layer
from kernrnn.testing.strategies import make_arrays, problems

REGISTRY = get_registry()
SHIPPED = sorted(n for n in REGISTRY.names()
                 if REGISTRY.source(n).distribution.startswith("kernrnn "))
ROOT = Path(__file__).resolve().parents[1]
#: One shipped cell per feature: dense with dxw == dhu (lstm), dhu != dxw (gru), no recurrent
#: matrix, a per-unit parameter and a relu kink (indrnn), a 3-block parameter and a value
#: recomputed in backward (lstm_peephole), heads, a select and 4 states (slstm), norms and
#: the two-stage split (lstm_ln).
LAYER_CELLS = ("gru", "indrnn", "lstm", "lstm_ln", "lstm_peephole", "slstm")


# -- every shipped cell: derived == hand-written, through the layer ---------------------------


def _tensors(result):
    y, hn, dx, dh0, grads = result
    return ([("y", y)] + [(f"hn[{s}]", h) for s, h in enumerate(hn)] + [("dx", dx)]
            + [(f"dh0[{s}]", h) for s, h in enumerate(dh0)] + sorted(grads.items()))


@pytest.mark.parametrize("name", LAYER_CELLS)
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_derived_gradients_equal_hand_written_through_the_layer(name, data):
    cell, hand = REGISTRY.get(name), hand_written(name)
    p = data.draw(problems(cell=cell, max_T=4, max_B=3, max_I=3, max_H=4), label="problem")
    lengths = data.draw(st.lists(st.integers(0, p.T), min_size=p.B, max_size=p.B), label="lengths")
    p = dataclasses.replace(p, num_layers=2, bidirectional=True, with_h0=True,
                            lengths=tuple(lengths))
    params, x, h0 = make_arrays(cell, p)  # per-unit parameters and norm gains random
    rng = np.random.default_rng(p.seed)
    dy = rng.uniform(-1, 1, (p.T, p.B, 2 * p.H))
    dhn = tuple(rng.uniform(-1, 1, (4, p.B, p.H)) for _ in range(cell.n_state))
    reg = dict(recurrent_dropout=0.3 if cell.has_recurrent else 0.0, input_dropout=0.2,
               zoneout=0.25)  # the same masks for both: run_layer's layer seed
    mine = _tensors(run_layer(cell, p, params, x, h0, dy=dy, dhn=dhn, regularization=reg))
    theirs = _tensors(run_layer(hand, p, params, x, h0, dy=dy, dhn=dhn, regularization=reg))
    assert [k for k, _ in mine] == [k for k, _ in theirs]
    for (label, got), (_, want) in zip(mine, theirs):
        err = float(np.max(np.abs(got - want), initial=0.0))
        assert err <= 1e-12 * float(np.max(np.abs(want), initial=0.0)), \
            f"{name} {label}: derived and hand-written differ by {err:.3e} on {p}"


def test_shipped_cells_are_forward_only():
    """Every shipped cell derives its backward; a hand-written one is kept only where it
    measured faster, with the measurement in a comment (none today)."""
    assert [n for n in SHIPPED if not REGISTRY.get(n).derived_backward] == []
    # a step with recurrent products (rhn) has no hand-written form: the contract has none
    assert sorted(MATH) == [n for n in SHIPPED if not REGISTRY.get(n).staged]


@pytest.mark.parametrize("name", sorted(MATH))
def test_derived_saves_no_more_than_hand_written(name):
    cell, hand = REGISTRY.get(name), hand_written(name)
    assert cell.n_saved + cell.n_mid <= hand.n_saved + hand.n_mid
    assert cell.same_grads == hand.same_grads == cell.derivation().same_grads


# -- the Cell API -------------------------------------------------------------------------------


def lstm_step(xw, hu, prev):
    i = sigmoid(xw[0] + hu[0])
    f = sigmoid(xw[1] + hu[1])
    g = tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3])
    c = f * prev[1] + i * g
    return (o * tanh(c), c)


def lstm_wrong_df(saved, prev, dstate):
    """The LSTM's hand-written backward with d(forget gate) missing its c_(t-1) factor."""
    i, f, g, o, tc = saved
    dc = dstate[1] + dstate[0] * o * (1 - tc * tc)
    d = (dc * g * i * (1 - i), dc * f * (1 - f), dc * i * (1 - g * g), dstate[0] * tc * o * (1 - o))
    return d, d, (0, dc * f)


def looping_forward(xw, hu, prev):
    h = prev[0]
    for k in range(2):
        h = h + xw[k]
    return (h, h), (h,)


def test_a_forward_only_cell_is_derived_when_built():
    cell = Cell("t_lstm", gates="ifgo", state=("h", "c"), forward=lstm_step)
    assert cell.derived_backward and cell.step is lstm_step
    assert cell.forward is not lstm_step and cell.backward is not None
    assert cell.n_saved == 5 and cell.same_grads == (True,) * 4
    new, saved = cell.forward((0.1, 0.2, 0.3, 0.4), (0.0,) * 4, (0.5, -0.5))
    assert new == pytest.approx(lstm_step((0.1, 0.2, 0.3, 0.4), (0.0,) * 4, (0.5, -0.5)))
    ref = cell.reference(*(tuple(np.full((1, 2), v) for v in vals)
                           for vals in ((0.1, 0.2, 0.3, 0.4), (0.0,) * 4, (0.5, -0.5))))
    assert ref[0][0, 0] == pytest.approx(new[0], rel=1e-14)


def test_replace_and_pickle_derive_again_from_the_step():
    ln = REGISTRY.get("lstm_ln")
    rms = dataclasses.replace(ln, name="t_rms", normalize_kind="rms")
    assert rms.step is ln.step and rms.derived_backward and rms.normalize_kind == "rms"
    back = pickle.loads(pickle.dumps(ln))
    assert back.step is ln.step and (back.n_saved, back.n_mid) == (ln.n_saved, ln.n_mid)
    assert back.same_grads == ln.same_grads
    swap = dataclasses.replace(REGISTRY.get("rnn"), name="t_swap",
                               forward=REGISTRY.get("rnn_relu").step)  # a new step: derived anew
    assert swap.step is REGISTRY.get("rnn_relu").step and swap.derived_backward
    assert swap.backward((0.5,), (0.0,), (1.0,))[0] == (1.0,)  # relu' = 1 at a positive value
    hand = pickle.loads(pickle.dumps(hand_written("gru")))
    assert not hand.derived_backward and hand.backward is MATH["gru"]["backward"]


def test_a_pickled_forward_only_cell_loads_in_a_fresh_process():
    """Generated functions live only in the process that derived them: the pickle holds
    the declaration and the step, and unpickling derives again."""
    blob = pickle.dumps([REGISTRY.get("lstm_peephole"), REGISTRY.get("indrnn")])
    code = ("import pickle, sys\n"
            "cells = pickle.loads(sys.stdin.buffer.read())\n"
            "for c in cells:\n"
            "    args = c.forward_args((0.1,) * c.n_gates, (0.2,) * c.n_gates,\n"
            "                          (0.3,) * c.n_state, [(0.4,) * p.blocks for p in c.params])\n"
            "    print(c.name, c.derived_backward, c.n_saved, repr(c.forward(*args)[0]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "plugins")]))
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                         env=env, check=True).stdout.decode().splitlines()
    for line, cell in zip(out, (REGISTRY.get("lstm_peephole"), REGISTRY.get("indrnn"))):
        args = cell.forward_args((0.1,) * cell.n_gates, (0.2,) * cell.n_gates,
                                 (0.3,) * cell.n_state, [(0.4,) * p.blocks for p in cell.params])
        assert line == f"{cell.name} True {cell.n_saved} {cell.forward(*args)[0]!r}"


def test_hand_written_backward_without_reference_gets_the_derived_one():
    math = {k: v for k, v in MATH["lstm_ln"].items() if k != "reference"}
    cell = dataclasses.replace(REGISTRY.get("lstm_ln"), name="t_hand_ln", **math)
    assert not cell.derived_backward and cell.forward is math["forward"]
    assert getattr(cell.reference, "kernrnn_step", None) is not None  # derived
    assert cell.n_saved == 1 and cell.n_mid == 5


def test_declaration_errors_of_the_two_forms():
    with pytest.raises(CellError, match="cell 't_f2'.*forward2/backward2 come with a "
                                        "hand-written backward.*norm\\(name, value\\)"):
        Cell("t_f2", gates="ifgo", state=("h", "c"), forward=lstm_step, normalize=("c",),
             forward2=MATH["lstm_ln"]["forward2"], backward2=MATH["lstm_ln"]["backward2"])
    with pytest.raises(CellError, match="cell 't_noref'.*no reference given, and none can be "
                                        "derived.*a for loop"):
        Cell("t_noref", gates=2, forward=looping_forward, backward=MATH["rnn"]["backward"])
    with pytest.raises(CellError, match="cell 't_loop'.*test_cell_derived.py line .*a for loop"):
        Cell("t_loop", gates=2, forward=looping_forward)  # as a forward-only step
    with pytest.raises(CellError, match="forward and reference disagree"):  # independent check
        Cell("t_badref", gates="ifgo", state=("h", "c"), forward=lstm_step,
             reference=MATH["cifg"]["reference"])


def test_check_cell_names_the_first_gradient_a_hand_written_backward_gets_wrong():
    wrong = dataclasses.replace(hand_written("lstm"), name="t_wrong", backward=lstm_wrong_df)
    with pytest.raises(ConformanceError, match=r"cell 't_wrong': the hand-written backward "
                                               r"disagrees .* at dxw\[1\] \(gate 'f'\)"):
        check_cell(wrong)  # compared before any kernel is compiled
    assert compare_backward(hand_written("lstm_peephole")) < 1e-14


def test_a_wrong_per_unit_parameter_gradient_is_named():
    def backward(saved, prev, dstate, u):
        da = dstate[0] if saved[0] > 0 else 0 * dstate[0]
        return (da,), (da * u[0],), (2 * da * prev[0],)

    wrong = dataclasses.replace(hand_written("indrnn"), name="t_du", backward=backward)
    with pytest.raises(ConformanceError, match=r"at du\[0\]"):
        compare_backward(wrong)
