"""PyTorch as an independent oracle for zoo cells (skipped without torch).

Each cell is written again from its paper (or haste's definition) as a plain
PyTorch loop over time, float64, with the very same weights, and compared with
kernrnn's layer: outputs, final states, and every gradient (autograd against
kernrnn's BPTT, per-unit parameters and norm gains included).
"""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn.testing.strategies import make_arrays, problems

torch = pytest.importorskip("torch")
F = torch.nn.functional
EXAMPLES = max(3, settings.default.max_examples // 2)


def peephole_step(x, state, w):
    """Gers & Schmidhuber (2000) in PyTorch's gate order; o peeks at the new cell state."""
    h, c = state
    a = x @ w["weight_ih"].T + w["bias_ih"] + h @ w["weight_hh"].T + w["bias_hh"]
    ai, af, ag, ao = a.chunk(4, dim=1)
    pi, pf, po = w["peephole"].chunk(3)
    i, f = torch.sigmoid(ai + pi * c), torch.sigmoid(af + pf * c)
    c_new = f * c + i * torch.tanh(ag)
    return torch.sigmoid(ao + po * c_new) * torch.tanh(c_new), c_new


def slstm_step(x, state, w):
    """Beck et al. (2024), sLSTM with exponential i and f, stabiliser m, normaliser n.

    The recurrent matrix of each gate is block-diagonal: head k's block is
    rows ``g*dh:(g+1)*dh`` of ``weight_hh[k]``.
    """
    h, c, n, m = state
    W = w["weight_hh"]
    NH, dh = W.shape[0], W.shape[2]
    R = torch.cat([torch.block_diag(*[W[k, g * dh:(g + 1) * dh] for k in range(NH)])
                   for g in range(4)])
    a = x @ w["weight_ih"].T + w["bias_ih"] + h @ R.T + w["bias_hh"]
    log_i, log_f, az, ao = a.chunk(4, dim=1)
    m_new = torch.maximum(log_f + m, log_i)
    i = torch.exp(log_i - m_new)
    f = torch.exp(log_f + m - m_new)
    c_new = f * c + i * torch.tanh(az)
    n_new = f * n + i
    return torch.sigmoid(ao) * c_new / n_new, c_new, n_new, m_new


def cornn_step(x, state, w, hyper):
    """Rusch & Mishra (2021): z' = z + dt (tanh(W y + 𝒲 z + V u + b) - gamma y - eps z),
    y' = y + dt z'; ``weight_hh`` is ``[W 𝒲]`` (y's columns first), b = b_ih + b_hh."""
    y, z = state
    W, Wz = w["weight_hh"].chunk(2, dim=1)
    a = x @ w["weight_ih"].T + y @ W.T + z @ Wz.T + w["bias_ih"] + w["bias_hh"]
    dt, gamma, epsilon = (hyper[k] for k in ("dt", "gamma", "epsilon"))
    z_new = z + dt * (torch.tanh(a) - gamma * y - epsilon * z)
    return y + dt * z_new, z_new


def rhn_step(x, state, w, depth=3):
    """Zilly et al. (2017): L highway layers per step, the input into the first only, carry
    coupled (c = 1 - t): s_l = tanh(h_l) t_l + s_(l-1) (1 - t_l); layer l > 1 reads
    ``weight_hs{l-1}`` (``[R_H; R_T]``) on s_(l-1)."""
    (s,) = state
    H = s.shape[1]
    for layer in range(1, depth + 1):
        if layer == 1:
            a = x @ w["weight_ih"].T + w["bias_ih"] + s @ w["weight_hh"].T + w["bias_hh"]
        else:
            a = s @ w[f"weight_hs{layer - 1}"].T + w[f"bias_hs{layer - 1}"]
        t = torch.sigmoid(a[:, H:])
        s = torch.tanh(a[:, :H]) * t + s * (1 - t)
    return (s,)


HASTE_ORDER = [0, 2, 1, 3]  # haste's gate blocks (i, g, f, o) in kernrnn's order (i, f, g, o)


def haste_layer_norm_lstm_step(x, state, w):
    """haste's LayerNormLSTM: its weights (kernel [I, 4H] etc., gates i, g, f, o), its equations.

    ``LN(W x) * gamma[0] + LN(R h) * gamma[1] + bias``, then the LSTM with
    ``h = o * tanh(LN(c) * gamma_h + beta_h)``; kernrnn's two biases add up to
    haste's one.
    """
    h, c = state
    H = h.shape[1]

    def haste(v, dim=0):
        return torch.cat([v.narrow(dim, g * H, H) for g in HASTE_ORDER], dim=dim)

    kernel, recurrent_kernel = haste(w["weight_ih"]).T, haste(w["weight_hh"]).T
    bias = haste(w["bias_ih"] + w["bias_hh"])
    gamma = torch.stack([haste(w["norm_ih_weight"]), haste(w["norm_hh_weight"])])
    v = (F.layer_norm(x @ kernel, (4 * H,), weight=gamma[0])
         + F.layer_norm(h @ recurrent_kernel, (4 * H,), weight=gamma[1]) + bias)
    i, g, f, o = v.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    c_hat = F.layer_norm(c_new, (H,), weight=w["norm_c_weight"], bias=w["norm_c_bias"])
    return torch.sigmoid(o) * torch.tanh(c_hat), c_new


def sru_step(x, state, w):
    """Lei et al. (2018): f, r from the input and c_(t-1) element-wise, a highway onto x_t.

    ``weight_ih`` stacks W, W_f, W_r; ``v`` is (v_f, v_r).  h_(t-1) is not read.
    """
    _, c = state
    wx, af, ar = (x @ w["weight_ih"].T + w["bias_ih"]).chunk(3, dim=1)
    vf, vr = w["v"].chunk(2)
    f = torch.sigmoid(af + vf * c)
    r = torch.sigmoid(ar + vr * c)
    c_new = f * c + (1 - f) * wx
    return r * c_new + (1 - r) * x, c_new


ORACLES = {"lstm_peephole": peephole_step, "slstm": slstm_step,
           "lstm_ln": haste_layer_norm_lstm_step, "sru": sru_step, "cornn": cornn_step,
           "rhn": rhn_step}


#: Hyperparameters drawn for an oracle (the layer gets the same values as ``cell_args``).
HYPER_RANGES = {"cornn": {"dt": (0.01, 0.1), "gamma": (0.5, 5.0), "epsilon": (0.5, 5.0)}}


def torch_rnn(step, weights, x, h0, lengths, num_layers, bidirectional):
    """Layers and directions around ``step``, with PyTorch's names and padded-step masking."""
    T, B = x.shape[:2]
    D = 2 if bidirectional else 1
    valid = torch.arange(T)[:, None] < torch.as_tensor(lengths)[None, :]  # [T, B]
    hn = [[None] * (num_layers * D) for _ in h0]
    inp = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = {k[:-len(sfx)]: v for k, v in weights.items() if k.endswith(sfx)}
            state = tuple(s[layer * D + d] for s in h0)
            ys = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                keep = valid[t][:, None]
                state = tuple(torch.where(keep, new, old)
                              for new, old in zip(step(inp[t], state, w), state))
                ys[t] = torch.where(keep, state[0], torch.zeros_like(state[0]))
            outs.append(torch.stack(ys))
            for s, v in enumerate(state):
                hn[s][layer * D + d] = v
        inp = torch.cat(outs, dim=2)
    return inp, tuple(torch.stack(v) for v in hn)


@pytest.mark.parametrize("name", sorted(ORACLES))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_zoo_cell_matches_its_pytorch_oracle(name, data):
    cell = kernrnn.get_registry().get(name)
    p = data.draw(problems(max_T=5, max_B=3, max_I=4, max_H=6, cell=cell), label="problem")
    params, x, h0 = make_arrays(cell, p, np.float64)
    D = 2 if p.bidirectional else 1
    hyper = {k: data.draw(st.floats(lo, hi), label=k)
             for k, (lo, hi) in HYPER_RANGES.get(name, {}).items()}
    step = ORACLES[name]
    if cell.hyper:
        step = functools.partial(step, hyper=cell.hyper_values(hyper))
    layer = kernrnn.RNN(cell, p.I, p.H, num_layers=p.num_layers, bidirectional=p.bidirectional,
                        dtype=np.float64, cell_args=hyper)
    layer.load_state_dict(params)
    h0_arg = None if h0 is None else (h0[0] if cell.n_state == 1 else h0)
    y, hn = layer(x, h0_arg, p.lengths)
    hn = (hn,) if cell.n_state == 1 else hn  # one state: an array, not a tuple
    rng = np.random.default_rng(p.seed)
    dy = rng.standard_normal(y.shape)
    dhn = tuple(rng.standard_normal((p.num_layers * D, p.B, p.H)) for _ in range(cell.n_state))
    dx, dh0 = layer.backward(dy, dhn[0] if cell.n_state == 1 else dhn)
    dh0 = (dh0,) if cell.n_state == 1 else dh0

    wt = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x, requires_grad=True)
    zeros = np.zeros((p.num_layers * D, p.B, p.H))
    h0t = tuple(torch.tensor(v, requires_grad=True)
                for v in (h0 if h0 is not None else (zeros,) * cell.n_state))
    lengths = p.lengths if p.lengths is not None else (p.T,) * p.B
    yt, hnt = torch_rnn(step, wt, xt, h0t, lengths, p.num_layers, p.bidirectional)
    loss = (yt * torch.tensor(dy)).sum() + sum((a * torch.tensor(b)).sum()
                                               for a, b in zip(hnt, dhn))
    loss.backward()

    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    for a, b in zip(hn, hnt):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    if h0 is not None:
        for a, b in zip(dh0, h0t):
            np.testing.assert_allclose(a, b.grad.numpy(), rtol=1e-9, atol=1e-11)
    assert set(layer.grads) == set(wt)
    for k, v in wt.items():
        np.testing.assert_allclose(layer.grads[k], v.grad.numpy(), rtol=1e-9, atol=1e-11,
                                   err_msg=k)
