"""Parametrised recurrent weights (kernrnn.cell.RecurrentWeight) and the zoo's AntisymmetricRNN.

The step's W_hh is ``forward(W, xp, **hyper)`` of the stored weight, computed once per
call; its gradient is chained back with ``vjp`` after BPTT, in the native layer (both
backends), the functional API, the trainer and ``kernrnn.torch``.  Checked against the
float64 reference (which applies ``forward`` itself) and finite differences of the stored
weight; ``check_cell`` checks a ``vjp`` against its ``forward``.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn.cell import Cell, CellError, RecurrentWeight, sigmoid, tanh
from kernrnn.testing import ConformanceError, check_cell
from kernrnn.testing.conformance import check_recurrent_weight, forward_errors, gradient_errors
from kernrnn.testing.strategies import problems

ANTI = kernrnn.get_registry().get("antisymmetric")


# -- test cells: a non-square dense W_hh and a per-head one --------------------------------


def gated_step(xw, hu, prev):
    return (sigmoid(xw[1] + hu[1]) * prev[0] + tanh(xw[0] + hu[0]),)


def squashed(W, xp, alpha):
    """alpha * tanh(W) plus W with its rows reversed: elementwise and a permutation."""
    return alpha * xp.tanh(W) + W[::-1]


def squashed_vjp(W, dV, xp, alpha):
    t = xp.tanh(W)
    return alpha * (1 - t * t) * dV + dV[::-1]


DENSE = Cell("t_rw_dense", gates="ab", forward=gated_step, hyper={"alpha": 0.7},
             recurrent_weight=RecurrentWeight(squashed, squashed_vjp))


def head_step(xw, hu, prev):
    return (tanh(xw[0] + hu[0] + 0.5 * prev[0]),)


def skew_heads(W, xp, beta):
    return W - beta * xp.swapaxes(W, 1, 2)


def skew_heads_vjp(W, dV, xp, beta):
    return dV - beta * xp.swapaxes(dV, 1, 2)


HEADS = Cell("t_rw_heads", gates="a", forward=head_step, recurrent="heads", heads=2,
             hyper={"beta": 1.0}, recurrent_weight=RecurrentWeight(skew_heads, skew_heads_vjp))

CELLS = {"t_rw_dense": (DENSE, "alpha"), "t_rw_heads": (HEADS, "beta"),
         "antisymmetric": (ANTI, "eps")}


@pytest.mark.parametrize("name", sorted(CELLS))
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_layer_matches_reference_and_finite_differences_of_the_stored_weight(name, data):
    cell, hyper = CELLS[name]
    p = data.draw(problems(max_T=5, max_B=3, max_I=3, max_H=6, cell=cell), label="problem")
    args = {hyper: data.draw(st.floats(-1.5, 1.5, allow_nan=False), label=hyper)}
    if cell is ANTI:
        args["gamma"] = data.draw(st.floats(0.0, 1.0), label="gamma")
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(cell, p, dtype, cell_args=args)
        assert scaled <= 1, (dtype, absolute, p, args)
    gradient_errors(cell, p, cell_args=args)  # the stored weight_hh included


def test_check_cell_checks_the_vjp_and_names_the_failure():
    assert check_recurrent_weight(DENSE) < 1e-8
    assert "recurrent_weight vjp vs finite differences" in str(check_cell(ANTI, examples=1))

    def forgot_transpose(W, dA, xp, eps, gamma):
        return dA

    wrong = Cell("t_rw_wrong", gates="h", forward=ANTI.step, hyper=ANTI.hyper,
                 recurrent_weight=RecurrentWeight(ANTI.recurrent_weight.forward,
                                                  forgot_transpose))
    for check in (check_recurrent_weight, lambda c: check_cell(c, examples=1)):
        with pytest.raises(ConformanceError, match="cell 't_rw_wrong': recurrent_weight.vjp "
                                                   "disagrees with finite differences of "
                                                   "recurrent_weight.forward"):
            check(wrong)


# -- the antisymmetric cell: the effective matrix, its gradient, a PyTorch oracle -----------


def test_antisymmetric_weight_and_gradient():
    W = np.random.default_rng(0).standard_normal((4, 4))
    A = ANTI.effective_weight_hh(W, np, {"gamma": 0.3})
    np.testing.assert_allclose(A + A.T, -0.6 * np.eye(4), atol=1e-15)
    dA = np.random.default_rng(1).standard_normal((4, 4))
    dW = ANTI.weight_hh_vjp(W, dA, np)
    np.testing.assert_allclose(dW, -dW.T)  # only the antisymmetric part reaches W


def test_trainer_gets_the_stored_weights_gradient():
    from kernrnn.train import Adam, SequenceModel, train_batch

    model = SequenceModel("antisymmetric", input_size=2, hidden_size=4, output_size=1,
                          dtype=np.float64, seed=0, cell_args={"eps": 0.5, "gamma": 0.1})
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 1))
    W0 = model.params["rnn.weight_hh_l0"].copy()
    train_batch(model, "mse", Adam(lr=0.01), x, y, np.array([5, 4, 2]))
    g = model.grads["rnn.weight_hh_l0"]
    assert np.abs(g).max() > 1e-6
    np.testing.assert_allclose(g, -g.T, atol=1e-14)  # dA - dA^T, not dA
    assert not np.allclose(model.params["rnn.weight_hh_l0"], W0)


def test_functional_api_chains_the_gradient():
    from kernrnn import rnn_backward, rnn_forward

    layer = kernrnn.RNN(ANTI, 3, 4, dtype=np.float64, seed=2, eps=0.4, gamma=0.2)
    x = np.random.default_rng(3).standard_normal((4, 2, 3))
    y, _ = layer(x)
    layer.backward(np.ones_like(y))
    params = {k[:-3]: v for k, v in layer.params.items()}
    yf, _, ctx = rnn_forward(ANTI, x, params, cell_args=layer.cell_args)
    _, _, grads = rnn_backward(ctx, np.ones_like(yf))
    np.testing.assert_allclose(yf, y, rtol=1e-13)
    np.testing.assert_allclose(grads["weight_hh"], layer.grads["weight_hh_l0"], rtol=1e-12)


def test_antisymmetric_matches_a_pytorch_loop_from_the_paper():
    torch = pytest.importorskip("torch")
    from test_zoo_torch import torch_rnn

    from kernrnn.testing.strategies import Problem, make_arrays

    eps, gamma = 0.3, 0.2

    def paper_step(x, state, w):
        """h_t = h_{t-1} + eps tanh(W_x x + (W_h - W_h^T - gamma I) h_{t-1} + b)."""
        (h,) = state
        W = w["weight_hh"]
        A = W - W.T - gamma * torch.eye(W.shape[0], dtype=W.dtype)
        b = w["bias_ih"] + w["bias_hh"]
        return (h + eps * torch.tanh(x @ w["weight_ih"].T + h @ A.T + b),)

    p = Problem(T=5, B=3, I=2, H=4, num_layers=2, bidirectional=True, lengths=(5, 3, 0),
                with_h0=True, seed=11)
    params, x, h0 = make_arrays(ANTI, p, np.float64)
    layer = kernrnn.RNN(ANTI, p.I, p.H, num_layers=2, bidirectional=True, dtype=np.float64,
                        eps=eps, gamma=gamma)
    layer.load_state_dict(params)
    y, hn = layer(x, h0[0], p.lengths)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    dx, dh0 = layer.backward(dy)

    wt = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x, requires_grad=True)
    h0t = (torch.tensor(h0[0], requires_grad=True),)
    yt, hnt = torch_rnn(paper_step, wt, xt, h0t, p.lengths, 2, True)
    (yt * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hn, hnt[0].detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dh0, h0t[0].grad.numpy(), rtol=1e-9, atol=1e-11)
    for k, v in wt.items():
        np.testing.assert_allclose(layer.grads[k], v.grad.numpy(), rtol=1e-9, atol=1e-11,
                                   err_msg=k)


# -- kernrnn.torch: the cell's parametrisation, torch's parametrize, gradient hooks ---------


def _plain_step(xw, hu, prev, eps):
    return (prev[0] + eps * tanh(xw[0] + hu[0]),)


#: The antisymmetric step with a plain (unparametrised) W_hh.
PLAIN = Cell("t_rw_plain", gates="h", forward=_plain_step, hyper={"eps": 0.01})


def test_torch_parametrize_on_weight_hh_equals_the_cells_parametrisation():
    torch = pytest.importorskip("torch")
    from torch.nn.utils import parametrize

    from kernrnn.torch import Recurrent

    class Skew(torch.nn.Module):
        def __init__(self, gamma):
            super().__init__()
            self.gamma = gamma

        def forward(self, W):
            return W - W.T - self.gamma * torch.eye(W.shape[0], dtype=W.dtype)

    torch.manual_seed(0)
    cell_module = Recurrent("antisymmetric", 3, 4, dtype=torch.float64, eps=0.5, gamma=0.2)
    plain = Recurrent(PLAIN, 3, 4, dtype=torch.float64, eps=0.5)
    plain.load_state_dict(dict(cell_module.state_dict()))  # the tensors, not the metadata
    parametrize.register_parametrization(plain, "weight_hh_l0", Skew(0.2))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ya, _ = cell_module(x)
    yb, _ = plain(x)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-14)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(cell_module.weight_hh_l0.grad,
                               plain.parametrizations.weight_hh_l0.original.grad,
                               rtol=1e-11, atol=1e-13)

    # a gradient hook on a parameter sees (and may change) the stored weight's gradient
    seen = []
    cell_module.zero_grad()
    cell_module.weight_hh_l0.register_hook(lambda g: seen.append(g.clone()) or 2 * g)
    cell_module(x)[0].sum().backward()
    torch.testing.assert_close(cell_module.weight_hh_l0.grad, 2 * seen[0])
    torch.testing.assert_close(seen[0], -seen[0].T)


# -- bad declarations and bad results ---------------------------------------------------------


def _keep(W, xp, **_):
    return W


def _pass(W, dV, xp, **_):
    return dV


def _transpose(W, xp, **_):
    return W.T


def _fails(W, xp, **_):
    raise RuntimeError("no")


def _as_float64(W, xp, **_):
    return W.astype(np.float64)


BAD = [
    (dict(gates="ab", forward=gated_step, recurrent_weight=(_keep, _keep)),
     "recurrent_weight must be a kernrnn.cell.RecurrentWeight"),
    (dict(gates="ab", forward=gated_step, recurrent_weight=RecurrentWeight(_transpose, _pass)),
     r"recurrent_weight.forward must return an array of the stored weight_hh's shape and "
     r"dtype, \[6, 3\] float64, got ndarray \[3, 6\] float64"),
    (dict(gates="ab", forward=gated_step, recurrent_weight=RecurrentWeight(_fails, _pass)),
     "recurrent_weight.forward failed on a sample weight_hh \\[6, 3\\] .*RuntimeError: no"),
    (dict(gates="ab", forward=gated_step, recurrent_weight=RecurrentWeight(_keep, _fails)),
     "recurrent_weight.vjp failed"),
]


@pytest.mark.parametrize("kw, match", BAD)
def test_bad_declarations_are_cell_errors(kw, match):
    with pytest.raises(CellError, match=match) as info:
        Cell("t_rw_bad", **kw)
    assert str(info.value).startswith("cell 't_rw_bad'")


def test_no_recurrent_product_no_parametrised_weight():
    def step(xw, prev):
        return (xw[0] + prev[0],)

    with pytest.raises(CellError, match="recurrent_weight parametrises W_hh: it needs a "
                                        "recurrent product, got recurrent='none'"):
        Cell("t_rw_none", gates="a", forward=step, recurrent="none",
             recurrent_weight=RecurrentWeight(_keep, _pass))


def test_a_result_of_another_dtype_is_refused_at_the_call():
    cell = Cell("t_rw_dtype", gates="h", forward=_plain_step, hyper={"eps": 0.1},
                recurrent_weight=RecurrentWeight(_as_float64, _pass))
    kernrnn.RNN(cell, 2, 3, dtype=np.float64)(np.ones((2, 1, 2)))  # float64: fine
    layer = kernrnn.RNN(cell, 2, 3, dtype=np.float32)
    with pytest.raises(CellError, match=r"cell 't_rw_dtype': recurrent_weight.forward must "
                                        r"return .* \[3, 3\] float32, got ndarray \[3, 3\] "
                                        r"float64"):
        layer(np.ones((2, 1, 2), dtype=np.float32))
