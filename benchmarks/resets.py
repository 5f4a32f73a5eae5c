"""What state resets (``resets=``, episode starts) cost on the CPU.

``python -m benchmarks.resets``: an LSTM layer at T=100, B=32, I=H=128,
float32, one Numba thread and one BLAS thread; one training step (forward and
backward) and one inference forward without resets, and with a reset mask
drawn with probability p per (t, b).  Interleaved repetitions, medians; a new
mask every repetition (the number of chunks varies).  Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

__all__ = ["cost", "main"]


def cost(repeats: int = 21, T: int = 100, B: int = 32, I: int = 128, H: int = 128,
         probabilities=(0.05, 0.01)) -> dict:
    """Median times (ms) without resets and with each reset probability, and the ratios."""
    import numba
    from threadpoolctl import threadpool_limits

    import kernrnn

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)
    dy = rng.uniform(-1, 1, (T, B, H)).astype(np.float32)
    layer = kernrnn.RNN("lstm", I, H, seed=0)
    names = ["none", *(f"p={p}" for p in probabilities)]
    train = {k: [] for k in names}
    infer = {k: [] for k in names}
    chunks = {k: [] for k in names}

    def mask(name):
        if name == "none":
            return None
        p = float(name[2:])
        return rng.random((T, B)) < p

    with threadpool_limits(1):
        for name in names:  # compile and warm up
            layer(x, resets=mask(name))
            layer.backward(dy)
        for _ in range(repeats):
            for name in names:
                m = mask(name)
                chunks[name].append(1 + int((m[1:].any(axis=1)).sum()) if m is not None else 1)
                layer.train()
                t0 = time.perf_counter()
                layer(x, resets=m)
                layer.backward(dy)
                train[name].append(time.perf_counter() - t0)
                layer.eval()
                t0 = time.perf_counter()
                layer(x, resets=m)
                infer[name].append(time.perf_counter() - t0)
    out = {"T": T, "B": B, "I": I, "H": H, "threads": 1, "repeats": repeats,
           "load": os.getloadavg()[0]}
    for name in names:
        out[name] = {"train_ms": 1e3 * statistics.median(train[name]),
                     "infer_ms": 1e3 * statistics.median(infer[name]),
                     "chunks": statistics.median(chunks[name])}
        if name != "none":
            out[name]["train_ratio"] = out[name]["train_ms"] / out["none"]["train_ms"]
            out[name]["infer_ratio"] = out[name]["infer_ms"] / out["none"]["infer_ms"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    result = cost(args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
