"""Stages with recurrent products (``Cell(products=...)``, ``matmul(name, m)`` in the forward):
the step cut into K stages, a learnable ``weight_h{name} [G_m*H, H]`` between two of them.

On the CPU's BLAS-per-step kernels, through the public layer: forward against the float64
reference and BPTT against finite differences on hypothesis-drawn tiny shapes (float64 and
float32; zoneout and recurrent dropout included), inference against training, the
parameters and their names, the paths that decline such cells, and bad declarations.  The
zoo's ``rhn`` runs in tests/test_zoo.py and tests/test_zoo_torch.py; the CUDA side in
tests/cudasim/test_sim_contract.py and :func:`test_float32_ptx_has_no_float64`.
"""

import dataclasses

import numpy as np
import pytest
from contract_test_cells import RHN2, STAGED_CELLS
from hypothesis import given, settings
from hypothesis import strategies as st
from test_plugins import make_distribution, plugin_dir  # noqa: F401 (fixture)

import kernrnn
from kernrnn.autodiff import derive
from kernrnn.backends import cpu
from kernrnn.backends.cpu.fused_source import fused_path
from kernrnn.backends.cpu.source import backward_source, forward_source
from kernrnn.cell import CellError, Product, tanh
from kernrnn.plugins import PluginError, load_registry
from kernrnn.testing.conformance import forward_errors, gradient_errors
from kernrnn.testing.strategies import Problem, make_arrays, problems

CELLS = {c.name: c for c in STAGED_CELLS}
SMALL = dict(max_T=6, max_B=3, max_I=4, max_H=6, max_layers=2)
EXAMPLES = max(3, settings.default.max_examples // 3)


@pytest.mark.parametrize("name", sorted(CELLS))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_forward_matches_reference(name, data):
    cell = CELLS[name]
    p = data.draw(problems(cell=cell, **SMALL), label="problem")
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(cell, p, dtype)
        assert scaled <= 1.0, f"{np.dtype(dtype)} error {absolute:.3e} beyond tolerance on {p}"


@pytest.mark.parametrize("name", sorted(CELLS))
@settings(max_examples=EXAMPLES)
@given(data=st.data(), regularised=st.booleans())
def test_gradients_match_finite_differences(name, data, regularised):
    cell = CELLS[name]
    p = data.draw(problems(cell=cell, **SMALL), label="problem")
    reg = None
    if regularised:  # zoneout on the new state, dropout on the first stage's product
        reg = dict(zoneout=0.3, recurrent_dropout=0.25 if cell.reads_h_only else 0.0)
    assert gradient_errors(cell, p, regularization=reg) < 1e-6  # raises naming the tensor


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("reverse", [False, True])
def test_inference_equals_training_forward(name, reverse):
    """Inference keeps one time slot of the stages' buffers: the same outputs."""
    cell = CELLS[name]
    p = Problem(T=5, B=3, I=2, H=4, num_layers=1, bidirectional=False, lengths=(5, 2, 0),
                with_h0=True, seed=11)
    prm, x, h0s = make_arrays(cell, p)
    params = {k.removesuffix("_l0"): v for k, v in prm.items()}
    h0 = np.stack([v[0] for v in h0s])
    lens = np.array(p.lengths, np.int64)
    y_t, hn_t, _ = cpu.forward(cell, x, params, h0, lens, reverse, True)
    y_i, hn_i, _ = cpu.forward(cell, x, params, h0, lens, reverse, False)
    np.testing.assert_array_equal(y_i, y_t)
    np.testing.assert_array_equal(hn_i, hn_t)


def test_parameters_of_the_products():
    """``weight_h{name} [G_m*H, H]`` and ``bias_h{name} [G_m*H]`` after PyTorch's four, in
    the state dict and the gradients; the zoo's rhn starts its transform biases at -2."""
    cell = CELLS["test_staged_mix"]
    assert list(cell.param_shapes(3, 4)) == [
        "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ha", "bias_ha", "weight_hb",
        "bias_hb", "weight_hc", "bias_hc", "u"]
    assert cell.param_shapes(3, 4)["weight_hb"] == (8, 4)
    layer = kernrnn.RNN(cell, 3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    y, _ = layer(np.random.default_rng(0).uniform(-1, 1, (4, 2, 3)))
    layer.backward(np.ones_like(y))
    assert set(layer.grads) == set(layer.state_dict())
    assert np.any(layer.grads["weight_hc_l1_reverse"] != 0)
    rhn = kernrnn.RNN("rhn", 3, 5, dtype=np.float64, seed=0).state_dict()
    for name in ("bias_ih_l0", "bias_hs1_l0", "bias_hs2_l0"):
        np.testing.assert_array_equal(rhn[name][5:], -2.0)
    np.testing.assert_array_equal(rhn["bias_hh_l0"][5:], 0.0)
    assert rhn["weight_hs2_l0"].shape == (10, 5)


def test_the_stages_and_their_functions():
    """rhn: three stages; forward, forward2, forward3 and their backwards in reverse, each
    receiving what the stage before produced (``math_signatures`` sizes chain)."""
    rhn = kernrnn.get_registry().get("rhn")
    assert rhn.n_stages == 3 and RHN2.n_stages == 2
    assert [w for w, _, _ in rhn.math_signatures()] == [
        "forward", "forward2", "forward3", "backward3", "backward2", "backward"]
    sig = {w: (a, r) for w, a, r in rhn.math_signatures()}
    assert sig["forward"][1][0] == 1 and sig["forward2"][0][0] == 2  # s1 -> [R_H2; R_T2] s1
    assert sig["forward"][1][1] == sig["forward2"][0][1]  # mid_1 handed on
    assert sig["forward3"][1] == [1, rhn.n_saved]
    assert rhn.stage_boundaries == (((("s1", 2),), 3), ((("s2", 2),), 3))


def test_paths_that_decline_staged_cells():
    for cell in STAGED_CELLS:
        assert not cell.plain and not fused_path(cell)
    with pytest.raises(CellError, match=r"cell 'rhn'.*proj_size needs a step of one stage, got "
                                        r"recurrent products between stages \('s1', 's2'\)"):
        kernrnn.RNN("rhn", 3, 4, dtype=np.float64, proj_size=2)


def test_cells_without_products_generate_the_same_kernels():
    """``products=()`` spelled out is the default: the same kernel source (every shipped cell
    but rhn leaves it out), with nothing of the staged kernels in it."""
    from kernrnn.backends.cuda.kernels import kernel_source

    reg = kernrnn.get_registry()
    for name in ("lstm", "gru", "lstm_ln"):
        cell = reg.get(name)
        same = dataclasses.replace(cell, products=())
        for reg_ in ((False, False), (True, True)):
            assert forward_source(same, True, reg_) == forward_source(cell, True, reg_)
            assert backward_source(same, False, reg=reg_) == backward_source(cell, False,
                                                                             reg=reg_)
            assert kernel_source(same, reg_) == kernel_source(cell, reg_)
        assert "WMT" not in forward_source(cell, True) and "staged" not in kernel_source(cell)


def _with_u(xw, hu, prev, u, matmul):
    r = matmul("m", xw[0] + hu[0] * u[0])
    return (tanh(r[0]),)


def _unknown_trailing(xw, hu, prev, u, mat):
    return (xw[0],)


def test_matmul_is_bound_by_name_after_the_parameters():
    d = derive(_with_u, name="bound", gates=1, params=(1,), products={"m": 1})
    assert d.n_stages == 2 and d.boundaries == ((("m", 1),),)
    with pytest.raises(CellError, match=r"cell 'unknown'.*bound by name; unknown trailing "
                                        r"argument 'mat', expected 'norm', 'matmul'"):
        derive(_unknown_trailing, name="unknown", gates=1, params=(1,), products={"m": 1})


BAD = {
    "a product's result read past its gates": (
        "r = matmul('m', a)\n    return (r[1],)", "r = matmul('m', a)\n    return (r[2],)",
        r"cell 'bad_st'.*index 2 is out of range: 'r' has 2 values"),
    "a product's results used as one number": (
        "r = matmul('m', a)\n    return (r[0] + 1.0,)", "r = matmul('m', a)\n    return (r + 1.0,)",
        r"cell 'bad_st'.*'r' is a tuple where a number is needed"),
    "a product of a tuple": (
        "r = matmul('m', a)\n    return (r[0],)", "r = matmul('m', xw)\n    return (r[0],)",
        r"cell 'bad_st'.*'xw' is a tuple where a number is needed"),
    "a product the cell does not declare": (
        "r = matmul('m', a)\n    return (r[0],)", "r = matmul('q', a)\n    return (r[0],)",
        r"cell 'bad_st'.*matmul\('q', \.\.\.\) but the cell declares the products \('m',\)"),
    "a declared product the step never applies": (
        "r = matmul('m', a)\n    return (r[0],)", "return (a,)",
        r"cell 'bad_st'.*the cell declares the products \('m',\), the forward never calls "
        r"matmul\('m', \.\.\.\)"),
}
SOURCE = r"plugin 'bad' from distribution 'kernrnn-bad 0.1'"


def _install(plugin_dir, body, tag, decl="products=(Product('m', gates=2),)"):  # noqa: F811
    modname = f"bad_stages_{tag}"
    code = ("from kernrnn.cell import Cell, Product, hookimpl, tanh\n"
            "def forward(xw, hu, prev, matmul):\n    a = tanh(xw[0] + hu[0])\n"
            f"    {body}\n"
            f"CELL = Cell('bad_st', gates=1, forward=forward, {decl})\n"
            "@hookimpl\ndef kernrnn_register_cells(registry):\n    registry.add(CELL)\n")
    make_distribution(plugin_dir, "kernrnn-bad", {"bad": modname}, {modname: code})


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_stage_products_name_cell_plugin_and_distribution(plugin_dir, case):  # noqa: F811
    _, bad, pattern = BAD[case]
    _install(plugin_dir, bad, str(sorted(BAD).index(case)))
    with pytest.raises(CellError, match=f"{SOURCE}.*{pattern}") as info:
        load_registry()
    assert isinstance(info.value, PluginError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_good_twin_registers(plugin_dir, case):  # noqa: F811
    _install(plugin_dir, BAD[case][0], "good" + str(sorted(BAD).index(case)))
    assert "bad_st" in load_registry().names()


DECLARATIONS = {
    "no pre-activations": ("products=(Product('m', gates=0),)",
                           r"product 'm': gates must be an int >= 1 or a string of labels "
                           r"\(G_m, the pre-activations per unit\), got 0"),
    "the name of the first stage's product": ("products=(Product('h'),)",
                                              r"product name must be .* \(not 'h'"),
    "a name twice": ("products=(Product('m'), Product('m'))",
                     r"product names must be distinct, got \['m', 'm'\]"),
    "a normalised value too": ("products=(Product('m'),), normalize=('c',)",
                               r"a step with recurrent products cannot also normalise"),
    "a parameter of the same name": (
        "products=(Product('m'),), params=(__import__('kernrnn.cell').cell.Param('bias_hm', "
        "init=0.0),)", r"product 'm' gives the parameter 'bias_hm', which the cell already "
                       r"has"),
}


@pytest.mark.parametrize("case", sorted(DECLARATIONS))
def test_bad_product_declarations(plugin_dir, case):  # noqa: F811
    decl, pattern = DECLARATIONS[case]
    _install(plugin_dir, "r = matmul('m', a)\n    return (r[0],)",
             "decl" + str(sorted(DECLARATIONS).index(case)), decl)
    with pytest.raises(CellError, match=f"{SOURCE}.*cell 'bad_st'.*{pattern}"):
        load_registry()


def test_products_need_a_forward_only_cell():
    from hand_written_cells import MATH

    lstm = kernrnn.get_registry().get("lstm")
    with pytest.raises(CellError, match=r"cell 'hand_st'.*products need a forward-only cell"):
        dataclasses.replace(lstm, name="hand_st", products=(Product("m"),), **MATH["lstm"])


def test_float32_ptx_has_no_float64():
    """The staged CUDA kernels compile to PTX, float32 without ``.f64``."""
    cuda = pytest.importorskip("numba.cuda", reason="the PTX check needs numba-cuda")
    from cuda_test_cells import nvvm_missing_locally

    from kernrnn.backends import cuda as cb

    if cb.SIMULATOR or nvvm_missing_locally():
        pytest.skip("compile_ptx needs the real CUDA target and NVVM")
    for cell in STAGED_CELLS:
        kernels = cb.get_kernels(cell, np.float32)
        sigs = cb.ptx_signatures(cell, np.float32)
        assert any(n.startswith("staged_backward0") for n in sigs)
        for name, sig in sigs.items():
            ptx, _ = cuda.compile_ptx(getattr(kernels, name), sig, cc=(9, 0))
            assert ".f64" not in ptx, f"{cell.name} {name}: float64 in float32 PTX"
