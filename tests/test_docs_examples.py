"""The documentation's runnable examples stay correct."""

import importlib.util
from pathlib import Path

import numba
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_numba_thread():
    """Learning is what is checked here, not speed: keep the loaded CI cores free."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def test_first_training_run_learns(one_numba_thread, capsys):
    losses, held_out, baseline = _load("first_training").main(steps=150, log_every=50)
    out = capsys.readouterr().out
    assert "step  150" in out and "held-out mse" in out
    assert all(np.isfinite(losses))
    # The loss falls by far more than noise would explain, and the model beats
    # the last-value forecast on held-out windows.
    assert np.mean(losses[-20:]) < 0.2 * np.mean(losses[:20])
    assert held_out < 0.7 * baseline
