"""Numba compiles with Python's cyclic garbage collector paused.

A Numba compile builds and drops hundreds of thousands of small objects (IR
nodes, type-inference constraints, LLVM wrappers).  They trip the collector's
allocation thresholds again and again, and each full collection walks every
object the compile holds.  On the 2-core development machine, fresh processes
with empty kernel caches, off and on alternating (``python -m
benchmarks.compile_cost --switch gc``): the CPU kernels of a training step of
lstm, gru, cifg and janet 33.6 -> 31.3 s, their CUDA kernels' PTX 6.5 -> 5.9 s
(process start and imports, about 3 s, included in both).

:func:`install` registers a listener for Numba's compiler-lock events (and
numba-cuda's, :func:`install_cuda`): while any thread holds or waits for the
compiler lock, the collector is paused; when the last one lets go, it is
switched back on if it was on before.  Reference counting still frees what
it can, so what waits is only the compile's cyclic garbage (about 70 MB more
at the peak for that compile), collected by the collector's next run after
the compile.  The collector's state between compiles is the user's: one
switched off before a compile stays off after it.

It acts on every Numba compile in the process, a user's own ``@njit``
functions too.  ``KERNRNN_PAUSE_GC=0`` in the environment leaves the
collector alone.
"""

from __future__ import annotations

import gc
import os
import threading

__all__ = ["install", "install_cuda", "enabled"]

_lock = threading.Lock()
_depth = 0  # threads in (or waiting for) a compiler lock, each nesting counted
_was_enabled = False  # the collector's state when the first of them came
_installed: set = set()  # "numba" and/or "numba-cuda"


def enabled() -> bool:
    """False when ``KERNRNN_PAUSE_GC=0`` asks to leave the collector alone."""
    return os.environ.get("KERNRNN_PAUSE_GC", "1").strip() != "0"


def _enter() -> None:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1


def _leave() -> None:
    global _depth
    with _lock:
        if _depth == 0:  # an end without its start (a listener installed mid-compile)
            return
        _depth -= 1
        if _depth == 0 and _was_enabled:
            gc.enable()


def _listener(event_module):
    """A listener for ``event_module`` (Numba's or numba-cuda's: each has its own
    ``Listener`` base class, so the class is made per module)."""
    class _PauseGC(event_module.Listener):
        """Pauses the collector from a compiler lock's start event to its end event."""

        def on_start(self, event):
            _enter()

        def on_end(self, event):
            _leave()

    return _PauseGC()


def _install(name: str, event_module, kind: str) -> None:
    with _lock:
        if name in _installed or not enabled():
            return
        _installed.add(name)
    event_module.register(kind, _listener(event_module))


def install() -> None:
    """Pause the collector during Numba's (CPU) compiles; once per process."""
    from numba.core import event

    _install("numba", event, "numba:compiler_lock")


def install_cuda() -> None:
    """The same for numba-cuda's compiles (its own compiler lock and events); a no-op
    with a numba-cuda that has neither."""
    try:
        from numba.cuda.core import event
    except ImportError:
        return
    if "numba-cuda:compiler_lock" in getattr(event, "_builtin_kinds", ()):
        _install("numba-cuda", event, "numba-cuda:compiler_lock")
