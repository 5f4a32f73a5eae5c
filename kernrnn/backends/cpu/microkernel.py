"""Register-blocked GEMM tiles for the recurrent products, and the step barrier.

The per-step recurrent product ``h_{t-1} @ W_hh.T`` is small (B rows) and
runs T times on the same ``W_hh``.  BLAS repacks ``W_hh`` at every call and
is tuned for large operands; here ``W_hh`` is packed *once per call* into
column panels (:func:`pack_forward`, :func:`pack_backward`) and every step
runs a generated tile function (:func:`tile_source`) that keeps an
``MR x NR`` block of the product in registers.  The forward kernels put the
cell's pointwise step right behind each tile (the "epilogue"), so the
recurrent pre-activations only ever live in a small tile in L1.

How the tile vectorises: its source spells out one scalar accumulator per
element of the block and, per ``k``, ``MR`` loads of ``A`` and ``NR``
contiguous loads of the packed panel; LLVM's SLP vectoriser turns each run of
16 (float32) accumulators into one zmm register and the products into FMAs
(``fastmath={"contract"}``; no reassociation, so each element still sums
over ``k`` in order).  Numba leaves the SLP vectoriser off by default, so the
modules that hold tiles are compiled with it on (:func:`compile_with_slp`).
Check with ``dispatcher.inspect_asm()``: ``vfmadd...ps`` on ``zmm`` (or
``ymm``) registers.  Row ranges are covered by full tiles and, for the last
rows, tiles of smaller heights (:func:`row_tiles_source`), so every row of a
tile is stored and a short remainder does not stream the panel once per row.

The step barrier (:func:`barrier_source`) lets threads that split one step's
hidden units between them meet once per step without the GIL: each thread
publishes the number of steps it finished with a release store and waits for
the others with acquire loads (``pause`` between polls on x86, then
``sched_yield`` once it has waited about 0.1 ms).
"""

from __future__ import annotations

import contextlib
import platform
import threading

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

__all__ = ["block_shape", "tail_heights", "row_tiles_source", "tile_source", "tile_name",
           "pack_forward", "pack_backward", "pack_source", "compile_with_slp", "barrier_source"]

VECTOR_BYTES = 64  # one AVX-512 register; on AVX2 LLVM uses two ymm per block column
ACCUMULATOR_VECTORS = 16  # registers for the tile, of 32 (AVX-512): room for loads
FLAG_STRIDE = 8  # int64 slots between two threads' flags: one cache line each


def block_shape(n_panel_vectors: int, itemsize: int) -> tuple[int, int]:
    """``(MR, NU)``: tile rows and units per panel for ``n_panel_vectors`` gate blocks.

    A panel holds ``NU`` units (one vector register of the dtype) of each of
    the ``n_panel_vectors`` recurrent gates, so a tile is ``MR x (NU * n)``;
    ``MR`` is the largest power of two (at most 8) whose tile fits in
    ``ACCUMULATOR_VECTORS`` registers: a power of two divides the 16-row
    groups of the forward kernels, so no group ends in a short tile (3-gate
    cells: 4 rows rather than 5, measured 13.2 against 13.7 ms for a GRU or
    CIFG forward at B=32, H=256).
    """
    nu = VECTOR_BYTES // itemsize
    fit = max(1, ACCUMULATOR_VECTORS // max(1, n_panel_vectors))
    mr = min(8, 1 << (fit.bit_length() - 1))
    return mr, nu


def tail_heights(mr: int, exact: bool) -> tuple[int, ...]:
    """Heights of the tiles that cover the last ``< mr`` rows of a row range.

    Every row of a tile streams the same panel, so a short remainder is best
    covered by few tiles: ``exact`` gives one tile of each height ``mr-1 .. 1``
    (one pass for any remainder), otherwise the powers of two below ``mr``
    (at most ``log2(mr)`` passes, fewer tiles to compile).
    """
    if exact:
        return tuple(range(mr - 1, 0, -1))
    return tuple(h for h in (32, 16, 8, 4, 2, 1) if h < mr)


def row_tiles_source(mr: int, nr: int, tails, lo: str, hi: str, call) -> str:
    """Source that covers rows ``lo:hi`` with ``mr``-row tiles, the rest with ``tails``.

    ``call(name, i0)`` gives the source of one tile call for rows from ``i0``
    with ``i1 = hi`` (a tile of height ``h`` then stores ``min(h, hi - i0)``
    rows).  The remainder is taken greedily by the tail heights (descending,
    ending in 1), so no tile computes rows it does not store.
    """
    lines = [f"i0 = {lo}", f"while {hi} - i0 >= {mr}:",
             "    " + call(tile_name(mr, nr), "i0"), f"    i0 += {mr}"]
    for h in tails:
        lines += [f"if {hi} - i0 >= {h}:", "    " + call(tile_name(h, nr), "i0"), f"    i0 += {h}"]
    return "\n".join(lines)


def tile_name(mr: int, nr: int) -> str:
    return f"tile_{mr}x{nr}"


def tile_source(mr: int, nr: int, nu: int) -> str:
    """Source of ``tile_{mr}x{nr}(A, i0, i1, Wp, jb, C, c_row, c_col, c_gate)``.

    ``C[c_row + r, c_col + g*c_gate + u] = sum_k A[i0 + r, k] * Wp[jb, k, g*nu + u]``
    for rows ``r < min(mr, i1 - i0)`` and panel column ``g*nu + u < nr``: the
    panel's gate blocks land ``c_gate`` columns apart, so the tile writes
    straight into a row layout ``[rows, G*Hpad]`` (``Hpad`` = H padded to whole
    panels).  Needs ``ZERO`` in the module's globals.  Rows past ``i1`` load
    row ``i1 - 1`` (no branches in the k loop) and are not stored.
    """
    name = tile_name(mr, nr)
    lines = [
        '@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})',
        f"def {name}(A, i0, i1, Wp, jb, C, c_row, c_col, c_gate):",
        f'    """{mr} rows x {nr} columns of A[i0:i1] @ Wp[jb], into C (see tile_source).',
        "",
        f"    Blocking: the {mr} x {nr} accumulators stay in registers for the",
        f"    whole k loop; per k it broadcasts one value of each of the {mr} rows of",
        f"    A and loads {nr} contiguous values of the panel Wp[jb, k] (one vector",
        "    per 16 float32), then does the products as FMAs.  Only the panel",
        "    streams from cache; the block is stored once at the end.",
        '    """',
        "    K = A.shape[1]",
        "    last = i1 - 1",
        "    nrow = i1 - i0",
    ]
    lines += [f"    r{r} = min(i0 + {r}, last)" for r in range(mr)]
    lines += [f"    c{r}_{n} = ZERO" for r in range(mr) for n in range(nr)]
    lines.append("    for k in range(K):")
    lines += [f"        a{r} = A[r{r}, k]" for r in range(mr)]
    lines += [f"        w{n} = Wp[jb, k, {n}]" for n in range(nr)]
    lines += [f"        c{r}_{n} += a{r} * w{n}" for r in range(mr) for n in range(nr)]
    # Offsets that are provably >= 0 let LLVM drop Numba's negative-index
    # select, so each gate's nu stores are contiguous and the accumulators
    # stay vectors (else the SLP vectoriser splits them up at every k).
    lines.append("    row0 = max(c_row, 0)")
    lines += [f"    o{g} = max(c_col + {g} * c_gate, 0)" for g in range(-(-nr // nu))]
    for r in range(mr):
        pad = "    "
        if r > 0:
            lines.append(f"    if nrow > {r}:")
            pad = "        "
        lines += [f"{pad}C[row0 + {r}, o{n // nu} + {n % nu}] = c{r}_{n}" for n in range(nr)]
    return "\n".join(lines) + "\n"


def pack_forward(W, n_gates: int, H: int, nu: int):
    """``W [G*H, K]`` (``W_hh``, or ``W_ih`` with K = I) as panels ``[NB, K, G*nu]`` for ``a @ W.T``.

    ``Wp[jb, k, g*nu + u] = W[g*H + jb*nu + u, k]``: panel ``jb`` holds the
    ``G`` gate columns of units ``jb*nu .. jb*nu + nu - 1`` (zero past ``H``),
    so one tile of a panel gives every gate of those units for the epilogue.
    """
    nb = -(-H // nu)
    K = W.shape[1]
    W3 = np.zeros((n_gates, nb * nu, K), dtype=W.dtype)
    W3[:, :H] = W.reshape(n_gates, H, K)
    return np.ascontiguousarray(
        W3.reshape(n_gates, nb, nu, K).transpose(1, 3, 0, 2).reshape(nb, K, n_gates * nu))


def pack_source() -> str:
    """Source of ``pack_panels(W, G, H, nu, out, jb0, jb1)``: panels ``jb0:jb1`` of
    :func:`pack_forward`'s layout, compiled (and ``pack_panels_backward(W, H, nu, out, jb0,
    jb1)``: :func:`pack_backward`'s).

    The NumPy version pads, transposes and copies (three passes over ``W``);
    this one reads each row of ``W`` once and writes its column of the panel
    (1.7-3x faster at H = 256-512; packing runs at every call, so it is a
    visible part of a small-batch forward).  A panel range, so the kernel
    threads can share the packing.
    """
    return '''
@numba.njit(cache=True, nogil=True, error_model="numpy")
def pack_panels(W, G, H, nu, out, jb0, jb1):
    """out[jb, k, g*nu + u] = W[g*H + jb*nu + u, k] (zero past H) for jb0 <= jb < jb1."""
    K = W.shape[1]
    for jb in range(jb0, jb1):
        for g in range(G):
            for u in range(nu):
                j = jb * nu + u
                c = g * nu + u
                if j < H:
                    row = W[g * H + j]
                    for k in range(K):
                        out[jb, k, c] = row[k]
                else:
                    for k in range(K):
                        out[jb, k, c] = 0


@numba.njit(cache=True, nogil=True, error_model="numpy")
def pack_panels_backward(W, H, nu, out, jb0, jb1):
    """out[jb, k, u] = W[k, jb*nu + u] (zero past H) for jb0 <= jb < jb1."""
    for k in range(W.shape[0]):
        row = W[k]
        for jb in range(jb0, jb1):
            for u in range(nu):
                j = jb * nu + u
                out[jb, k, u] = row[j] if j < H else 0
'''


def pack_backward(W, H: int, nu: int):
    """``W_hh [G*H, H]`` as panels ``[NB, G*H, nu]`` for ``dHU @ W_hh`` (not transposed).

    ``Wp[jb, k, u] = W_hh[k, jb*nu + u]`` (zero past ``H``).
    """
    nb = -(-H // nu)
    GH = W.shape[0]
    Wz = np.zeros((GH, nb * nu), dtype=W.dtype)
    Wz[:, :H] = W
    return np.ascontiguousarray(Wz.reshape(GH, nb, nu).transpose(1, 0, 2))


_slp_lock = threading.Lock()


@contextlib.contextmanager
def compile_with_slp():
    """Numba's SLP vectoriser on while the block runs (kernels compiled inside get it).

    Numba reads ``config.SLP_VECTORIZE`` when it builds the optimisation
    passes of each compilation, so this scopes the setting to the kernels
    compiled here; other Numba code in the process keeps Numba's default.
    """
    with _slp_lock:
        before = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1
        try:
            yield
        finally:
            numba.config.SLP_VECTORIZE = before


# -- the step barrier ------------------------------------------------------------


@intrinsic
def atomic_load(typingctx, arr, idx):
    """``arr[idx]`` of an int64 array as an acquire load (never hoisted out of a loop)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(arr, idx), codegen


@intrinsic
def atomic_store(typingctx, arr, idx, val):
    """``arr[idx] = val`` of an int64 array as a release store."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, ptr, "release", 8)
        return context.get_dummy_value()

    return types.none(arr, idx, val), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@intrinsic
def spin_pause(typingctx):
    """The CPU's spin-wait hint (``pause`` on x86, nothing elsewhere)."""

    def codegen(context, builder, sig, args):
        if _X86:  # LLVM's intrinsic (Numba's JIT has no inline-assembly parser)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


_POSIX = platform.system() in ("Linux", "Darwin") or platform.system().endswith("BSD")


@intrinsic
def yield_core(typingctx):
    """Give the core to another runnable thread (``sched_yield``; nothing where absent).

    Called as an external symbol of the C library (resolved when the JIT
    links the kernel), so kernels that use it stay cacheable.
    """

    def codegen(context, builder, sig, args):
        if _POSIX:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


SPINS_BEFORE_YIELD = 4000  # about 0.1 ms of ``pause`` (Zen 4: ~65 cycles each)


def barrier_source() -> str:
    """Source of ``step_barrier(flags, tid, nthr, done)``: wait until every thread finished ``done`` steps.

    Spins (``pause``) for about 0.1 ms, then yields the core at every poll:
    on a loaded machine the partner may be waiting for this very core, and a
    thread that keeps spinning there stalls both for a whole scheduler time
    slice per step (measured: LSTM B=1 forward at load 3.4, 400 ms instead of
    2 ms).
    """
    return f'''
@numba.njit(cache=True, nogil=True)
def step_barrier(flags, tid, nthr, done):
    """Publish that this thread finished ``done`` steps, then wait for the others."""
    atomic_store(flags, tid * FLAG_STRIDE, done)
    for o in range(nthr):
        if o != tid:
            spins = 0
            while atomic_load(flags, o * FLAG_STRIDE) < done:
                if spins < {SPINS_BEFORE_YIELD}:
                    spins += 1
                    spin_pause()
                else:
                    yield_core()
'''
