"""PyTorch's layer options on the native layer: batch_first, dropout, bias=False.

Also SequenceModel and ``kernrnn train`` with them, and the explicit-parameter
calls (forward_with/backward_with) that the PyTorch adapter builds on.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernrnn
from kernrnn.cli import main
from kernrnn.train import AddingTask, SequenceModel, Trainer, load_checkpoint, make_optimizer


@given(cell=st.sampled_from(["lstm", "gru", "rnn"]), T=st.integers(1, 5), B=st.integers(1, 3),
       L=st.integers(1, 2), bidirectional=st.booleans(), bias=st.booleans(),
       batch_first=st.booleans(), seed=st.integers(0, 2**31))
def test_options_match_pytorch(cell, T, B, L, bidirectional, bias, batch_first, seed):
    torch = pytest.importorskip("torch")
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    ref = cls(3, 4, L, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
              dtype=torch.float64)
    layer = kernrnn.RNN(cell, 3, 4, num_layers=L, bidirectional=bidirectional, bias=bias,
                        batch_first=batch_first, dtype=np.float64)
    assert set(layer.state_dict()) == set(ref.state_dict())  # no bias_* with bias=False
    layer.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (B, T, 3) if batch_first else (T, B, 3))
    xt = torch.tensor(x, requires_grad=True)
    yt, _ = ref(xt)
    y, _ = layer(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    (yt * torch.tensor(dy)).sum().backward()
    dx, _ = layer.backward(dy)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(layer.grads[name], p.grad.numpy(), rtol=1e-9, atol=1e-11)


def _loss_and_grad(layer, x, dy, key):
    y, _, ctx = layer.forward_with(layer.params, x, dropout_seed=key)
    dx, _, grads = layer.backward_with(ctx, dy)
    return float((y * dy).sum()), dx, grads


def test_dropout_masks_are_reused_in_backward_and_off_in_eval():
    layer = kernrnn.RNN("gru", 3, 4, num_layers=3, dropout=0.4, dtype=np.float64, seed=1)
    plain = kernrnn.RNN("gru", 3, 4, num_layers=3, dtype=np.float64)
    plain.load_state_dict(layer.state_dict())
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (5, 2, 3))
    dy = rng.standard_normal((5, 2, 4))
    # backward against central differences with the same masks (same key)
    _, dx, _ = _loss_and_grad(layer, x, dy, 9)
    eps = 1e-6
    for idx in [(0, 0, 0), (2, 1, 2), (4, 0, 1)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd = (_loss_and_grad(layer, xp, dy, 9)[0] - _loss_and_grad(layer, xm, dy, 9)[0]) / (2 * eps)
        assert abs(fd - dx[idx]) < 1e-7
    # training draws new masks per call (a counter), eval is the plain stack
    y1, _ = layer(x)
    y2, _ = layer(x)
    assert layer.dropout_calls == 2 and not np.allclose(y1, y2)
    layer.eval()
    np.testing.assert_array_equal(layer(x)[0], plain.eval()(x)[0])
    assert layer.dropout_calls == 2


def test_dropout_is_inverted_and_seeded():
    a = kernrnn.RNN("rnn", 2, 50, num_layers=2, dropout=0.5, dtype=np.float64, seed=3)
    b = kernrnn.RNN("rnn", 2, 50, num_layers=2, dropout=0.5, dtype=np.float64, seed=3)
    masks = a._dropout_masks((20, 8, 50), a._call_key())
    np.testing.assert_array_equal(masks[0], b._dropout_masks((20, 8, 50), b._call_key())[0])
    assert set(np.unique(masks[0])) == {0.0, 2.0}  # kept values scaled by 1 / (1 - p)
    assert abs(masks[0].mean() - 1.0) < 0.05


def test_forward_with_leaves_the_layer_alone():
    layer = kernrnn.RNN("lstm", 2, 3, num_layers=2, dtype=np.float64, seed=0)
    own = {k: v.copy() for k, v in layer.params.items()}
    other = {k: v * 2 for k, v in layer.params.items()}
    x = np.random.default_rng(1).uniform(-1, 1, (4, 2, 2))
    y_own, _ = layer(x)  # pending backward of the layer's own call
    y, _, ctx = layer.forward_with(other, x)
    assert not np.allclose(y, y_own)
    dx, _, grads = layer.backward_with(ctx, np.ones_like(y))
    assert set(grads) == set(own) and all(np.any(g) for g in grads.values())
    assert all(not np.any(g) for g in layer.grads.values())
    for k, v in own.items():
        np.testing.assert_array_equal(layer.params[k], v)
    layer.backward(np.ones_like(y_own))  # the layer's own pending call still works
    with pytest.raises(ValueError, match="training=True"):
        layer.backward_with(None, np.ones_like(y))


@pytest.mark.parametrize("kwargs,match", [
    ({"dropout": 1.5}, "dropout must be a number in \\[0, 1\\]"),
    ({"dropout": -0.1}, "dropout must be a number in \\[0, 1\\]"),
    ({"dropout": "0.1"}, "dropout must be a number"),
    ({"bias": 1}, "bias must be a bool"),
    ({"batch_first": None}, "batch_first must be a bool"),
])
def test_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kernrnn.RNN("gru", 2, 3, **kwargs)


def test_batch_first_dy_shape_is_checked():
    layer = kernrnn.RNN("gru", 2, 3, batch_first=True, dtype=np.float64)
    y, _ = layer(np.zeros((4, 5, 2)))
    assert y.shape == (4, 5, 3)
    with pytest.raises(ValueError, match="dy must have shape \\[4, 5, 3\\]"):
        layer.backward(np.zeros((5, 4, 3)))


# -- SequenceModel and the training loop --------------------------------------------


def test_sequence_model_batch_first_is_the_transposed_model():
    kw = dict(input_size=2, hidden_size=3, output_size=2, num_layers=2, dtype=np.float64,
              seed=5)
    tm, bf = SequenceModel("gru", **kw), SequenceModel("gru", batch_first=True, **kw)
    x = np.random.default_rng(0).uniform(-1, 1, (6, 3, 2))
    out, _ = tm(x)
    out_bf, _ = bf(x.swapaxes(0, 1))
    np.testing.assert_allclose(out_bf, out.swapaxes(0, 1), rtol=1e-12)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    tm.backward(dout)
    bf.backward(dout.swapaxes(0, 1))
    np.testing.assert_allclose(bf.last_dx, tm.last_dx.swapaxes(0, 1), rtol=1e-12)
    for k, g in tm.grads.items():
        np.testing.assert_allclose(bf.grads[k], g, rtol=1e-12)
    assert bf.config()["batch_first"] is True and "batch_first" not in tm.config()


def test_sequence_model_without_bias_and_with_dropout():
    m = SequenceModel("lstm", input_size=2, hidden_size=3, num_layers=2, bias=False,
                      dropout=0.3, seed=0)
    assert not [k for k in m.params if k.startswith("rnn.bias")]
    again = SequenceModel.from_config(m.config())
    assert again.rnn.dropout == 0.3 and again.rnn.bias is False


def _dropout_trainer(seed=0):
    task = AddingTask(8, steps_per_epoch=3, test_size=10)
    model = SequenceModel("gru", input_size=task.input_size, hidden_size=4, num_layers=2,
                          dropout=0.3, batch_first=True, output_size=task.output_size,
                          head=task.head, seed=seed)
    return Trainer(model, task, make_optimizer("adam", lr=0.01), batch_size=4, seed=seed)


def test_resume_with_dropout_draws_the_same_masks(tmp_path):
    full = _dropout_trainer()
    full.fit(2)
    part = _dropout_trainer()
    part.fit(2, stop_after=4)
    part.save(tmp_path / "c.npz")
    resumed = _dropout_trainer(seed=1)
    resumed.restore(load_checkpoint(tmp_path / "c.npz"))
    resumed.fit(2)
    assert resumed.losses == full.losses


def test_cli_dropout_and_no_bias(tmp_path, capsys):
    argv = ["train", "--task", "adding", "--seq-len", "6", "--steps-per-epoch", "2",
            "--epochs", "1", "--cell", "gru", "--hidden", "4", "--layers", "2", "--no-progress",
            "--no-plot", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv + ["--dropout", "0.2", "--no-bias"]) == 0
    meta = load_checkpoint(tmp_path / "checkpoint.npz").meta
    assert meta["model"]["dropout"] == 0.2 and meta["model"]["bias"] is False
    capsys.readouterr()
    assert main(argv[:-2] + ["--out", str(tmp_path / "b"), "--dropout", "1.5"]) == 2
    assert "--dropout must lie in [0, 1], got 1.5" in capsys.readouterr().err
    one = [a if a != "2" or i != argv.index("--layers") + 1 else "1" for i, a in enumerate(argv)]
    assert main(one[:-2] + ["--out", str(tmp_path / "c"), "--dropout", "0.2"]) == 2
    assert "--dropout acts between stacked layers" in capsys.readouterr().err


def test_the_core_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np, kernrnn, kernrnn.train, kernrnn.cli\n"
            "kernrnn.RNN('gru', 2, 3, num_layers=2, dropout=0.5, batch_first=True)"
            "(np.zeros((1, 2, 2), np.float32))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
