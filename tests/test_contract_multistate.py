"""Recurrence on several states (``Cell(recurrent_states=...)``): ``weight_hh [Gr*H, R*H]``
over the named state components side by side, on the CPU's BLAS-per-step path, through the
public layer.

Forward against the float64 reference and BPTT against finite differences on
hypothesis-drawn tiny shapes (float64 and float32), zoneout included; the paths that decline
such cells; bad declarations; and the default leaving every other cell's kernels unchanged.
The zoo's ``cornn`` runs in tests/test_zoo.py and tests/test_zoo_torch.py; the CUDA side in
tests/cudasim/test_sim_contract.py and :func:`test_float32_ptx_has_no_float64`.
"""

import dataclasses

import numpy as np
import pytest
from contract_test_cells import MULTISTATE_CELLS
from hypothesis import given, settings
from hypothesis import strategies as st
from test_plugins import make_distribution, plugin_dir  # noqa: F401 (fixture)

import kernrnn
from kernrnn.backends.cpu.fused_source import fused_path
from kernrnn.backends.cpu.source import backward_source, forward_source
from kernrnn.cell import CellError
from kernrnn.plugins import PluginError, load_registry
from kernrnn.testing.conformance import forward_errors, gradient_errors
from kernrnn.testing.strategies import problems

CELLS = {c.name: c for c in MULTISTATE_CELLS}
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
@given(data=st.data(), zoneout=st.sampled_from([0.0, 0.3]))
def test_gradients_match_finite_differences(name, data, zoneout):
    cell = CELLS[name]
    p = data.draw(problems(cell=cell, **SMALL), label="problem")
    reg = dict(zoneout=zoneout) if zoneout else None
    assert gradient_errors(cell, p, regularization=reg) < 1e-6  # raises naming the tensor


def test_weight_hh_reads_the_states_side_by_side():
    """``weight_hh [Gr*H, R*H]`` in the state dict; a [Gr*H, H] one is refused by shape."""
    cell = CELLS["test_lstm_ch"]
    layer = kernrnn.RNN(cell, 3, 4, dtype=np.float64, seed=0)
    sd = layer.state_dict()
    assert sd["weight_hh_l0"].shape == (3 * 4, 2 * 4)
    sd["weight_hh_l0"] = np.zeros((12, 4))
    with pytest.raises(ValueError, match=r"weight_hh_l0.*\[12, 8\]"):
        layer.load_state_dict(sd)


def test_the_product_reads_the_named_states():
    """``recurrent_states=("c",)``: ``hu = W_hh c``; h never reaches the product."""
    layer = kernrnn.RNN(CELLS["test_c_only"], 2, 3, dtype=np.float64, seed=0)
    sd = layer.state_dict()
    sd["bias_ih_l0"][:] = 0
    sd["bias_hh_l0"][:] = 0
    layer.load_state_dict(sd)
    x = np.zeros((1, 2, 2))
    c0 = np.arange(6.0).reshape(1, 2, 3) / 10
    for h in (np.ones((1, 2, 3)), -np.ones((1, 2, 3))):
        y, _ = layer(x, (h, c0))
        np.testing.assert_allclose(y[0], np.tanh(c0[0] @ sd["weight_hh_l0"].T), rtol=1e-12)


def test_paths_that_decline_such_cells():
    """The CPU's packed path and the persistent CUDA kernel run h-only products: these cells
    take the BLAS-per-step path (CPU) and the GEMM-per-step path (CUDA)."""
    for cell in MULTISTATE_CELLS:
        assert not cell.plain and not fused_path(cell)
    assert fused_path(kernrnn.get_registry().get("lstm"))


def test_check_cell_runs_its_regularised_example_without_recurrent_dropout():
    """kernrnn.testing.check_cell's last example adds dropout and zoneout; for a product
    over several states it leaves recurrent dropout out (which the layer refuses) and
    checks the rest."""
    from kernrnn.testing import check_cell

    cell = MULTISTATE_CELLS[0]
    report = check_cell(cell, examples=2)
    assert report.examples == 2
    assert report.max_gradient_error < 1e-6


def test_regularisation_and_projection_that_need_h_alone_are_refused():
    cell = CELLS["test_lstm_ch"]
    with pytest.raises(ValueError, match=r"recurrent_dropout=0.2 masks h before W_hh, but cell "
                                         r"'test_lstm_ch' feeds the recurrent product "
                                         r"recurrent_states=\('c', 'h'\); expected "
                                         r"recurrent_dropout=0"):
        kernrnn.RNN(cell, 3, 4, dtype=np.float64, recurrent_dropout=0.2)
    with pytest.raises(CellError, match=r"proj_size needs a recurrent product on h alone .*"
                                        r"got recurrent_states=\('c', 'h'\)"):
        kernrnn.RNN(cell, 3, 4, dtype=np.float64, proj_size=2)


def test_the_default_generates_the_same_kernels():
    """``recurrent_states=("h",)`` spelled out is the default: the same kernel source as a
    cell that leaves it out (every shipped cell but cornn does)."""
    from kernrnn.backends.cuda.kernels import kernel_source

    reg = kernrnn.get_registry()
    for name in ("lstm", "gru", "lstm_ln"):
        cell = reg.get(name)
        same = dataclasses.replace(cell, recurrent_states=("h",))
        assert same.reads_h_only and cell.recurrent_states is None
        for reg_ in ((False, False), (True, True)):
            assert forward_source(same, True, reg_) == forward_source(cell, True, reg_)
            assert backward_source(same, False, reg=reg_) == backward_source(cell, False,
                                                                             reg=reg_)
            assert kernel_source(same, reg_) == kernel_source(cell, reg_)
        assert "Hd[b, 0 * H + j]" not in forward_source(cell, True)


BAD = {
    "a state that does not exist": (
        "recurrent_states=('h', 'c')", "recurrent_states=('h', 'q')",
        r"cell 'bad_rs'.*recurrent_states names the state components the recurrent product "
        r"reads: expected names out of the state \('h', 'c'\), got \('h', 'q'\) \('q' not a "
        r"state\)"),
    "a state named twice": (
        "recurrent_states=('c',)", "recurrent_states=('c', 'c')",
        r"cell 'bad_rs'.*recurrent_states must name each state component once, got "
        r"\('c', 'c'\)"),
    "a recurrence other than dense": (
        "recurrent_states=('h',), recurrent='heads', heads=1",
        "recurrent_states=('h', 'c'), recurrent='heads', heads=1",
        r"cell 'bad_rs'.*recurrent_states=\('h', 'c'\) needs recurrent='dense'.*got "
        r"recurrent='heads'"),
}
SOURCE = r"plugin 'bad' from distribution 'kernrnn-bad 0.1'"


def _install(plugin_dir, decl, tag):  # noqa: F811
    modname = f"bad_multistate_{tag}"
    code = ("import dataclasses\nfrom kernrnn.cell import hookimpl\n"
            "from contract_test_cells import LSTM_CH\n"
            f"CELL = dataclasses.replace(LSTM_CH, name='bad_rs', recurrent_norm=None, {decl})\n"
            "@hookimpl\ndef kernrnn_register_cells(registry):\n    registry.add(CELL)\n")
    make_distribution(plugin_dir, "kernrnn-bad", {"bad": modname}, {modname: code})


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recurrent_states_name_cell_plugin_and_distribution(plugin_dir, case):  # noqa: F811
    _, bad, pattern = BAD[case]
    tag = str(sorted(BAD).index(case))
    _install(plugin_dir, bad, tag)
    with pytest.raises(CellError, match=f"{SOURCE}.*{pattern}") as info:
        load_registry()
    assert isinstance(info.value, PluginError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_good_twin_registers(plugin_dir, case):  # noqa: F811
    _install(plugin_dir, BAD[case][0], "good" + str(sorted(BAD).index(case)))
    assert "bad_rs" in load_registry().names()


def test_float32_ptx_has_no_float64():
    """The GEMM-per-step kernels of these cells compile to PTX, float32 without ``.f64``."""
    cuda = pytest.importorskip("numba.cuda", reason="the PTX check needs numba-cuda")
    from cuda_test_cells import nvvm_missing_locally

    from kernrnn.backends import cuda as cb

    if cb.SIMULATOR or nvvm_missing_locally():
        pytest.skip("compile_ptx needs the real CUDA target and NVVM")
    for cell in MULTISTATE_CELLS:
        kernels = cb.get_kernels(cell, np.float32)
        for name, sig in cb.ptx_signatures(cell, np.float32).items():
            ptx, _ = cuda.compile_ptx(getattr(kernels, name), sig, cc=(9, 0))
            assert ".f64" not in ptx, f"{cell.name} {name}: float64 in float32 PTX"
