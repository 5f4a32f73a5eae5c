"""Which time loops may be replayed as CUDA graphs, checked under the simulator.

A graph replays the kernel scalars and device pointers of the call that
captured it.  The simulator cannot capture graphs, so these tests switch
graphs on, record the key each loop hands to ``run_loop`` (None: the loop runs
eagerly every call) and run the loop eagerly.  Real capture and replay need a
GPU (``tests/test_gpu.py``).
"""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import kernrnn  # noqa: E402
from kernrnn.backends.cuda import graphs, host  # noqa: E402


@pytest.fixture
def keys(monkeypatch):
    """Graphs on; the (direction, key) of every loop, in order."""
    seen = []

    def run_loop(key, issue, make_scratch):
        seen.append(key)
        issue(make_scratch())

    monkeypatch.setattr(graphs, "graphs_enabled", lambda: True)
    monkeypatch.setattr(graphs, "_refusals_warned", set())
    monkeypatch.setattr(host, "run_loop", run_loop)
    monkeypatch.setattr(host, "layout_key", lambda *arrays: tuple(a.ctypes.data for a in arrays))
    return seen


def _train_step(cell, **kw):
    layer = kernrnn.RNN(cell, 3, 4, device="cuda", dtype=np.float64, seed=0, **kw)
    x = np.random.default_rng(0).normal(size=(3, 2, 3))
    y, _ = layer(x)
    layer.backward(np.ones_like(y))


def test_plain_cell_loops_are_keyed(keys):
    _train_step("lstm")
    assert len(keys) == 2 and all(k is not None for k in keys)
    assert [k[0] for k in keys] == ["forward", "backward"]


@pytest.mark.parametrize("kw", [dict(zoneout=0.3), dict(recurrent_dropout=0.3)])
def test_regularised_loops_run_eagerly(keys, kw):
    """Masks and zoneout seeds are new each call: a graph would freeze the capturing
    call's, and a backward captured later than its forward would use other masks."""
    with pytest.warns(RuntimeWarning, match="without them .regularisation"):
        _train_step("lstm", **kw)
    assert keys == [None, None]


@pytest.mark.parametrize("cell,kw", [("lstm_ln", {}), ("slstm", {}), ("lstm", dict(proj_size=2))])
def test_arrays_are_wrapped_once_per_loop_not_per_step(monkeypatch, cell, kw):
    """A wrap (``cuda.as_cuda_array``) costs tens of microseconds of Python: the norm and
    projection kernels' arrays are wrapped before the loop, so the count is the same
    for any T."""
    from kernrnn.backends.cuda import launch

    counts = []
    wrap = launch.Launcher.wrap

    def counting(a):
        counts[-1] += 1
        return wrap(a)

    monkeypatch.setattr(launch.Launcher, "wrap", staticmethod(counting))
    for T in (2, 5):
        counts.append(0)
        layer = kernrnn.RNN(cell, 3, 4, device="cuda", dtype=np.float64, seed=0, **kw)
        y, _ = layer(np.random.default_rng(0).normal(size=(T, 2, 3)))
        layer.backward(np.ones_like(y))
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("cell", ["lstm_peephole", "lstm_ln", "gru_ln"])
def test_cells_with_parameters_or_norms_run_eagerly(keys, cell):
    """Their per-unit parameters, norm vectors and gradient accumulators are new arrays
    each call, outside the key: a replay would read and write the capturing call's."""
    with pytest.warns(RuntimeWarning, match="without them .its per-unit parameters"):
        _train_step(cell)
    assert keys == [None, None]


@pytest.mark.parametrize("cell", ["slstm", "gru"])
def test_heads_and_plain_cells_stay_keyed(keys, cell):
    _train_step(cell)
    assert len(keys) == 2 and None not in keys
