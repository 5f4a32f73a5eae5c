"""PyTorch as an independent oracle (skipped when torch is not installed)."""

import numpy as np
import pytest
from hypothesis import given

import kernrnn
from kernrnn.testing.strategies import make_arrays, problems

torch = pytest.importorskip("torch")

MODULES = {"rnn": ("RNN", {}), "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
           "lstm": ("LSTM", {}), "gru": ("GRU", {})}


@pytest.mark.parametrize("cell_name", sorted(MODULES))
@given(p=problems(max_T=6, max_B=3, max_I=4, max_H=5))
def test_same_numbers_as_pytorch(cell_name, p):
    cell = kernrnn.get_registry().get(cell_name)
    cls, extra = MODULES[cell_name]
    params, x, h0 = make_arrays(cell, p, np.float64)
    tm = getattr(torch.nn, cls)(p.I, p.H, num_layers=p.num_layers, bidirectional=p.bidirectional,
                                dtype=torch.float64, **extra)
    tm.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    layer = kernrnn.RNN(cell_name, p.I, p.H, num_layers=p.num_layers,
                        bidirectional=p.bidirectional, dtype=np.float64)
    layer.load_state_dict(params)
    lengths = p.lengths
    if lengths is not None and min(lengths) == 0:  # torch's packed sequences need length >= 1
        lengths = tuple(max(1, v) for v in lengths)
    xt = torch.tensor(x, requires_grad=True)
    h0t = None
    if h0 is not None:
        h0t = tuple(torch.tensor(h, requires_grad=True) for h in h0)
        h0t = h0t[0] if cell.n_state == 1 else h0t
    inp = xt if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(
        xt, torch.tensor(lengths), enforce_sorted=False)
    yt, hnt = tm(inp, h0t)
    if lengths is not None:
        yt, _ = torch.nn.utils.rnn.pad_packed_sequence(yt, total_length=p.T)
    y, hn = layer(x, None if h0 is None else (h0[0] if cell.n_state == 1 else h0), lengths)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    hn_t = (hnt,) if cell.n_state == 1 else hnt
    hn_k = (hn,) if cell.n_state == 1 else hn
    for a, b in zip(hn_k, hn_t):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-12)
    rng = np.random.default_rng(p.seed)
    dy = rng.standard_normal(y.shape)
    (yt * torch.tensor(dy)).sum().backward()
    dx, _ = layer.backward(dy)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    for name, param in tm.named_parameters():
        np.testing.assert_allclose(layer.grads[name], param.grad.numpy(), rtol=1e-9, atol=1e-11)
