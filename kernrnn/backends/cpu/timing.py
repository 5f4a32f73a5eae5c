"""A hook that timestamps the CPU backend's parts, for ``kernrnn bench --timeline``.

Off unless :func:`recording` installs a recorder.  The backend then calls it
with a label as each part starts and ends: its ``forward`` and ``backward``,
the weight gradients and their GEMMs, each kernel thread's calls
(``caller``/``pool`` and the kernel's name) and the BLAS hold.  Switched off,
a part pays one global read.  The labels are the hook's interface: a renamed
function keeps them.
"""

from __future__ import annotations

import contextlib
import functools

__all__ = ["recording", "recorder", "mark", "span", "timed"]

_recorder = None  # callable(label: str), or None


def recorder():
    """The recorder in use, or None."""
    return _recorder


@contextlib.contextmanager
def recording(record):
    """Call ``record(label)`` at every part's start and end while the block runs."""
    global _recorder
    if _recorder is not None:
        raise RuntimeError("the CPU backend's timing hook is already recording")
    _recorder = record
    try:
        yield
    finally:
        _recorder = None


def mark(label: str) -> None:
    """Record ``label`` now (when recording)."""
    r = _recorder
    if r is not None:
        r(label)


@contextlib.contextmanager
def span(label: str):
    """Record ``label start`` and ``label end`` around the block (when recording)."""
    mark(label + " start")
    try:
        yield
    finally:
        mark(label + " end")


def timed(label: str):
    """Decorator: the function's calls are a :func:`span` ``label``."""
    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _recorder is None:
                return fn(*args, **kwargs)
            with span(label):
                return fn(*args, **kwargs)
        return wrapper
    return wrap
