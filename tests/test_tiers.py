"""The NumPy first tier and the swap to the kernels (kernrnn.backends.cpu.tiers).

The first tier must compute what the kernels compute (forward, BPTT, every
gradient), for every recurrence form it covers; the swap must happen between
calls, a training forward's backward must stay in its tier, and a failed
background build must leave the first tier running with one warning.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn.backends.cpu import first_tier, host, tiers
from kernrnn.functional import rnn_backward, rnn_forward
from kernrnn.plugins import resolve_cell
from kernrnn.testing.tolerances import forward_tolerance, grad_tolerance

# one cell per form the first tier covers: dense (lstm), per-unit parameters without a
# recurrent matrix (indrnn), per-head products (slstm: 2 heads), the raw input (sru), a
# product over two states with hyperparameters (cornn)
CELLS = ("lstm", "indrnn", "slstm", "sru", "cornn")


@pytest.fixture
def fresh_tiers(monkeypatch):
    """Tiers on, with no build recorded (the rest of the suite runs with tiers off)."""
    monkeypatch.setattr(tiers, "_jobs", {})
    tiers.set_enabled(True)
    yield
    tiers.set_enabled(None)


def _problem(cell, T, B, I, H, dtype, seed):
    rng = np.random.default_rng(seed)
    params = {k: rng.uniform(-0.5, 0.5, s).astype(dtype)
              for k, s in cell.param_shapes(I, H).items()}
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = (np.stack(cell.state_sampler(rng, (B, H))) if cell.state_sampler
          else rng.uniform(-1, 1, (cell.n_state, B, H))).astype(dtype)
    lengths = rng.integers(0, T + 1, size=B).astype(np.int64)
    lengths[rng.integers(B)] = T
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    dhn = rng.standard_normal((cell.n_state, B, H)).astype(dtype)
    return params, x, h0, lengths, dy, dhn


def test_first_tier_takes_the_layer_hyperparameters():
    """A cell with hyperparameters (tests/hyper_test_cells.py): both tiers read the values
    the call passes, not the defaults."""
    from hyper_test_cells import HYP

    tiers.set_enabled(False)
    try:
        values = HYP.hyper_vector({"eps": 0.7, "gamma": -0.4, "k": 2, "flip": True})
        assert values != HYP.hyper_vector()
        params, x, h0, lengths, dy, dhn = _problem(HYP, 4, 2, 3, 3, np.float64, 3)
        y1, hn1, c1 = host.forward(HYP, x, params, h0, lengths, False, True, hyper=values)
        y0, hn0, c0 = first_tier.forward(HYP, x, params, h0, lengths, False, True,
                                         hyper=values)
        np.testing.assert_allclose(y0, y1, rtol=1e-10, atol=1e-12)
        g1, g0 = host.backward(c1, dy, dhn)[2], first_tier.backward(c0, dy, dhn)[2]
        host.release(c1)
        for k in g1:
            np.testing.assert_allclose(g0[k], g1[k], rtol=1e-10, atol=1e-12, err_msg=k)
        y_default = first_tier.forward(HYP, x, params, h0, lengths, False, False)[0]
        assert not np.allclose(y_default, y0)
    finally:
        tiers.set_enabled(None)


@pytest.mark.parametrize("name", CELLS)
@settings(max_examples=4)
@given(T=st.integers(0, 5), B=st.integers(1, 3),
       I=st.integers(1, 4), half=st.integers(1, 3), reverse=st.booleans(),
       seed=st.integers(0, 2**16))
def test_first_tier_computes_what_the_kernels_compute(name, T, B, I, half, reverse, seed):
    tiers.set_enabled(False)  # host.forward below runs the kernels
    try:
        cell = resolve_cell(name)
        H = 2 * half  # slstm's two heads divide it
        I = H if cell.raw_input else I  # the raw input needs I == H
        params, x, h0, lengths, dy, dhn = _problem(cell, T, B, I, H, np.float64, seed)
        assert first_tier.supports(cell)
        y1, hn1, c1 = host.forward(cell, x, params, h0, lengths, reverse, True)
        y0, hn0, c0 = first_tier.forward(cell, x, params, h0, lengths, reverse, True)
        assert c0.path == first_tier.PATH and c1.path != first_tier.PATH
        dx1, dh1, g1 = host.backward(c1, dy, dhn)
        dx0, dh0, g0 = first_tier.backward(c0, dy, dhn)
        host.release(c1)
        tol = dict(rtol=1e-10, atol=1e-12)
        for a, b in ((y0, y1), (hn0, hn1), (dx0, dx1), (dh0, dh1)):
            np.testing.assert_allclose(a, b, **tol)
        assert sorted(g0) == sorted(g1)
        for k in g1:
            np.testing.assert_allclose(g0[k], g1[k], err_msg=k, **tol)
        y2, hn2, none = first_tier.forward(cell, x, params, h0, lengths, reverse, False)
        assert none is None
        np.testing.assert_allclose(y2, y1, **tol)
    finally:
        tiers.set_enabled(None)


def test_first_tier_float32_stays_float32_and_close():
    tiers.set_enabled(False)
    try:
        cell = resolve_cell("lstm")
        params, x, h0, lengths, dy, dhn = _problem(cell, 4, 3, 3, 4, np.float32, 1)
        y1, hn1, c1 = host.forward(cell, x, params, h0, lengths, False, True)
        y0, hn0, c0 = first_tier.forward(cell, x, params, h0, lengths, False, True)
        dx1, dh1, g1 = host.backward(c1, dy, dhn)
        dx0, dh0, g0 = first_tier.backward(c0, dy, dhn)
        host.release(c1)
        for a in (y0, hn0, dx0, dh0, *g0.values()):
            assert a.dtype == np.float32
        np.testing.assert_allclose(y0, y1, **forward_tolerance(np.float32))
        for k in g1:
            np.testing.assert_allclose(g0[k], g1[k], err_msg=k, **grad_tolerance(np.float32))
        np.testing.assert_allclose(dx0, dx1, **grad_tolerance(np.float32))
    finally:
        tiers.set_enabled(None)


def _call(cell, seed=0, dtype=np.float64):
    params, x, h0, lengths, dy, dhn = _problem(cell, 4, 2, 3, 4, dtype, seed)
    y, hn, ctx = rnn_forward(cell, x, dict(params), h0=tuple(h0), lengths=lengths,
                             training=True)
    return y, ctx, dy


def test_first_call_runs_the_first_tier_and_swaps_after_the_build(fresh_tiers, monkeypatch):
    gate = threading.Event()
    real = tiers._build

    def held_build(*args):  # the build finishes only when the test says so
        gate.wait(60)
        real(*args)

    monkeypatch.setattr(tiers, "_build", held_build)
    cell = resolve_cell("lstm")
    y0, ctx0, dy = _call(cell)
    assert ctx0.path == first_tier.PATH  # the build is under way
    y1, ctx1, _ = _call(cell)
    assert ctx1.path == first_tier.PATH
    gate.set()
    assert kernrnn.warmup(timeout=60)
    y2, ctx2, _ = _call(cell)
    assert ctx2.path != first_tier.PATH  # swapped: the kernels run
    np.testing.assert_allclose(y0, y2, rtol=1e-10, atol=1e-12)
    # a first-tier forward made before the swap is differentiated in its own tier
    g_old = rnn_backward(ctx1, dy)[2]
    g_new = rnn_backward(ctx2, dy)[2]
    for k in g_new:
        np.testing.assert_allclose(g_old[k], g_new[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_failed_build_keeps_the_first_tier_and_warns_once(fresh_tiers, monkeypatch):
    gate = threading.Event()

    def broken_build(*args):
        gate.wait(60)
        raise RuntimeError("the compiler broke")

    monkeypatch.setattr(tiers, "_build", broken_build)
    cell = resolve_cell("lstm")
    y0, ctx0, _ = _call(cell)
    assert ctx0.path == first_tier.PATH
    gate.set()
    for job in tiers._jobs.values():
        job.done.wait(30)
    with pytest.warns(RuntimeWarning, match="the compiler broke"):
        y1, ctx1, _ = _call(cell)
    assert ctx1.path == first_tier.PATH
    np.testing.assert_array_equal(y0, y1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once only
        _, ctx2, _ = _call(cell)
    assert ctx2.path == first_tier.PATH
    with pytest.raises(RuntimeError, match="the compiler broke"):
        kernrnn.warmup()


def test_calls_the_first_tier_does_not_cover_wait_for_the_kernels(fresh_tiers):
    cell = resolve_cell("lstm_ln")  # a normalisation inside the step: two stages
    assert not first_tier.supports(cell)
    _, ctx, _ = _call(cell)
    assert ctx.path != first_tier.PATH and not tiers._jobs
    assert not first_tier.supports(resolve_cell("lstm"), reg=object())


def test_tiers_off_runs_the_kernels_from_the_first_call(fresh_tiers):
    tiers.set_enabled(False)
    _, ctx, _ = _call(resolve_cell("lstm"))
    assert ctx.path != first_tier.PATH and not tiers._jobs


def test_warmup_of_a_layer_builds_before_the_first_call(fresh_tiers):
    layer = kernrnn.RNN("lstm", 3, 4, dtype=np.float64)
    assert kernrnn.warmup(layer, batch_size=2)
    params, x, h0, lengths, dy, dhn = _problem(layer.cell, 4, 2, 3, 4, np.float64, 0)
    _, _, ctx = rnn_forward(layer.cell, x, dict(params), training=True)
    assert ctx.path != first_tier.PATH


def test_a_broken_plugin_is_named_by_the_background_build(fresh_tiers, monkeypatch):
    """With tiers on, the check of a cell's math runs in the background build (construction
    compiles nothing); its error reaches the caller once, naming the cell."""
    from kernrnn import scalar
    from kernrnn.backends.cpu import host
    from kernrnn.errors import CellError

    seen, gate = [], threading.Event()

    def failing_check(cell, dtype):
        gate.wait(60)
        seen.append(cell.name)
        raise CellError(f"cell {cell.name!r}: its math does not compile")

    monkeypatch.setattr(host, "check_cell_compiles", failing_check)
    monkeypatch.setattr(scalar, "check_cell_compiles", failing_check)
    host._check_math.cache_clear()
    try:
        layer = kernrnn.RNN("gru", 3, 4, dtype=np.float64)  # no check at construction
        assert seen == []
        x = np.zeros((2, 1, 3))
        y, _ = layer(x)  # the first tier
        gate.set()
        for job in tiers._jobs.values():
            job.done.wait(30)
        assert seen == ["gru"]
        with pytest.warns(RuntimeWarning, match="its math does not compile"):
            layer(x)
    finally:
        host._check_math.cache_clear()
