"""Plugin discovery, validation and error messages."""

import textwrap

import numpy as np
import pytest

from kernrnn.plugins import AUTOLOAD_ENV, PluginError, load_registry
from kernrnn.testing import check_cell

FIXTURES = __import__("pathlib").Path(__file__).parent / "plugin_fixtures"


def make_distribution(root, dist_name, entry_points: dict, modules: dict):
    """Write an installed-looking distribution (dist-info + modules) under ``root``."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist_name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kernrnn]\n{eps}\n")


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    return tmp_path


def test_shipped_cells_registered_as_plugins():
    reg = load_registry(autoload=False)
    assert {"rnn", "rnn_relu", "lstm", "gru"} <= set(reg.names())
    assert reg.source("lstm").plugin == "kernrnn_cells.lstm"
    assert "built in" in reg.source("gru").distribution
    assert reg.get("lstm").n_gates == 4 and reg.get("lstm").state == ("h", "c")
    assert reg.get("gru").gate_labels == "rzn"


def test_entry_point_cell_discovered_and_conformant(plugin_dir):
    make_distribution(plugin_dir, "kernrnn-testcells", {"testcells": "mgu_cells"},
                      {"mgu_cells": (FIXTURES / "mgu_cells.py").read_text()})
    reg = load_registry()
    assert "test_mgu" in reg
    src = reg.source("test_mgu")
    assert src.plugin == "testcells" and src.distribution == "kernrnn-testcells 0.1"
    report = check_cell(reg.get("test_mgu"), examples=3, seed=1)
    assert report.examples == 3 and report.max_forward_error["float64"] < 1e-10


def test_autoload_switch(plugin_dir, monkeypatch):
    make_distribution(plugin_dir, "kernrnn-testcells", {"testcells": "mgu_cells"},
                      {"mgu_cells": (FIXTURES / "mgu_cells.py").read_text()})
    assert "test_mgu" not in load_registry(autoload=False)
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert "test_mgu" not in load_registry()
    monkeypatch.setenv(AUTOLOAD_ENV, "0")
    assert "test_mgu" in load_registry()


def test_import_error_names_plugin_and_distribution(plugin_dir):
    make_distribution(plugin_dir, "kernrnn-broken", {"broken": "broken_mod"},
                      {"broken_mod": "import not_a_module_anywhere_xyz\n"})
    with pytest.raises(PluginError, match=r"plugin 'broken' from distribution 'kernrnn-broken 0.1'"
                       r".*could not be loaded.*ModuleNotFoundError"):
        load_registry()


def test_misspelt_hook_is_reported(plugin_dir):
    make_distribution(plugin_dir, "kernrnn-typo", {"typo": "typo_mod"}, {"typo_mod": """
        from kernrnn.cell import hookimpl

        @hookimpl
        def kernrnn_register_cell(registry):
            pass
        """})
    with pytest.raises(PluginError, match=r"plugin 'typo'.*kernrnn-typo.*unknown hook"):
        load_registry()


def test_duplicate_name_names_both_sources(plugin_dir):
    make_distribution(plugin_dir, "kernrnn-dup", {"dup": "dup_mod"}, {"dup_mod": """
        from kernrnn.cell import hookimpl
        from kernrnn_cells.lstm import LSTM

        @hookimpl
        def kernrnn_register_cells(registry):
            registry.add(LSTM)
        """})
    with pytest.raises(PluginError) as info:
        load_registry()
    msg = str(info.value)
    assert "'lstm' is registered twice" in msg
    assert "kernrnn_cells.lstm" in msg and "kernrnn-dup 0.1" in msg


BAD_CELLS = {
    "gate count": ("gates='ab'", "xw[2]", "forward failed on sample input.*IndexError"),
    "state size": ("gates='a', state=('h', 'c')", "xw[0]", "forward returned a state of 1 values"),
    "name": ("gates='a', name='Bad Name'", "xw[0]", "cell name must be lower case"),
}


@pytest.mark.parametrize("case", sorted(BAD_CELLS))
def test_bad_cell_definitions_are_reported(plugin_dir, case):
    kwargs, use, pattern = BAD_CELLS[case]
    if "name=" not in kwargs:
        kwargs += ", name='bad'"
    modname = "bad_mod_" + case.replace(" ", "_")
    make_distribution(plugin_dir, "kernrnn-bad", {"bad": modname}, {modname: f"""
        import numpy as np
        from kernrnn.cell import Cell, hookimpl

        def fwd(xw, hu, prev):
            return ({use} + hu[0],), ()

        def bwd(saved, prev, ds):
            return (ds[0],), (ds[0],), (0,)

        def ref(xw, hu, prev):
            return (xw[0] + hu[0],)

        @hookimpl
        def kernrnn_register_cells(registry):
            registry.add(Cell(forward=fwd, backward=bwd, reference=ref, {kwargs}))
        """})
    with pytest.raises(PluginError, match=r"plugin 'bad' from distribution 'kernrnn-bad 0.1' "
                       r"registered a bad cell: .*" + pattern):
        load_registry()


def test_reference_disagreeing_with_forward_is_rejected():
    from kernrnn.cell import Cell, CellError

    def fwd(xw, hu, prev):
        return (xw[0] + hu[0],), ()

    def bwd(saved, prev, ds):
        return (ds[0],), (ds[0],), (0,)

    with pytest.raises(CellError, match="forward and reference disagree"):
        Cell("lin", gates="a", forward=fwd, backward=bwd,
             reference=lambda xw, hu, prev: (2 * xw[0] + hu[0],))


def test_registry_add_rejects_non_cells():
    reg = load_registry(autoload=False)
    with pytest.raises(PluginError, match="expected a kernrnn.cell.Cell"):
        reg.add("lstm")


def test_unknown_cell_lists_known_ones():
    import kernrnn

    with pytest.raises(ValueError, match=r"unknown cell 'lsmt'; registered cells: .*gru.*lstm"):
        kernrnn.RNN("lsmt", 3, 4)


def test_math_that_does_not_compile_names_the_cell():
    """Valid Python that Numba cannot compile fails when first used, naming the cell."""
    import math

    import kernrnn
    from kernrnn.cell import Cell, CellError

    def fwd(xw, hu, prev):
        act = getattr(math, "tanh")  # noqa: B009  (dynamic lookup: fine in Python, not in Numba)
        return (act(xw[0]) + hu[0],), ()

    def bwd(saved, prev, ds):
        return (ds[0],), (ds[0],), (0,)

    cell = Cell("nocompile", gates="a", forward=fwd, backward=bwd,
                reference=lambda xw, hu, prev: (np.tanh(xw[0]) + hu[0],))
    with pytest.raises(CellError, match="'nocompile'.*forward math does not compile for float32"):
        kernrnn.RNN(cell, 2, 3)


def test_float64_leak_in_float32_math_is_reported():
    import math

    import kernrnn
    from kernrnn.cell import Cell, CellError

    def fwd(xw, hu, prev):
        return (xw[0] + hu[0] + math.pi * 0,), ()  # math.pi is a float64 global

    def bwd(saved, prev, ds):
        return (ds[0],), (ds[0],), (0,)

    cell = Cell("leak", gates="a", forward=fwd, backward=bwd,
                reference=lambda xw, hu, prev: (xw[0] + hu[0],))
    with pytest.raises(CellError, match="cell 'leak'.*must be a float32 scalar"):
        kernrnn.RNN(cell, 2, 3, dtype=np.float32)
    kernrnn.RNN(cell, 2, 3, dtype=np.float64)  # fine in float64


def test_register_plugin_at_runtime(fresh_registry):
    import importlib
    import sys

    import kernrnn

    sys.path.insert(0, str(FIXTURES))
    try:
        mod = importlib.import_module("mgu_cells")
        kernrnn.register_plugin(mod)
        assert "test_mgu" in kernrnn.cells()
        assert kernrnn.get_registry().source("test_mgu").distribution == "registered at run time"
        layer = kernrnn.RNN("test_mgu", 2, 3, dtype=np.float64)
        y, h = layer(np.zeros((4, 1, 2)))
        assert y.shape == (4, 1, 3) and h.shape == (1, 1, 3)
    finally:
        sys.path.remove(str(FIXTURES))
