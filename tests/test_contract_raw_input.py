"""The raw input (``Cell(raw_input=True)``): a step that reads x_t element-wise.

Through the public layer on the CPU, in float64 and float32: forward against the float64
reference and BPTT against finite differences (the input's gradient included, which
carries the raw read's part), on hypothesis-drawn tiny shapes, for the zoo's ``sru`` and
the test cells of ``tests/raw_input_cells.py`` (dense recurrence, two stages with an input
norm, linear in the state).  Then stacks and directions, the ``I != H`` errors, the
forward's trailing argument ``x``, the PTX of the CUDA kernels, ``kernrnn.torch``, and that
cells without raw input generate the same kernel source as before the feature.  The CUDA
kernels under the simulator: ``tests/cudasim/test_sim_raw_input.py``.
"""

import hashlib

import numpy as np
import pytest
import raw_input_cells
from hand_written_cells import hand_written
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn.backends.cpu.fused_source import (
    fused_forward_source,
    fused_path,
    input_projection_source,
)
from kernrnn.backends.cpu.microkernel import block_shape
from kernrnn.backends.cpu.source import (
    backward_source,
    forward_source,
    same_input_and_recurrent_grads,
)
from kernrnn.backends.cuda.kernels import kernel_source
from kernrnn.cell import Cell, CellError
from kernrnn.functional import rnn_forward
from kernrnn.testing import tolerances as tol
from kernrnn.testing.conformance import compare_backward, forward_errors, gradient_errors, run_layer
from kernrnn.testing.strategies import Problem, make_arrays, problems

REGISTRY = kernrnn.get_registry()
SRU = REGISTRY.get("sru")
CELLS = {"sru": SRU, **{c.name: c for c in raw_input_cells.CELLS}}
SMALL = dict(max_T=6, max_B=3, max_I=6, max_H=6, max_layers=2)
EXAMPLES = max(3, settings.default.max_examples // 4)
REG = dict(input_dropout=0.3, zoneout=0.2)


def _check(cell, p, regularization=None, dtypes=(np.float64, np.float32)):
    for dtype in dtypes:
        scaled, absolute = forward_errors(cell, p, dtype, regularization=regularization)
        assert scaled <= 1, (f"{cell.name} {np.dtype(dtype)}: forward differs from the reference "
                             f"by {absolute:.3e} (tolerance {tol.forward_tolerance(dtype)}) on {p}")
    worst = gradient_errors(cell, p, regularization=regularization)  # raises on a disagreement
    assert worst <= 1e-5, f"{cell.name}: gradient error {worst:.2e} on {p}"


@pytest.mark.parametrize("name", sorted(CELLS))
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_forward_and_bptt_through_the_layer(name, data):
    cell = CELLS[name]
    p = data.draw(problems(cell=cell, **SMALL), label="problem")
    assert p.I == p.H and not (p.num_layers > 1 and p.bidirectional)
    _check(cell, p)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_with_input_dropout_and_zoneout(name):
    """The raw read sees the dropped-out input (the one W_ih reads): its gradient is masked
    too.  Recurrent dropout where the cell has a recurrent product."""
    cell = CELLS[name]
    p = Problem(T=5, B=3, I=4, H=4, num_layers=2, bidirectional=False, lengths=(5, 2, 0),
                with_h0=True, seed=11)
    _check(cell, p, dict(REG, recurrent_dropout=0.3 if cell.has_recurrent else 0.0),
           dtypes=(np.float64,))


@pytest.mark.parametrize("layers, bidirectional", [(2, False), (1, True)])
@pytest.mark.parametrize("name", ["sru", "raw_highway"])
def test_stacked_and_bidirectional(name, layers, bidirectional):
    """A stack of one direction (layers above the first get H inputs), and both directions
    of one layer (each reads x_t): the reference runs the same, masked lengths included."""
    p = Problem(T=5, B=3, I=4, H=4, num_layers=layers, bidirectional=bidirectional,
                lengths=(5, 3, 1), with_h0=True, seed=3)
    _check(CELLS[name], p)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_inference_equals_the_training_forward(name):
    """Inference kernels (nothing saved, two state slots) read the raw block too."""
    layer = kernrnn.RNN(CELLS[name], 4, 4, num_layers=2, dtype=np.float64, seed=1)
    x = np.random.default_rng(2).uniform(-1, 1, (6, 3, 4))
    y, hn = layer(x, lengths=[6, 4, 0])
    y_eval, hn_eval = layer.eval()(x, lengths=[6, 4, 0])
    np.testing.assert_allclose(y_eval, y, rtol=1e-13, atol=1e-14)
    for a, b in zip(hn_eval if isinstance(hn, tuple) else (hn_eval,),
                    hn if isinstance(hn, tuple) else (hn,)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_dx_holds_the_raw_inputs_gradient():
    """With W_ih = 0 the input reaches the output only through the raw read: one step of
    the highway cell from h0 = 0 is h = t g + (1 - t) x with t, g constants, so
    dx = (1 - t) dy exactly."""
    cell = CELLS["raw_highway"]
    p = Problem(T=1, B=2, I=3, H=3, num_layers=1, bidirectional=False, lengths=None,
                with_h0=False, seed=5)
    params, x, _ = make_arrays(cell, p)
    params["weight_ih_l0"][:] = 0.0
    dy = np.random.default_rng(0).uniform(-1, 1, (1, 2, 3))
    _, _, dx, _, _ = run_layer(cell, p, params, x, None, dy=dy, dhn=(np.zeros((1, 2, 3)),))
    t = 1.0 / (1.0 + np.exp(-(params["bias_ih_l0"][3:] + params["bias_hh_l0"][3:])))
    np.testing.assert_allclose(dx, (1.0 - t) * dy, rtol=1e-13, atol=1e-15)
    assert np.all(np.abs(dx) > 0)


def test_hand_written_raw_input_backward_matches_the_derived_one():
    """The contract with a hand-written backward: forward takes x as a 1-tuple last,
    backward returns dx last (tests/hand_written_cells.py's sru)."""
    hand = hand_written("sru")
    assert hand.raw_input and not hand.derived_backward
    assert compare_backward(hand) <= 1e-12


# -- bad input ---------------------------------------------------------------------------------


def _source_named(message):
    assert "cell 'sru'" in message and "plugin 'kernrnn_cells.sru'" in message
    assert "distribution 'kernrnn" in message


@settings(max_examples=5, deadline=None)
@given(I=st.integers(1, 8), H=st.integers(1, 8))
def test_input_size_other_than_hidden_size_is_a_cell_error(I, H):
    if I == H:
        assert kernrnn.RNN("sru", I, H).input_size == H
        return
    with pytest.raises(CellError) as err:
        kernrnn.RNN("sru", I, H)
    _source_named(str(err.value))
    assert f"expected input_size={H}, got {I}" in str(err.value)
    params = {k: np.zeros(s) for k, s in SRU.param_shapes(H, H).items()}
    params["weight_ih"] = np.zeros((3 * H, I))
    with pytest.raises(CellError, match=f"expected input_size={H}, got {I}"):
        rnn_forward(SRU, np.zeros((2, 1, I)), params)


def test_a_bidirectional_stack_is_refused_naming_layer_1():
    with pytest.raises(CellError) as err:
        kernrnn.RNN("sru", 4, 4, num_layers=2, bidirectional=True)
    msg = str(err.value)
    _source_named(msg)
    assert "expected input_size=4, got 8 at layer 1" in msg and "bidirectional" in msg


def step_reads_x(xw, prev, x):
    return (xw[0] + x,)


def step_without_x(xw, prev):
    return (xw[0],)


def step_unknown_name(xw, prev, x, y):
    return (xw[0] + x,)


@pytest.mark.parametrize("step, raw, expected", [
    (step_reads_x, False, "the forward takes 'x' (the raw input x_t) but the cell does not "
                          "declare raw_input=True"),
    (step_without_x, True, "the cell declares raw_input=True but the forward takes no 'x'"),
    (step_unknown_name, True, "unknown trailing argument 'y', expected 'x'"),
])
def test_the_forwards_trailing_x(step, raw, expected):
    with pytest.raises(CellError) as err:
        Cell("t_raw", gates="a", forward=step, recurrent="none", raw_input=raw)
    assert expected in str(err.value) and "t_raw" in str(err.value)


def test_raw_input_must_be_a_bool():
    with pytest.raises(CellError, match="raw_input must be True or False, got 'yes'"):
        Cell("t_raw", gates="a", forward=step_reads_x, recurrent="none", raw_input="yes")


# -- kernels of other cells, PTX, kernrnn.torch -----------------------------------------------


def _sources(cell) -> str:
    same = same_input_and_recurrent_grads(cell)
    parts = [cell.derivation().source, forward_source(cell, True), forward_source(cell, False),
             backward_source(cell, same), kernel_source(cell)]
    if fused_path(cell):  # the packed CPU kernels
        mr, nu = block_shape(cell.n_recurrent_gates, 4)
        mrx, _ = block_shape(cell.n_gates, 4)
        parts += [input_projection_source(cell.n_gates, mrx, nu),
                  fused_forward_source(cell, True, mr, mrx, nu),
                  backward_source(cell, same, packed=(mr, nu))]
    return "\n".join(parts)


#: sha256 (first 16 hex digits) of the math and the CPU and CUDA kernel sources, as generated
#: before the raw input existed (gru and lstm: since the input projection copies X element by
#: element).  A change here means a cell without raw input now runs
#: different code: intended changes update the digest (print ``_sources(cell)``'s).
UNCHANGED = {"gru": "fba5e9f50f780ca5", "indrnn": "e981d936aba8cfe0", "lstm": "06bf769caf406c2c",
             "mingru": "228124a4f1af0a8d"}


@pytest.mark.parametrize("name", sorted(UNCHANGED))
def test_cells_without_raw_input_generate_the_same_kernels(name):
    digest = hashlib.sha256(_sources(REGISTRY.get(name)).encode()).hexdigest()[:16]
    assert digest == UNCHANGED[name], f"{name}: generated source changed ({digest})"


@pytest.mark.parametrize("name", sorted(CELLS))
def test_float32_ptx_has_no_float64(name):
    cuda = pytest.importorskip("numba.cuda", reason="the PTX check needs numba-cuda")
    from cuda_test_cells import nvvm_missing_locally

    from kernrnn.backends import cuda as cb

    if cb.SIMULATOR or nvvm_missing_locally():
        pytest.skip("compile_ptx needs the real CUDA target and NVVM")
    cell = CELLS[name]
    kernels = cb.get_kernels(cell, np.float32)
    sigs = cb.ptx_signatures(cell, np.float32)
    assert any("backward" in n for n in sigs)
    for kname, sig in sigs.items():
        ptx, _ = cuda.compile_ptx(getattr(kernels, kname), sig, cc=(9, 0))
        hits = [line.strip() for line in ptx.splitlines() if ".f64" in line]
        assert not hits, f"{name} {kname}: float64 in float32 PTX, e.g. {hits[:3]}"


@pytest.mark.parametrize("bidirectional", [False, True])
def test_kernrnn_torch_gradient_of_x_includes_the_raw_part(bidirectional):
    torch = pytest.importorskip("torch")
    from kernrnn.torch import Recurrent, RecurrentCell

    torch.manual_seed(0)
    m = Recurrent("sru", 3, 3, num_layers=1 if bidirectional else 2,
                  bidirectional=bidirectional, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: m(v)[0], (x,), eps=1e-6, atol=1e-8)
    step = RecurrentCell("sru", 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: step(v)[0], (x[0],), eps=1e-6, atol=1e-8)
    with pytest.raises(CellError, match="expected input_size=3, got 6 at layer 1"):
        Recurrent("sru", 3, 3, num_layers=2, bidirectional=True)
