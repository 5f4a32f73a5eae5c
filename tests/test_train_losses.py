"""Losses: gradients vs finite differences, masking, numerical stability, PyTorch."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernrnn.testing.tolerances import FD, FD_STEP
from kernrnn.train.losses import cross_entropy_loss, length_mask, mse_loss


@st.composite
def loss_problems(draw, classes=False):
    T = draw(st.integers(1, 5))
    B = draw(st.integers(1, 4))
    C = draw(st.integers(1 if not classes else 2, 6))
    masked = draw(st.booleans())
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B)) if masked else None
    seed = draw(st.integers(0, 2**32 - 1))
    return T, B, C, lengths, seed


def _directional_fd(f, x, v):
    return (f(x + FD_STEP * v) - f(x - FD_STEP * v)) / (2 * FD_STEP)


@given(loss_problems())
def test_mse_gradient_matches_finite_differences(prob):
    T, B, O, lengths, seed = prob
    rng = np.random.default_rng(seed)
    pred, target = rng.normal(size=(2, T, B, O))
    mask = None if lengths is None else length_mask(lengths, T, dtype=np.float64)
    loss, grad = mse_loss(pred, target, mask)
    for _ in range(3):
        v = rng.normal(size=pred.shape)
        fd = _directional_fd(lambda p: float(mse_loss(p, target, mask)[0]), pred, v)
        np.testing.assert_allclose(np.sum(grad * v), fd, **FD)
    # the definition: mean over unmasked positions and outputs
    m = np.ones((T, B)) if mask is None else mask
    want = (((pred - target) ** 2) * m[..., None]).sum() / max(m.sum(), 1) / O
    np.testing.assert_allclose(float(loss), want, rtol=1e-12, atol=1e-15)


@given(loss_problems(classes=True))
def test_cross_entropy_gradient_matches_finite_differences(prob):
    T, B, C, lengths, seed = prob
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, B, C)) * 3
    target = rng.integers(0, C, size=(T, B))
    mask = None if lengths is None else length_mask(lengths, T, dtype=np.float64)
    loss, grad = cross_entropy_loss(logits, target, mask)
    for _ in range(3):
        v = rng.normal(size=logits.shape)
        fd = _directional_fd(lambda z: float(cross_entropy_loss(z, target, mask)[0]), logits, v)
        np.testing.assert_allclose(np.sum(grad * v), fd, **FD)
    # against the textbook formula
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    nll = -np.log(np.take_along_axis(p, target[..., None], -1))[..., 0]
    m = np.ones((T, B)) if mask is None else mask
    np.testing.assert_allclose(float(loss), (nll * m).sum() / max(m.sum(), 1), rtol=1e-10)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 3.0]], dtype=np.float32)
    target = np.array([0, 2])
    loss, grad = cross_entropy_loss(logits, target)
    assert np.isfinite(float(loss)) and np.isfinite(grad).all()
    # class 2 of row 1 is 1e4 - 3 below the top logit: nll ~ 9997, mean ~ 4998.5
    np.testing.assert_allclose(float(loss), (0.0 + (1e4 - 3.0)) / 2, rtol=1e-5)
    assert grad.dtype == np.float32


def test_fully_masked_batch_gives_zero_not_nan():
    pred = np.ones((3, 2, 1))
    mask = np.zeros((3, 2))
    loss, grad = mse_loss(pred, np.zeros_like(pred), mask)
    assert float(loss) == 0.0 and not grad.any()
    loss, grad = cross_entropy_loss(np.ones((3, 2, 4)), np.zeros((3, 2), int), mask, denom=0)
    assert float(loss) == 0.0 and not grad.any()


def test_denom_overrides_the_count():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 4, 3, 2))
    l1, g1 = mse_loss(pred, target)
    l2, g2 = mse_loss(pred, target, denom=6.0)  # half of the 12 positions
    np.testing.assert_allclose(float(l2), 2 * float(l1))
    np.testing.assert_allclose(g2, 2 * g1)


def test_float32_stays_float32():
    pred = np.ones((2, 3, 1), np.float32)
    loss, grad = mse_loss(pred, np.zeros_like(pred), length_mask([1, 2, 0], 2))
    assert grad.dtype == np.float32 and np.asarray(loss).dtype == np.float32


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="target must have the predictions' shape"):
        mse_loss(np.zeros((2, 3, 1)), np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match="mask must have shape"):
        mse_loss(np.zeros((2, 3, 1)), np.zeros((2, 3, 1)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="target must have shape"):
        cross_entropy_loss(np.zeros((2, 3, 4)), np.zeros((2, 4), int))
    with pytest.raises(TypeError, match="integer class ids"):
        cross_entropy_loss(np.zeros((2, 3, 4)), np.zeros((2, 3)))


def test_against_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 3, 7))
    target = rng.integers(0, 7, size=(5, 3))
    loss, grad = cross_entropy_loss(logits, target)
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t.reshape(-1, 7), torch.tensor(target).reshape(-1))
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)
    pred, tgt = rng.normal(size=(2, 4, 3, 2))
    loss, grad = mse_loss(pred, tgt)
    t = torch.tensor(pred, requires_grad=True)
    ref = torch.nn.functional.mse_loss(t, torch.tensor(tgt))
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)
