"""Where one CPU call's time goes: timestamps of its parts (``kernrnn bench --timeline``).

The benchmark gives a call's total; this gives its parts, to find what is
worth making faster.  While it runs, thin wrappers around the CPU backend's
entry points (forward, backward, each kernel thread's calls, the BLAS hold,
the weight-gradient GEMMs) and the layer's backward record when each starts
and ends; afterwards the originals are put back.  Each wrapper costs a few
microseconds.  A call is timed after the benchmark's pause (as ``kernrnn
bench`` times it), ``steps`` times, and the one with the median total is
reported: medians of single events would mix different calls.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time

__all__ = ["step_timeline", "format_timeline"]


@contextlib.contextmanager
def _recording(events: list):
    """Wrap the CPU backend's parts so each appends ``(label, perf_counter())`` to ``events``."""
    import kernrnn.layer as layer
    from kernrnn.backends import common, cpu

    def mark(label):
        events.append((label, time.perf_counter()))

    def timed(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            mark(label + " start")
            try:
                return fn(*args, **kwargs)
            finally:
                mark(label + " end")
        return wrapper

    caller = threading.get_ident()

    def run_calls(calls):  # one kernel thread's calls (cpu._launch_fused)
        who = "caller" if threading.get_ident() == caller else "pool"
        for fn, fn_args in calls:
            name = getattr(fn, "__name__", "kernel")
            mark(f"{who} {name} start")
            fn(*fn_args)
            mark(f"{who} {name} end")

    blas_hold = cpu._blas_single_thread

    @contextlib.contextmanager
    def held_blas():
        mark("BLAS held to one thread")
        with blas_hold():
            yield
            mark("BLAS restore")
        mark("BLAS restored")

    patches = [
        (cpu, "forward", timed(cpu.forward, "backend forward")),
        (cpu, "backward", timed(cpu.backward, "backend backward")),
        (cpu, "_run_calls", run_calls),
        (cpu, "_blas_single_thread", held_blas),
        (cpu, "_threaded_matmul", timed(cpu._threaded_matmul, "GEMM (kernel threads)")),
        (common, "_matmul", timed(common._matmul, "GEMM (BLAS threads)")),
        (common, "weight_gradients", timed(common.weight_gradients, "weight gradients")),
        (layer.RNN, "backward", timed(layer.RNN.backward, "layer backward")),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)


def step_timeline(cell: str, B: int, T: int, I: int, H: int, mode: str, steps: int = 15,
                  warmup: int = 3, threads: int = 2) -> list[tuple[str, float]]:
    """``[(label, ms since the call began), ...]`` of the median of ``steps`` calls.

    ``mode`` is ``forward`` (an inference forward) or ``train`` (forward and
    backward, as ``kernrnn bench`` times them); the last event is ``done``.
    """
    from kernrnn.bench import cpu as bench

    if mode not in bench.MODES:
        raise ValueError(f"mode must be one of {', '.join(bench.MODES)}, got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    bench.set_threads(threads)
    step, *_ = bench._kernrnn_step(cell, B, T, I, H, mode)
    for _ in range(warmup):
        step()
    runs = []
    events: list = []
    with _recording(events):
        for _ in range(steps):
            bench._settle()
            events.clear()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            runs.append([(label, (t - t0) * 1e3) for label, t in events] + [("done", (t1 - t0) * 1e3)])
    runs.sort(key=lambda r: r[-1][1])
    return runs[len(runs) // 2]


def format_timeline(events) -> str:
    """One line per event: ms since the call began, ms since the previous event, label."""
    lines = [f"{'at ms':>9} {'+ms':>8}  event"]
    prev = 0.0
    for label, t in events:
        lines.append(f"{t:9.3f} {t - prev:8.3f}  {label}")
        prev = t
    return "\n".join(lines)
