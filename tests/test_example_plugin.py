"""The plugin tutorial's example package, found through its entry points.

``docs/examples/kernrnn-example-cells`` is the code the tutorial shows.  These
tests make it visible the way ``pip install`` would (its source directory on
``sys.path`` plus a ``.dist-info`` directory whose entry points are read from
the example's own ``pyproject.toml``), so a plain ``pytest`` after the
README's install command exercises it without installing anything.  Then
kernrnn must discover both cells through the ``kernrnn`` entry-point group,
name their distribution, and the cells must pass the conformance check.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given

from kernrnn.plugins import PROJECT, load_registry
from kernrnn.testing import check_cell, check_compiles
from kernrnn.testing import tolerances as tol
from kernrnn.testing.conformance import compare_backward, forward_errors, gradient_errors
from kernrnn.testing.strategies import problems

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "kernrnn-example-cells"
PYPROJECT = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
CELLS = ("example_cifg", "example_mgu")


def _write_dist_info(root: Path) -> None:
    """What pip would install for the example: METADATA and entry_points.txt."""
    name, version = PYPROJECT["name"], PYPROJECT["version"]
    dist = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    group = PROJECT
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in PYPROJECT["entry-points"][group].items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example package importable and its entry points visible, for this module only."""
    root = tmp_path_factory.mktemp("example-dist")
    _write_dist_info(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("KERNRNN_DISABLE_PLUGIN_AUTOLOAD", raising=False)
        mp.syspath_prepend(str(EXAMPLE / "src"))
        mp.syspath_prepend(str(root))
        yield


@pytest.fixture(scope="module")
def registry(installed):
    return load_registry(autoload=True)


def test_pyproject_declares_one_entry_point_per_cell():
    assert sorted(PYPROJECT["entry-points"][PROJECT]) == sorted(CELLS)


def test_entry_points_are_visible(installed):
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=PROJECT)
           if ep.dist is not None and ep.dist.name == PYPROJECT["name"]}
    assert sorted(eps) == sorted(CELLS)
    assert eps["example_cifg"].value == "kernrnn_example_cells.cifg"


@pytest.mark.parametrize("name", CELLS)
def test_cells_discovered_with_their_source(registry, name):
    source = registry.source(name)
    assert source.plugin == name
    assert source.distribution == f"{PYPROJECT['name']} {PYPROJECT['version']}"
    assert registry.get(name).n_gates == {"example_cifg": 3, "example_mgu": 2}[name]


def test_autoload_off_hides_the_example(installed):
    registry = load_registry(autoload=False)
    assert not any(name in registry for name in CELLS)
    assert "lstm" in registry


def test_the_two_forms_of_a_cell(registry):
    """The tutorial's CIFG is a forward step only; its MGU keeps a hand-written backward,
    which agrees with the one derived from its forward."""
    cifg, mgu = registry.get("example_cifg"), registry.get("example_mgu")
    assert cifg.derived_backward and cifg.step.__module__ == "kernrnn_example_cells.cifg"
    assert cifg.derivation().saved == ("f", "g", "o", "tanh_c")
    assert not mgu.derived_backward and mgu.backward.__module__ == "kernrnn_example_cells.mgu"
    assert compare_backward(mgu) < 1e-12
    assert mgu.same_grads == mgu.derivation().same_grads == (True, False)


@pytest.mark.parametrize("name", CELLS)
def test_example_cells_pass_the_conformance_check(registry, name):
    report = check_cell(registry.get(name), examples=4, seed=1)
    assert report.examples == 4
    # check_cell compared the hand-written backward (only) with the derived one
    assert (report.max_backward_difference is None) == registry.get(name).derived_backward
    assert report.max_forward_error["float64"] <= tol.FLOAT64["atol"] * 10
    assert report.max_forward_error["float32"] <= tol.FLOAT32["atol"] * 10


@pytest.mark.parametrize("name", CELLS)
def test_example_cells_compile_for_every_backend(registry, name):
    """The tutorial's check_compiles: CPU kernels, the static GPU checks and PTX where NVVM is."""
    report = check_compiles(registry.get(name))
    assert report.ok and "CPU kernels" in report.checked


@pytest.mark.parametrize("name", CELLS)
def test_example_cells_forward_and_gradients_match_reference(registry, name):
    cell = registry.get(name)

    @given(problems(max_T=6, max_B=3, max_I=4, max_H=4))
    def check(p):
        for dtype in (np.float64, np.float32):
            scaled, _ = forward_errors(cell, p, dtype)
            assert scaled <= 1
        gradient_errors(cell, p)  # raises ConformanceError on a disagreement

    check()


def test_layer_and_cli_use_the_discovered_cells(installed, fresh_registry, capsys):
    import kernrnn
    from kernrnn.cli import main

    assert {"example_cifg", "example_mgu", "cifg", "mgu"} <= set(kernrnn.cells())
    layer = kernrnn.RNN("example_cifg", input_size=3, hidden_size=5, dtype=np.float64, seed=0)
    assert layer.state_dict()["weight_ih_l0"].shape == (15, 3)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 2, 3))
    y, (h, c) = layer(x)
    assert y.shape == (4, 2, 5) and h.shape == c.shape == (1, 2, 5)
    assert main(["cells"]) == 0
    out = capsys.readouterr().out
    assert "example_cifg" in out and "example_mgu" in out and PYPROJECT["name"] in out
    assert "LSTM with coupled input and forget gate" in out  # the description column


@pytest.mark.parametrize("example, shipped", [("example_cifg", "cifg"), ("example_mgu", "mgu")])
def test_example_cells_and_the_shipped_zoo_cells_coexist_and_agree(registry, example, shipped):
    """Same math, different names: both registered, same numbers on the same weights."""
    import kernrnn

    assert registry.source(shipped).distribution.endswith("(built in)")
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (5, 2, 3))
    a = kernrnn.RNN(registry.get(example), 3, 4, dtype=np.float64, seed=1)
    b = kernrnn.RNN(registry.get(shipped), 3, 4, dtype=np.float64, seed=2)
    b.load_state_dict(a.state_dict())
    np.testing.assert_allclose(b(x)[0], a(x)[0], rtol=1e-13, atol=1e-14)
