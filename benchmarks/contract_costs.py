"""What each capability of the cell contract's round 3 costs, next to the cell without it.

``python -m benchmarks.contract_costs``: one layer, float32, T=100, B=32, I=H=128,
one Numba thread and one BLAS thread; a training step (forward and BPTT) per
pair, the two cells timed with interleaved repetitions in one process (medians).
Each pair computes something different by design (the capability is the
difference), so only the times are compared:

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


PAIRS = ("hyperparameters", "recurrent_states", "stage products", "recurrent_weight")


def cost(repeats: int = 21, T: int = 100, B: int = 32, I: int = 128, H: int = 128) -> dict:
    """Per capability: median training-step times (ms) with and without it, and the ratio."""
    import numba
    from threadpoolctl import threadpool_limits

    import kernrnn
    from kernrnn.backends.cpu import tiers

    tiers.set_enabled(False)  # the compiled kernels on both sides
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)
    dy = rng.uniform(-1, 1, (T, B, H)).astype(np.float32)
    out = {}
    with threadpool_limits(1):
        for what, (cell, without) in _cells().items():
            layers = {"with": kernrnn.RNN(cell, I, H, seed=0),
                      "without": kernrnn.RNN(without, I, H, seed=0)}
            times = {k: [] for k in layers}

            def step(layer):
                layer.zero_grad()
                layer(x)
                layer.backward(dy)

            for layer in layers.values():  # compile and warm up
                step(layer)
                step(layer)
            for r in range(repeats):
                for k in (("with", "without") if r % 2 == 0 else ("without", "with")):
                    t0 = time.perf_counter()
                    step(layers[k])
                    times[k].append(time.perf_counter() - t0)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            out[what] = {"with": f"{cell.name}", "without": without.name,
                         "with_ms": round(med["with"], 2), "without_ms": round(med["without"], 2),
                         "ratio": round(med["with"] / med["without"], 3)}
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
