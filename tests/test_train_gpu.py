"""Training on the CUDA backend agrees with the CPU (real GPU only; skipped elsewhere)."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _cuda_or_skip():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
        from kernrnn.backends import get_backend

        get_backend("cuda")
    except Exception as e:  # no driver, no device, backend not built here
        pytest.skip(f"CUDA backend not available: {e}")
    return cupy


def test_losses_and_optimizers_on_device_match_host():
    cupy = _cuda_or_skip()
    from kernrnn.train import Adam, clip_grad_norm, cross_entropy_loss, length_mask, mse_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 3, 5)).astype(np.float32)
    target = rng.integers(0, 5, size=(4, 3)).astype(np.int32)
    mask = length_mask([4, 2, 0], 4)
    l_h, g_h = cross_entropy_loss(logits, target, mask)
    l_d, g_d = cross_entropy_loss(cupy.asarray(logits), cupy.asarray(target),
                                  cupy.asarray(mask))
    assert isinstance(g_d, cupy.ndarray)
    np.testing.assert_allclose(float(l_d), float(l_h), rtol=1e-5)
    np.testing.assert_allclose(g_d.get(), g_h, rtol=1e-5, atol=1e-7)
    pred = rng.normal(size=(4, 3, 2)).astype(np.float32)
    l_h, g_h = mse_loss(pred, pred * 0, mask)
    l_d, g_d = mse_loss(cupy.asarray(pred), cupy.asarray(pred * 0), cupy.asarray(mask))
    np.testing.assert_allclose(g_d.get(), g_h, rtol=1e-5, atol=1e-7)
    p_h = {"w": rng.normal(size=(3, 3)).astype(np.float32)}
    g = {"w": rng.normal(size=(3, 3)).astype(np.float32) * 10}
    p_d = {"w": cupy.asarray(p_h["w"])}
    g_dev = {"w": cupy.asarray(g["w"])}
    n_h, n_d = clip_grad_norm(g, 1.0), clip_grad_norm(g_dev, 1.0)
    np.testing.assert_allclose(float(n_d), float(n_h), rtol=1e-5)
    Adam(lr=0.1).step(p_h, g)
    Adam(lr=0.1).step(p_d, g_dev)
    np.testing.assert_allclose(p_d["w"].get(), p_h["w"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell,tokens", [("lstm", False), ("gru", True)])
def test_train_batch_on_device_matches_cpu(cell, tokens):
    cupy = _cuda_or_skip()
    from kernrnn.train import Adam, SequenceModel, train_batch

    rng = np.random.default_rng(1)
    kw = dict(vocab_size=6) if tokens else dict(input_size=3)
    models = [SequenceModel(cell, hidden_size=8, output_size=6 if tokens else 2, seed=0,
                            device=dev, **kw) for dev in ("cpu", "cuda")]
    T, B = 9, 4
    if tokens:
        x = rng.integers(0, 6, size=(T, B)).astype(np.int32)
        y = rng.integers(0, 6, size=(T, B)).astype(np.int32)
        loss = "ce"
    else:
        x = rng.normal(size=(T, B, 3)).astype(np.float32)
        y = rng.normal(size=(T, B, 2)).astype(np.float32)
        loss = "mse"
    lengths = np.array([9, 5, 1, 7])
    results = []
    for m, xp in zip(models, (np, cupy), strict=True):
        opt = Adam(lr=0.01)
        r = train_batch(m, loss, opt, xp.asarray(x), xp.asarray(y), lengths, tbptt=4, clip=1.0)
        results.append((float(r.loss), m.state_dict()))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-4)
    for k in results[0][1]:
        np.testing.assert_allclose(results[1][1][k], results[0][1][k], rtol=1e-3, atol=1e-5)
