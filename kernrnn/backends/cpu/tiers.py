"""Tiered start-up: the NumPy first tier runs while the kernels compile in the background.

A new or edited cell's kernels take seconds to compile; JIT runtimes answer
that with tiers, and so does the CPU backend.  The first call of a cell (per
precision and mode, training or inference) starts a background thread that
builds the kernels by running them once on a two-step batch of the call's
sizes (Numba compiles and fills the kernel cache, so the next process loads
them), and returns at once: until that thread is done, calls of that cell run
:mod:`~kernrnn.backends.cpu.first_tier` (NumPy, about as fast as an eager
PyTorch loop).  Each call picks its tier when it starts, and a training
forward's backward runs in the forward's tier, so the swap falls between two
calls.  The tiers agree to rounding (``kernrnn.testing.tolerances``), not bit
for bit.

The background thread never blocks the caller (Numba compiles under LLVM with
the GIL released) and never crashes it: if the compile fails, the first tier
keeps running and the failure is reported once, as a :class:`RuntimeWarning`
at the next call.  A call the first tier does not cover
(:func:`~kernrnn.backends.cpu.first_tier.supports`) compiles in the foreground
as without tiers.  ``KERNRNN_TIERS=0`` (or :func:`set_enabled`) turns tiers
off: every call waits for the kernels; ``kernrnn bench`` and the tests do.
:func:`kernrnn.warmup` waits for the kernels, before a benchmark say.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np

from kernrnn.backends.cpu import first_tier

__all__ = ["enabled", "set_enabled", "defers_compile_check", "first_tier_call", "wait",
           "compile_now"]

_jobs: dict = {}  # (cell, dtype, training) -> _Job
_jobs_lock = threading.Lock()
_local = threading.local()  # .compiling: this thread builds kernels (never tiered)
_enabled: bool | None = None


class _Job:
    """One background build of a cell's kernels for one precision and mode."""

    def __init__(self):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.reported = False


def enabled() -> bool:
    """Whether calls may run the first tier (``KERNRNN_TIERS``, default on)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("KERNRNN_TIERS", "1").strip() not in ("0", "false", "no", "off")


def set_enabled(on: bool | None) -> None:
    """Turn tiers on or off for this process (None: back to ``KERNRNN_TIERS``)."""
    global _enabled
    _enabled = None if on is None else bool(on)


def defers_compile_check(cell, device: str) -> bool:
    """Whether a layer leaves the check of ``cell``'s math
    (``kernrnn.scalar.check_cell_compiles``, a compile of 1-3 s) to the background
    build: with tiers on, on the CPU, for a cell the first tier runs.  The build runs the
    check first, so a plugin's broken math is reported with the same error, once."""
    return device == "cpu" and enabled() and first_tier.supports(cell)


def _build(build, *args) -> None:
    """Run ``build(*args)`` (:func:`kernrnn.backends.cpu.host.build`) with tiers off in this
    thread, so its calls compile and run the kernels."""
    _local.compiling = True
    try:
        build(*args)
    finally:
        _local.compiling = False


def _run(job: _Job, *args) -> None:
    try:
        _build(*args)
    except BaseException as exc:  # reported to the caller's thread, once
        job.error = exc
    finally:
        job.done.set()


def first_tier_call(build, cell, dtype, training: bool, reg, proj: bool, B: int, I: int,
                    H: int) -> bool:
    """True when this call should run the first tier (and the kernels' build is under way).

    The first call of ``(cell, dtype, training)`` starts the background build,
    ``build(cell, dtype, training, B, I, H)``.
    """
    if getattr(_local, "compiling", False) or not enabled():
        return False
    key = (cell, np.dtype(dtype), bool(training))
    job = _jobs.get(key)
    if job is None:
        if not first_tier.supports(cell, reg, proj):
            return False
        with _jobs_lock:
            job = _jobs.get(key)
            if job is None:
                job = _jobs[key] = _Job()
                threading.Thread(target=_run, daemon=True,
                                 name=f"kernrnn build {cell.name} {np.dtype(dtype)}",
                                 args=(job, build, cell, np.dtype(dtype), bool(training), B,
                                       I, H)
                                 ).start()
    if not job.done.is_set():
        return first_tier.supports(cell, reg, proj)
    if job.error is None:
        return False
    if not job.reported:
        job.reported = True
        warnings.warn(f"kernrnn: building the CPU kernels of cell {cell.name!r} "
                      f"({np.dtype(dtype)}) failed ({type(job.error).__name__}: {job.error}); "
                      f"its calls keep running the first tier (NumPy)", RuntimeWarning,
                      stacklevel=4)
    return first_tier.supports(cell, reg, proj)


def wait(cell=None, timeout: float | None = None) -> bool:
    """Wait for the background builds (of ``cell`` only, if given); True when all are done.

    A build that failed raises its error here.
    """
    jobs = [j for (c, _, _), j in list(_jobs.items()) if cell is None or c is cell]
    for job in jobs:
        if not job.done.wait(timeout):
            return False
        if job.error is not None:
            job.reported = True
            raise job.error
    return True


def compile_now(build, cell, dtype, training: bool, B: int, I: int, H: int) -> None:
    """``build`` the kernels of one call's sizes in this thread (:func:`kernrnn.warmup`)."""
    key = (cell, np.dtype(dtype), bool(training))
    job = _jobs.get(key)
    if job is not None:
        wait(cell)
        return
    _build(build, cell, np.dtype(dtype), training, B, I, H)
    done = _Job()
    done.done.set()
    with _jobs_lock:
        _jobs.setdefault(key, done)
