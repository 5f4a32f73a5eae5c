"""Bad cells under contract v2: a CellError naming the cell, its plugin and its distribution.

Each bad cell lives in a module of a fake installed distribution
(``kernrnn-bad 0.1``, entry point ``bad``) and is built when the module is
imported, as the zoo's cells are.  Loading the registry must then fail with an
error that is both a :class:`CellError` and a :class:`PluginError` and says
what the contract expected and what the cell gave; the good twin of each bad
cell (one change away) registers fine, so the check is about that change.
"""

import numpy as np
import pytest
from test_plugins import make_distribution, plugin_dir  # noqa: F401 (fixture)

import kernrnn
from kernrnn.cell import CellError
from kernrnn.plugins import PluginError, load_registry

SOURCE = r"plugin 'bad' from distribution 'kernrnn-bad 0.1'"

IMPORTS = """
import dataclasses
import numpy as np
from hand_written_cells import MATH
from kernrnn.cell import Param, hookimpl
from kernrnn_cells import indrnn, lstm_ln, mingru, slstm
"""
HOOK = """
@hookimpl
def kernrnn_register_cells(registry):
    registry.add(CELL)
"""

# case: (the good cell, the bad one, what the error must say)
CASES = {
    "per-unit parameter of the wrong size": (
        "dataclasses.replace(indrnn.INDRNN, name='bad_u', params=(Param('u', "
        "init=lambda rng, shape, H: np.zeros(shape)),))",
        "dataclasses.replace(indrnn.INDRNN, name='bad_u', params=(Param('u', "
        "init=lambda rng, shape, H: np.zeros(H + 1)),))",
        r"cell 'bad_u'.*parameter 'u' must have blocks\*H = 3 values for H=3, its init "
        r"returned shape \(4,\)"),
    "per-unit parameter without an initialiser": (
        "dataclasses.replace(indrnn.INDRNN, name='bad_init', params=(Param('u', init=0.5),))",
        "dataclasses.replace(indrnn.INDRNN, name='bad_init', params=(Param('u'),))",
        r"cell 'bad_init'.*parameter 'u' has no initialiser: give init=<number> or "
        r"init=<function"),
    "normalised value the step does not produce": (
        "dataclasses.replace(lstm_ln.LSTM_LN, name='bad_norm', normalize=('c',))",
        "dataclasses.replace(lstm_ln.LSTM_LN, name='bad_norm', normalize=('c', 'd'))",
        r"cell 'bad_norm'.*the cell normalises \('c', 'd'\), the forward never calls "
        r"norm\('d', \.\.\.\)"),
    "normalised value a hand-written stage 1 does not produce": (
        "dataclasses.replace(lstm_ln.LSTM_LN, name='bad_norm2', normalize=('c',), "
        "**MATH['lstm_ln'])",
        "dataclasses.replace(lstm_ln.LSTM_LN, name='bad_norm2', normalize=('c', 'd'), "
        "**MATH['lstm_ln'])",
        r"cell 'bad_norm2'.*returned 1 values to normalise, the cell declares "
        r"normalize=\('c', 'd'\): the normalised value 'd' must be produced"),
    "declared linear, but not linear in the state": (
        "dataclasses.replace(mingru.MINGRU, name='bad_linear', linear=True)",
        "dataclasses.replace(indrnn.INDRNN, name='bad_linear', linear=True)",
        r"cell 'bad_linear'.*linear=True, but state 'h' is not a\*prev \+ b in the previous "
        r"state: at prev=.* the step gives .*, the affine fit"),
    "heads that are not a number of heads": (
        "dataclasses.replace(slstm.SLSTM, name='bad_heads', heads=3)",
        "dataclasses.replace(slstm.SLSTM, name='bad_heads', heads=0)",
        r"cell 'bad_heads'.*recurrent='heads' needs heads=<int >= 1>, got heads=0"),
}


def _install(plugin_dir, cell_expr, tag):  # noqa: F811
    modname = f"bad_cells_{tag}"
    make_distribution(plugin_dir, "kernrnn-bad", {"bad": modname},
                      {modname: IMPORTS + f"CELL = {cell_expr}\n" + HOOK})


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_cell_is_a_cell_error_naming_plugin_and_distribution(plugin_dir, case):  # noqa: F811
    _, bad, pattern = CASES[case]
    tag = str(sorted(CASES).index(case))
    _install(plugin_dir, bad, tag)
    with pytest.raises(CellError, match=f"{SOURCE}.*{pattern}") as info:
        load_registry()
    assert isinstance(info.value, PluginError)
    assert "\n" not in str(info.value)  # one line


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_good_twin_registers(plugin_dir, case):  # noqa: F811
    good, _, _ = CASES[case]
    _install(plugin_dir, good, "good" + str(sorted(CASES).index(case)))
    reg = load_registry()
    (name,) = [n for n in reg.names() if reg.source(n).plugin == "bad"]
    assert reg.source(name).distribution == "kernrnn-bad 0.1"


def test_heads_not_dividing_the_hidden_size(plugin_dir, fresh_registry):  # noqa: F811
    _install(plugin_dir, "dataclasses.replace(slstm.SLSTM, name='three_heads', heads=3)",
             "heads")
    kernrnn.RNN("three_heads", 2, 6, dtype=np.float64)  # 3 heads of 2 units
    with pytest.raises(CellError, match=rf"cell 'three_heads' \({SOURCE}\): heads=3 must "
                                        r"divide the hidden size, got hidden_size=7"):
        kernrnn.RNN("three_heads", 2, 7, dtype=np.float64)


def test_none_cell_state_dict_with_weight_hh():
    layer = kernrnn.RNN("mingru", 3, 4, dtype=np.float64, seed=0)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    assert not any(k.startswith("weight_hh") for k in before)
    sd = {k: v + 1 for k, v in before.items()}
    sd["weight_hh_l0"] = np.zeros((8, 4))
    with pytest.raises(CellError, match=r"cell 'mingru' \(plugin 'kernrnn_cells.mingru' from "
                                        r"distribution 'kernrnn .* \(built in\)'\) has no "
                                        r"recurrent matrix \(recurrent='none'\): its state "
                                        r"dict has no weight_hh/bias_hh, got \['weight_hh_l0'\]"):
        layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():  # nothing was loaded
        np.testing.assert_array_equal(v, before[k])


def test_wrong_shape_from_a_registered_cells_init_names_its_source(fresh_registry):
    """A per-unit init that is right for H=3 (validation) but not for the layer's H."""
    import dataclasses

    from kernrnn.cell import Param
    from kernrnn.plugins import get_registry

    def init(rng, shape, hidden_size):
        return np.zeros(shape if hidden_size == 3 else (hidden_size + 1,))

    cell = dataclasses.replace(get_registry().get("indrnn"), name="odd_init",
                               params=(Param("u", init=init),))
    get_registry().add(cell)
    with pytest.raises(CellError, match=r"cell 'odd_init' \(plugin '<runtime>'.*\): init "
                                        r"returned shape \(6,\) for u, expected \(5,\)"):
        kernrnn.RNN("odd_init", 2, 5, dtype=np.float64)
