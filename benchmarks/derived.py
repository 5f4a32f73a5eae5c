"""Derived backwards against the hand-written ones they replaced: one row per shipped cell.

``python -m benchmarks.derived`` prints a Markdown table with, per shipped cell:

* the lines of its file now and at git revision ``--before`` (the hand-written cell);
* the largest difference between the derived and the hand-written gradients through
  :class:`kernrnn.RNN` in float64 (2 layers, both directions, variable lengths, an initial
  state, random per-unit parameters and norm gains, dropout and zoneout masks fixed),
  relative to each tensor's largest value;
* a training step (forward and BPTT of one layer, float32, B=64, T=100, I=H=256, one
  thread) with the derived and with the hand-written math, in the same process, the two
  interleaved (alternating order), medians of ``--repeats`` runs, and the ratio;
* the values saved per element and per step (B*H elements): ``saved`` plus, for a
  two-stage step, ``mid``.

The hand-written math is ``tests/hand_written_cells.py`` (the cells as they were before
kernrnn derived backwards).  ``--compile CELL`` instead times, in a fresh process with empty
kernel caches, the first forward and backward of one cell (float32, CPU): the cold compile
time; ``--variant hand`` compiles the hand-written math, ``registry`` the registered cell,
and ``--pythonpath OLD:OLD/plugins`` takes kernrnn from an older checkout (the time before).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZE = {"B": 64, "T": 100, "I": 256, "H": 256}


def _hand_written():
    sys.path.insert(0, str(ROOT / "tests"))
    import hand_written_cells

    return hand_written_cells


def shipped() -> list[str]:
    """The registered cells of the kernrnn distribution itself."""
    from kernrnn.plugins import get_registry

    reg = get_registry()
    return [n for n in reg.names() if reg.source(n).distribution.startswith("kernrnn ")]


def lines(name: str, rev: str | None = None) -> int | None:
    """Lines of the plugin file of cell ``name``, now or at git revision ``rev``."""
    import importlib

    from kernrnn.plugins import get_registry

    path = Path(importlib.import_module(get_registry().source(name).plugin).__file__)
    if rev is None:
        return len(path.read_text().splitlines())
    rel = path.resolve().relative_to(ROOT)
    out = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT, capture_output=True,
                         text=True)
    return len(out.stdout.splitlines()) if out.returncode == 0 else None


def saved_per_element(cell) -> int:
    """Values the forward stores per element and step for backward (saved + mid)."""
    return cell.n_saved + cell.n_mid


def gradient_difference(derived, hand, seed: int = 0) -> float:
    """max |derived - hand| / max |hand| over the output, final state and every gradient."""
    from kernrnn.testing.conformance import run_layer
    from kernrnn.testing.strategies import Problem, make_arrays

    H = 4 * derived.n_heads
    L = 1 if derived.raw_input else 2  # raw input: layer 1 of a bidirectional stack gets 2H
    p = Problem(T=5, B=3, I=H if derived.raw_input else 4, H=H, num_layers=L,
                bidirectional=True, lengths=(5, 2, 0), with_h0=True, seed=seed)
    params, x, h0 = make_arrays(derived, p, np.float64)  # per-unit parameters, gains random
    rng = np.random.default_rng(seed)
    dy = rng.uniform(-1, 1, (p.T, p.B, 2 * p.H))
    dhn = tuple(rng.uniform(-1, 1, (2 * L, p.B, p.H)) for _ in range(derived.n_state))
    reg = dict(recurrent_dropout=0.3 if derived.has_recurrent else 0.0, input_dropout=0.2,
               zoneout=0.25)
    a = run_layer(derived, p, params, x, h0, dy=dy, dhn=dhn, regularization=reg)
    b = run_layer(hand, p, params, x, h0, dy=dy, dhn=dhn, regularization=reg)
    worst = 0.0
    for got, want in zip(_tensors(a), _tensors(b)):
        worst = max(worst, float(np.max(np.abs(got - want), initial=0.0)
                                 / max(float(np.max(np.abs(want), initial=0.0)), 1e-300)))
    return worst


def _tensors(result):
    y, hn, dx, dh0, grads = result
    return [y, *hn, dx, *dh0, *(grads[k] for k in sorted(grads))]


def _problem(cell, seed: int = 0):
    from kernrnn.testing.strategies import Problem, make_arrays

    p = Problem(SIZE["T"], SIZE["B"], SIZE["I"], SIZE["H"], 1, False, None, True, seed)
    params, x, h0 = make_arrays(cell, p, np.float32)
    dy = np.random.default_rng(seed).uniform(-1, 1, (p.T, p.B, p.H)).astype(np.float32)
    return params, x, h0, dy


def _train_step(cell, params, x, h0, dy):
    import kernrnn

    layer = kernrnn.RNN(cell, x.shape[2], dy.shape[2], dtype=np.float32)
    layer.load_state_dict(params)
    h0_arg = h0[0] if cell.n_state == 1 else h0

    def run():
        layer.zero_grad()
        layer(x, h0_arg)
        layer.backward(dy)
    return run


def time_cell(derived, hand, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of a float32 training step, derived and hand-written, interleaved."""
    params, x, h0, dy = _problem(derived)
    fns = {"derived": _train_step(derived, params, x, h0, dy),
           "hand": _train_step(hand, params, x, h0, dy)}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()} | {
        f"{k}_all": v for k, v in times.items()}


def table(names, before: str | None, repeats: int, timing: bool = True) -> list[dict]:
    from kernrnn.bench.cpu import set_threads
    from kernrnn.plugins import get_registry

    set_threads(1)
    hw = _hand_written()
    rows = []
    for name in names:
        derived = get_registry().get(name)
        hand = hw.hand_written(name)
        row = {"cell": name, "lines_before": lines(name, before), "lines_after": lines(name),
               "hand_written_backward": not derived.derived_backward,
               "max_grad_diff": gradient_difference(derived, hand),
               "saved_before": saved_per_element(hand), "saved_after": saved_per_element(derived)}
        if timing:
            row.update(time_cell(derived, hand, repeats))
        rows.append(row)
        print(f"  {name}: {({k: v for k, v in row.items() if not k.endswith('_all')})}",
              file=sys.stderr, flush=True)
    return rows


def markdown(rows) -> str:
    BH = SIZE["B"] * SIZE["H"]
    out = ["| cell | lines before | lines after | max gradient difference | derived (ms) | "
           "hand-written (ms) | derived / hand | saved per element (per step) before | "
           "after |", "|" + "---|" * 9]
    for r in rows:
        t = (f"{1e3 * r['derived']:.1f} | {1e3 * r['hand']:.1f} | "
             f"{r['derived'] / r['hand']:.3f}") if "derived" in r else "- | - | -"
        kept = " (hand-written backward)" if r["hand_written_backward"] else ""
        out.append(f"| {r['cell']}{kept} | {r['lines_before']} | {r['lines_after']} | "
                   f"{r['max_grad_diff']:.1e} | {t} | "
                   f"{r['saved_before']} ({r['saved_before'] * BH}) | "
                   f"{r['saved_after']} ({r['saved_after'] * BH}) |")
    return "\n".join(out)


# -- cold compile time ---------------------------------------------------------------------


def compile_once(name: str, variant: str) -> dict:
    """Import, then the first forward and backward of ``name`` (float32, CPU), in seconds."""
    t0 = time.perf_counter()
    import kernrnn
    from kernrnn.plugins import get_registry

    cell = get_registry().get(name)
    if variant == "hand":
        cell = _hand_written().hand_written(name)
    t1 = time.perf_counter()
    layer = kernrnn.RNN(cell, 8, 8 * cell.n_heads, dtype=np.float32, seed=0)
    y, _ = layer(np.zeros((3, 2, 8), np.float32))
    layer.backward(np.ones_like(y))
    t2 = time.perf_counter()
    return {"import": t1 - t0, "compile": t2 - t1, "kernrnn": str(Path(kernrnn.__file__).parent),
            "derived_backward": getattr(cell, "derived_backward", False)}


def compile_fresh(name: str, variant: str, pythonpath: str | None = None) -> dict:
    """:func:`compile_once` in a new process with empty kernel caches."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, KERNRNN_CACHE_DIR=tmp, NUMBA_CACHE_DIR=tmp,
                   PYTHONPATH=pythonpath or os.pathsep.join([str(ROOT), str(ROOT / "plugins")]))
        # run as a script, so kernrnn comes from PYTHONPATH (not from the current directory)
        out = subprocess.run([sys.executable, __file__, "--compile-here", name, "--variant",
                              variant], cwd=tmp, env=env, capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="*", help="cells (default: every shipped cell)")
    ap.add_argument("--before", help="git revision of the hand-written cells, for lines before")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-timing", action="store_true", help="skip the training-step times")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--compile", metavar="CELL", help="cold compile time of CELL (new process)")
    ap.add_argument("--compile-here", metavar="CELL", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=("registry", "hand"), default="registry")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes for --compile")
    ap.add_argument("--pythonpath", help="PYTHONPATH of the --compile processes (another "
                                         "checkout's root and plugins folder, for the time before)")
    args = ap.parse_args(argv)
    if args.compile_here:
        print(json.dumps(compile_once(args.compile_here, args.variant)))
        return 0
    if args.compile:
        runs = [compile_fresh(args.compile, args.variant, args.pythonpath)
                for _ in range(args.runs)]
        print(json.dumps({"cell": args.compile, "variant": args.variant, "runs": runs,
                          "median_compile": statistics.median(r["compile"] for r in runs)}))
        return 0
    rows = table(args.cells or shipped(), args.before, args.repeats, not args.no_timing)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
