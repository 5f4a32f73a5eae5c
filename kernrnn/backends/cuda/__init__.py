"""CUDA backend: Numba-CUDA kernels and cuBLAS GEMMs (via CuPy) for one layer and direction.

Same interface and array layouts as :mod:`kernrnn.backends.cpu` (those of
:mod:`kernrnn.backends.common`), so :mod:`kernrnn.layer` and
:mod:`kernrnn.functional` run unchanged with ``device="cuda"``.  This module is
the backend's public surface; the code lives in:

* :mod:`.arrays`: what is available (numba-cuda, CuPy, a GPU, the simulator)
  and array interop;
* :mod:`.kernels`: the generated source of every cell's kernels;
  :mod:`.launch`: compiling and launching them;
* :mod:`.stepgemm`: the time loop's per-step GEMMs, calling cuBLAS directly
  through :mod:`._cublas`;
* :mod:`.paths`: the choice between the GEMM-per-step loops and the persistent
  fused kernel of :mod:`.persistent`;
* :mod:`.graphs`: replaying a loop as a CUDA graph;
* :mod:`.host`: ``forward``/``backward`` and their time loops.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) NumPy stands in for
CuPy and the same kernels run on the CPU, so CI tests this backend's logic.
"""

from __future__ import annotations

from kernrnn.backends.common import ForwardContext
from kernrnn.backends.cuda.arrays import (
    SIMULATOR,
    CudaUnavailableError,
    asarray,
    from_host,
    lengths,
    require,
    xp,
)
from kernrnn.backends.cuda.graphs import GRAPHS_ENV, graph_stats, graphs_enabled, set_graphs
from kernrnn.backends.cuda.host import backward, forward, release
from kernrnn.backends.cuda.launch import BLOCK, get_kernels, kernel_sources, ptx_signatures
from kernrnn.backends.cuda.paths import PATH_ENV, PATHS, get_path, resolve_path, set_path
from kernrnn.backends.cuda.stepgemm import raw_gemm_ok

__all__ = [
    "xp", "SIMULATOR", "CudaUnavailableError", "require", "asarray", "from_host", "lengths",
    "forward", "backward", "release", "ForwardContext", "get_kernels", "kernel_sources", "set_path",
    "get_path", "PATHS", "BLOCK", "set_graphs", "graphs_enabled", "graph_stats", "PATH_ENV",
    "GRAPHS_ENV", "ptx_signatures",
]

# Names from before the split, still read by the device check and the GPU benchmark.
_resolve_path = resolve_path
_raw_gemm_ok = raw_gemm_ok
