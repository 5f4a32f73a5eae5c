"""Layer and functional API semantics (beyond the reference comparisons)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernrnn
from kernrnn.testing import tolerances as tol
from kernrnn.testing.reference import reference_direction


@given(T=st.integers(1, 6), B=st.integers(1, 3), H=st.integers(1, 4), seed=st.integers(0, 10**6),
       cell=st.sampled_from(["lstm", "gru", "rnn"]), reverse=st.booleans())
def test_functional_matches_reference_and_finite_differences(T, B, H, seed, cell, reverse):
    rng = np.random.default_rng(seed)
    c = kernrnn.get_registry().get(cell)
    G, S, I = c.n_gates, c.n_state, 3
    x = rng.uniform(-1, 1, (T, B, I))
    w = [rng.uniform(-0.5, 0.5, s) for s in [(G * H, I), (G * H, H), (G * H,), (G * H,)]]
    h0 = tuple(rng.uniform(-1, 1, (B, H)) for _ in range(S))
    lengths = rng.integers(0, T + 1, B)
    y, hn, ctx = kernrnn.rnn_forward(cell, x, *w, h0=h0, lengths=lengths, reverse=reverse)
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ry, rhn = reference_direction(c, x, dict(zip(kinds, w)), h0, lengths, reverse)
    np.testing.assert_allclose(y, ry, rtol=1e-10, atol=1e-12)
    for a, b in zip(hn, rhn):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    dy = rng.uniform(-1, 1, y.shape)
    dx, dh0, grads = kernrnn.rnn_backward(ctx, dy)
    assert set(grads) == {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    # the functional API's own gradient, checked along a random direction of
    # bias_ih against a central difference of the reference (tolerance: tol.FD)
    eps = tol.FD_STEP
    v = rng.standard_normal(w[2].shape)
    def loss(sign):
        moved = dict(zip(kinds, [w[0], w[1], w[2] + sign * eps * v, w[3]]))
        return (reference_direction(c, x, moved, h0, lengths, reverse)[0] * dy).sum()

    lp, lm = loss(1), loss(-1)
    fd = (lp - lm) / (2 * eps)
    assert abs(fd - (grads["bias_ih"] * v).sum()) < tol.FD["rtol"] * max(1, abs(lp))



def test_functional_backward_returns_the_forward_buffers_to_the_workspace():
    """rnn_backward hands the forward's buffers back, as the layer's backward does, so the
    next call reuses them; the spent ctx then refuses a second backward."""
    from kernrnn.backends.cpu.workspace import workspace

    c = kernrnn.get_registry().get("lstm")
    G, T, B, I, H = c.n_gates, 5, 4, 3, 16
    rng = np.random.default_rng(0)
    w = [rng.uniform(-0.5, 0.5, s) for s in [(G * H, I), (G * H, H), (G * H,), (G * H,)]]
    x = rng.uniform(-1, 1, (T, B, I))
    workspace.clear()
    y, _, ctx = kernrnn.rnn_forward("lstm", x, *w)
    states = ctx.States  # [S, T+1, B, H], 6,144 bytes: large enough for the workspace
    assert states.nbytes >= workspace.min_bytes and not ctx.released
    kernrnn.rnn_backward(ctx, np.ones_like(y))
    assert ctx.released
    taken = [workspace.take(states.shape, states.dtype) for _ in range(8)]
    assert any(a is states for a in taken), "the forward's States did not go back"
    with pytest.raises(ValueError, match="consumed"):
        kernrnn.rnn_backward(ctx, np.ones_like(y))

def test_outputs_past_length_are_zero_and_hn_is_last_valid_state():
    layer = kernrnn.RNN("lstm", 2, 3, bidirectional=True, dtype=np.float64, seed=1)
    x = np.random.default_rng(0).uniform(-1, 1, (6, 3, 2))
    lengths = [6, 3, 0]
    y, (h, c) = layer(x, lengths=lengths)
    assert np.all(y[3:, 1] == 0) and np.all(y[:, 2] == 0)
    np.testing.assert_array_equal(h[0, 1], y[2, 1, :3])  # forward: state at t = length-1
    np.testing.assert_array_equal(h[1, 1], y[0, 1, 3:])  # reverse: state after t = 0
    # the truncated sequence gives the same result as running it alone
    y1, (h1, _) = layer(x[:3, 1:2])
    np.testing.assert_allclose(y1[:, 0], y[:3, 1], rtol=1e-14)
    np.testing.assert_allclose(h1[:, 0], h[:, 1], rtol=1e-14)
    np.testing.assert_array_equal(h[:, 2], 0)  # empty sequence keeps h0 = 0


def test_grads_accumulate_until_zero_grad():
    layer = kernrnn.RNN("gru", 2, 3, dtype=np.float64, seed=0)
    x = np.ones((4, 2, 2))
    y, _ = layer(x)
    layer.backward(np.ones_like(y))
    g1 = {k: v.copy() for k, v in layer.grads.items()}
    y, _ = layer(x)
    layer.backward(np.ones_like(y))
    for k in g1:
        np.testing.assert_allclose(layer.grads[k], 2 * g1[k])
    layer.zero_grad()
    assert all(np.all(v == 0) for v in layer.grads.values())


def test_eval_mode_gives_same_output():
    layer = kernrnn.RNN("lstm", 3, 5, num_layers=2, dtype=np.float32, seed=0)
    x = np.random.default_rng(0).standard_normal((7, 4, 3)).astype(np.float32)
    y_train, _ = layer(x)
    y_eval, _ = layer.eval()(x)
    np.testing.assert_array_equal(y_train, y_eval)


def test_float32_layer_keeps_float32():
    layer = kernrnn.RNN("gru", 3, 4, dtype=np.float32)
    y, h = layer(np.zeros((2, 1, 3), np.float32))
    dx, dh0 = layer.backward(np.ones_like(y))
    assert y.dtype == h.dtype == dx.dtype == dh0.dtype == np.float32
    assert all(v.dtype == np.float32 for v in layer.grads.values())


def test_state_dict_round_trip_and_names():
    a = kernrnn.RNN("lstm", 3, 4, num_layers=2, bidirectional=True, seed=0)
    assert list(a.state_dict()) == [
        f"{k}_l{layer}{sfx}" for layer in range(2) for sfx in ("", "_reverse")
        for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    b = kernrnn.RNN("lstm", 3, 4, num_layers=2, bidirectional=True, seed=1)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(a(x)[0], b(x)[0])


def test_default_init_is_pytorch_uniform():
    layer = kernrnn.RNN("gru", 3, 16, seed=0)
    bound = 1 / np.sqrt(16)
    for v in layer.params.values():
        assert np.all(np.abs(v) <= bound) and np.abs(v).max() > 0.8 * bound


def test_empty_time_axis():
    layer = kernrnn.RNN("lstm", 2, 3, dtype=np.float64)
    h0 = (np.ones((1, 2, 3)), np.full((1, 2, 3), 2.0))
    y, (h, c) = layer(np.zeros((0, 2, 2)), h0)
    assert y.shape == (0, 2, 3)
    np.testing.assert_array_equal(h, h0[0])
    dx, (dh, dc) = layer.backward(np.zeros((0, 2, 3)), (np.ones((1, 2, 3)), np.ones((1, 2, 3))))
    assert dx.shape == (0, 2, 2)
    np.testing.assert_array_equal(dh, 1.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(threads):
    import numba

    layer = kernrnn.RNN("lstm", 3, 8, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 5, 3))
    ref, _ = layer(x)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        y, _ = layer(x)
    finally:
        numba.set_num_threads(old)
    np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-15)
