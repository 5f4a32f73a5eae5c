"""Variational dropout and zoneout inside the fused kernels: properties (issue: regularisation).

The masks come from Philox-4x32-10 (:mod:`kernrnn.philox`); the reference
regenerates them with an independent vectorised implementation, so kernels
and reference agree only if the masks are bit-identical.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn import philox
from kernrnn.regularization import Regularization, call_seed, recurrent_mask, zoneout_keep
from kernrnn.testing.conformance import forward_errors, gradient_errors
from kernrnn.testing.strategies import problems

REGISTRY = kernrnn.get_registry()
# one cell per form: dense (two states), dense GRU, heads, two-stage norm, no recurrent matrix
CELLS = ["lstm", "gru", "slstm", "lstm_ln", "indrnn"]


def _reg(cell, data):
    rate = st.sampled_from([0.0, 0.1, 0.5, 0.9])
    zo = tuple(data.draw(rate) for _ in range(cell.n_state))
    return dict(recurrent_dropout=data.draw(rate) if cell.has_recurrent else 0.0,
                input_dropout=data.draw(rate), zoneout=zo)


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox-4x32-10, both implementations."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                      0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        assert tuple(int(v) for v in philox.philox(*ctr, *key)) == want
        words = [np.uint64(v) for v in ctr + key]
        assert int(philox.philox_scalar(*words)) == want[0]


@settings(max_examples=10)
@given(seed=st.integers(0, 2**64 - 1), t=st.integers(0, 2**32 - 1), b=st.integers(0, 500),
       j=st.integers(0, 5000), rate=st.floats(0, 1))
def test_kernel_and_vector_masks_agree(seed, t, b, j, rate):
    thr = philox.threshold(rate)
    bits = philox.bits24(seed, 7, t, b, j)
    lo, hi = seed & 0xFFFFFFFF, seed >> 32
    assert bool(philox.below_scalar(lo, hi, 7, t, b, j, thr)) == bool(bits < thr)
    words = philox.zoneout_words(lo, hi, 7, t, b, j)
    assert [int(w) for w in words] == [int(w >> np.uint32(8)) for w in philox.philox(
        t, b, j, 7, lo, hi)]


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_mask_rate_within_binomial_bounds(rate):
    """The observed drop rate of a large mask is p within 5 standard deviations."""
    B, H = 64, 500
    n = B * H
    m = recurrent_mask(np, 1234, 0, 0, B, H, rate, np.float64)
    dropped = int((m == 0).sum())
    sd = np.sqrt(n * rate * (1 - rate))
    assert abs(dropped - n * rate) < 5 * sd, (dropped, n * rate, sd)
    np.testing.assert_allclose(m[m > 0], 1 / (1 - rate))  # inverted dropout
    keep = zoneout_keep(99, 1, 1, 0, 17, B, H, rate)
    assert abs(int(keep.sum()) - n * rate) < 5 * sd
    # a fresh zoneout mask per step, the same dropout mask at every step
    assert (zoneout_keep(99, 1, 1, 0, 18, B, H, rate) != keep).any()


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=3)
@given(data=st.data())
def test_forward_and_gradients_match_the_reference_with_the_same_masks(cell_name, data):
    """Kernels vs the float64 reference with regenerated masks; gradients vs finite
    differences with the masks fixed; float32 too."""
    cell = REGISTRY.get(cell_name)
    p = data.draw(problems(max_T=6, max_B=3, max_I=4, max_H=4, cell=cell))
    reg = _reg(cell, data)
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(cell, p, dtype, regularization=reg)
        assert scaled <= 1, f"{cell_name} {np.dtype(dtype)} {reg}: {absolute:.3e} on {p}"
    gradient_errors(cell, p, regularization=reg)


@pytest.mark.parametrize("cell_name", ["lstm", "indrnn"])
def test_eval_equals_the_unregularised_layer_when_only_dropout(cell_name):
    """Dropout is off in eval; zoneout's eval rule is the expectation, checked below."""
    cell = REGISTRY.get(cell_name)
    rd = 0.5 if cell.has_recurrent else 0.0
    a = kernrnn.RNN(cell_name, 3, 4, num_layers=2, dtype=np.float64, seed=1,
                    recurrent_dropout=rd, input_dropout=0.4)
    b = kernrnn.RNN(cell_name, 3, 4, num_layers=2, dtype=np.float64, seed=1)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(0).uniform(-1, 1, (7, 2, 3))
    a.eval()
    b.eval()
    ya, _ = a(x)
    yb, _ = b(x)
    np.testing.assert_array_equal(ya, yb)
    a.train()
    yt, _ = a(x)
    assert not np.allclose(yt, yb)  # training does drop


def test_zoneout_eval_is_the_expectation():
    layer = kernrnn.RNN("gru", 2, 3, dtype=np.float64, seed=2, zoneout=0.3)
    plain = kernrnn.RNN("gru", 2, 3, dtype=np.float64)
    plain.load_state_dict(layer.state_dict())
    layer.eval()
    x = np.random.default_rng(1).uniform(-1, 1, (4, 2, 2))
    y, h = layer(x)
    # one step at a time: h_t = 0.3 h_{t-1} + 0.7 gru(h_{t-1})
    prev = np.zeros((1, 2, 3))
    for t in range(4):
        _, cand = plain.eval()(x[t:t + 1], prev)
        prev = 0.3 * prev + 0.7 * cand
        np.testing.assert_allclose(y[t], prev[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h, prev, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell_name", ["lstm", "slstm"])
def test_zoneout_one_keeps_every_state_at_h0(cell_name):
    cell = REGISTRY.get(cell_name)
    layer = kernrnn.RNN(cell_name, 3, 4, dtype=np.float64, seed=3, zoneout=1.0)
    rng = np.random.default_rng(4)
    h0 = cell.sample_states(rng, (1, 2, 4))
    x = rng.uniform(-1, 1, (6, 2, 3))
    y, hn = layer(x, h0 if cell.n_state > 1 else h0[0])
    for t in range(6):
        np.testing.assert_array_equal(y[t], h0[0][0])
    for a, b in zip(hn if cell.n_state > 1 else (hn,), h0):
        np.testing.assert_array_equal(a, b)
    dx, _ = layer.backward(np.ones_like(y))
    np.testing.assert_array_equal(dx, 0)  # nothing flows into the cell


def test_recurrent_dropout_one_is_a_layer_without_recurrent_weights():
    a = kernrnn.RNN("lstm", 3, 4, dtype=np.float64, seed=5, recurrent_dropout=1.0)
    b = kernrnn.RNN("lstm", 3, 4, dtype=np.float64)
    sd = dict(a.state_dict())
    sd["weight_hh_l0"] = np.zeros_like(sd["weight_hh_l0"])
    b.load_state_dict(sd)
    x = np.random.default_rng(6).uniform(-1, 1, (5, 2, 3))
    h0 = tuple(np.random.default_rng(7).uniform(-1, 1, (2, 1, 2, 4)))
    ya, _ = a(x, h0)
    yb, _ = b(x, h0)
    np.testing.assert_allclose(ya, yb, rtol=1e-14, atol=1e-15)
    dxa, _ = a.backward(np.ones_like(ya))
    dxb, _ = b.backward(np.ones_like(yb))
    np.testing.assert_allclose(dxa, dxb, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(a.grads["weight_hh_l0"], 0)


def test_same_seed_same_results_and_masks_change_between_calls():
    x = np.random.default_rng(8).uniform(-1, 1, (5, 3, 2))
    outs = []
    for _ in range(2):
        layer = kernrnn.RNN("lstm", 2, 3, dtype=np.float64, seed=9, recurrent_dropout=0.3,
                            zoneout=(0.2, 0.1))
        y1, _ = layer(x)
        y2, _ = layer(x)
        outs.append((y1, y2))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert not np.array_equal(outs[0][0], outs[0][1])  # a fresh call draws fresh masks
    layer = kernrnn.RNN("lstm", 2, 3, dtype=np.float64, seed=9)
    assert layer.mask_seed(0) == call_seed(layer.dropout_seed, 0)


def test_bad_settings_are_refused_naming_the_option():
    lstm = REGISTRY.get("lstm")
    with pytest.raises(ValueError, match=r"recurrent_dropout must lie in \[0, 1\], got 1.5"):
        Regularization.build(lstm, recurrent_dropout=1.5)
    with pytest.raises(ValueError, match=r"zoneout must be one rate or 2 rates"):
        Regularization.build(lstm, zoneout=(0.1, 0.2, 0.3))
    with pytest.raises(TypeError, match=r"input_dropout must be a number"):
        Regularization.build(lstm, input_dropout="0.1")
    with pytest.raises(ValueError, match=r"cell 'mingru' has recurrent='none'"):
        kernrnn.RNN("mingru", 2, 3, recurrent_dropout=0.2)


def test_regularised_kernels_compile_to_ptx_without_float64():
    """The PTX check of the regularised variant (Philox in the kernels), float32."""
    cuda = pytest.importorskip("numba.cuda")
    from cuda_test_cells import nvvm_missing_locally

    from kernrnn.backends import cuda as cb
    if cb.SIMULATOR or nvvm_missing_locally():
        pytest.skip("needs NVVM and the real CUDA target")
    cell = REGISTRY.get("gru")
    k = cb.get_kernels(cell, np.float32, (True, True))
    for name, sig in cb.ptx_signatures(cell, np.float32, reg=(True, True)).items():
        if name.startswith("step_"):
            ptx, _ = cuda.compile_ptx(getattr(k, name), sig, cc=(9, 0))
            assert ".f64" not in ptx, name
