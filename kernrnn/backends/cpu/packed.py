"""Where a fused forward's packed weight panels come from.

An inference forward reuses the panels of unchanged weights
(:class:`PackedWeights`, :func:`inference_panels`); a training forward packs
fresh ones on its kernel threads, each thread its share, in the same task as
its forward (:func:`training_panels`), and keeps ``W_hh``'s backward panels
for BPTT.
"""

from __future__ import annotations

import threading

import numpy as np

from kernrnn.backends.cpu import microkernel as mk
from kernrnn.backends.cpu.build import FusedKernels, precompile
from kernrnn.backends.cpu.kernel_args import PACK_TRAINING
from kernrnn.backends.cpu.workspace import workspace

__all__ = ["PackedWeights", "inference_panels", "training_panels"]


class PackedWeights:
    """Packed panels of recently used weight matrices, reused while the weights are unchanged.

    Packing ``W_ih`` and ``W_hh`` is a visible part of a small forward (LSTM,
    H = 256: about 0.35 ms against a 1.3 ms forward at B = 1; nearly all of a
    T = 1 call, as in autoregressive sampling).  An entry keeps a copy of the
    matrix it was packed from, and is used only when the matrix passed now
    is bit for bit equal to that copy (compared as integers, so NaN and -0.0
    count too): arrays changed in place, or a new array at a recycled
    address, are packed afresh.  The comparison reads both matrices once
    (about a sixth of packing them).  Only inference forwards use it (an
    optimiser changes the weights between training steps).  At most
    ``max_entries`` matrices and ``max_bytes`` of copies and panels are kept,
    the least recently used going first.
    """

    def __init__(self, max_entries: int = 16, max_bytes: int = 256 << 20):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: dict = {}  # key -> (copy of W, panels); insertion order = recency
        self._lock = threading.Lock()

    def get(self, f: FusedKernels, W, n_gates: int, H: int):
        W = np.ascontiguousarray(W)
        key = (id(W), W.shape, W.dtype.str, n_gates, H, f.nu)
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None and _same_bits(f, entry[0], W):
            with self._lock:
                self._entries[key] = entry
            return entry[1]
        packed = f.pack_forward(W, n_gates, H)
        with self._lock:
            self._entries[key] = (W.copy(), packed)
            while self._entries and (len(self._entries) > self.max_entries or sum(
                    a.nbytes + b.nbytes for a, b in self._entries.values()) > self.max_bytes):
                self._entries.pop(next(iter(self._entries)))
        return packed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _same_bits(f: FusedKernels, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the C-contiguous ``a`` and ``b`` hold the same values bit for bit (so a
    NaN equals itself and -0.0 differs from 0.0: the panels are exactly ``b``'s)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.size == 0:
        return True
    ints = np.dtype(f"u{a.dtype.itemsize}")
    return bool(f.same_bits(a.reshape(-1).view(ints), b.reshape(-1).view(ints)))


_packed_weights = PackedWeights()


def inference_panels(f: FusedKernels, cell, params, H: int):
    """``(Wp, Wxp)``: the forward panels of ``W_hh`` and ``W_ih``, reused while unchanged."""
    return (_packed_weights.get(f, params["weight_hh"], cell.n_recurrent_gates, H),
            _packed_weights.get(f, params["weight_ih"], cell.n_gates, H))


def training_panels(f: FusedKernels, cell, params, H: int, dtype):
    """``(Wp, Wxp, Wb, prepare)``: buffers for a training forward's panels (forward
    ``W_hh``, ``W_ih``, backward ``W_hh``), and the ``prepare`` of
    :func:`~kernrnn.backends.cpu.threads.run_fused` that gives each thread its share of
    the packing (:func:`~kernrnn.backends.cpu.fused_source.pack_training_source`)."""
    nb, nu = -(-H // f.nu), f.nu
    G, Gr = cell.n_gates, cell.n_recurrent_gates
    Whh = np.ascontiguousarray(params["weight_hh"])
    Wih = np.ascontiguousarray(params["weight_ih"])
    Wp = workspace.take((nb, H, Gr * nu), dtype)
    Wxp = workspace.take((nb, Wih.shape[1], G * nu), dtype)
    Wb = workspace.take((nb, Gr * H, nu), dtype)

    def prepare(parts):
        if parts[0].nthr > 1:  # unit split: each thread reads only its own unit blocks
            ranges, meet = [(part.jb0, part.jb1) for part in parts], 1
        else:  # row split: every thread reads every panel, so they share and then meet
            n = len(parts)
            ranges, meet = [(c * nb // n, (c + 1) * nb // n) for c in range(n)], n
        flags = np.zeros(meet * mk.FLAG_STRIDE, dtype=np.int64)
        shared = {"Whh": Whh, "Wih": Wih, "Gr": Gr, "G": G, "H": H, "nu": nu, "Wp": Wp,
                  "Wxp": Wxp, "Wb": Wb, "flags": flags, "nthr": meet}
        calls = [(f.pack_training, PACK_TRAINING.pack(shared, jb0=jb0, jb1=jb1,
                                                      tid=c if meet > 1 else 0))
                 for c, (jb0, jb1) in enumerate(ranges)]
        precompile(f.pack_training, calls[0][1])
        return calls

    return Wp, Wxp, Wb, prepare

