"""What each capability of the cell contract's round 3 costs, next to the cell without it.

``python -m benchmarks.contract_costs``: one layer, float32, T=100, B=32, I=H=128,
one Numba thread and one BLAS thread; a training step (forward and BPTT) per
pair, the cells timed with interleaved repetitions in one process (medians of
the process's CPU time, which a busy machine stretches less than wall time).
Each pair computes something different by design (the capability is the
difference), so only the times are compared.  A cell with a round-3 capability
(but the parametrised weight) runs on the BLAS-per-step kernels, which the
packed (fused) path outruns for plain dense cells: the cell without it is timed
on the same path (``same path``, the capability's own cost) and on its own
(``own path``, what a user sees):

* hyperparameters: ``cornn`` (Δt, γ, ε read from the per-unit vector) against
  the same step with the three values as literals in its source;
* recurrence on several states: ``cornn`` (``weight_hh [H, 2H]`` over [y; z])
  against the same step whose product reads y alone (``[H, H]``);
* a recurrent product between stages: ``rhn`` (depth 3: two products more per
  step) against the same highway layer at depth 1;
* a parametrised recurrent weight: ``antisymmetric`` (W - Wᵀ - γI once per call
  and its vjp after BPTT) against the same step on the stored W directly.

The raw input (SRU) and resets have their own measurements: ``docs/cells.md`` and
``python -m benchmarks.resets``.  Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from kernrnn.cell import Cell, sigmoid, tanh

__all__ = ["PAIRS", "cost", "main"]


def _cornn_literals(xw, hu, prev):
    y, z = prev
    z_new = z + 0.042 * (tanh(xw[0] + hu[0]) - 2.7 * y - 4.7 * z)
    return (y + 0.042 * z_new, z_new)


def _highway(h, t, s):
    t = sigmoid(t)
    return tanh(h) * t + s * (1.0 - t)


def _rhn1(xw, hu, prev):
    return (_highway(xw[0] + hu[0], xw[1] + hu[1], prev[0]),)


def _euler(xw, hu, prev):
    return (prev[0] + 0.01 * tanh(xw[0] + hu[0]),)


def _cells() -> dict:
    """name -> (the zoo cell, the cell without the capability)."""
    from kernrnn.plugins import get_registry

    reg = get_registry()
    literal = Cell("cornn_literals", gates=1, state=("h", "z"), forward=_cornn_literals,
                   recurrent_states=("h", "z"))
    y_only = Cell("cornn_y_only", gates=1, state=("h", "z"), forward=_cornn_literals)
    rhn1 = Cell("rhn_depth1", gates="ht", forward=_rhn1)
    plain = Cell("euler_plain_w", gates="h", forward=_euler)
    return {"hyperparameters": (reg.get("cornn"), literal),
            "recurrent_states": (literal, y_only),
            "stage products": (reg.get("rhn"), rhn1),
            "recurrent_weight": (reg.get("antisymmetric"), plain)}


def _step(layer, x, dy):
    layer.zero_grad()
    layer(x)
    layer.backward(dy)


def _renamed(cell):
    """The same cell under another name (its own kernels, built on the current path)."""
    import dataclasses

    return dataclasses.replace(cell, name=cell.name + "_plain")


PAIRS = ("hyperparameters", "recurrent_states", "stage products", "recurrent_weight")


def cost(repeats: int = 21, T: int = 100, B: int = 32, I: int = 128, H: int = 128) -> dict:
    """Per capability: median training-step times (ms) with and without it, and the ratio."""
    import numba
    from threadpoolctl import threadpool_limits

    import kernrnn
    from kernrnn.backends.cpu import tiers, tuning
    from kernrnn.backends.cpu.fused_source import fused_path

    tiers.set_enabled(False)  # the compiled kernels on both sides
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)
    dy = rng.uniform(-1, 1, (T, B, H)).astype(np.float32)
    out = {}
    with threadpool_limits(1):
        for what, (cell, without) in _cells().items():
            layers = {"with": kernrnn.RNN(cell, I, H, seed=0),
                      "own path": kernrnn.RNN(without, I, H, seed=0)}
            for layer in layers.values():  # compile (each on its own path) and warm up
                _step(layer, x, dy)
            if fused_path(without) and not fused_path(cell):
                tuning.FUSED = False  # the cell without it, built on the plain path too
                try:
                    layers["same path"] = kernrnn.RNN(_renamed(without), I, H, seed=0)
                    _step(layers["same path"], x, dy)
                finally:
                    tuning.FUSED = True
            else:
                layers["same path"] = layers.pop("own path")
            times = {k: [] for k in layers}
            keys = list(layers)
            for r in range(repeats):
                for k in (keys if r % 2 == 0 else keys[::-1]):
                    t0 = time.process_time()
                    _step(layers[k], x, dy)
                    times[k].append(time.process_time() - t0)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            out[what] = {"with": cell.name, "without": without.name,
                         **{f"{k} ms": round(v, 2) for k, v in med.items()},
                         "ratio (same path)": round(med["with"] / med["same path"], 3)}
            if "own path" in med:
                out[what]["ratio (own path)"] = round(med["with"] / med["own path"], 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.contract_costs", description=__doc__)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args(argv)
    result = {"size": {"T": 100, "B": 32, "I": 128, "H": 128}, "threads": 1,
              "load_before": _load(), "pairs": cost(args.repeats)}
    result["load_after"] = _load()
    print(json.dumps(result, indent=1))
    return 0


def _load():
    """The load average (1, 5, 15 min), or None where the system does not give it."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
