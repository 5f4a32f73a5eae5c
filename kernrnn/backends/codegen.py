"""Source generation shared by the backends.

Cells are arbitrary (G gates, S state components, K saved values), while
Numba's PTX compiler needs tuple indices known at compile time.  So the core
writes each kernel's source for the cell at hand, with every gate, state and
saved index unrolled, and compiles it.  The per-element body is written here
once; the CPU and CUDA kernels wrap it in their own loops.

Generated modules are written to the kernel cache directory
(:mod:`kernrnn.backends.kernel_cache`) so Numba's on-disk cache applies; the
file name hashes the kernel source *and* the cell's retyped math, so editing a
cell never reuses a stale kernel.
"""

from __future__ import annotations

import hashlib

from kernrnn.backends import kernel_cache
from kernrnn.scalar import math_fingerprint

__all__ = ["tup", "forward_body", "backward_body", "load_module", "cell_fingerprint"]


def tup(items) -> str:
    """Python source of a tuple literal (a 1-tuple keeps its comma)."""
    items = list(items)
    if len(items) == 1:
        return f"({items[0]},)"
    return "(" + ", ".join(items) + ")"


def forward_body(G, S, K, *, xw, hu, prev, new, saved, y, indent) -> str:
    """Per-element forward step.

    ``xw(g)``, ``hu(g)``, ``prev(s)`` return source expressions that load a
    value; ``new(s)``, ``saved(k)``, ``y`` give assignment targets (``saved``
    may be None for inference, ``y`` None when there is no output array).
    """
    pad = " " * indent
    lines = [
        f"xw_ = {tup(xw(g) for g in range(G))}",
        f"hu_ = {tup(hu(g) for g in range(G))}",
        f"prev_ = {tup(prev(s) for s in range(S))}",
        "st_, sv_ = cell_forward(xw_, hu_, prev_)",
    ]
    lines += [f"{new(s)} = st_[{s}]" for s in range(S)]
    if saved is not None:
        lines += [f"{saved(k)} = sv_[{k}]" for k in range(K)]
    if y is not None:
        lines.append(f"{y} = st_[0]")
    return "\n".join(pad + line for line in lines)


def backward_body(G, S, K, *, saved, prev, dstate, dxw, dhu, dprev, indent) -> str:
    """Per-element backward step (same conventions as :func:`forward_body`)."""
    pad = " " * indent
    lines = [
        f"sv_ = {tup(saved(k) for k in range(K))}" if K else "sv_ = ()",
        f"prev_ = {tup(prev(s) for s in range(S))}",
        f"ds_ = {tup(dstate(s) for s in range(S))}",
        "dxw_, dhu_, dprev_ = cell_backward(sv_, prev_, ds_)",
    ]
    lines += [f"{dxw(g)} = dxw_[{g}]" for g in range(G)]
    lines += [f"{dhu(g)} = dhu_[{g}]" for g in range(G)]
    lines += [f"{dprev(s)} = dprev_[{s}]" for s in range(S)]
    return "\n".join(pad + line for line in lines)


def cell_fingerprint(cell) -> str:
    """A hash of everything in a cell that ends up in compiled code."""
    h = hashlib.sha256()
    for fn in (cell.forward, cell.backward):
        h.update(math_fingerprint(fn).encode())
    h.update(f"{cell.name}|{cell.n_gates}|{cell.n_state}|{cell.n_saved}".encode())
    return h.hexdigest()[:16]


def _cache_dir():
    """The kernel cache directory in use (see :mod:`kernrnn.backends.kernel_cache`)."""
    return kernel_cache.cache_dir()


def load_module(source: str, tag: str, namespace: dict):
    """Execute generated ``source`` as a module whose file lives in the kernel cache.

    ``namespace`` (the cell's compiled scalar functions, numpy, ...) is put in
    the module's globals first.  Loading is thread-safe, never imports byte
    code, and refuses cache directories other users can write; see
    :mod:`kernrnn.backends.kernel_cache`.
    """
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return kernel_cache.load_module(source, f"kernrnn_gen_{tag}_{digest}", namespace)
