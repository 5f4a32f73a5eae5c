"""The cell zoo (``plugins/kernrnn_cells``) on the CPU, and the contract features it uses.

Every zoo cell, and two test-only cells for feature combinations no zoo cell
has (``tests/zoo_test_cells.py``), in float64 and float32: forward against the
float64 reference, BPTT against finite differences (per-unit parameters and
normalisation gains included, since :func:`gradient_errors` checks every
parameter) and float32 gradients against the float64 ones.  Each test draws
small shapes; the kernels of one (cell, dtype) are compiled once and shared by
all tests of this module.
"""

import ast
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest
import zoo_test_cells
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn.backends.cpu import get_kernels
from kernrnn.cell import CellError, Param
from kernrnn.plugins import load_registry
from kernrnn.scalar import check_cell_compiles
from kernrnn.testing import tolerances as tol
from kernrnn.testing.conformance import (
    ConformanceError,
    forward_errors,
    gradient_errors,
    run_layer,
)
from kernrnn.testing.strategies import Problem, make_arrays, problems

ZOO = ("antisymmetric", "cifg", "cornn", "gru_ln", "indrnn", "janet", "lstm_ln",
       "lstm_peephole", "mgu", "mingru", "minlstm", "rhn", "slstm", "sru", "ugrnn")
REGISTRY = load_registry(autoload=False, plugins=[zoo_test_cells])
CELLS = ZOO + tuple(c.name for c in zoo_test_cells.CELLS)
PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins" / "kernrnn_cells"
# A third of the profile's examples per cell (13 cells): enough to vary every
# shape, layout and seed, and keeps CI time in check.
EXAMPLES = max(3, settings.default.max_examples // 3)
SMALL = dict(max_T=6, max_B=3, max_I=4, max_H=6, max_layers=2)


def _problem(data, cell):
    return data.draw(problems(cell=cell, **SMALL), label="problem")


@pytest.mark.parametrize("name", ZOO)
def test_zoo_cell_is_one_short_file_on_the_public_api(name):
    """One file per cell, <= 80 lines, a docstring with equations, imports only public API."""
    path = PLUGIN_DIR / f"{name}.py"
    assert REGISTRY.source(name).plugin == f"kernrnn_cells.{name}"
    text = path.read_text()
    assert len(text.splitlines()) <= 80
    tree = ast.parse(text)
    doc = ast.get_docstring(tree)
    assert doc and "=" in doc and "(" in doc.splitlines()[0]  # paper reference and equations
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module in ("kernrnn.cell",), f"{name} imports from {node.module}"
        elif isinstance(node, ast.Import):
            assert all(a.name in ("math", "numpy") for a in node.names)


def test_the_contract_features_are_all_exercised():
    """At least one tested cell per feature: a guard against losing coverage."""
    cells = [REGISTRY.get(n) for n in CELLS]
    assert any(c.params for c in cells)
    assert any(c.recurrent == "none" for c in cells)
    assert any(c.recurrent_gates is not None for c in cells)
    assert any(c.recurrent == "heads" and (c.input_norm or c.recurrent_norm or c.normalize)
               for c in cells)
    kinds = {n.kind for c in cells for n in (c.input_norm, c.recurrent_norm) if n is not None}
    assert kinds == {"layer", "rms"}
    assert {c.normalize_kind for c in cells if c.normalize} == {"layer", "rms"}
    assert {n.over for c in cells for n in (c.input_norm, c.recurrent_norm) if n} == {"gate",
                                                                                     "row"}
    assert any(c.linear for c in cells)
    assert any(c.hyper and c.recurrent_weight is not None for c in cells)
    assert any(c.raw_input for c in cells)
    assert any(not c.reads_h_only for c in cells)
    assert any(c.n_stages > 2 for c in cells)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", CELLS)
def test_math_compiles_in_the_kernel_precision(name, dtype):
    check_cell_compiles(REGISTRY.get(name), dtype)  # raises CellError naming the cell


@pytest.mark.parametrize("name", CELLS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_forward_matches_reference(name, data):
    cell = REGISTRY.get(name)
    p = _problem(data, cell)
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(cell, p, dtype)
        assert scaled <= 1.0, f"{np.dtype(dtype)} error {absolute:.3e} beyond tolerance on {p}"


@pytest.mark.parametrize("name", CELLS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_gradients_match_finite_differences(name, data):
    cell = REGISTRY.get(name)
    p = _problem(data, cell)
    assert gradient_errors(cell, p) < 1e-6  # raises ConformanceError naming the tensor


@pytest.mark.parametrize("name", CELLS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_float32_gradients_close_to_float64(name, data):
    """float32 BPTT, every parameter (per-unit ones and gains too), input and initial state."""
    cell = REGISTRY.get(name)
    p = _problem(data, cell)
    params, x, h0 = make_arrays(cell, p, np.float64)
    rng = np.random.default_rng(p.seed)
    D = 2 if p.bidirectional else 1
    dy = rng.uniform(-1, 1, (p.T, p.B, D * p.H))
    dhn = tuple(rng.uniform(-1, 1, (p.num_layers * D, p.B, p.H)) for _ in range(cell.n_state))
    *_, dx64, dh064, g64 = run_layer(cell, p, params, x, h0, "cpu", dy, dhn)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    *_, dx32, dh032, g32 = run_layer(
        cell, p, {k: f32(v) for k, v in params.items()}, f32(x),
        None if h0 is None else tuple(map(f32, h0)), "cpu", f32(dy), tuple(map(f32, dhn)))
    assert set(g32) == set(params)
    for got, want in [(dx32, dx64), *zip(dh032 or (), dh064 or ()),
                      *((g32[k], g64[k]) for k in g64)]:
        np.testing.assert_allclose(got, want, **tol.grad_tolerance(np.float32))


def test_a_wrong_per_unit_gradient_is_caught():
    """The check covers per-unit parameters: IndRNN with du off by 2x fails on ``u_l0``."""
    base = REGISTRY.get("indrnn")

    def backward(saved, prev, dstate, u):
        da = dstate[0] if saved[0] > 0 else 0 * dstate[0]
        return (da,), (da * u[0],), (2 * da * prev[0],)

    wrong = dataclasses.replace(base, name="indrnn_wrong_du", backward=backward)
    p = Problem(T=4, B=2, I=3, H=3, num_layers=1, bidirectional=False, lengths=None,
                with_h0=True, seed=7)
    with pytest.raises(ConformanceError, match="param 'u_l0'"):
        gradient_errors(wrong, p)
    assert gradient_errors(base, p) < 1e-6  # the same problem passes with the right du


# -- recurrence form "none" ------------------------------------------------------

NONE_CELLS = [n for n in CELLS if REGISTRY.get(n).recurrent == "none"]


@pytest.mark.parametrize("name", NONE_CELLS)
def test_none_cell_has_no_recurrent_matrix(name):
    cell = REGISTRY.get(name)
    bi = not cell.raw_input  # raw input: I == H, and a stack of one direction (H inputs above)
    I = 4 if cell.raw_input else 3
    layer = kernrnn.RNN(cell, I, 4, num_layers=2, bidirectional=bi, dtype=np.float64, seed=0)
    keys = set(layer.state_dict())
    assert not any(k.startswith(("weight_hh", "bias_hh")) for k in keys), keys
    assert {"weight_ih_l1" + ("_reverse" if bi else ""), "bias_ih_l0"} <= keys
    y, _ = layer(np.ones((3, 2, I)))
    layer.backward(np.ones_like(y))
    assert set(layer.grads) == keys


@pytest.mark.parametrize("name, dense", [(n, "gru") for n in NONE_CELLS])
def test_none_cell_kernels_run_no_recurrent_gemm(name, dense):
    """No BLAS call inside the time loop of a ``none`` cell (a dense cell has one)."""
    def gemm_calls(cell):
        k = get_kernels(cell, np.float64)
        return sum(inspect.getsource(f.py_func).count("np.dot(")
                   for f in (k.forward_train, k.forward_infer, k.backward_loop))

    assert gemm_calls(REGISTRY.get(dense)) >= 3  # forward (train, infer) and backward
    assert gemm_calls(REGISTRY.get(name)) == 0


@pytest.mark.parametrize("name", [n for n in CELLS if REGISTRY.get(n).linear])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_linear_cells_are_affine_in_the_initial_state(name, data):
    """``linear=True``: one layer's final state is an affine function of h0 (on the kernels).

    (One layer: a second layer's gates see the first one's output, so it is not.)
    """
    cell = REGISTRY.get(name)
    p = dataclasses.replace(_problem(data, cell), with_h0=True, num_layers=1)
    params, x, h0a = make_arrays(cell, p, np.float64)
    h0b = cell.sample_states(np.random.default_rng(p.seed + 1), h0a[0].shape)
    a = data.draw(st.floats(-2, 2), label="a")

    def final(h0):
        return run_layer(cell, p, params, x, h0)[1]

    mixed = final(tuple(a * u + (1 - a) * v for u, v in zip(h0a, h0b)))
    for m, u, v in zip(mixed, final(h0a), final(h0b)):
        np.testing.assert_allclose(m, a * u + (1 - a) * v, rtol=1e-10, atol=1e-12)


def test_per_unit_parameters_are_in_the_state_dict_and_trained():
    """``{name}_l{k}`` (+ ``_reverse``) in state_dict and grads; load_state_dict checks size."""
    layer = kernrnn.RNN(REGISTRY.get("lstm_peephole"), 3, 4, num_layers=2, bidirectional=True,
                        dtype=np.float64, seed=0)
    sd = layer.state_dict()
    for k in ("peephole_l0", "peephole_l1_reverse"):
        assert sd[k].shape == (12,) and np.all(sd[k] == 0)  # init=0.0, 3 blocks of H
    y, _ = layer(np.random.default_rng(0).uniform(-1, 1, (5, 2, 3)))
    layer.backward(np.ones_like(y))
    assert np.any(layer.grads["peephole_l1_reverse"] != 0)
    sd["peephole_l0"] = np.zeros(8)
    with pytest.raises(ValueError, match=r"peephole_l0.*\[12\]"):
        layer.load_state_dict(sd)


def test_a_cell_reused_under_another_name_is_checked_again():
    """dataclasses.replace re-validates: a derived cell with a bad parameter is rejected."""
    with pytest.raises(CellError, match="parameter 'u' has no initialiser"):
        dataclasses.replace(REGISTRY.get("indrnn"), name="x", params=(Param("u"),))
