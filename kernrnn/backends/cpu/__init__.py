"""CPU backend: Numba kernels for one layer and one direction.

Per layer and direction:

* forward: ``XW = x @ W_ih.T`` for all steps in one BLAS GEMM (NumPy, every
  core), then the whole time loop runs compiled.  Batch rows are independent
  for the entire sequence, so the batch is cut into one chunk per thread and
  each thread runs *all* T steps of its chunk: its rows of the recurrent GEMM
  ``h_{t-1} @ W_hh.T`` (single-threaded BLAS from inside Numba) and the cell's
  fused pointwise step, with both biases added there.  No synchronisation per
  step: the threads meet once per call.
* backward: the same split for BPTT (pointwise backward, bias-gradient sums,
  ``dh_{t-1} = dHU_t @ W_hh`` per chunk), then the weight gradients and ``dx``
  as large GEMMs over all T*B rows.

Dense cells (:func:`~kernrnn.backends.cpu.fused_source.fused_path`) take a
faster road: ``W_ih`` and ``W_hh`` are packed into panels of 16 units (every
gate of them) and each step runs register-blocked tiles
(:mod:`~kernrnn.backends.cpu.microkernel`) with the cell's step right behind,
on small row buffers instead of the T-long ``XW`` and ``HU``; BPTT's ``dHU_t
@ W_hh`` uses the same kind of tiles.

Array layouts (time-major): ``States[s, t', b, j]`` holds the state at time
boundary t' (``States[:, 0]`` is h0 for the forward direction, ``States[:,
T]`` for the reverse one); ``Saved[k, t, b, j]`` the values the cell saved for
backward; gate g of unit j is column ``g*H + j`` of ``XW``, ``HU``, ``dXW``,
``dHU`` (PyTorch's row order of ``W_ih``), so the pointwise loop over j reads
G contiguous streams and vectorises.

Where each part lives (modules of this package): ``host`` (``forward``,
``backward``, ``release``), ``threads`` (thread pool, BLAS ownership, thread
split), ``build`` (kernel assembly and caching), ``source`` and
``fused_source`` (kernel source), ``kernel_args`` (every kernel argument,
described once), ``packed`` (packed weight panels), ``workspace`` (reused
buffers), ``microkernel`` (register tiles, step barrier), ``tuning`` (tuning
constants and their measurements), ``timing`` (the ``kernrnn bench
--timeline`` hook).
"""

from __future__ import annotations

from kernrnn.backends.cpu.build import CpuKernels, FusedKernels, get_kernels
from kernrnn.backends.cpu.fused_source import fused_path
from kernrnn.backends.cpu.host import (
    ForwardContext,
    asarray,
    backward,
    forward,
    lengths,
    release,
    xp,
)
from kernrnn.backends.cpu.source import same_input_and_recurrent_grads
from kernrnn.backends.cpu.threads import SplitChooser, n_threads

__all__ = ["CpuKernels", "FusedKernels", "fused_path", "get_kernels", "ForwardContext", "forward",
           "backward", "release", "xp", "asarray", "lengths", "n_threads", "SplitChooser",
           "same_input_and_recurrent_grads"]
