"""CPU backend: Numba kernels for one layer and one direction.

Per layer and direction:

* forward: ``XW = x @ W_ih.T`` for all steps in one BLAS GEMM (NumPy, every
  core), then the whole time loop runs compiled.  Batch rows are independent
  for the entire sequence, so the batch is cut into one chunk per thread and
  each thread runs *all* T steps of its chunk: its rows of the recurrent GEMM
  ``h_{t-1} @ W_hh.T`` (single-threaded BLAS from inside Numba) and the cell's
  fused pointwise step, with both biases added there.  No synchronisation per
  step: the threads meet once per call.
* backward: the same split for BPTT (pointwise backward, bias-gradient sums,
  ``dh_{t-1} = dHU_t @ W_hh`` per chunk), then the weight gradients and ``dx``
  as large GEMMs over all T*B rows (multi-threaded BLAS again).

Who owns the cores: the chunks run on plain Python threads calling ``nogil``
kernels (no Numba threading layer, so no OpenMP pool spinning next to BLAS's
or PyTorch's), while BLAS is held to one thread; the big GEMMs outside the
time loops get every BLAS thread.  With one chunk (one thread, or a batch of
one) the loop runs in the caller with BLAS left as it is.
The BLAS limit is process-wide: layers called from several Python threads
at once still compute correctly, but may run BLAS multi-threaded inside the
loops (oversubscribed) while another call restores the limit.

Dense cells (:func:`fused_path`: a full ``W_hh``, no normalisation) take a
faster road: ``W_ih`` and ``W_hh`` are packed once per call into panels of 16
units (every gate of them), and each step runs register-blocked tiles
(:mod:`kernrnn.backends.cpu.microkernel`) for ``x_t @ W_ih.T`` and
``h_{t-1} @ W_hh.T`` with the cell's step right behind, on small row buffers
instead of the T-long ``XW`` and ``HU``, all on the kernel threads; BPTT's
``dHU_t @ W_hh`` uses the same kind of tiles on ``W_hh`` packed (not
transposed) in panels of output units.  ``FUSED = False`` sends dense cells
through the BLAS-per-step kernels again, for side-by-side measurements.
Small batches are weight-bound rather than FMA-bound: with one or two rows
per thread the input projection of all steps runs first, and for B <= 4 the
threads split either the rows or the hidden units, whichever the recent
calls measured faster (``SplitChooser``), in the forward and in BPTT.  The
weight-gradient GEMMs of long batches run on the kernel threads too
(one-thread BLAS each), so no BLAS worker is left spinning on the cores the
next forward needs.  The large scratch buffers come from a
:mod:`~kernrnn.backends.cpu.workspace` and go back to it when no longer
used (:func:`release` for a training forward's, once its backward ran), so
a training loop does not fault in and zero fresh pages at every step.

Array layouts (time-major): ``States[s, t', b, j]`` holds the state at time
boundary t' (``States[:, 0]`` is h0 for the forward direction,
``States[:, T]`` for the reverse one); ``Saved[k, t, b, j]`` the values the
cell saved for backward; gate g of unit j is column ``g*H + j`` of ``XW``,
``HU``, ``dXW``, ``dHU`` (PyTorch's row order of ``W_ih``), so the pointwise
loop over j reads G contiguous streams and vectorises.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numba
import numba.np.ufunc.parallel as _numba_parallel
import numpy as np

from kernrnn import regularization
from kernrnn.backends import common
from kernrnn.backends.codegen import (
    backward1_call,
    backward2_call,
    backward_call,
    cell_fingerprint,
    forward2_call,
    forward_call,
    hu_gates,
    load_module,
    math_namespace,
    row_norm,
    row_norm_backward,
    zoneout_backward,
    zoneout_stores,
)
from kernrnn.backends.cpu import microkernel as mk
from kernrnn.backends.cpu.workspace import workspace

__all__ = ["CpuKernels", "FusedKernels", "fused_path", "get_kernels", "ForwardContext", "forward",
           "backward", "release", "xp"]

xp = np  # the array module of this backend


def asarray(a) -> np.ndarray:
    """A C-contiguous NumPy array (no dtype change: callers checked it)."""
    return np.ascontiguousarray(a)


def lengths(lens: np.ndarray) -> np.ndarray:
    return lens


# -- generated kernels ----------------------------------------------------------
#
# One forward and one backward kernel per cell, written for the cell at hand:
# its recurrence form (dense, heads, none), per-unit parameters and
# normalisations decide which sections the source has.  Every kernel has the
# same arguments; arrays a cell does not use are one-element stand-ins.
# Element (b, j) of head hd is unit j = hd*dh + i, so the innermost loop over
# i reads contiguous memory and vectorises.


def _ind(text: str, n: int) -> str:
    pad = " " * n
    return "\n".join(pad + line if line else line for line in text.splitlines())


def _forward_source(cell, train: bool, reg=(False, False), proj=False) -> str:
    """All T steps of one direction for batch rows b0:b1 (see the module docstring).

    ``reg``: (recurrent dropout, zoneout) sections to generate.  ``proj``: an
    LSTMP projection inside the loop: after each step ``Hp[n] = States[0, n]
    @ W_hr.T`` (``WrT [H, P]``), which the next step's product and ``Y`` read.
    """
    rdrop, zone = reg
    S, Gr = cell.n_state, cell.n_recurrent_gates
    rec, rnorm = cell.has_recurrent, cell.recurrent_norm
    tt = "t" if (train and rnorm is not None) else "0"  # HU keeps every step only when needed
    tm = "t" if train else "0"  # Mid, Zhat, Rz keep every step only for training

    def hu(r):
        v = f"HU[{tt}, hd, b, {r} * dh + i]"
        if rnorm is not None:
            v += f" * g_hh[{r} * H + j]"
        return v + f" + b_hh[{r} * H + j]"

    def xw(g):
        return f"XW[t, b, {g} * H + j] + b_ih[{g} * H + j]"

    def prev(s):
        return f"States[{s}, p, b, j]"

    def new(s):
        return f"States[{s}, n, b, j]"

    def pp(i):
        return f"P[{i} * H + j]"

    saved = (lambda k: f"Saved[{k}, t, b, j]") if train else (lambda k: None)
    gates = hu_gates(cell, hu, "ZERO")
    elem = "for hd in range(NH):\n    for i in range(dh):\n        j = hd * dh + i"
    target = (lambda s: f"cand{s}") if zone else new  # zoneout decides after the step
    after = ("\n" + zoneout_stores(S, target, prev, new)) if zone else ""
    # the recurrent product's input: the masked h, the projected h or h
    h_in = "Hd" if rdrop else ("Hp[p]" if proj else "States[0, p]")
    y_store = "" if proj else "\n        Y[t, b, j] = States[0, n, b, j]"
    lines = []
    if cell.recurrent == "dense":  # contiguous operands: BLAS straight on the arrays
        lines.append(f"np.dot({h_in}[b0:b1], WT[0], HU[{tt}, 0, b0:b1])")
    elif rec:
        lines.append("for hd in range(NH):\n"
                     f"    np.dot(np.ascontiguousarray({h_in}[b0:b1, hd * dh:(hd + 1) * dh]), "
                     f"WT[hd], HU[{tt}, hd, b0:b1])")
    lines.append("for b in range(b0, b1):\n    if t < lengths[b]:")
    body = []
    if rnorm is not None:
        loops = ["for hd in range(NH):", "for i in range(dh):"]
        value = f"HU[{tt}, hd, b, r * dh + i]"
        if rnorm.over == "gate":
            body.append(f"for r in range({Gr}):\n" + _ind(row_norm(
                rnorm.kind, loops, value, "H", f"Rhh[{tt}, b, r]", indent=0, prefix="n_"), 4))
        else:
            body.append(row_norm(rnorm.kind, [f"for r in range({Gr}):"]
                                 + loops, value, f"{Gr} * H",
                                 f"Rhh[{tt}, b, 0]", indent=0, prefix="n_"))
    if not cell.normalize:
        step = forward_call(cell, xw=xw, hu=lambda g: gates[g], prev=prev, p=pp,
                            z_or_new=target, saved_or_mid=saved, indent=0) + after
        body.append(elem + "\n" + _ind(step, 8) + y_store)
    else:
        st1 = forward_call(cell, xw=xw, hu=lambda g: gates[g], prev=prev, p=pp,
                           z_or_new=lambda k: f"Zhat[{k}, {tm}, b, j]",
                           saved_or_mid=lambda m: f"Mid[{m}, {tm}, b, j]", indent=0)
        body.append(elem + "\n" + _ind(st1, 8))
        for k in range(cell.n_norm):
            body.append(row_norm(cell.normalize_kind, ["for j in range(H):"],
                                 f"Zhat[{k}, {tm}, b, j]", "H", f"Rz[{k}, {tm}, b]", indent=0,
                                 prefix=f"z{k}_"))
        st2 = forward2_call(cell, zn=lambda k: f"(Zhat[{k}, {tm}, b, j] * Gz[{k} * H + j] + "
                                               f"Bz[{k} * H + j])",
                            mid=lambda m: f"Mid[{m}, {tm}, b, j]", prev=prev, p=pp, new=target,
                            saved=saved, indent=0) + after
        body.append(elem + "\n" + _ind(st2, 8) + y_store)
    lines.append(_ind("\n".join(body), 8))
    carry = "\n".join(f"            States[{s}, n, b, j] = States[{s}, p, b, j]"
                      for s in range(S)) + ("" if proj else "\n            Y[t, b, j] = 0")
    lines.append(f"    else:\n        for j in range(H):\n{carry}")
    if proj:  # project the new h; a finished row keeps its projected h
        lines.append("np.dot(States[0, n, b0:b1], WrT, Hp[n, b0:b1])\n"
                     "for b in range(b0, b1):\n    if t < lengths[b]:\n"
                     "        for k in range(Hp.shape[2]):\n            Y[t, b, k] = Hp[n, b, k]\n"
                     "    else:\n        for k in range(Hp.shape[2]):\n"
                     "            Hp[n, b, k] = Hp[p, b, k]\n            Y[t, b, k] = 0")
    if rdrop:  # the next step's recurrent input: this step's h, masked
        lines.append("    for j in range(H):\n        Hd[b, j] = States[0, n, b, j] * Mr[b, j]")
    loop = _ind("\n".join(lines), 8)
    name = "forward_train" if train else "forward_infer"
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
def {name}(XW, b_ih, WT, b_hh, g_hh, P, Gz, Bz, States, Saved, Mid, Zhat, Rz, HU, Rhh, Y,
           lengths, reverse, Mr, Hd, Zthr, Zp, seed_lo, seed_hi, zstream, ztrain, WrT, Hp,
           b0, b1):
    """All T steps for batch rows b0:b1 (with recurrent dropout ``Hd`` holds the masked
    previous h, filled for the first step by the caller)."""
    T = XW.shape[0]
    H = States.shape[3]
    NH = HU.shape[1]
    dh = H // NH
    for step in range(T):
        if reverse:
            t = T - 1 - step
            p = t + 1
            n = t
        else:
            t = step
            p = t
            n = t + 1
{loop}
'''


def fused_path(cell) -> bool:
    """True when the cell runs on packed-``W_hh`` tiles with the step in the epilogue.

    Dense recurrence without normalisations (those need whole rows of the
    products before the step), and few enough gates that a tile of one unit
    block fits the registers.
    """
    return (cell.recurrent == "dense" and cell.input_norm is None and cell.recurrent_norm is None
            and not cell.normalize and 1 <= cell.n_recurrent_gates <= 6 and cell.n_gates <= 6)


def _fused_forward_source(cell, train: bool, mr: int, mrx: int, nu: int,
                          reg=(False, False)) -> str:
    """All T steps for rows b0:b1 and unit blocks jb0:jb1, on packed ``W_ih``/``W_hh`` panels.

    Per step, rows go in groups of about 16 (``RG``): for each of the
    thread's unit blocks (``nu`` units, every gate) the
    :mod:`~kernrnn.backends.cpu.microkernel` tiles write ``x_t @ W_ih.T``
    (``mrx`` rows a tile) and ``h_{t-1} @ W_hh.T`` (``mr`` rows) of the group
    into small row buffers ``XWr [RG, G*Hp]`` and ``HUr [RG, Gr*Hp]`` (L1/L2,
    never a T-long ``XW`` or ``HU``; the input projection runs on the same
    threads, so no BLAS pool spins beside them), and the cell's step then runs
    over the group's rows,
    one long vectorised loop over the units per row (a loop per 16-unit tile
    would pay LLVM's runtime alias checks for one vector iteration).  The
    panel of a unit block is reused by every tile of the group.  Threads
    split either the rows (``nthr == 1``: no synchronisation) or the unit
    blocks (``nthr`` threads meet at one barrier per step: the next step
    reads every unit of h).  ``reg`` (recurrent dropout, zoneout): the tiles
    read the masked state ``Hd`` (filled for the first step by the caller),
    and zoneout blends each new state with the previous one.
    """
    rdrop, zone = reg
    S, Gr = cell.n_state, cell.n_recurrent_gates
    nr, nrx = Gr * nu, cell.n_gates * nu
    rg = max(mr, mrx) * -(-16 // max(mr, mrx))

    G, K = cell.n_gates, cell.n_saved

    def hu(r):
        return f"hur{r}[j] + bh{r}[j]"

    gates = hu_gates(cell, hu, "ZERO")
    saved = (lambda k: f"sv{k}[j]") if train else (lambda k: None)

    def new(s):
        return f"hn{s}[j]"

    def prev(s):
        return f"hp{s}[j]"

    target = (lambda s: f"cand{s}") if zone else new
    step = forward_call(cell, xw=lambda g: f"xw{g}[j] + bi{g}[j]",
                        hu=lambda g: gates[g], prev=prev,
                        p=lambda i: f"pv{i}[j]", z_or_new=target,
                        saved_or_mid=saved, indent=0)
    if zone:
        step += "\n" + zoneout_stores(S, target, prev, new)
    if rdrop:  # the next step's recurrent input: this step's h, masked
        step += "\nhdr[j] = hn0[j] * mrr[j]"
    # One 1-d view per operand row and gate block: indices are then plain
    # j >= 0, so LLVM can bound every access for its run-time overlap checks
    # (``X[..., g * H + j]`` carries Numba's negative-index select) and keeps
    # the vector loop.  Per-call views of the parameters, per-row ones of the
    # time-varying arrays.
    pviews = "\n".join(
        [f"bi{g} = b_ih[{g} * H:{g + 1} * H]" for g in range(G)]
        + [f"bh{r} = b_hh[{r} * H:{r + 1} * H]" for r in range(Gr)]
        + [f"pv{i} = P[{i} * H:{i + 1} * H]" for i in range(cell.n_param_scalars)])
    views = "\n".join(
        [f"hp{s} = States[{s}, p, b]\nhn{s} = States[{s}, n, b]" for s in range(S)]
        + [f"xw{g} = XWs[xr, {g} * Hp:{g + 1} * Hp]" for g in range(G)]
        + [f"hur{r} = HUr[rr, {r} * Hp:{r + 1} * Hp]" for r in range(Gr)]
        + ([f"sv{k} = Saved[{k}, t, b]" for k in range(K)] if train else [])
        + (["hdr = Hd[b]", "mrr = Mr[b]"] if rdrop else []))
    carry = "\n".join(f"hn{s}[j] = hp{s}[j]" for s in range(S))
    if rdrop:
        carry += "\nhdr[j] = hn0[j] * mrr[j]"
    # The group's rows in mr-row tiles; its last rows in power-of-two tiles.
    xtiles = mk.row_tiles_source(
        mrx, nrx, mk.tail_heights(mrx, exact=False), "g0", "g1",
        lambda tile, i0: f"{tile}(Xt, {i0}, g1, Wxp, jb, XWr, {i0} - g0, jb * {nu}, Hp)")
    htiles = mk.row_tiles_source(
        mr, nr, mk.tail_heights(mr, exact=False), "g0", "g1",
        lambda tile, i0: f"{tile}(A, {i0}, g1, Wp, jb, HUr, {i0} - g0, jb * {nu}, Hp)")
    name = "forward_train" if train else "forward_infer"
    # Training keeps every step's state (States [S, T+1, B, H], for BPTT); inference
    # only the current one, in two slots that take turns (States [S, 2, B, H],
    # allocated by _forward_fused): far less state written to memory.
    slots = ("if reverse:\n    t = T - 1 - step\n    p = t + 1\n    n = t\n"
             "else:\n    t = step\n    p = t\n    n = t + 1") if train else (
        "t = T - 1 - step if reverse else step\np = step & 1  # the step's input slot\n"
        "n = 1 - p")
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
def {name}(X, Wxp, b_ih, Wp, b_hh, P, States, Saved, Y, lengths, reverse, Mr, Hd, Zthr, Zp,
           seed_lo, seed_hi, zstream, ztrain, XWc, flags, nthr, tid, b0, b1, jb0, jb1, pre):
    """All T steps for rows b0:b1, unit blocks jb0:jb1 ({mrx}x{nrx} and {mr}x{nr} tiles,
    {nu} units a block); ``pre``: read the input projection from XWc (input_projection)."""
    T = X.shape[0]
    H = States.shape[3]
    Hp = max(Wp.shape[0], 0) * {nu}  # indices provably >= 0 (see j_lo)
    XWr = np.empty(({rg}, {cell.n_gates} * Hp), X.dtype)
    HUr = np.empty(({rg}, {Gr} * Hp), X.dtype)
    j_lo = max(jb0 * {nu}, 0)  # provably >= 0: no negative-index select per element
    j_hi = min(jb1 * {nu}, H)
    rows = b1 - b0
    XWs = XWr
    if pre:
        XWs = XWc
{_ind(pviews, 4)}
    for step in range(T):
{_ind(slots, 8)}
        A = {"Hd" if rdrop else "States[0, p]"}
        Xt = X[t]
        for g0 in range(b0, b1, {rg}):
            g1 = min(g0 + {rg}, b1)
            for jb in range(jb0, jb1):
                if not pre:
{_ind(xtiles, 20)}
{_ind(htiles, 16)}
            for rr in range(g1 - g0):
                b = g0 + rr
                xr = t * rows + (b - b0) if pre else rr
{_ind(views, 16)}
                yrow = Y[t, b]
                if t < lengths[b]:
                    for u in range(j_hi - j_lo):  # from 0: LLVM sees j >= 0
                        j = j_lo + u
{_ind(step, 24)}
                        yrow[j] = hn0[j]
                else:
                    for u in range(j_hi - j_lo):
                        j = j_lo + u
{_ind(carry, 24)}
                        yrow[j] = 0
        if nthr > 1:
            step_barrier(flags, tid, nthr, step + 1)
'''


def _pack_training_source() -> str:
    """``pack_training(Whh, Wih, Gr, G, H, nu, Wp, Wxp, Wb, jb0, jb1, flags, tid, nthr)``.

    A training forward packs fresh weights at every call (an optimiser
    changed them): panels ``jb0:jb1`` of ``W_hh`` for the forward (``Wp``) and
    the backward (``Wb``, kept for it, read while ``W_hh`` is in cache) and of
    ``W_ih`` (``Wxp``).  Each kernel thread packs its share first, in the same
    task as its forward; with ``nthr > 1`` (the row split: every thread reads
    every panel) the threads then meet at a barrier.  In the caller alone
    this took 0.7-1.0 ms of a 6 ms LSTM training step at B=1, H=256.
    """
    return '''
@numba.njit(cache=True, nogil=True, error_model="numpy")
def pack_training(Whh, Wih, Gr, G, H, nu, Wp, Wxp, Wb, jb0, jb1, flags, tid, nthr):
    """Panels jb0:jb1 of W_hh (forward and backward layouts) and W_ih; see _pack_training_source."""
    pack_panels(Whh, Gr, H, nu, Wp, jb0, jb1)
    pack_panels(Wih, G, H, nu, Wxp, jb0, jb1)
    pack_panels_backward(Whh, H, nu, Wb, jb0, jb1)
    if nthr > 1:
        step_barrier(flags, tid, nthr, 1)
'''


def _same_bits_source() -> str:
    """``same_bits(a, b)``: whether two flat unsigned-int views hold the same bits.

    The inference cache (:class:`PackedWeights`) checks at every call that a
    matrix is unchanged since it was packed.  ``np.array_equal`` writes a
    boolean array and reduces it (0.13-0.15 ms a 1 MB matrix after a pause,
    two per LSTM forward); this reads both once, ORs the XORs of a block in
    vector registers and stops at the first block that differs.
    """
    return '''
@numba.njit(cache=True, nogil=True, error_model="numpy")
def same_bits(a, b):
    """a == b bitwise, for 1-d unsigned-int arrays of one length."""
    n = a.shape[0]
    for s in range(0, n, 4096):
        av = a[s:min(s + 4096, n)]
        bv = b[s:min(s + 4096, n)]
        acc = av[0] ^ bv[0]
        for i in range(av.shape[0]):  # from 0: no negative-index select, so it vectorises
            acc |= av[i] ^ bv[i]
        if acc != 0:
            return False
    return True
'''


def _input_projection_source(cell, mrx: int, nu: int) -> str:
    """``input_projection(X, Wxp, XWc, b0, b1, jb0, jb1)``: ``x_t @ W_ih.T`` of all steps first.

    For one or two rows per thread (``pre`` in :func:`_run_fused`): rows
    ``b0:b1`` of every step, copied to ``T * rows`` consecutive rows, go
    through the tiles in groups of 16, so each panel of ``W_ih`` streams once
    per group rather than once per step; row ``t * rows + (b - b0)`` of
    ``XWc [T * rows, G*Hp]`` (unit blocks ``jb0:jb1``) is what the forward
    kernel then reads.  A kernel of its own, so the forward kernels carry one
    tile sequence less (compile time).
    """
    nrx = cell.n_gates * nu
    rg = 16
    ptiles = mk.row_tiles_source(
        mrx, nrx, mk.tail_heights(mrx, exact=False), "g0", "g1",
        lambda tile, i0: f"{tile}(Xc, {i0}, g1, Wxp, jb, XWc, {i0}, jb * {nu}, Hp)")
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
def input_projection(X, Wxp, XWc, b0, b1, jb0, jb1):
    """x_t @ W_ih.T for rows b0:b1 of all T steps into XWc ({mrx}x{nrx} tiles)."""
    T = X.shape[0]
    Hp = max(Wxp.shape[0], 0) * {nu}
    rows = b1 - b0
    Xc = np.empty((T * rows, X.shape[2]), X.dtype)
    for t in range(T):
        for r in range(rows):
            Xc[t * rows + r] = X[t, b0 + r]
    for g0 in range(0, T * rows, {rg}):
        g1 = min(g0 + {rg}, T * rows)
        for jb in range(jb0, jb1):
{_ind(ptiles, 12)}
'''


def _backward_source(cell, same: bool, packed=None, reg=(False, False), proj=False) -> str:
    """BPTT over all steps for batch rows b0:b1.

    ``dS`` holds the element-wise part of the state gradients; the recurrent
    part ``dH = dHU_t @ W_hh`` of the previous step is added when it is read
    (saves a pass).  ``same``: the cell returns the same values for dxw and
    dhu (LSTM, Elman), so only dXW is written and used for both.  ``packed``
    ``(mr, nu)``: a dense cell's ``dH = dHU_t @ W_hh`` runs on ``W_hh`` packed
    in panels of ``nu`` units (``W`` is then ``[NB, Gr*H, nu]``) with
    ``mr``-row register tiles, instead of BLAS.  ``reg``: (recurrent dropout,
    zoneout) sections to generate.  ``proj``: the LSTMP projection: per step,
    before the rows, the projected h's gradient ``dHp[t] = dY_t + dH + dSp``
    (``dSp``: what arrives at the projected h from later; finished rows pass
    it on) and the unprojected h's ``dR = dHp[t] @ W_hr``; ``dH`` is then
    ``[1, B, P]``.

    Threads split the rows (``b0:b1``) or, with ``packed``, the unit blocks
    (``jb0:jb1`` of all rows, ``nthr`` threads meeting at one barrier per
    step, before ``dH`` needs every unit's ``dHU``).  The bias and
    per-unit gradients of row ``b`` go to row ``chunk[b]`` of the
    accumulators, its chunk under the row split, so both splits add the same
    values in the same order (bit for bit the same gradients).
    """
    rdrop, zone = reg
    G, Gr = cell.n_gates, cell.n_recurrent_gates
    rec, rnorm = cell.has_recurrent, cell.recurrent_norm
    tt = "t" if rnorm is not None else "0"
    S, K, NP = cell.n_state, cell.n_saved, cell.n_param_scalars
    # Element index of the per-row views: the unit ``j`` (generic: views span all
    # H units), or, packed, ``e`` counted from the thread's first unit ``j_lo``
    # (views start there).  A loop index from 0 is one LLVM proves
    # non-negative, so it drops Numba's wraparound select and vectorises the
    # loop; on ``j`` from ``range(j_lo, j_hi)`` the LSTM's BPTT step stayed
    # scalar (LSTM BPTT, 2 threads: B=32, H=128 5.4 -> 3.6 ms; B=8, H=256 4.1 -> 3.1).
    x = "j" if packed is None else "e"
    mr_ = f" * mrr[{x}]" if rdrop else ""  # dH is the gradient of the masked h
    dh_in = "dH[hd, b, i]" if packed is None else "dhv[e]"
    ds0 = f"ds0[{x}] + dRr[{x}]" if proj else \
        f"ds0[{x}] + dyr[{x}]" + (f" + {dh_in}{mr_}" if rec else "")

    def arriving(s):
        return ds0 if s == 0 else f"ds{s}[{x}]"

    dstate, zwrap = zoneout_backward(S, arriving, lambda s: f"ds{s}[{x}]", zone)

    def prev(s):
        return f"hp{s}[{x}]"

    def saved(k):
        return f"sv{k}[{x}]"

    def pp(i):
        return f"pv{i}[{x}]"

    def dp(i):
        return f"dpv{i}[{x}]"

    def dxw(g):
        return f"dxw{g}[{x}]"

    def dprev(s):
        return f"ds{s}[{x}]"

    dhu = (lambda r: None) if same else (lambda r: f"dhu{r}[{'i' if packed is None else 'e'}]")
    # the thread's units: all of a head (generic), or its unit blocks (packed, NH = 1)
    irange = "range(dh)" if packed is None else "range(j_lo, j_hi)"
    lo, hi = ("", "") if packed is None else ("j_lo", "j_hi")

    def span(g):  # units of gate block g in a row of G*H (the thread's, packed)
        return f"{g} * H + {lo}:{g} * H + {hi}" if packed is not None else f"{g} * H:{g + 1} * H"

    # One 1-d view per row and gate block: a store to dXW[t, b, g*H + j]
    # carries Numba's negative-index select, which LLVM cannot analyse for
    # overlap between the G stores; dxw_g[j] it can.  Likewise for the
    # states: on dS[s, b, j] LLVM's run-time overlap check spans every s and
    # finds the read and written spans interleaved (scalar fallback).
    row = f"{lo}:{hi}" if packed is not None else ""
    sub = f", {row}" if row else ""
    views = "\n".join(
        [f"dxw{g} = dXW[t, b, {span(g)}]" for g in range(G)]
        + [f"ds{s} = dS[{s}, b{sub}]\nhp{s} = States[{s}, p, b{sub}]" for s in range(S)]
        + [f"sv{k} = Saved[{k}, t, b{sub}]" for k in range(K)]
        + [f"dRr = dR[b{sub}]" if proj else f"dyr = dY[t, b{sub}]"]
        + [f"pv{i} = P[{span(i)}]\ndpv{i} = dP[c, {span(i)}]" for i in range(NP)]
        + ([f"mrr = Mr[b{sub}]"] if rdrop else [])
        + ([f"dhv = dH[0, b{sub}]"] if packed is not None and rec else []))
    if packed is None:
        hviews = "" if (same or not rec) else "\n".join(
            f"    dhu{r} = dHU[hd, t, b, {r} * dh:{r + 1} * dh]" for r in range(Gr))
        elem_head = ("for hd in range(NH):\n" + (hviews + "\n" if hviews else "")
                     + "    for i in range(dh):\n        j = hd * dh + i")
    else:
        if not same and rec:
            views += "\n" + "\n".join(f"dhu{r} = dHU[0, t, b, {span(r)}]" for r in range(Gr))
        elem_head = "for e in range(j_hi - j_lo):\n    j = j_lo + e"
    elem_pad = 8 if packed is None else 4
    body = [views]
    if not cell.normalize:
        step = zwrap(backward_call(cell, saved=saved, prev=prev, dstate=dstate, p=pp, dxw=dxw,
                                   dhu=dhu, dprev=dprev, dp=dp, indent=0))
        body.append(elem_head + "\n" + _ind(step, elem_pad))
    else:
        def zhat(k):
            return f"Zhat[{k}, t, b, j]"

        st2 = backward2_call(cell, saved=saved,
                             zn=lambda k: f"({zhat(k)} * Gz[{k} * H + j] + Bz[{k} * H + j])",
                             mid=lambda m: f"Mid[{m}, t, b, j]", prev=prev, dstate=dstate, p=pp,
                             dzn=lambda k: f"DZ[{k}, b, j]", dmid=lambda m: f"DM[{m}, b, j]",
                             dprev=dprev, dp=dp, indent=0)
        st2 = zwrap(st2)
        acc = "\n".join(f"dGz[c, {k} * H + j] += DZ[{k}, b, j] * {zhat(k)}\n"
                        f"dBz[c, {k} * H + j] += DZ[{k}, b, j]\n"
                        f"DZ[{k}, b, j] = DZ[{k}, b, j] * Gz[{k} * H + j]"
                        for k in range(cell.n_norm))
        body.append("for hd in range(NH):\n    for i in range(dh):\n        j = hd * dh + i\n"
                    + _ind(st2, 8) + "\n" + _ind(acc, 8))
        for k in range(cell.n_norm):
            body.append(row_norm_backward(cell.normalize_kind, ["for j in range(H):"],
                                          f"DZ[{k}, b, j]", zhat(k), "H", f"Rz[{k}, t, b]",
                                          indent=0, prefix=f"z{k}_"))
        st1 = backward1_call(cell, mid=lambda m: f"Mid[{m}, t, b, j]", prev=prev,
                             dz=lambda k: f"DZ[{k}, b, j]", dmid=lambda m: f"DM[{m}, b, j]",
                             p=pp, dxw=dxw, dhu=dhu, dprev=dprev, dp=dp, indent=0)
        body.append(elem_head + "\n" + _ind(st1, 8))
    # Bias gradients: summed per row after the element loop, from the row just
    # written (hot in cache); inside the loop the G strided updates of one
    # array would stop LLVM from vectorising it.
    # (the dxw views span the thread's units j_lo:j_hi, all H when not packed)
    body.append("\n".join(f"dbi{g} = db_ih[c, {g} * H + j_lo:{g} * H + j_hi]\n"
                          f"for e in range(j_hi - j_lo):\n    dbi{g}[e] += dxw{g}[e]"
                          for g in range(G)))
    if rec and not same and packed is not None:
        body.append("\n".join(f"dbh{r} = db_hh[c, {span(r)}]\n"
                              f"for e in range(j_hi - j_lo):\n    dbh{r}[e] += dhu{r}[e]"
                              for r in range(Gr)))
    elif rec and not same:
        u = "r * H + hd * dh + i"
        v = "dHU[hd, t, b, r * dh + i]"
        hu_sum = ["for hd in range(NH):", f"    for r in range({Gr}):",
                  f"        for i in {irange}:", f"            db_hh[c, {u}] += {v}"]
        if rnorm is not None:
            hu_sum += [f"            dg_hh[c, {u}] += {v} * HU[{tt}, hd, b, r * dh + i]",
                       f"            {v} = {v} * g_hh[{u}]"]
        body.append("\n".join(hu_sum))
        if rnorm is not None:
            loops = ["for hd in range(NH):", "for i in range(dh):"]
            xhat = f"HU[{tt}, hd, b, r * dh + i]"
            if rnorm.over == "gate":
                body.append(f"for r in range({Gr}):\n" + _ind(row_norm_backward(
                    rnorm.kind, loops, v, xhat, "H", f"Rhh[{tt}, b, r]", indent=0,
                    prefix="n_"), 4))
            else:
                body.append(row_norm_backward(
                    rnorm.kind, [f"for r in range({Gr}):"] + loops,
                    v, xhat, f"{Gr} * H", f"Rhh[{tt}, b, 0]", indent=0, prefix="n_"))
    active = _ind("\n".join(body), 16)
    masked = ("                for g in range(G):\n"
              "                    for u in range(j_hi - j_lo):\n"
              "                        dXW[t, b, g * H + j_lo + u] = 0")
    mrj = " * Mr[b, hd * dh + i]" if rdrop else ""
    if rec and not proj:
        masked += ("\n                for hd in range(NH):\n"
                   f"                    for i in {irange}:\n"
                   f"                        dS[0, b, hd * dh + i] += dH[hd, b, i]{mrj}")
    if rec:
        masked += ("\n                for hd in range(NH):\n"
                   f"                    for r in range({Gr}):\n"
                   f"                        for i in {irange}:\n"
                   "                            dHU[hd, t, b, r * dh + i] = 0")
    gemm = ("        for hd in range(NH):\n"
            "            np.dot(dHU[hd, t, b0:b1], W[hd], dH[hd, b0:b1])" if rec else "")
    if packed is not None:  # dH is [1, B, Hp] here: tiles of the last panel store past H
        mr, nu = packed
        tiles = mk.row_tiles_source(
            mr, nu, mk.tail_heights(mr, exact=False), "b0", "b1",
            lambda tile, i0: f"{tile}(A, {i0}, b1, W, jb, dH[0], {i0}, jb * {nu}, 0)")
        gemm = f"""        if nthr > 1:  # dH needs every unit's dHU of this step
            step_barrier(flags, tid, nthr, step + 1)
        A = dHU[0, t]
        for jb in range(jb0, jb1):
{_ind(tiles, 12)}"""
    final = ("    for hd in range(NH):\n        for b in range(b0, b1):\n"
             f"            for i in {irange}:\n"
             f"                dS[0, b, hd * dh + i] += dH[hd, b, i]{mrj}") if rec else ""
    pre = ""
    if proj:
        final = ("    for b in range(b0, b1):\n        for k in range(dSp.shape[1]):\n"
                 "            dSp[b, k] += dH[0, b, k]")
        pre = """        for b in range(b0, b1):
            if t < lengths[b]:
                for k in range(dSp.shape[1]):
                    dHp[t, b, k] = dY[t, b, k] + dH[0, b, k] + dSp[b, k]
                    dSp[b, k] = 0
            else:
                for k in range(dSp.shape[1]):
                    dSp[b, k] += dH[0, b, k]
                    dHp[t, b, k] = 0
        np.dot(dHp[t, b0:b1], Wr, dR[b0:b1])
"""
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
def backward_loop(dY, dS, W, States, Saved, Mid, Zhat, Rz, HU, Rhh, g_hh, P, Gz, Bz, lengths,
                  reverse, dXW, dHU, dH, DZ, DM, Mr, Zthr, Zp, seed_lo, seed_hi, zstream,
                  ztrain, Wr, dHp, dSp, dR, db_ih, db_hh, dg_hh, dP, dGz, dBz, chunk, flags,
                  nthr, tid, b0, b1, jb0, jb1):
    """BPTT for rows b0:b1{", unit blocks jb0:jb1" if packed is not None else ""}."""
    T = dY.shape[0]
    H = dS.shape[2]
    G = dXW.shape[2] // H
    NH = dHU.shape[0]
    dh = H // NH
    j_lo = {"0" if packed is None else f"max(jb0 * {packed[1]}, 0)"}
    j_hi = {"H" if packed is None else f"min(jb1 * {packed[1]}, H)"}
    for hd in range(dH.shape[0]):
        for b in range(b0, b1):
            for i in range({"dH.shape[2]" if packed is None else
                            f"j_lo, min(jb1 * {packed[1]}, dH.shape[2])"}):
                dH[hd, b, i] = 0
    for step in range(T):
        if reverse:
            t = step
            p = t + 1
        else:
            t = T - 1 - step
            p = t
{pre}        for b in range(b0, b1):
            c = chunk[b]
            if t < lengths[b]:
{active}
            else:
{masked}
{gemm}
{final}
'''


def same_input_and_recurrent_grads(cell) -> bool:
    """True when the cell's backward returns one expression for dxw and dhu.

    Read from the source (``return d, d, ...``): then the gradients of the input
    and recurrent pre-activations are equal by construction and the kernel
    stores them once.  Only for plain cells, where ``dHU`` can share ``dXW``'s
    memory.
    """
    if not cell.plain:
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cell.backward)))
    except (OSError, TypeError, SyntaxError):
        return False
    fdef = tree.body[0]
    returns = [n for n in ast.walk(fdef) if isinstance(n, ast.Return)]
    if len(returns) != 1 or not isinstance(returns[0].value, ast.Tuple):
        return False
    elts = returns[0].value.elts
    return len(elts) == 3 and ast.dump(elts[0]) == ast.dump(elts[1])


@dataclass(frozen=True)
class CpuKernels:
    """The compiled kernels of one cell in one precision."""

    forward_train: object
    forward_infer: object
    backward_loop: object
    same_grads: bool
    fused: FusedKernels | None = None


@dataclass(frozen=True)
class FusedKernels:
    """A dense cell's kernels on packed ``W_hh`` (see :func:`fused_path`).

    ``mr x (Gr*nu)`` forward tiles over panels of ``nu`` units; the backward's
    ``dHU @ W_hh`` uses ``mrb x nu`` tiles.  Compiled with the SLP vectoriser
    (:func:`~kernrnn.backends.cpu.microkernel.compile_with_slp`).
    """

    forward_train: object
    forward_infer: object
    backward_loop: object
    mr: int
    nu: int
    mrb: int
    pack_panels: object  # pack_panels(W, G, H, nu, out, jb0, jb1): mk.pack_forward's layout
    pack_panels_backward: object  # (W, H, nu, out, jb0, jb1): mk.pack_backward's layout
    pack_training: object  # a training forward's share of the packing (_pack_training_source)
    input_projection: object  # x_t @ W_ih.T of all steps first (``pre``)
    same_bits: object  # same_bits(a, b): two flat unsigned-int views hold the same bits

    def pack_forward(self, W, n_gates: int, H: int):
        """``W [G*H, K]`` as panels ``[NB, K, G*nu]`` (:func:`~kernrnn.backends.cpu.microkernel.pack_forward`)."""
        nb = -(-H // self.nu)
        out = np.empty((nb, W.shape[1], n_gates * self.nu), dtype=W.dtype)
        self.pack_panels(np.ascontiguousarray(W), n_gates, H, self.nu, out, 0, nb)
        return out

    def pack_backward(self, W, H: int):
        """``W_hh [G*H, H]`` as panels ``[NB, G*H, nu]`` (:func:`~kernrnn.backends.cpu.microkernel.pack_backward`)."""
        nb = -(-H // self.nu)
        out = np.empty((nb, W.shape[0], self.nu), dtype=W.dtype)
        self.pack_panels_backward(np.ascontiguousarray(W), H, self.nu, out, 0, nb)
        return out


_VECTORIZER_CHECKS = 1000
_vectorizer_configured = False


def _allow_alias_checks() -> None:
    """Let LLVM vectorise loops that touch many arrays.

    The pointwise loops read and write a dozen arrays that Numba cannot mark
    as non-aliasing, so LLVM guards the vector loop with runtime overlap
    checks; past its default budget (128) it keeps the loop scalar.  This
    raises the process-wide budget (an LLVM option; it only allows more
    checks, nothing changes for loops that vectorised already).  Together
    with ``error_model="numpy"`` (no ZeroDivisionError branch per division)
    the loops compile to AVX2/AVX-512 code; see ``dispatcher.inspect_asm()``.
    """
    global _vectorizer_configured
    if not _vectorizer_configured:
        import llvmlite.binding as llvm

        llvm.set_option("kernrnn", f"-vectorize-memory-check-threshold={_VECTORIZER_CHECKS}")
        _vectorizer_configured = True


@lru_cache(maxsize=None)
def get_kernels(cell, dtype, reg=(False, False), proj=False) -> CpuKernels:
    """Build (or load from Numba's cache) the CPU kernels of ``cell``.

    ``reg`` = (recurrent dropout, zoneout): a variant with those sections (see
    :mod:`kernrnn.regularization`); the plain kernels carry none of their cost.
    ``proj``: the variant with an LSTMP projection in the loop (BLAS per step,
    no packed tiles).
    """
    _allow_alias_checks()
    dtype = np.dtype(dtype)
    reg = (bool(reg[0]), bool(reg[1]))
    same = same_input_and_recurrent_grads(cell)
    source = "import math\nimport numba\nimport numpy as np\n" + "\n".join(
        [_forward_source(cell, True, reg, proj), _forward_source(cell, False, reg, proj),
         _backward_source(cell, same, reg=reg, proj=proj)]
    )
    source = (f"# kernrnn CPU kernels: cell {cell.name!r}, {dtype}, regularisation {reg}, "
              f"projection {bool(proj)}, math {cell_fingerprint(cell)}\n" + source)
    tag = f"cpu_{cell.name}_{dtype.name}" + ("_reg" if any(reg) else "") + ("_proj" if proj else "")
    module = load_module(source, tag, math_namespace(cell, dtype))
    fused = _fused_kernels(cell, dtype, same, reg) \
        if (FUSED and fused_path(cell) and not proj) else None
    return CpuKernels(module.forward_train, module.forward_infer, module.backward_loop, same,
                      fused)


# Whether dense cells run on packed-W_hh tiles (True) or through BLAS per step;
# a switch for side-by-side measurements (``kernrnn bench`` compares both).
FUSED = True


def _fused_kernels(cell, dtype, same: bool, reg=(False, False)) -> FusedKernels:
    G, Gr = cell.n_gates, cell.n_recurrent_gates
    mr, nu = mk.block_shape(Gr, dtype.itemsize)
    mrx, _ = mk.block_shape(G, dtype.itemsize)
    mrb, _ = mk.block_shape(1, dtype.itemsize)
    tiles = {(h, Gr * nu) for h in (mr, *mk.tail_heights(mr, exact=False))}
    tiles |= {(h, G * nu) for h in (mrx, *mk.tail_heights(mrx, exact=False))}
    tiles |= {(h, nu) for h in (mrb, *mk.tail_heights(mrb, exact=False))}
    source = "\n".join(
        ["import math\nimport numba\nimport numpy as np\n", mk.barrier_source(), mk.pack_source()]
        + [mk.tile_source(a, b, nu) for a, b in sorted(tiles)]
        + [_pack_training_source(), _same_bits_source(), _input_projection_source(cell, mrx, nu),
           _fused_forward_source(cell, True, mr, mrx, nu, reg),
           _fused_forward_source(cell, False, mr, mrx, nu, reg),
           _backward_source(cell, same, packed=(mrb, nu), reg=reg)])
    source = (f"# kernrnn CPU kernels on packed W_hh: cell {cell.name!r}, {dtype}, "
              f"regularisation {reg}, math {cell_fingerprint(cell)}\n" + source)
    ns = math_namespace(cell, dtype)
    ns.update(atomic_load=mk.atomic_load, atomic_store=mk.atomic_store,
              spin_pause=mk.spin_pause, yield_core=mk.yield_core, FLAG_STRIDE=mk.FLAG_STRIDE)
    module = load_module(source, f"cpu_fused_{cell.name}_{dtype.name}"
                         + ("_reg" if any(reg) else ""), ns)
    return FusedKernels(module.forward_train, module.forward_infer, module.backward_loop,
                        mr, nu, mrb, module.pack_panels, module.pack_panels_backward,
                        module.pack_training, module.input_projection, module.same_bits)


_compiled_sigs: set = set()


def _arg_key(a):
    """What decides Numba's type of a kernel argument, cheaply (``numba.typeof`` costs
    about 7 us an array, 0.15 ms for a fused forward's 30 arguments at every call)."""
    if isinstance(a, np.ndarray):
        f = a.flags
        return (a.dtype.str, a.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned)
    return type(a)


def _compile_with_slp(kernel, args) -> None:
    """Compile (or load from cache) ``kernel`` for ``args`` with the SLP vectoriser on.

    The tiles vectorise only with it; compiling before the threads start also
    keeps two threads from compiling the same kernel at once.
    """
    key = (id(kernel), tuple(_arg_key(a) for a in args))
    if key in _compiled_sigs:
        return
    with mk.compile_with_slp():
        kernel.compile(tuple(numba.typeof(a) for a in args))
    _compiled_sigs.add(key)


# -- thread ownership -----------------------------------------------------------

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas = None


def _blas_libs():
    """threadpoolctl's handles on the loaded BLAS libraries (found once).

    SciPy's BLAS (the one Numba's ``np.dot`` calls) is imported first so it is
    among them even before any kernel has run.
    """
    global _blas
    if _blas is None:
        import scipy.linalg.cython_blas  # noqa: F401
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


@contextlib.contextmanager
def _blas_single_thread():
    """Hold every BLAS to one thread (restored afterwards)."""
    libs = _blas_libs()
    before = [lib.num_threads for lib in libs]
    changed = [lib for lib, n in zip(libs, before, strict=True) if n != 1]
    for lib in changed:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before, strict=True):
            if n != 1:
                lib.set_num_threads(n)


def n_threads() -> int:
    """Threads the CPU kernels use: Numba's setting (``NUMBA_NUM_THREADS``,
    ``numba.set_num_threads``).

    Read without launching Numba's threading layer when nothing launched it
    yet: kernrnn runs no parallel Numba code, and Numba's default OpenMP
    layer, once started before PyTorch is loaded, makes PyTorch's own OpenMP
    operations 10-30x slower in the same process (measured: an eager CIFG
    training loop, B=16, H=256, 62 ms -> 1.5 s).
    """
    if not getattr(_numba_parallel, "_is_initialized", True):
        return numba.config.NUMBA_NUM_THREADS
    return numba.get_num_threads()


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kernrnn-cpu")
            _pool_size = n
        return _pool


# Fewest batch rows per thread worth a chunk of their own; below it the time
# loop runs in the caller and BLAS keeps its threads for the per-step GEMM.
MIN_ROWS_PER_CHUNK = 1


def _n_chunks(batch: int) -> int:
    return max(1, min(batch // MIN_ROWS_PER_CHUNK, n_threads()))


def _run_chunks(kernel, args, batch: int) -> None:
    """``kernel(*args, b0, b1)`` over batch chunks, one per thread."""
    nchunk = _n_chunks(batch)
    _launch_fused([[(kernel, (*args, c * batch // nchunk, (c + 1) * batch // nchunk))]
                   for c in range(nchunk)])


# How the fused forward and BPTT kernels split their work between the threads: "rows" (batch
# chunks, no synchronisation), "units" (hidden-unit blocks, one barrier per
# step, every thread runs all B rows: each keeps its part of W_hh in its own
# L2) or "auto": for batches up to UNIT_SPLIT_MAX_BATCH, the faster of the two
# as measured on the calls themselves (:class:`SplitChooser`); larger batches
# split the rows.  Both splits compute every value with the same code in the
# same order, so the choice never changes a result.  A fixed choice cannot
# win on a shared machine: with dedicated cores the unit split is 1.5-2x
# faster at B = 1, but a descheduled partner stalls it at every step (1.5-5x
# slower under load 3-4; docs/benchmarks/cpu.md).
SPLIT = "auto"
UNIT_SPLIT_MAX_BATCH = 4


class SplitChooser:
    """The faster thread split per problem shape, from the calls' own wall times.

    Each shape first runs twice with each split, the first time not counted
    (it pays one-off costs: starting a pool thread, the other core's cold
    caches; measured 2.8 against 1.1 ms for the unit split's first LSTM
    forward at B = 1); then the split with the lower recent time (an
    exponential average per split) runs, and after
    ``probe_every`` calls the other one is tried again, so a change of load
    (another process taking a core stalls the unit split's barrier) is
    noticed.  A probe that loses doubles the wait before the next one (up
    to ``max_probe_every``), so a split that keeps losing costs less and
    less; when the load slows the split in use, its own average rises past
    the other's time and the choice changes without a probe.
    """

    def __init__(self, probe_every: int = 8, max_probe_every: int = 1024,
                 weight: float = 0.5):
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.weight = weight
        # key -> [calls until the next probe, interval, {split: s}, splits run once]
        self._stats: dict = {}

    def _entry(self, key) -> list:
        return self._stats.setdefault(key, [self.probe_every, self.probe_every, {}, set()])

    def choose(self, key) -> str:
        entry = self._entry(key)
        times = entry[2]
        for split in ("rows", "units"):
            if split not in times:
                return split
        best = min(times, key=times.get)
        entry[0] -= 1
        if entry[0] <= 0:
            return "units" if best == "rows" else "rows"
        return best

    def record(self, key, split: str, seconds: float) -> None:
        entry = self._entry(key)
        if split not in entry[3]:  # a split's first call: not counted
            entry[3].add(split)
            return
        times = entry[2]
        old = times.get(split)
        if entry[0] <= 0:  # a probe: its time replaces the stale one; back off if it lost
            lost = seconds > min(v for k, v in times.items() if k != split)
            entry[1] = min(2 * entry[1], self.max_probe_every) if lost else self.probe_every
            entry[0] = entry[1]
            old = None
        times[split] = seconds if old is None else old + self.weight * (seconds - old)


_split_chooser = SplitChooser()

# Most batch rows per thread for which a fused forward computes the input
# projection of all steps first (``pre``): with one or two rows, streaming
# every panel of W_ih at every step costs more than writing and reading back
# the projection (LSTM, H=256, 2 threads: B=1 unit split 1.76 -> 1.24 ms,
# B=2 2.11 -> 1.80); from 4 rows on the step tiles are compute-bound and
# ``pre`` only adds traffic (B=4 unit split 2.57 -> 2.85, B=8 rows split
# 4.84 -> 5.18).
PRE_PROJECTION_MAX_ROWS = 2


def _thread_parts(kernel, shape, batch: int, n_blocks: int):
    """How a kernel on packed weights splits its work: ``(key, parts)``.

    ``parts``: one ``(nthr, tid, b0, b1, jb0, jb1)`` per thread, either batch
    chunks of all unit blocks (``nthr == 1``) or unit blocks of all rows (see
    :data:`SPLIT`).  ``key`` is the :data:`_split_chooser`'s key for this
    problem when it chose (record the call's time under it), else None.
    """
    nthr = min(n_threads(), n_blocks)
    split = SPLIT
    key = None
    if split == "auto":
        split = "rows"
        if nthr > 1 and batch <= UNIT_SPLIT_MAX_BATCH:
            key = (id(kernel), shape, n_blocks, nthr)
            split = _split_chooser.choose(key)
    if split == "units" and nthr > 1:
        return key, [(nthr, c, 0, batch, c * n_blocks // nthr, (c + 1) * n_blocks // nthr)
                     for c in range(nthr)]
    nchunk = _n_chunks(batch)
    return key, [(1, 0, c * batch // nchunk, (c + 1) * batch // nchunk, 0, n_blocks)
                 for c in range(nchunk)]


def _split_name(parts) -> str:
    return "units" if parts[0][0] > 1 else "rows"


def _run_fused(kernel, args, batch: int, n_blocks: int, project, prepare=None) -> None:
    """A fused forward kernel over the threads, split by rows or by unit blocks.

    ``args[0]``, ``args[1]`` are ``x`` and the packed ``W_ih``; ``project`` is
    the module's ``input_projection``, run first (same split) when ``pre``;
    ``prepare(parts)``, when given, the calls each thread makes before
    anything else (one per thread: packing the panels).
    """
    key, parts = _thread_parts(kernel, args[0].shape, batch, n_blocks)
    nthr = parts[0][0]
    flags = np.zeros(nthr * mk.FLAG_STRIDE, dtype=np.int64)
    pre = max(b1 - b0 for _, _, b0, b1, _, _ in parts) <= PRE_PROJECTION_MAX_ROWS
    X, Wxp = args[0], args[1]
    dummy = np.empty((1, 1), dtype=X.dtype)
    xw = {}  # one projection buffer per row range: unit-split threads share theirs
    if pre:
        for part in parts:
            b0, b1 = part[2], part[3]
            if (b0, b1) not in xw:
                xw[b0, b1] = workspace.take(
                    (X.shape[0] * (b1 - b0), Wxp.shape[0] * Wxp.shape[2]), X.dtype)
    tails = [(xw.get((part[2], part[3]), dummy), flags, *part, pre) for part in parts]
    _compile_with_slp(kernel, (*args, *tails[0]))
    ptails = [(xw[part[2], part[3]], *part[2:6]) for part in parts] if pre else []
    if ptails:
        _compile_with_slp(project, (X, Wxp, *ptails[0]))
    # One task per thread: its part of the projection (its own unit blocks or
    # rows, so no thread waits for another's), then its part of the forward.
    work = [[(kernel, (*args, *tail))] for tail in tails]
    for calls, ptail in zip(work, ptails):
        calls.insert(0, (project, (X, Wxp, *ptail)))
    if prepare is not None:
        for calls, call in zip(work, prepare(parts), strict=True):
            calls.insert(0, call)
    _launch_timed(work, key, parts)
    workspace.give(*xw.values())


def _launch_timed(work, key, parts) -> None:
    """:func:`_launch_fused`, the time recorded for the split chooser when it chose."""
    t0 = time.perf_counter()
    try:
        _launch_fused(work)
    finally:
        if key is not None:
            _split_chooser.record(key, _split_name(parts), time.perf_counter() - t0)


def _run_calls(calls) -> None:
    for fn, fn_args in calls:
        fn(*fn_args)


def _launch_fused(work) -> None:
    """Each thread's ``[(kernel, args), ...]`` in order: the first list in the caller, the
    others on the pool (one wake-up per thread and call: 0.1-0.3 ms each at B = 1)."""
    if len(work) == 1:
        _run_calls(work[0])
        return
    # No BLAS runs inside, but holding it to one thread parks its workers,
    # which otherwise spin on the cores the kernel threads need.
    with _blas_single_thread():
        pool = _executor(len(work) - 1)
        futures = [pool.submit(_run_calls, calls) for calls in work[1:]]
        try:
            _run_calls(work[0])
        finally:
            for f in futures:
                f.result()


# Fewest T*B rows for which the weight-gradient GEMMs run on the kernel threads
# (BLAS held to one thread, output rows split) instead of multi-threaded BLAS.
# OpenBLAS's workers spin for about 0.1 s after each multi-threaded call, on
# the cores the next forward's kernel threads need: a CIFG training forward
# (B=32, H=256) took 31 ms within 0.05 s of a backward and 21 ms after 0.1 s.
# Measured per training step (fwd + bwd, H=256): CIFG B=32 71 -> 56 ms, B=64
# 127 -> 97; LSTM B=32 90 -> 68, B=64 165 -> 127; B=16 equal (37 ms); B=8
# slower (CIFG 21 -> 27), hence the threshold.
THREADED_GEMM_MIN_ROWS = 2048


def _threaded_matmul(a, b):
    """``a @ b`` with the output's rows split over the kernel threads, each on one-thread BLAS.

    No BLAS worker is woken, so none is left spinning after the call.
    """
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    nchunk = min(n_threads(), max(1, a.shape[0] // 64))
    bounds = [(c * a.shape[0] // nchunk, (c + 1) * a.shape[0] // nchunk) for c in range(nchunk)]

    def part(r0, r1):
        np.matmul(a[r0:r1], b, out=out[r0:r1])

    with _blas_single_thread():
        if nchunk == 1:
            part(*bounds[0])
            return out
        pool = _executor(nchunk - 1)
        futures = [pool.submit(part, *bd) for bd in bounds[1:]]
        try:
            part(*bounds[0])
        finally:
            for f in futures:
                f.result()
    return out


# -- host side --------------------------------------------------------------------

ForwardContext = common.ForwardContext


def forward(cell, x, params, h0, lengths, reverse, training, y=None, reg=None):
    """Run one layer in one direction; arguments are already validated.

    ``params`` maps the cell's parameter names (``weight_ih``, ...; see
    :meth:`kernrnn.cell.Cell.param_shapes`) to arrays; ``h0`` is ``[S, B, H]``,
    ``lengths`` int64 ``[B]``; ``y`` an optional ``[T, B, H]`` (possibly
    strided) view to write the output into; ``reg`` a
    :class:`~kernrnn.regularization.RegularizationCall` or None.  Returns
    ``(y, hn, ctx)``; ``ctx`` is None unless ``training``.  With a projection
    (``params["weight_hr"]`` ``[P, H]``, LSTMP) ``y`` is ``[T, B, P]`` and the
    projected h travels in the first P columns of ``h0[0]``/``hn[0]``.
    """
    T, B, _ = x.shape
    H = h0.shape[2]
    dtype = x.dtype
    proj = common.projection_size(params)
    k = get_kernels(cell, dtype, reg.flags() if reg is not None else (False, False), bool(proj))
    x, input_mask = common.input_dropout(np, reg, x)
    ka = regularization.kernel_arrays(np, reg, cell, B, H, dtype)
    if ka.Hd.shape == (B, H):  # the first step's recurrent input: h0, masked
        ka.Hd[...] = h0[0] * ka.Mr
    if k.fused is not None:
        return _forward_fused(k.fused, cell, x, params, h0, lengths, reverse, training, y,
                              reg, ka, input_mask)
    XW, input_cache = common.input_projection(np, cell, x, params, take=workspace.take)
    buf = common.time_buffers(np, cell, T, B, H, dtype, training, proj, take=workspace.take)
    one = np.ones(1, dtype=dtype)
    WrT, Hp = one.reshape(1, 1), one.reshape(1, 1, 1)
    if proj:
        h0, buf.Hp[T if reverse else 0] = common.projection_state(np, h0, proj, B, H, dtype)
        WrT, Hp = np.ascontiguousarray(params["weight_hr"].T), buf.Hp
    buf.States[:, T if reverse else 0] = h0
    if y is None:
        y = np.empty((T, B, proj or H), dtype=dtype)
    W3 = common.recurrent_weights(cell, params, H)
    WT = np.ascontiguousarray(W3.transpose(0, 2, 1)) if W3 is not None else one.reshape(1, 1, 1)
    b_hh = params["bias_hh"] if cell.has_recurrent else one
    P = common.param_vector(np, cell, params, H, dtype)
    g_hh, Gz, Bz = common.norm_vectors(np, cell, params, H, dtype)
    kernel = k.forward_train if training else k.forward_infer
    if T > 0:
        _run_chunks(kernel, (XW, params["bias_ih"], WT, b_hh, g_hh, P, Gz, Bz, buf.States,
                             buf.Saved, buf.Mid, buf.Zhat, buf.Rz, buf.HU, buf.Rhh, y, lengths,
                             reverse, *_reg_args(ka), WrT, Hp), B)
    hn = buf.States[:, 0 if reverse else T].copy()
    if proj:
        hn[0] = 0
        hn[0, :, :proj] = buf.Hp[0 if reverse else T]
    ctx = None
    if training:
        ctx = ForwardContext(cell, x, params, input_cache, buf, lengths, reverse, reg=reg,
                             input_mask=input_mask)
    else:
        workspace.give(*buf.arrays())
    workspace.give(XW)  # the input projection (or its normalised copy): backward needs neither
    return y, hn, ctx


def _reg_args(ka) -> tuple:
    """The regularisation arguments of the forward kernels (masks, thresholds, seed)."""
    return (ka.Mr, ka.Hd, ka.Zthr, ka.Zp, ka.seed_lo, ka.seed_hi, ka.zstream, ka.ztrain)


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


def _forward_fused(f: FusedKernels, cell, x, params, h0, lengths, reverse, training, y, reg,
                   ka, input_mask):
    """:func:`forward` of a dense cell on packed weights (see :func:`fused_path`)."""
    T, B, _ = x.shape
    H = h0.shape[2]
    dtype = x.dtype
    buf = common.time_buffers(np, cell, T, B, H, dtype, training, take=workspace.take,
                              state_slots=None if training else 2)
    first, last = (T if reverse else 0, 0 if reverse else T) if training else (0, T & 1)
    buf.States[:, first] = h0
    if y is None:
        y = np.empty((T, B, H), dtype=dtype)
    prepare, Wb = None, None
    if training:  # fresh weights: packed on the kernel threads (_pack_training_source)
        Wp, Wxp, Wb, prepare = _training_panels(f, cell, params, H, dtype)
    else:  # inference: the panels of unchanged weights are reused
        Wp = _packed_weights.get(f, params["weight_hh"], cell.n_recurrent_gates, H)
        Wxp = _packed_weights.get(f, params["weight_ih"], cell.n_gates, H)
    P = common.param_vector(np, cell, params, H, dtype)
    if T > 0:
        _run_fused(f.forward_train if training else f.forward_infer,
                   (np.ascontiguousarray(x), Wxp, params["bias_ih"], Wp, params["bias_hh"], P,
                    buf.States, buf.Saved, y, lengths, reverse, *_reg_args(ka)), B,
                   Wp.shape[0], f.input_projection, prepare)
    hn = buf.States[:, last].copy()
    ctx = None
    if training:
        workspace.give(Wp, Wxp)
        if T == 0:  # nothing ran, so nothing was packed
            workspace.give(Wb)
            Wb = None
        ctx = ForwardContext(cell, x, params, None, buf, lengths, reverse, reg=reg,
                             input_mask=input_mask, panels=Wb)
    else:
        workspace.give(*buf.arrays())
    return y, hn, ctx


def _training_panels(f: FusedKernels, cell, params, H: int, dtype):
    """``(Wp, Wxp, Wb, prepare)``: buffers for a training forward's panels (forward
    ``W_hh``, ``W_ih``, backward ``W_hh``), and the ``prepare`` of :func:`_run_fused`
    that gives each thread its share of the packing."""
    nb, nu = -(-H // f.nu), f.nu
    G, Gr = cell.n_gates, cell.n_recurrent_gates
    Whh = np.ascontiguousarray(params["weight_hh"])
    Wih = np.ascontiguousarray(params["weight_ih"])
    Wp = workspace.take((nb, H, Gr * nu), dtype)
    Wxp = workspace.take((nb, Wih.shape[1], G * nu), dtype)
    Wb = workspace.take((nb, Gr * H, nu), dtype)

    def prepare(parts):
        if parts[0][0] > 1:  # unit split: each thread reads only its own unit blocks
            ranges, meet = [part[4:6] for part in parts], 1
        else:  # row split: every thread reads every panel, so they share and then meet
            n = len(parts)
            ranges, meet = [(c * nb // n, (c + 1) * nb // n) for c in range(n)], n
        flags = np.zeros(meet * mk.FLAG_STRIDE, dtype=np.int64)
        calls = [(f.pack_training, (Whh, Wih, Gr, G, H, nu, Wp, Wxp, Wb, jb0, jb1, flags,
                                    c if meet > 1 else 0, meet))
                 for c, (jb0, jb1) in enumerate(ranges)]
        _compile_with_slp(f.pack_training, calls[0][1])
        return calls

    return Wp, Wxp, Wb, prepare


def release(ctx: ForwardContext) -> None:
    """``ctx`` will not be used again (its layer's backward consumed it): its buffers
    go back to the workspace for the next call."""
    workspace.give(*ctx.buffers.arrays())
    if ctx.panels is not None:
        workspace.give(ctx.panels)
    ctx.buffers = ctx.panels = None


def backward(ctx: ForwardContext, dy, dhn):
    """BPTT for one forward call.  Returns ``(dx, dh0, grads)``.

    ``dy`` is ``[T, B, H]`` (may be a strided view), ``dhn`` ``[S, B, H]``;
    ``grads`` has the keys of the forward call's ``params``.
    """
    cell, x, params, buf = ctx.cell, ctx.x, ctx.params, ctx.buffers
    T, B, _ = x.shape
    H = dhn.shape[2]
    dtype = x.dtype
    G, NH = cell.n_gates, cell.n_heads
    GrH = cell.n_recurrent_gates * H
    reg = ctx.reg
    proj = common.projection_size(params)
    k = get_kernels(cell, dtype, reg.flags() if reg is not None else (False, False), bool(proj))
    ka = regularization.kernel_arrays(np, reg, cell, B, H, dtype)  # masks regenerated
    dS = np.array(dhn, dtype=dtype, copy=True)
    stand_in = np.ones((1, 1), dtype=dtype)
    Wr, dHp, dSp, dR = stand_in, stand_in.reshape(1, 1, 1), stand_in, stand_in
    if proj:  # dS[0] is the unprojected h's (the step adds none); dSp the projected h's
        Wr = np.ascontiguousarray(params["weight_hr"])
        dHp = workspace.take((T, B, proj), dtype)
        dSp = dS[0, :, :proj].copy()  # a copy: ascontiguousarray may return a view
        dR = np.empty((B, H), dtype=dtype)
        dS[0] = 0
    dXW = workspace.take((T, B, G * H), dtype)
    one = np.ones(1, dtype=dtype)
    if not cell.has_recurrent:
        dHU = one.reshape(1, 1, 1, 1)
    elif k.same_grads:
        dHU = dXW.reshape(1, T, B, G * H)
    else:
        dHU = workspace.take((NH, T, B, GrH // NH), dtype)
    dH = workspace.take((NH, B, proj or H // NH) if k.fused is None else
                        (1, B, -(-H // k.fused.nu) * k.fused.nu), dtype)
    DZ = np.empty((max(cell.n_norm, 1), B, H), dtype=dtype)
    DM = np.empty((max(cell.n_mid, 1), B, H), dtype=dtype)
    loop = k.backward_loop
    if k.fused is not None:
        loop = k.fused.backward_loop
        # the panels the forward packed, or (a context without them) packed now
        W = ctx.panels if ctx.panels is not None else \
            k.fused.pack_backward(params["weight_hh"], H)
    else:
        W = common.recurrent_weights(cell, params, H)
        W = np.ascontiguousarray(W) if W is not None else one.reshape(1, 1, 1)
    P = common.param_vector(np, cell, params, H, dtype)
    g_hh, Gz, Bz = common.norm_vectors(np, cell, params, H, dtype)
    nchunk = _n_chunks(B)
    # one gradient row per batch chunk, summed after: no two threads add to one
    # element, and the order of the additions is fixed (deterministic, no
    # atomics), the same under either thread split (``chunk[b]``: b's row)
    acc = {name: np.zeros((nchunk, max(n, 1)), dtype=dtype) for name, n in (
        ("bias_ih", G * H), ("bias_hh", GrH), ("norm_hh", GrH),
        ("params", cell.n_param_scalars * H), ("gz", cell.n_norm * H), ("bz", cell.n_norm * H))}
    rows = [(c * B // nchunk, (c + 1) * B // nchunk) for c in range(nchunk)]
    chunk = np.empty(B, dtype=np.int64)
    for c, (b0, b1) in enumerate(rows):
        chunk[b0:b1] = c
    if T > 0:
        args = (dy, dS, W, buf.States, buf.Saved, buf.Mid, buf.Zhat, buf.Rz, buf.HU, buf.Rhh,
                g_hh, P, Gz, Bz, ctx.lengths, ctx.reverse, dXW, dHU, dH, DZ, DM, ka.Mr,
                ka.Zthr, ka.Zp, ka.seed_lo, ka.seed_hi, ka.zstream, ka.ztrain, Wr, dHp, dSp, dR,
                *acc.values(), chunk)
        if k.fused is not None:
            key, parts = _thread_parts(loop, dy.shape, B, W.shape[0])
        else:
            key, parts = None, [(1, 0, b0, b1, 0, 0) for b0, b1 in rows]
        flags = np.zeros(parts[0][0] * mk.FLAG_STRIDE, dtype=np.int64)
        work = [[(loop, (*args, flags, *part))] for part in parts]
        if k.fused is not None:
            _compile_with_slp(loop, work[0][0][1])
        _launch_timed(work, key, parts)
    sums = {name: a.sum(axis=0) for name, a in acc.items()}
    dx, grads = common.weight_gradients(
        np, cell, ctx, dXW, dHU if cell.has_recurrent else None,
        ka.Mr if reg is not None and reg.recurrent_dropout else None,
        dHp if proj else None,
        matmul=_threaded_matmul if T * B >= THREADED_GEMM_MIN_ROWS else None)
    if proj:
        dS[0] = 0
        dS[0, :, :proj] = dSp
    grads["bias_ih"] = sums["bias_ih"]
    if cell.has_recurrent:
        grads["bias_hh"] = sums["bias_ih"].copy() if k.same_grads else sums["bias_hh"]
    grads.update(common.per_unit_gradients(cell, sums["params"], sums["norm_hh"], sums["gz"],
                                           sums["bz"], H))
    workspace.give(dXW, dHU, dH, dHp)  # views (dHU of an LSTM is dXW's) and stand-ins stay out
    return dx, dS, grads
