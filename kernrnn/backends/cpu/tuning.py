"""The CPU backend's tuning constants, each with the measurement behind its value.

The other modules read them as ``tuning.NAME`` at call time, so a test or a
measurement can set one here (``monkeypatch.setattr(tuning, "SPLIT", "rows")``).
:data:`FUSED` acts when kernels are built (clear
:func:`~kernrnn.backends.cpu.build.get_kernels`'s cache after changing it),
:data:`VECTORIZER_CHECKS` once per process, before the first kernel is built.
Round-by-round measurements: ``docs/benchmarks/cpu.md``.
"""

from __future__ import annotations

__all__ = ["FUSED", "SPLIT", "UNIT_SPLIT_MAX_BATCH", "MIN_ROWS_PER_CHUNK",
           "PRE_PROJECTION_MAX_ROWS", "THREADED_GEMM_MIN_ROWS", "VECTORIZER_CHECKS"]

#: Whether dense cells run on packed-W_hh tiles (True) or through BLAS per step.
#: A switch to run both roads side by side: tests/test_cpu_speed_paths.py
#: compares their results, and a measurement compares their times in one
#: process (set it, then ``get_kernels.cache_clear()``).
FUSED = True

#: How the fused forward and BPTT kernels split their work between the
#: threads: "rows" (batch chunks, no synchronisation), "units" (hidden-unit
#: blocks, one barrier per step, every thread runs all B rows: each keeps its
#: part of W_hh in its own L2) or "auto": for batches up to
#: UNIT_SPLIT_MAX_BATCH, the faster of the two as measured on the calls
#: themselves (:class:`~kernrnn.backends.cpu.threads.SplitChooser`); larger
#: batches split the rows.  Both splits compute every value with the same code
#: in the same order, so the choice never changes a result.  A fixed choice
#: cannot win on a shared machine: with dedicated cores the unit split is
#: 1.5-2x faster at B = 1, but a descheduled partner stalls it at every step
#: (1.5-5x slower under load 3-4; docs/benchmarks/cpu.md).
SPLIT = "auto"
#: The largest batch for which ``SPLIT = "auto"`` may choose the unit split.
UNIT_SPLIT_MAX_BATCH = 4

#: Fewest batch rows per thread worth a chunk of their own; below it the time
#: loop runs in the caller and BLAS keeps its threads for the per-step GEMM.
MIN_ROWS_PER_CHUNK = 1

#: Most batch rows per thread for which a fused forward computes the input
#: projection of all steps first (``pre``): with one or two rows, streaming
#: every panel of W_ih at every step costs more than writing and reading back
#: the projection (LSTM, H=256, 2 threads: B=1 unit split 1.76 -> 1.24 ms,
#: B=2 2.11 -> 1.80); from 4 rows on the step tiles are compute-bound and
#: ``pre`` only adds traffic (B=4 unit split 2.57 -> 2.85, B=8 rows split
#: 4.84 -> 5.18).
PRE_PROJECTION_MAX_ROWS = 2

#: Fewest T*B rows for which the weight-gradient GEMMs run on the kernel threads
#: (BLAS held to one thread, output rows split) instead of multi-threaded BLAS.
#: OpenBLAS's workers spin for about 0.1 s after each multi-threaded call, on
#: the cores the next forward's kernel threads need: a CIFG training forward
#: (B=32, H=256) took 31 ms within 0.05 s of a backward and 21 ms after 0.1 s.
#: Measured per training step (fwd + bwd, H=256): CIFG B=32 71 -> 56 ms, B=64
#: 127 -> 97; LSTM B=32 90 -> 68, B=64 165 -> 127; B=16 equal (37 ms); B=8
#: slower (CIFG 21 -> 27), hence the threshold.
THREADED_GEMM_MIN_ROWS = 2048

#: LLVM's budget of run-time overlap checks per vectorised loop (its default:
#: 128).  The pointwise loops read and write a dozen arrays that Numba cannot
#: mark as non-aliasing; past the default budget LLVM keeps them scalar.  Set
#: once per process, before the first kernel is built
#: (:mod:`~kernrnn.backends.cpu.build`).
VECTORIZER_CHECKS = 1000
