"""Scratch arrays reused from one kernel call to the next.

A forward or backward call needs large buffers: the states of every step,
the gate values saved for BPTT, the pre-activation gradients (tens of MB at
B = 32, T = 100, H = 256).  Taken fresh from ``np.empty`` at every call they
often come back from the C library as new pages, which the kernel then faults
in and the OS zeroes on first touch: glibc hands large freed blocks back to
the system.  Measured on a training step (T=100, I=H=256, B=32, 2 threads),
that was 11% of an LSTM's time and 20% of a CIFG's (with the C library told
to keep its memory: 65.0 -> 57.8 ms and 56.9 -> 45.7 ms).

:class:`Workspace` keeps the buffers the backend knows nobody uses any more
(a backward's gradients of the pre-activations after its GEMMs, an inference
forward's states, a training forward's buffers once the layer's backward has
consumed them) and hands them out again for the same shape and dtype.  Only
buffers the backend allocated and never showed to a caller go back.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

__all__ = ["Workspace", "workspace"]


class Workspace:
    """Free arrays by ``(shape, dtype)``: at most ``max_arrays`` of them and ``max_bytes``
    in all (the oldest dropped first), none under ``min_bytes``.  Shapes must match
    exactly, so calls whose shapes keep changing (a new T every batch) gain nothing
    and the oldest buffers just make room.

    :meth:`take` returns an array with undefined contents, like ``np.empty``;
    :meth:`give` puts arrays back that no one reads or writes any more.
    Thread-safe: an array is in the free lists at most once and handed to one
    caller at a time.
    """

    def __init__(self, max_bytes: int = 512 << 20, min_bytes: int = 4096,
                 max_arrays: int = 64):
        self.max_bytes = max_bytes
        self.max_arrays = max_arrays  # also bounds take()'s scan
        self.min_bytes = min_bytes  # smaller arrays: malloc reuses them anyway
        self._free: OrderedDict = OrderedDict()  # id -> array, oldest first
        self._lock = threading.Lock()
        self._bytes = 0

    def take(self, shape, dtype) -> np.ndarray:
        """A free array of exactly ``shape`` and ``dtype``, else a new ``np.empty`` one."""
        shape = tuple(int(n) for n in shape)
        dtype = np.dtype(dtype)
        with self._lock:
            for key, a in self._free.items():
                if a.shape == shape and a.dtype == dtype:
                    del self._free[key]
                    self._bytes -= a.nbytes
                    return a
        return np.empty(shape, dtype=dtype)

    def give(self, *arrays) -> None:
        """Put back arrays nobody uses any more; views, small and read-only arrays are
        left alone."""
        with self._lock:
            for a in arrays:
                # only whole, owned arrays (a view would pin another array's memory)
                if (not isinstance(a, np.ndarray) or a.base is not None or a.nbytes < self.min_bytes
                        or not a.flags.writeable or id(a) in self._free):
                    continue
                self._free[id(a)] = a
                self._bytes += a.nbytes
            while self._free and (self._bytes > self.max_bytes
                                  or len(self._free) > self.max_arrays):
                _, old = self._free.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        """Drop every free array (their memory goes back to the allocator)."""
        with self._lock:
            self._free.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held in free arrays."""
        return self._bytes


workspace = Workspace()
