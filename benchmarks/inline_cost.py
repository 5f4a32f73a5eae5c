"""What kernrnn.numba_inline saves: PTX compile times with numba-cuda's inliner and kernrnn's.

Each measurement is a fresh process with an empty kernel cache that compiles the PTX of
every CUDA kernel (float32) of every cell given; ``KERNRNN_FAST_INLINE=0`` selects
numba-cuda's inliner.  The two settings alternate, ``--repeats`` times each, so a
drifting machine affects both.  (The same change in Numba's CPU inliner measured no
gain, so the CPU kernels are not hooked and not measured here.)  Needs numba-cuda::

    python -m benchmarks.inline_cost --cells lstm,gru,cifg,janet --repeats 2
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


def _time(code: str, fast: bool) -> float:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, KERNRNN_CACHE_DIR=cache, KERNRNN_TIERS="0",
                   KERNRNN_FAST_INLINE="1" if fast else "0")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="lstm,gru,cifg,janet")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    code = _PTX.format(cells=cells)
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for fast in (False, True):
            times[fast].append(_time(code, fast))
    numba_s, kernrnn_s = statistics.median(times[False]), statistics.median(times[True])
    print(f"PTX: numba-cuda's inliner {numba_s:.1f} s, kernrnn's {kernrnn_s:.1f} s "
          f"(x{kernrnn_s / numba_s:.2f}; process start and imports included)")
    print(json.dumps({"cells": cells, "numba_inliner_s": times[False],
                      "kernrnn_inliner_s": times[True], "ratio": kernrnn_s / numba_s}))


if __name__ == "__main__":
    main()
