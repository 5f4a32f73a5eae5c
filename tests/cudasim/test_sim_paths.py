"""A failing persistent kernel falls back to the GEMM path, checked under the simulator.

The persistent kernel may fail on a GPU where the plan did not foresee it (a
launch error, too few co-resident blocks, cudadevrt not linking).  Unless
``path="persistent"`` was asked for, the call then runs on the GEMM path, with
one warning, and the same problem stays there.
"""

import warnings

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from kernrnn.backends import cpu  # noqa: E402
from kernrnn.backends.cuda import paths  # noqa: E402
from kernrnn.backends.cuda import persistent as cp  # noqa: E402
from kernrnn.plugins import get_registry  # noqa: E402

LSTM = get_registry().get("lstm")


@pytest.fixture
def failing(monkeypatch):
    """The persistent kernels raise as a launch would on a GPU; counts the attempts."""
    calls = []

    def fail(*args, **kw):
        calls.append(args[0].name)
        raise RuntimeError("CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE (faked)")

    monkeypatch.setattr(cp, "forward_loop", fail)
    monkeypatch.setattr(cp, "backward_loop", fail)
    monkeypatch.setattr(paths, "_persistent_failures", set())
    monkeypatch.setattr(paths, "_failure_warned", set())
    yield calls
    cb.set_path(None)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    T, B, I, H = 4, 3, 2, 5
    params = {"weight_ih": rng.uniform(-0.5, 0.5, (4 * H, I)),
              "weight_hh": rng.uniform(-0.5, 0.5, (4 * H, H)),
              "bias_ih": rng.uniform(-0.5, 0.5, 4 * H), "bias_hh": rng.uniform(-0.5, 0.5, 4 * H)}
    return params, rng.uniform(-1, 1, (T, B, I)), rng.uniform(-1, 1, (2, B, H)), \
        np.array([4, 2, 0], np.int64)


def test_configured_persistent_path_falls_back_once_with_a_warning(failing):
    params, x, h0, lens = _problem()
    cb.set_path("persistent")
    with pytest.warns(RuntimeWarning, match="persistent CUDA kernel failed.*COOPERATIVE"):
        y, hn, ctx = cb.forward(LSTM, x, params, h0, cb.lengths(lens), False, True)
    assert ctx.path == "gemm" and failing == ["lstm"]
    y_c, hn_c, ctx_c = cpu.forward(LSTM, x, params, h0, lens, False, True)
    np.testing.assert_allclose(y, y_c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hn, hn_c, rtol=1e-12, atol=1e-12)
    dy, dhn = np.ones_like(y), np.ones_like(hn)
    got, want = cb.backward(ctx, dy, dhn), cpu.backward(ctx_c, dy, dhn)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-11, atol=1e-12)
    with warnings.catch_warnings():  # the same problem again: gemm directly, no warning
        warnings.simplefilter("error")
        _, _, ctx2 = cb.forward(LSTM, x, params, h0, cb.lengths(lens), False, True)
    assert ctx2.path == "gemm" and failing == ["lstm"]


def test_backward_falls_back_with_the_incoming_state_gradient(failing, monkeypatch):
    """The forward ran on the persistent kernel; its backward fails: the GEMM backward
    starts again from dhn (the kernel may have changed dS in place)."""
    params, x, h0, lens = _problem(1)
    y, hn, ctx = cb.forward(LSTM, x, params, h0, cb.lengths(lens), False, True)
    y_c, hn_c, ctx_c = cpu.forward(LSTM, x, params, h0, lens, False, True)
    ctx.path = "persistent"  # as if the forward had run on the kernel (same buffers)

    def scribble(cell, dy, dS, *args, **kw):
        dS += 100  # a partial run's damage
        raise RuntimeError("launch failed (faked)")

    monkeypatch.setattr(cp, "backward_loop", scribble)
    rng = np.random.default_rng(2)
    dy, dhn = rng.uniform(-1, 1, y.shape), rng.uniform(-1, 1, hn.shape)
    with pytest.warns(RuntimeWarning, match="persistent CUDA kernel failed"):
        got = cb.backward(ctx, dy, dhn)
    want = cpu.backward(ctx_c, dy, dhn)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-11, atol=1e-12)
    for k in want[2]:
        np.testing.assert_allclose(got[2][k], want[2][k], rtol=1e-11, atol=1e-12, err_msg=k)


def test_explicit_persistent_path_raises(failing):
    params, x, h0, lens = _problem()
    with pytest.raises(RuntimeError, match="COOPERATIVE"):
        cb.forward(LSTM, x, params, h0, cb.lengths(lens), False, True, path="persistent")
    with pytest.raises(RuntimeError, match="COOPERATIVE"):  # and is never remembered as failed
        cb.forward(LSTM, x, params, h0, cb.lengths(lens), False, True, path="persistent")
    assert failing == ["lstm", "lstm"]
