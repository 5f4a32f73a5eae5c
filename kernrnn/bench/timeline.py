"""Where one CPU call's time goes: timestamps of its parts (``kernrnn bench --timeline``).

The benchmark gives a call's total; this gives its parts, to find what is
worth making faster.  While it runs, the CPU backend's timing hook
(:mod:`kernrnn.backends.cpu.timing`) records when its parts start and end
(forward, backward, each kernel thread's calls, the BLAS hold, the
weight-gradient GEMMs), and a thin wrapper around the layer's public
``RNN.backward`` does the same; afterwards both are undone.  Each mark costs
a few microseconds.  A call is timed after the benchmark's pause (as
``kernrnn bench`` times it), ``steps`` times, and the one with the median
total is reported: medians of single events would mix different calls.
"""

from __future__ import annotations

import contextlib
import functools
import time

__all__ = ["step_timeline", "format_timeline"]


@contextlib.contextmanager
def _recording(events: list):
    """Record the CPU backend's parts and the layer's backward as ``(label, perf_counter())``
    in ``events``."""
    from kernrnn.backends.cpu import timing
    from kernrnn.layer import RNN

    def mark(label):
        events.append((label, time.perf_counter()))

    backward = RNN.__dict__.get("backward")
    if backward is None:  # fail loudly rather than time a call without its backward
        raise RuntimeError("kernrnn.RNN has no method 'backward' of its own: "
                           "update kernrnn/bench/timeline.py")

    @functools.wraps(backward)
    def layer_backward(*args, **kwargs):
        mark("layer backward start")
        try:
            return backward(*args, **kwargs)
        finally:
            mark("layer backward end")

    RNN.backward = layer_backward
    try:
        with timing.recording(mark):
            yield
    finally:
        RNN.backward = backward


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
