"""Cheaper Numba-IR inlining of kernrnn's math into CUDA kernels.

Every kernel inlines the cell's math, its helpers (``sigmoid``, ``tanh``, ...)
and the Philox draws at Numba IR level (:mod:`kernrnn.scalar`,
:mod:`kernrnn.philox`), and a cell's math goes into a dozen CUDA kernels.  At
every such site numba-cuda's inliner redoes two things whose result is the
same each time:

1. it runs the callee's untyped passes again (byte code to canonical IR,
   with the callee's own inlines), and
2. it copies the callee's IR one block at a time, each block with a fresh
   memo, so every block's copy deep-copies the function's whole variable scope
   (NVIDIA/numba-cuda#688 describes the same cost).

For the functions registered here (:func:`register`: kernrnn's, never a
user's own Numba functions) :func:`install` makes numba-cuda's inliner keep
the canonical IR of each function per target and compiler flags (the inliner
copies it before it changes anything) and copy all blocks of a callee with
one memo, so the scope and each variable are copied once per inline
(``_InlinerCopy``).  The PTX is the same as before
(``tests/test_numba_inline.py``).  Measured on the 2-core development machine
(``python -m benchmarks.compile_cost --switch inline --what ptx``): the PTX of every CUDA kernel of four
cells 11.6 -> 9.0 s, ``tests/test_ptx.py`` 75.1 -> 63.6 s.  Numba's CPU
inliner is left as it is: the same change there measured no gain (the CPU
kernels of a training step of the four cells, 78.1 s with Numba's inliner,
80.5 s with this one).

``KERNRNN_FAST_INLINE=0`` in the environment leaves numba-cuda's inliner as it is.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import threading
import weakref

__all__ = ["register", "install", "enabled", "numba_inliner"]

_registered: weakref.WeakSet = weakref.WeakSet()  # the plain Python functions
_ir_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # function -> {key: IR}
_lock = threading.Lock()
_installed = False
_state = threading.local()
_off = False  # numba_inliner() sets it


def enabled() -> bool:
    """False when ``KERNRNN_FAST_INLINE=0`` asks for numba-cuda's inliner unchanged."""
    return os.environ.get("KERNRNN_FAST_INLINE", "1").strip() != "0"


@contextlib.contextmanager
def numba_inliner():
    """Compile with numba-cuda's own inliner inside the block (to compare with it)."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


def register(dispatcher):
    """Mark a Numba ``inline="always"`` dispatcher as kernrnn's (returns it unchanged)."""
    _registered.add(dispatcher.py_func)
    return dispatcher


def install() -> None:
    """Hook numba-cuda's inliner (called by :mod:`kernrnn.backends.cuda` once it has
    imported numba-cuda; calling it again is free).  Nothing changes for functions that
    were not registered, nor anywhere when numba-cuda is not the one this was written
    against."""
    global _installed
    if _installed or not enabled() or "numba.cuda" not in sys.modules:
        return  # (never imports numba-cuda for this)
    _installed = True
    try:
        from numba.cuda.core import inline_closurecall as module
    except ImportError:  # numba's own CUDA target, or another layout: its own inliner
        return
    worker = getattr(module, "InlineWorker", None)
    if (worker is None or getattr(module, "copy", None) is not copy
            or not callable(getattr(worker, "run_untyped_passes", None))
            or not callable(getattr(worker, "inline_ir", None))):
        return  # not the inliner this was written against: leave it as it is
    worker.run_untyped_passes = _memoised(worker.run_untyped_passes)
    worker.inline_ir = _one_memo_per_scope(worker.inline_ir)
    module.copy = _InlinerCopy()


def _memoised(run_untyped_passes):
    def wrapper(self, func, enable_ssa=False):
        if _off or func not in _registered:
            return run_untyped_passes(self, func, enable_ssa)
        # Numba's version sets this on the caller's flags before it runs; so do we.
        self.flags.enable_ssa = enable_ssa
        key = (type(self), type(self.targetctx), enable_ssa, self.flags.summary())
        with _lock:
            cached = _ir_cache.get(func, {}).get(key)
        if cached is not None:
            return cached
        func_ir = run_untyped_passes(self, func, enable_ssa)  # the inliner copies it: kept intact
        with _lock:
            _ir_cache.setdefault(func, {})[key] = func_ir
        return func_ir

    wrapper.__wrapped__ = run_untyped_passes
    return wrapper


class _InlinerCopy:
    """Stands in for the ``copy`` module inside numba-cuda's inliner.

    It copies a callee block by block, each with a fresh memo, so every
    block's copy deep-copies the whole variable scope again.  While a
    registered function is being inlined, the blocks that share a scope share
    one memo instead: one copy of the scope and of each variable, exactly what
    a deep copy of all blocks at once gives.  (Inlining a function copies its
    IR, then copies that copy; the two have different scopes, so they never
    share a memo.)  Everything else passes straight to :mod:`copy`.
    """

    def __getattr__(self, name):
        return getattr(copy, name)

    def deepcopy(self, x, memo=None):
        memos = getattr(_state, "memos", None)
        scope = getattr(x, "scope", None)
        if memos is None or memo is not None or scope is None or not hasattr(x, "body"):
            return copy.deepcopy(x, memo)
        return copy.deepcopy(x, memos.setdefault(id(scope), {}))


def _one_memo_per_scope(inline_ir):
    def wrapper(self, caller_ir, block, i, callee_ir, *args, **kwargs):
        func = getattr(getattr(callee_ir, "func_id", None), "func", None)
        if _off or func not in _registered:
            return inline_ir(self, caller_ir, block, i, callee_ir, *args, **kwargs)
        outer, _state.memos = getattr(_state, "memos", None), {}
        try:
            return inline_ir(self, caller_ir, block, i, callee_ir, *args, **kwargs)
        finally:
            _state.memos = outer

    wrapper.__wrapped__ = inline_ir
    return wrapper
