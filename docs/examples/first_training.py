"""A first training run with kernrnn's layer API: next-value prediction of a noisy sine.

An LSTM layer reads the series; a linear read-out y_t = W_y h_t + b_y predicts
the next value; the loss is the mean squared error over all steps.  kernrnn
provides the forward pass and BPTT (``layer.backward``); the read-out and the
optimizer (Adam) are a few lines of NumPy.
"""

import numpy as np

import kernrnn


def make_batch(rng, series, T, B):
    """B random windows of length T + 1, time-major: inputs [T, B, 1], targets [T, B, 1]."""
    starts = rng.integers(0, len(series) - T - 1, size=B)
    windows = np.stack([series[s:s + T + 1] for s in starts], axis=1)[:, :, None]
    return windows[:-1], windows[1:]


def main(steps=300, hidden=16, T=40, B=16, lr=0.01, seed=0, log_every=50):
    rng = np.random.default_rng(seed)
    t = np.arange(4000)
    series = (np.sin(0.2 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)

    layer = kernrnn.RNN("lstm", input_size=1, hidden_size=hidden, dtype=np.float32, seed=seed)
    readout = {"W_y": (rng.standard_normal((1, hidden)) / np.sqrt(hidden)).astype(np.float32),
               "b_y": np.zeros(1, np.float32)}

    # Adam state for every parameter: the layer's (PyTorch names) and the read-out's.
    params = {**layer.state_dict(), **readout}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}

    losses = []
    for step in range(1, steps + 1):
        x, target = make_batch(rng, series, T, B)
        h, _ = layer(x)                                   # [T, B, H]
        pred = h @ readout["W_y"].T + readout["b_y"]      # [T, B, 1]
        err = pred - target
        loss = float(np.mean(err * err))
        losses.append(loss)

        dpred = (2.0 / err.size) * err                    # d loss / d pred
        grads = {"W_y": np.einsum("tbo,tbh->oh", dpred, h), "b_y": dpred.sum(axis=(0, 1))}
        layer.zero_grad()
        layer.backward(dpred @ readout["W_y"])            # d loss / d h -> BPTT
        grads.update(layer.grads)

        for k, g in grads.items():                        # Adam, in place
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            mhat, vhat = m[k] / (1 - 0.9**step), v[k] / (1 - 0.999**step)
            params[k] -= (lr * mhat / (np.sqrt(vhat) + 1e-8)).astype(np.float32)

        if log_every and step % log_every == 0:
            print(f"step {step:4d}  mse {np.mean(losses[-log_every:]):.5f}")

    # Naive baseline: predict that the next value equals the current one.
    x, target = make_batch(rng, series, T, 256)
    baseline = float(np.mean((x - target) ** 2))
    pred = layer.eval()(x)[0] @ readout["W_y"].T + readout["b_y"]
    held_out = float(np.mean((pred - target) ** 2))
    print(f"held-out mse {held_out:.5f}, last-value baseline {baseline:.5f}")
    return losses, held_out, baseline


if __name__ == "__main__":
    main()
