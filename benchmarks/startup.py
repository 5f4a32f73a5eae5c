"""Start-up: process start to the end of the first training step, kernrnn against JAX.

Remeasures issue 24's table in one run.  Every case is a fresh interpreter
(one thread: ``NUMBA_NUM_THREADS``, ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
and ``XLA_FLAGS`` for JAX), timed from before the process starts until its
first training step (forward and backward, gradients ready) has finished:

* kernrnn, LSTM and a custom CIFG (written in the child script, as a user
  would write a new cell), B=32, T=100, I=64, H=128, float32: **cold** (an
  empty kernel cache), **edited** (a new cell, here the same math under
  another name, with the cache its previous version left: shared kernels
  load, the cell's own compile) and **warm** (the same cell again);
* kernrnn, LSTM B=8, T=20, I=32, H=64: construction, first inference forward,
  first training forward, first backward, cold and warm;
* JAX (``lax.scan`` + ``jit(value_and_grad)``, the same sizes and math), when
  installed; JAX keeps no compile cache between processes by default, so its
  warm run is another cold one.  JAX is not a dependency of kernrnn: without
  it the JAX column reads "not installed".

Run from the repository root::

    PYTHONPATH=.:plugins python -m benchmarks.startup [--repeats N] [--json FILE]

Timings are medians of ``--repeats`` runs (default 1: a cold run costs tens
of seconds), the cases interleaved; the machine's load average is printed
before and after, since a busy machine stretches compile times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

KERNRNN_CHILD = r'''
import json, sys, time
t_start = time.perf_counter()
import numpy as np
import kernrnn
from kernrnn.cell import Cell, sigmoid, tanh


def cifg_forward(xw, hu, prev):  # forward only, as a user writes a new cell
    f = sigmoid(xw[0] + hu[0])
    g = tanh(xw[1] + hu[1])
    o = sigmoid(xw[2] + hu[2])
    c = f * prev[1] + (1 - f) * g
    return (o * tanh(c), c)


which, name, B, T, I, H, order = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]), sys.argv[7]
if which == "cifg":
    cell = Cell(name, gates="fgo", state=("h", "c"), forward=cifg_forward)
else:
    import dataclasses
    from kernrnn.plugins import get_registry
    cell = get_registry().get(which)
    if name != which:
        cell = dataclasses.replace(cell, name=name)
times = {"import": time.perf_counter() - t_start}
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)


def timed(key, fn):
    t0 = time.perf_counter()
    out = fn()
    times[key] = time.perf_counter() - t0
    return out


layer = timed("construction", lambda: kernrnn.RNN(cell, I, H, dtype=np.float32, seed=0))
for part in order.split(","):
    if part == "infer":
        layer.eval()
        timed("inference forward", lambda: layer(x))
    else:
        layer.train()
        y, _ = timed("training forward", lambda: layer(x))
        timed("backward", lambda: layer.backward(np.ones_like(y)))
times["in process"] = time.perf_counter() - t_start
from kernrnn.backends.cpu import tiers
times["first tier"] = float(not tiers.wait(timeout=0))  # 1.0: the first step ran NumPy
kernrnn.warmup()
times["kernels ready"] = time.perf_counter() - t_start
print("@@" + json.dumps(times))
'''

JAX_CHILD = r'''
import json, sys, time
t_start = time.perf_counter()
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

which, B, T, I, H = sys.argv[1], *map(int, sys.argv[2:6])
G = 4 if which == "lstm" else 3
times = {"import": time.perf_counter() - t_start}


def loss(params, x):
    W_ih, W_hh, b = params
    xw = x @ W_ih.T + b

    def step(carry, xw_t):
        h, c = carry
        z = xw_t + h @ W_hh.T
        if G == 4:
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        else:
            f, g, o = jnp.split(z, 3, axis=-1)
            f = jax.nn.sigmoid(f)
            c = f * c + (1 - f) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((x.shape[1], H), x.dtype)
    _, ys = lax.scan(step, (zeros, zeros), xw)
    return ys.sum()


rng = np.random.default_rng(0)
s = 1 / np.sqrt(H)
params = tuple(jnp.asarray(rng.uniform(-s, s, shape).astype(np.float32))
               for shape in ((G * H, I), (G * H, H), (G * H,)))
x = jnp.asarray(rng.uniform(-1, 1, (T, B, I)).astype(np.float32))
t0 = time.perf_counter()
step = jax.jit(jax.value_and_grad(loss))
value, grads = step(params, x)
jax.block_until_ready(grads)
times["first step (jit)"] = time.perf_counter() - t0
times["in process"] = time.perf_counter() - t_start
print("@@" + json.dumps(times))
'''

BIG = (32, 100, 64, 128)
SMALL = (8, 20, 32, 64)


def _env(cache: str, tiers: bool = True) -> dict:
    return dict(os.environ, KERNRNN_TIERS="1" if tiers else "0", KERNRNN_CACHE_DIR=os.path.join(cache, "kernels"),
                NUMBA_CACHE_DIR=os.path.join(cache, "numba"), NUMBA_NUM_THREADS="1",
                OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                JAX_PLATFORMS="cpu")


def _run(script: str, args, cache: str, tiers: bool = True) -> dict:
    """Wall seconds of one fresh interpreter running ``script`` (and the times it printed);
    ``tiers=False``: every call waits for the kernels (``KERNRNN_TIERS=0``)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, *map(str, args)], env=_env(cache, tiers),
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {args} failed:\n{proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")][-1]
    return {"wall": wall, **json.loads(line[2:])}


def _have_jax() -> bool:
    return subprocess.run([sys.executable, "-c", "import jax"], capture_output=True).returncode == 0


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def measure(repeats: int = 1) -> dict:
    """Every case ``repeats`` times, interleaved; the lists of results per case."""
    work = tempfile.mkdtemp(prefix="kernrnn-startup-bench-")
    kern, jaxs = os.path.join(work, "kernrnn_child.py"), os.path.join(work, "jax_child.py")
    with open(kern, "w") as f:
        f.write(KERNRNN_CHILD)
    with open(jaxs, "w") as f:
        f.write(JAX_CHILD)
    jax_ok = _have_jax()
    runs: dict = {}

    def add(key, value):
        runs.setdefault(key, []).append(value)

    try:
        for r in range(repeats):
            for cell in ("lstm", "cifg"):
                for tiers, tag in ((True, ""), (False, " no tiers")):
                    cache = os.path.join(work, f"cache-{cell}-{r}{tag.strip()}")
                    for kind, version in (("cold", 1), ("edited", 2), ("warm", 2)):
                        add((cell, kind + tag), _run(
                            kern, [cell, f"{cell}_v{version}", *BIG, "train"], cache, tiers))
                if jax_ok:
                    add((cell, "jax"), _run(jaxs, [cell, *BIG], cache))
            cache = os.path.join(work, f"cache-small-{r}")
            for tiers, tag in ((True, ""), (False, " no tiers")):
                cache = os.path.join(work, f"cache-small-{r}{tag.strip()}")
                for kind in ("cold", "warm"):
                    add(("lstm small", kind + tag),
                        _run(kern, ["lstm", "lstm", *SMALL, "infer,train"], cache, tiers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"runs": {f"{a}|{b}": v for (a, b), v in runs.items()}, "jax": jax_ok}


def _med(values, key):
    vals = [v[key] for v in values if key in v]
    return statistics.median(vals) if vals else float("nan")


def report(result: dict) -> str:
    runs = result["runs"]

    for values in runs.values():  # the process wall time up to the end of the first step
        for v in values:
            v["first step"] = v["wall"] - (v.get("kernels ready", v["in process"])
                                           - v["in process"])

    def cell(key, field="first step"):
        return f"{_med(runs[key], field):.2f} s" if key in runs else "-"

    jax_note = "" if result["jax"] else "JAX is not installed: its column is empty " \
                                        "(pip install jax to compare).\n"
    lines = [jax_note + "| case | kernrnn, tiered (default): first step / kernels ready | "
             "kernrnn without tiers (`KERNRNN_TIERS=0`) | JAX (`lax.scan` + "
             "`jit(value_and_grad)`) |", "|---|---|---|---|"]
    for c in ("lstm", "cifg"):
        name = "LSTM" if c == "lstm" else "custom CIFG (forward only)"
        jx = (f"{cell(f'{c}|jax', 'wall')} ({cell(f'{c}|jax', 'first step (jit)')} jit)"
              if result["jax"] else "not installed")
        for kind, label in (("cold", "cold (empty kernel cache)"),
                            ("edited", "new cell after an edit (cache of its previous version)"),
                            ("warm", "warm cache")):
            k, k0 = f"{c}|{kind}", f"{c}|{kind} no tiers"
            tier = " (NumPy step)" if _med(runs[k], "first tier") > 0.5 else ""
            inner = _med(runs[k0], "training forward") + _med(runs[k0], "backward")
            lines.append(f"| {name}, B,T,I,H = {','.join(map(str, BIG))}, process start to end "
                         f"of first training step, {label} | {cell(k)}{tier} / "
                         f"{cell(k, 'kernels ready')} | {cell(k0)} ({inner:.2f} s in the step, "
                         f"{_med(runs[k0], 'construction'):.2f} s construction) | "
                         f"{jx if kind != 'edited' else ''} |")
    for kind in ("cold", "warm"):
        row = []
        for tag in ("", " no tiers"):
            k = f"lstm small|{kind}{tag}"
            parts = [_med(runs[k], p) for p in ("construction", "inference forward",
                                                "training forward", "backward")]
            row.append(f"{' / '.join(f'{p:.2f}' for p in parts)} s ({sum(parts):.2f} s in all; "
                       f"process {cell(k)})")
        lines.append(f"| LSTM, B,T,I,H = {','.join(map(str, SMALL))}, {kind}: construction / "
                     f"first inference forward / first training forward / first backward | "
                     f"{row[0]} | {row[1]} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1, help="runs of every case (median)")
    p.add_argument("--json", metavar="FILE", help="also write the raw times")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    before = _load()
    result = measure(args.repeats)
    result["load"] = [before, _load()]
    print(report(result))
    print(f"\nload average (1, 5, 15 min) before: {before}; after: {result['load'][1]}; "
          f"{os.cpu_count()} CPUs, one thread per process, {args.repeats} run(s) per case")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
