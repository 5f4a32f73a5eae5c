"""What the kernels' regularisation costs and what it buys.

``python -m benchmarks.regularization cost``: one training step (forward and
backward) of an LSTM layer at B=64, T=100, I=H=256, float32, with recurrent
dropout, input dropout and zoneout on against off, in one process, interleaved
repetitions, medians.

``python -m benchmarks.regularization charlm``: a character-level language
model (``kernrnn train``'s charlm task) on the Python documentation that
ships with every CPython (``pydoc_data.topics``, English prose), for the LSTM
without regularisation, with variational dropout and with zoneout, several
seeds each; prints the held-out bits per character as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

__all__ = ["cost", "charlm", "CONFIGS", "main"]

#: The three charlm configurations compared: name -> extra ``kernrnn train`` options.
CONFIGS = {
    "none": [],
    "variational dropout": ["--recurrent-dropout", "0.25", "--input-dropout", "0.1"],
    "zoneout": ["--zoneout", "0.1", "0.05"],
}


def cost(repeats: int = 15, threads: int = 2, B=64, T=100, I=256, H=256) -> dict:
    """Median training-step times (ms), regularisation off and on, and their ratio."""
    import numba

    import kernrnn

    numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)
    dy = rng.uniform(-1, 1, (T, B, H)).astype(np.float32)
    layers = {
        "off": kernrnn.RNN("lstm", I, H, seed=0),
        "on": kernrnn.RNN("lstm", I, H, seed=0, recurrent_dropout=0.25, input_dropout=0.1,
                          zoneout=(0.1, 0.05)),
    }
    times = {k: [] for k in layers}
    for layer in layers.values():  # compile and warm up
        y, _ = layer(x)
        layer.backward(dy)
    for _ in range(repeats):
        for name, layer in layers.items():
            t0 = time.perf_counter()
            layer(x)
            layer.backward(dy)
            times[name].append(time.perf_counter() - t0)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"off_ms": med["off"], "on_ms": med["on"], "ratio": med["on"] / med["off"],
            "load": os.getloadavg()[0], "B": B, "T": T, "I": I, "H": H, "threads": threads}


def _corpus(chars: int) -> str:
    import pydoc_data.topics as topics

    text = "".join(topics.topics[k] for k in sorted(topics.topics))
    return text[:chars]


def charlm(seeds=(0, 1, 2), epochs=6, chars=200_000, hidden=128, out=None) -> list[dict]:
    """Held-out bits per character for each configuration of :data:`CONFIGS` and seed."""
    from kernrnn.cli import main as cli

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pydoc-topics.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_corpus(chars))
        for name, extra in CONFIGS.items():
            for seed in seeds:
                run = os.path.join(tmp, f"{name.replace(' ', '-')}-{seed}")
                args = ["train", "--data", path, "--epochs", str(epochs), "--hidden",
                        str(hidden), "--seed", str(seed), "--out", run, *extra]
                status = cli(args)
                if status:
                    raise RuntimeError(f"kernrnn {' '.join(args)} exited with {status}")
                with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
                    metrics = json.load(f)
                rows.append({"config": name, "seed": seed, "options": " ".join(extra),
                             "bits_per_char": _heldout_bpc(metrics)})
                print(rows[-1], file=sys.stderr, flush=True)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return rows


def _heldout_bpc(result: dict) -> float:
    """The final held-out metric of a charlm run (bits per character) from metrics.json."""
    metrics = result["metrics"]
    if metrics.get("metric") != "bits/char":
        raise ValueError(f"expected a bits/char metric, got {metrics.get('metric')!r}")
    return float(metrics["model"])


def main(argv=None) -> int:
    """Command line: ``cost`` and/or ``charlm`` (default both)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.regularization",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="*", help="cost, charlm (default both)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", help="write the charlm rows here")
    args = ap.parse_args(argv)
    what = args.what or ["cost", "charlm"]
    bad = sorted(set(what) - {"cost", "charlm"})
    if bad:
        ap.error(f"unknown task(s) {', '.join(bad)}; choose from cost, charlm")
    if "cost" in what:
        c = cost(args.repeats, args.threads)
        print(f"training step B={c['B']} T={c['T']} I={c['I']} H={c['H']} float32, "
              f"{c['threads']} threads: off {c['off_ms']:.1f} ms, on {c['on_ms']:.1f} ms, "
              f"ratio {c['ratio']:.3f} (load {c['load']:.1f})")
    if "charlm" in what:
        rows = charlm(tuple(args.seeds), args.epochs, args.chars, out=args.json)
        print("| configuration | options | " + " | ".join(f"seed {s}" for s in args.seeds)
              + " | mean |")
        print("|---|---|" + "---|" * (len(args.seeds) + 1))
        for name in CONFIGS:
            vals = [r["bits_per_char"] for r in rows if r["config"] == name]
            print(f"| {name} | {' '.join(CONFIGS[name]) or '-'} | "
                  + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
