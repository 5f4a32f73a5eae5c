"""Optimizers vs hand-derived formulas and PyTorch; global-norm clipping."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernrnn.train.optim import SGD, Adam, AdamW, clip_grad_norm, global_norm, make_optimizer


def _problem(seed, shapes=((3, 4), (5,))):
    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.normal(size=s) for i, s in enumerate(shapes)}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(4)]
    return params, grads


@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.9]), st.booleans(),
       st.sampled_from([0.0, 0.1]))
def test_sgd_matches_hand_formula(seed, mu, nesterov, wd):
    if nesterov and mu == 0:
        return
    params, grads = _problem(seed)
    ref = {k: v.copy() for k, v in params.items()}
    buf = {}
    opt = SGD(lr=0.1, momentum=mu, weight_decay=wd, nesterov=nesterov)
    for g in grads:
        opt.step(params, g)
        for k in ref:
            d = g[k] + wd * ref[k]
            if mu:
                buf[k] = d.copy() if k not in buf else mu * buf[k] + d
                d = d + mu * buf[k] if nesterov else buf[k]
            ref[k] = ref[k] - 0.1 * d
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-13, atol=1e-13)


@given(st.integers(0, 2**32 - 1), st.booleans(), st.sampled_from([0.0, 0.05]))
def test_adam_matches_hand_formula(seed, decoupled, wd):
    params, grads = _problem(seed)
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v2 = {k: np.zeros_like(v) for k, v in ref.items()}
    lr, b1, b2, eps = 0.01, 0.8, 0.95, 1e-6
    opt = (AdamW if decoupled else Adam)(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for t, g in enumerate(grads, start=1):
        opt.step(params, g)
        for k in ref:
            gk = g[k]
            if decoupled:
                ref[k] = ref[k] * (1 - lr * wd)
            else:
                gk = gk + wd * ref[k]
            m[k] = b1 * m[k] + (1 - b1) * gk
            v2[k] = b2 * v2[k] + (1 - b2) * gk * gk
            mhat = m[k] / (1 - b1 ** t)
            vhat = v2[k] / (1 - b2 ** t)
            ref[k] = ref[k] - lr * mhat / (np.sqrt(vhat) + eps)
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-12, atol=1e-12)


def test_first_adam_step_moves_each_weight_by_lr():
    # bias correction makes the first step lr * g/|g| (up to eps)
    params = {"w": np.array([1.0, -2.0, 3.0])}
    Adam(lr=0.5, eps=1e-12).step(params, {"w": np.array([10.0, -0.001, 3.0])})
    np.testing.assert_allclose(params["w"], [0.5, -1.5, 2.5], rtol=1e-9)


@pytest.mark.parametrize("name,kwargs,tcls", [
    ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}, "SGD"),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}, "SGD"),
    ("adam", {"lr": 0.01, "weight_decay": 0.01}, "Adam"),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}, "AdamW"),
])
def test_matches_pytorch(name, kwargs, tcls):
    torch = pytest.importorskip("torch")
    params, grads = _problem(3)
    tparams = [torch.tensor(params[k].copy(), requires_grad=True) for k in params]
    topt = getattr(torch.optim, tcls)(tparams, **kwargs)
    opt = make_optimizer(name, **kwargs)
    for g in grads:
        opt.step(params, g)
        for tp, k in zip(tparams, params, strict=True):
            tp.grad = torch.tensor(g[k])
        topt.step()
    for tp, k in zip(tparams, params, strict=True):
        np.testing.assert_allclose(params[k], tp.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_updates_in_place_and_state_round_trip():
    params, grads = _problem(5)
    ids = {k: id(v) for k, v in params.items()}
    a = Adam(lr=0.01)
    a.step(params, grads[0])
    assert {k: id(v) for k, v in params.items()} == ids
    meta, arrays = a.state_dict()
    b = Adam(lr=0.01)
    b.load_state_dict(meta, arrays, params)
    p1 = {k: v.copy() for k, v in params.items()}
    p2 = {k: v.copy() for k, v in params.items()}
    a.step(p1, grads[1])
    b.step(p2, grads[1])
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    with pytest.raises(ValueError, match="optimizer state is for 'adam'"):
        SGD(lr=0.1).load_state_dict(meta, arrays, params)
    with pytest.raises(ValueError, match="has shape"):
        b.load_state_dict(meta, arrays, {"p0": np.zeros((2, 2)), "p1": np.zeros(5)})


@given(st.integers(0, 2**32 - 1), st.floats(0.01, 100.0))
def test_clip_grad_norm(seed, max_norm):
    rng = np.random.default_rng(seed)
    grads = {"a": rng.normal(size=(4, 3)) * 3, "b": rng.normal(size=7)}
    orig = {k: v.copy() for k, v in grads.items()}
    total = math.sqrt(sum(float((v ** 2).sum()) for v in orig.values()))
    norm = clip_grad_norm(grads, max_norm)
    assert float(norm) == pytest.approx(total, rel=1e-12)
    after = float(global_norm(grads))
    if total > max_norm:
        assert after == pytest.approx(max_norm, rel=1e-5)
        # direction kept
        for k in grads:
            np.testing.assert_allclose(grads[k] * total, orig[k] * after, rtol=1e-9, atol=1e-12)
    else:
        for k in grads:
            np.testing.assert_array_equal(grads[k], orig[k])


def test_clip_matches_pytorch_and_zero_means_measure_only():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=5)}
    ts = [torch.zeros(v.shape, dtype=torch.float64, requires_grad=True) for v in grads.values()]
    for t, v in zip(ts, grads.values(), strict=True):
        t.grad = torch.tensor(v.copy())
    ref = torch.nn.utils.clip_grad_norm_(ts, 0.5)
    norm = clip_grad_norm(grads, 0.5)
    np.testing.assert_allclose(float(norm), ref.item(), rtol=1e-12)
    for t, v in zip(ts, grads.values(), strict=True):
        np.testing.assert_allclose(v, t.grad.numpy(), rtol=1e-12)
    before = {k: v.copy() for k, v in grads.items()}
    clip_grad_norm(grads, 0)
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])


@pytest.mark.parametrize("make,match", [
    (lambda: SGD(lr=0), "lr must be"),
    (lambda: SGD(lr=-1), "lr must be"),
    (lambda: SGD(lr=float("nan")), "lr must be"),
    (lambda: SGD(lr=0.1, nesterov=True), "nesterov"),
    (lambda: Adam(lr=0.1, betas=(1.0, 0.9)), r"betas\[0\]"),
    (lambda: Adam(lr=0.1, eps=0), "eps must be"),
    (lambda: make_optimizer("lbfgs", lr=1), "optimizer must be one of"),
])
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_mismatched_keys():
    with pytest.raises(ValueError, match="same keys"):
        SGD(lr=0.1).step({"a": np.zeros(2)}, {"b": np.zeros(2)})
