"""LSTMP (``proj_size``) in the native layer: kernels vs the float64 reference and PyTorch."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn.cell import Cell, CellError
from kernrnn.testing import tolerances as tol
from kernrnn.testing.conformance import forward_errors, gradient_errors
from kernrnn.testing.strategies import make_arrays, problems

REGISTRY = kernrnn.get_registry()
# the LSTM and one zoo cell with per-unit parameters (its packed-tile path gives way to
# the projection's BLAS path)
CELLS = ["lstm", "lstm_peephole"]
SMALL = dict(max_T=6, max_B=3, max_I=4, max_H=6, max_layers=2)


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=15)
@given(data=st.data())
def test_forward_matches_reference(cell_name, data):
    cell = REGISTRY.get(cell_name)
    p = data.draw(problems(**SMALL, cell=cell, projection=True))
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(cell, p, dtype)
        assert scaled <= 1, (f"{cell_name} {np.dtype(dtype)}: error {absolute:.3e} over "
                             f"tolerance {tol.forward_tolerance(dtype)} on {p}")


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=10)
@given(data=st.data())
def test_gradients_match_finite_differences(cell_name, data):
    cell = REGISTRY.get(cell_name)
    p = data.draw(problems(**SMALL, cell=cell, projection=True))
    gradient_errors(cell, p)  # raises ConformanceError naming the tensor


@settings(max_examples=15)
@given(p=problems(max_T=6, max_B=3, max_I=4, max_H=6, projection=True), batch_first=st.booleans())
def test_same_numbers_and_names_as_pytorch_lstmp(p, batch_first):
    torch = pytest.importorskip("torch")
    cell = REGISTRY.get("lstm")
    params, x, h0 = make_arrays(cell, p, np.float64)
    tm = torch.nn.LSTM(p.I, p.H, num_layers=p.num_layers, bidirectional=p.bidirectional,
                       proj_size=p.proj_size, batch_first=batch_first, dtype=torch.float64)
    layer = kernrnn.RNN("lstm", p.I, p.H, num_layers=p.num_layers,
                        bidirectional=p.bidirectional, proj_size=p.proj_size,
                        batch_first=batch_first, dtype=np.float64)
    assert list(layer.state_dict()) == list(tm.state_dict())
    tm.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    layer.load_state_dict(params)
    xb = x.swapaxes(0, 1).copy() if batch_first else x
    xt = torch.tensor(xb, requires_grad=True)
    h0t = None if h0 is None else tuple(torch.tensor(h, requires_grad=True) for h in h0)
    yt, (ht, ct) = tm(xt, h0t)
    y, (h, c) = layer(xb, h0)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h, ht.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, ct.detach().numpy(), rtol=1e-10, atol=1e-12)
    rng = np.random.default_rng(p.seed)
    dy, dh, dc = (rng.standard_normal(a.shape) for a in (y, h, c))
    ((yt * torch.tensor(dy)).sum() + (ht * torch.tensor(dh)).sum()
     + (ct * torch.tensor(dc)).sum()).backward()
    dx, (dh0, dc0) = layer.backward(dy, (dh, dc))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    if h0 is not None:
        np.testing.assert_allclose(dh0, h0t[0].grad.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(dc0, h0t[1].grad.numpy(), rtol=1e-9, atol=1e-11)
    for name, param in tm.named_parameters():
        np.testing.assert_allclose(layer.grads[name], param.grad.numpy(), rtol=1e-9, atol=1e-11,
                                   err_msg=name)


def test_shapes_of_parameters_states_and_outputs():
    layer = kernrnn.RNN("lstm", 3, 6, num_layers=2, bidirectional=True, proj_size=2,
                        dtype=np.float64)
    shapes = layer.param_shapes()
    assert shapes["weight_hh_l0"] == (24, 2) and shapes["weight_hr_l0_reverse"] == (2, 6)
    assert shapes["weight_ih_l1"] == (24, 4)  # the upper layer reads both projected outputs
    y, (h, c) = layer(np.zeros((5, 4, 3)))
    assert y.shape == (5, 4, 4) and h.shape == (4, 4, 2) and c.shape == (4, 4, 6)
    dx, (dh0, dc0) = layer.backward(np.ones_like(y))
    assert dx.shape == (5, 4, 3) and dh0.shape == (4, 4, 2) and dc0.shape == (4, 4, 6)
    assert "proj_size=2" in repr(layer)


def _leaky_forward(xw, hu, prev):
    a = math.tanh(xw[0] + hu[0])
    c = 0.5 * prev[1] + a
    return (c + 0.5 * prev[0], c), (a,)


def _leaky_backward(saved, prev, dstate):
    dc = dstate[1] + dstate[0]
    da = dc * (1 - saved[0] * saved[0])
    return (da,), (da,), (0.5 * dstate[0], 0.5 * dc)


def _leaky_reference(xw, hu, prev):
    c = 0.5 * prev[1] + np.tanh(xw[0] + hu[0])
    return (c + 0.5 * prev[0], c)


_LEAKY = Cell("leaky_two_state", gates="a", state=("h", "c"), forward=_leaky_forward,
              backward=_leaky_backward, reference=_leaky_reference)


def test_bad_proj_size_and_states_are_named():
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        kernrnn.RNN("lstm", 3, 4, proj_size=4)
    with pytest.raises(ValueError, match="proj_size should be a non-negative integer"):
        kernrnn.RNN("lstm", 3, 4, proj_size=-1)
    with pytest.raises(ValueError, match="proj_size should be a non-negative integer"):
        kernrnn.RNN("lstm", 3, 4, proj_size=1.5)
    with pytest.raises(CellError, match="reads h_\\(t-1\\) only through W_hh"):
        kernrnn.RNN(_LEAKY, 3, 4, proj_size=2)  # (h, c) but h_(t-1) enters element-wise
    with pytest.raises(CellError, match="a state besides h"):
        kernrnn.RNN("gru", 3, 4, proj_size=2)
    with pytest.raises(CellError, match="dense recurrence"):
        kernrnn.RNN("slstm", 3, 4, proj_size=2)
    with pytest.raises(ValueError, match="does not combine with recurrent_dropout"):
        kernrnn.RNN("lstm", 3, 4, proj_size=2, recurrent_dropout=0.1)
    layer = kernrnn.RNN("lstm", 3, 4, proj_size=2)
    x = np.zeros((2, 1, 3), dtype=np.float32)
    z = np.zeros((1, 1, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"h0 \(h\).*\[1, 1, 2\]"):
        layer(x, (z, z))  # h must have proj_size units


@settings(max_examples=10)
@given(p=problems(max_T=5, max_B=3, max_I=3, max_H=5, max_layers=1, bidirectional=False,
                  projection=True), reverse=st.booleans())
def test_functional_api_projects_like_the_reference(p, reverse):
    from kernrnn.functional import rnn_backward, rnn_forward
    from kernrnn.testing.reference import reference_direction

    cell = REGISTRY.get("lstm")
    params, x, h0 = make_arrays(cell, p, np.float64)
    d = {k[:-3]: v for k, v in params.items()}  # one layer, one direction: strip "_l0"
    h0 = None if h0 is None else tuple(h[0] for h in h0)
    y, hn, ctx = rnn_forward(cell, x, d, h0=h0, lengths=p.lengths, reverse=reverse)
    start = h0 if h0 is not None else (np.zeros((p.B, p.proj_size)), np.zeros((p.B, p.H)))
    y_ref, hn_ref = reference_direction(cell, x, d, start, p.lengths, reverse)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(hn, hn_ref):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert hn[0].shape == (p.B, p.proj_size) and hn[1].shape == (p.B, p.H)
    dx, dh0, grads = rnn_backward(ctx, np.ones_like(y), (np.ones_like(hn[0]), hn[1] * 0))
    assert dh0[0].shape == (p.B, p.proj_size) and grads["weight_hr"].shape == (p.proj_size, p.H)
    with pytest.raises(ValueError, match=r"weight_hr must be \[P, "):
        rnn_forward(cell, x, {**d, "weight_hr": d["weight_hr"].T})
