"""Every public entry point rejects bad input with a message naming what is wrong."""

import numpy as np
import pytest

import kernrnn


@pytest.fixture(scope="module")
def lstm():
    return kernrnn.RNN("lstm", input_size=3, hidden_size=4, num_layers=2, dtype=np.float64, seed=0)


def x_ok(T=5, B=2, I=3):
    return np.zeros((T, B, I))


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(input_size=0, hidden_size=4), ValueError, "input_size must be >= 1, got 0"),
    (dict(input_size=3, hidden_size=2.5), TypeError, "hidden_size must be an int"),
    (dict(input_size=3, hidden_size=4, num_layers=True), TypeError, "num_layers must be an int"),
    (dict(input_size=3, hidden_size=4, dtype=np.int32), TypeError, "dtype must be float32 or float64, got int32"),
    (dict(input_size=3, hidden_size=4, device="tpu"), ValueError, "device must be 'cpu' or 'cuda', got 'tpu'"),
    (dict(input_size=3, hidden_size=4, bidirectional=1), TypeError, "bidirectional must be a bool"),
    (dict(input_size=3, hidden_size=4, nonlinearity="relu"), ValueError, "nonlinearity applies to cell 'rnn' only"),
])
def test_constructor(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        kernrnn.RNN("lstm", **kwargs)


def test_nonlinearity_choice():
    assert kernrnn.RNN("rnn", 2, 3, nonlinearity="relu").cell.name == "rnn_relu"
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
        kernrnn.RNN("rnn", 2, 3, nonlinearity="gelu")


@pytest.mark.parametrize("x, exc, pattern", [
    (np.zeros((5, 3)), ValueError, r"x must have 3 dimensions \[\?, \?, 3\], got shape \[5, 3\]"),
    (np.zeros((5, 2, 4)), ValueError, r"x must have shape \[\?, \?, 3\], got \[5, 2, 4\]"),
    (np.zeros((5, 2, 3), np.float32), TypeError, "x must have dtype float64 .*got float32"),
    (np.full((5, 2, 3), np.nan), ValueError, "x contains NaN or infinity"),
    ([[[0.0] * 3]], TypeError, "x must be an array, got list"),
])
def test_forward_x(lstm, x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        lstm(x)


@pytest.mark.parametrize("lengths, exc, pattern", [
    ([5], ValueError, r"lengths must have shape \[2\]"),
    ([5, 6], ValueError, r"lengths must lie in \[0, 5\].*max 6"),
    ([-1, 2], ValueError, r"lengths must lie in \[0, 5\].*min -1"),
    ([2.0, 3.0], TypeError, "lengths must be integers, got dtype float64"),
])
def test_forward_lengths(lstm, lengths, exc, pattern):
    with pytest.raises(exc, match=pattern):
        lstm(x_ok(), lengths=lengths)


def test_forward_state(lstm):
    h = np.zeros((2, 2, 4))
    with pytest.raises(TypeError, match=r"h0 must be a tuple \('h', 'c'\) of 2 arrays \[2, 2, 4\]"):
        lstm(x_ok(), h)
    with pytest.raises(ValueError, match=r"h0 \(c\) must have shape \[2, 2, 4\], got \[1, 2, 4\]"):
        lstm(x_ok(), (h, np.zeros((1, 2, 4))))
    with pytest.raises(TypeError, match=r"h0 \(h\) must have dtype float64"):
        lstm(x_ok(), (h.astype(np.float32), h))


def test_backward_errors():
    layer = kernrnn.RNN("gru", 3, 4, dtype=np.float64)
    with pytest.raises(ValueError, match="backward.. needs a forward.. call in training mode"):
        layer.backward(np.zeros((5, 2, 4)))
    y, _ = layer(x_ok())
    with pytest.raises(ValueError, match=r"dy must have shape \[5, 2, 4\], got \[5, 2, 8\]"):
        layer.backward(np.zeros((5, 2, 8)))
    with pytest.raises(TypeError, match="dy must have dtype float64"):
        layer.backward(np.zeros((5, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"dhn must have shape \[1, 2, 4\]"):
        layer.backward(np.zeros_like(y), np.zeros((2, 2, 4)))
    layer.backward(np.zeros_like(y))
    with pytest.raises(ValueError, match="none since the last backward"):
        layer.backward(np.zeros_like(y))
    layer.eval()
    layer(x_ok())
    with pytest.raises(ValueError, match="eval mode"):
        layer.backward(np.zeros_like(y))


def test_state_dict_errors(lstm):
    sd = {k: v.copy() for k, v in lstm.state_dict().items()}
    missing = dict(sd)
    del missing["bias_hh_l1"]
    with pytest.raises(ValueError, match=r"missing keys \['bias_hh_l1'\], unexpected keys \[\]"):
        lstm.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['weight_hh_l2'\]"):
        lstm.load_state_dict({**sd, "weight_hh_l2": sd["weight_hh_l1"]})
    with pytest.raises(ValueError, match=r"state_dict\['weight_ih_l1'\] must have shape \[16, 4\], got \[16, 3\]"):
        lstm.load_state_dict({**sd, "weight_ih_l1": sd["weight_ih_l0"]})
    with pytest.raises(TypeError, match=r"state_dict\['bias_ih_l0'\] must have dtype float64.*float32"):
        lstm.load_state_dict({**sd, "bias_ih_l0": sd["bias_ih_l0"].astype(np.float32)})
    with pytest.raises(TypeError, match="state_dict must be a mapping, got list"):
        lstm.load_state_dict([1, 2])
    lstm.load_state_dict(sd)  # the good one still loads


def test_functional_errors():
    x = np.zeros((4, 2, 3))
    w_ih, w_hh, b = np.zeros((16, 3)), np.zeros((16, 4)), np.zeros(16)
    with pytest.raises(ValueError, match=r"cell 'lstm' with H=4 \(from bias_ih\): weight_ih must "
                                         r"have shape \[16, 3\], got \[12, 3\]"):
        kernrnn.rnn_forward("lstm", x, np.zeros((12, 3)), np.zeros((12, 4)), b, b)
    with pytest.raises(ValueError, match=r"bias_hh must have shape \[16\], got \[12\]"):
        kernrnn.rnn_forward("lstm", x, w_ih, w_hh, b, np.zeros(12))
    with pytest.raises(TypeError, match=r"h0 must be a tuple of 2 arrays"):
        kernrnn.rnn_forward("lstm", x, w_ih, w_hh, b, b, h0=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="needs the ctx of a forward call made with training=True"):
        kernrnn.rnn_backward(None, x)
    with pytest.raises(TypeError, match="cell must be a registered name or a kernrnn.Cell"):
        kernrnn.rnn_forward(3, x, w_ih, w_hh, b, b)
