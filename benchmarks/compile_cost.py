"""What a compile-time switch saves: kernel compile times with it off and on, side by side.

The switches are kernrnn's compile-time changes to Numba, each with an environment
variable that turns it off:

* ``inline``: ``KERNRNN_FAST_INLINE`` (:mod:`kernrnn.numba_inline`, numba-cuda's inliner);
* ``gc``: ``KERNRNN_PAUSE_GC`` (:mod:`kernrnn.numba_gc`, the garbage collector paused
  while Numba compiles).

Each measurement is a fresh process with an empty kernel cache that compiles, for every
cell given, either the CPU kernels of a float32 training step (``--what cpu``: forward
and backward, without the first tier) or the PTX of every CUDA kernel in float32
(``--what ptx``, needs numba-cuda).  Off and on alternate, ``--repeats`` times each, so a
drifting machine affects both; the time includes process start and imports::

    python -m benchmarks.compile_cost --switch gc --what cpu --cells lstm,gru,cifg,janet
    python -m benchmarks.compile_cost --switch inline --what ptx --cells lstm,gru,cifg,janet
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

SWITCHES = {"inline": "KERNRNN_FAST_INLINE", "gc": "KERNRNN_PAUSE_GC"}

_PTX = """
import numpy as np
from numba import cuda
from kernrnn.backends import cuda as cb
from kernrnn.plugins import load_registry
reg = load_registry()
for name in {cells!r}:
    cell = reg.get(name)
    kernels = cb.get_kernels(cell, np.float32)
    for n, sig in cb.ptx_signatures(cell, np.float32).items():
        cuda.compile_ptx(getattr(kernels, n), sig, cc=(9, 0))
"""

_CPU = """
import numpy as np
import kernrnn
for name in {cells!r}:
    layer = kernrnn.RNN(name, 16, 32, dtype=np.float32, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 4, 16)).astype(np.float32)
    y, hn = layer(x)
    layer.backward(np.ones_like(y))
"""


def _time(code: str, variable: str, on: bool) -> float:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, KERNRNN_CACHE_DIR=cache, KERNRNN_TIERS="0",
                   **{variable: "1" if on else "0"})
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", choices=sorted(SWITCHES), default="gc")
    parser.add_argument("--what", choices=["cpu", "ptx"], default="cpu")
    parser.add_argument("--cells", default="lstm,gru,cifg,janet")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    code = (_PTX if args.what == "ptx" else _CPU).format(cells=cells)
    variable = SWITCHES[args.switch]
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for on in (False, True):
            times[on].append(_time(code, variable, on))
    off_s, on_s = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.what} kernels of {','.join(cells)}: {variable}=0 {off_s:.1f} s, "
          f"{variable}=1 {on_s:.1f} s (x{on_s / off_s:.2f}; process start and imports included)")
    print(json.dumps({"switch": variable, "what": args.what, "cells": cells,
                      "off_s": times[False], "on_s": times[True], "ratio": on_s / off_s}))


if __name__ == "__main__":
    main()
