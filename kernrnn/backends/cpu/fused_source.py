"""Source of the fused CPU kernels: dense cells on packed weight panels.

The forward runs the :mod:`~kernrnn.backends.cpu.microkernel` tiles for
``x_t @ W_ih.T`` and ``h_{t-1} @ W_hh.T`` with the cell's step right behind
them; around it: the packing of a training forward's panels, the input
projection of all steps first (small batches) and the bitwise comparison
behind the inference cache (:mod:`~kernrnn.backends.cpu.packed`).  The fused
BPTT is :func:`~kernrnn.backends.cpu.source.backward_source` with ``packed``.
"""

from __future__ import annotations

from kernrnn.backends.codegen import forward_call, hu_gates, zoneout_stores
from kernrnn.backends.cpu import microkernel as mk
from kernrnn.backends.cpu.kernel_args import FUSED_FORWARD, INPUT_PROJECTION, PACK_TRAINING
from kernrnn.backends.cpu.source import ind

__all__ = ["fused_path", "fused_forward_source", "pack_training_source", "same_bits_source",
           "input_projection_source"]


def fused_path(cell) -> bool:
    """True when the cell runs on packed-``W_hh`` tiles with the step in the epilogue.

    Dense recurrence on h alone, one stage, without normalisations (those need whole
    rows of the products before the step), and few enough gates that a tile of one unit
    block fits the registers.  Not a cell with ``raw_input`` (its step reads x
    itself, which the packed kernels never hold): the plain kernels run it.
    """
    return (cell.recurrent == "dense" and cell.input_norm is None and cell.recurrent_norm is None
            and not cell.normalize and not cell.raw_input and 1 <= cell.n_recurrent_gates <= 6
            and cell.n_gates <= 6 and cell.reads_h_only and not cell.products)


def fused_forward_source(cell, train: bool, mr: int, mrx: int, nu: int,
                          reg=(False, False)) -> str:
    """All T steps for rows b0:b1 and unit blocks jb0:jb1, on packed ``W_ih``/``W_hh`` panels.

    Per step, rows go in groups of about 16 (``RG``): for each of the
    thread's unit blocks (``nu`` units, every gate) the
    :mod:`~kernrnn.backends.cpu.microkernel` tiles write ``x_t @ W_ih.T``
    (``mrx`` rows a tile) and ``h_{t-1} @ W_hh.T`` (``mr`` rows) of the group
    into small row buffers ``XWr [RG, G*Hpad]`` and ``HUr [RG, Gr*Hpad]`` (L1/L2,
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
        + [f"pv{i} = unit_params[{i} * H:{i + 1} * H]" for i in range(cell.n_unit_scalars)])
    views = "\n".join(
        [f"hp{s} = States[{s}, p, b]\nhn{s} = States[{s}, n, b]" for s in range(S)]
        + [f"xw{g} = XWs[xr, {g} * Hpad:{g + 1} * Hpad]" for g in range(G)]
        + [f"hur{r} = HUr[rr, {r} * Hpad:{r + 1} * Hpad]" for r in range(Gr)]
        + ([f"sv{k} = Saved[{k}, t, b]" for k in range(K)] if train else [])
        + (["hdr = Hd[b]", "mrr = Mr[b]"] if rdrop else []))
    carry = "\n".join(f"hn{s}[j] = hp{s}[j]" for s in range(S))
    if rdrop:
        carry += "\nhdr[j] = hn0[j] * mrr[j]"
    # The group's rows in mr-row tiles; its last rows in power-of-two tiles.
    xtiles = mk.row_tiles_source(
        mrx, nrx, mk.tail_heights(mrx, exact=False), "g0", "g1",
        lambda tile, i0: f"{tile}(Xt, {i0}, g1, Wxp, jb, XWr, {i0} - g0, jb * {nu}, Hpad)")
    htiles = mk.row_tiles_source(
        mr, nr, mk.tail_heights(mr, exact=False), "g0", "g1",
        lambda tile, i0: f"{tile}(A, {i0}, g1, Wp, jb, HUr, {i0} - g0, jb * {nu}, Hpad)")
    name = "forward_train" if train else "forward_infer"
    # Training keeps every step's state (States [S, T+1, B, H], for BPTT); inference
    # only the current one, in two slots that take turns (States [S, 2, B, H],
    # allocated by host._forward_fused): far less state written to memory.
    slots = ("if reverse:\n    t = T - 1 - step\n    p = t + 1\n    n = t\n"
             "else:\n    t = step\n    p = t\n    n = t + 1") if train else (
        "t = T - 1 - step if reverse else step\np = step & 1  # the step's input slot\n"
        "n = 1 - p")
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
{FUSED_FORWARD.signature(name)}
    """All T steps for rows b0:b1, unit blocks jb0:jb1 ({mrx}x{nrx} and {mr}x{nr} tiles,
    {nu} units a block); ``pre``: read the input projection from XWc (input_projection)."""
    T = X.shape[0]
    H = States.shape[3]
    Hpad = max(Wp.shape[0], 0) * {nu}  # indices provably >= 0 (see j_lo)
    XWr = np.empty(({rg}, {cell.n_gates} * Hpad), X.dtype)
    HUr = np.empty(({rg}, {Gr} * Hpad), X.dtype)
    j_lo = max(jb0 * {nu}, 0)  # provably >= 0: no negative-index select per element
    j_hi = min(jb1 * {nu}, H)
    rows = b1 - b0
    XWs = XWr
    if pre:
        XWs = XWc
{ind(pviews, 4)}
    for step in range(T):
{ind(slots, 8)}
        A = {"Hd" if rdrop else "States[0, p]"}
        Xt = X[t]
        for g0 in range(b0, b1, {rg}):
            g1 = min(g0 + {rg}, b1)
            for jb in range(jb0, jb1):
                if not pre:
{ind(xtiles, 20)}
{ind(htiles, 16)}
            for rr in range(g1 - g0):
                b = g0 + rr
                xr = t * rows + (b - b0) if pre else rr
{ind(views, 16)}
                yrow = Y[t, b]
                if t < lengths[b]:
                    for u in range(j_hi - j_lo):  # from 0: LLVM sees j >= 0
                        j = j_lo + u
{ind(step, 24)}
                        yrow[j] = hn0[j]
                else:
                    for u in range(j_hi - j_lo):
                        j = j_lo + u
{ind(carry, 24)}
                        yrow[j] = 0
        if nthr > 1:
            step_barrier(flags, tid, nthr, step + 1)
'''


def pack_training_source() -> str:
    """``pack_training(Whh, Wih, Gr, G, H, nu, Wp, Wxp, Wb, jb0, jb1, flags, tid, nthr)``.

    A training forward packs fresh weights at every call (an optimiser
    changed them): panels ``jb0:jb1`` of ``W_hh`` for the forward (``Wp``) and
    the backward (``Wb``, kept for it, read while ``W_hh`` is in cache) and of
    ``W_ih`` (``Wxp``).  Each kernel thread packs its share first, in the same
    task as its forward; with ``nthr > 1`` (the row split: every thread reads
    every panel) the threads then meet at a barrier.  In the caller alone
    this took 0.7-1.0 ms of a 6 ms LSTM training step at B=1, H=256.
    """
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
{PACK_TRAINING.signature("pack_training")}
    """Panels jb0:jb1 of W_hh (forward and backward layouts) and W_ih; see pack_training_source."""
    pack_panels(Whh, Gr, H, nu, Wp, jb0, jb1)
    pack_panels(Wih, G, H, nu, Wxp, jb0, jb1)
    pack_panels_backward(Whh, H, nu, Wb, jb0, jb1)
    if nthr > 1:
        step_barrier(flags, tid, nthr, 1)
'''


def same_bits_source() -> str:
    """``same_bits(a, b)``: whether two flat unsigned-int views hold the same bits.

    The inference cache (:class:`~kernrnn.backends.cpu.packed.PackedWeights`)
    checks at every call that a matrix is unchanged since it was packed.
    ``np.array_equal`` writes a boolean array and reduces it (0.13-0.15 ms a
    1 MB matrix after a pause, two per LSTM forward); this reads both once,
    ORs the XORs of a block in vector registers and stops at the first block
    that differs.
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


def input_projection_source(n_gates: int, mrx: int, nu: int) -> str:
    """``input_projection(X, Wxp, XWc, b0, b1, jb0, jb1)``: ``x_t @ W_ih.T`` of all steps first.

    For one or two rows per thread (``pre`` in
    :func:`~kernrnn.backends.cpu.threads.run_fused`): rows ``b0:b1`` of every
    step, copied to ``T * rows`` consecutive rows, go through the tiles in
    groups of 16, so each panel of ``W_ih`` streams once
    per group rather than once per step; row ``t * rows + (b - b0)`` of
    ``XWc [T * rows, G*Hpad]`` (unit blocks ``jb0:jb1``) is what the forward
    kernel then reads.  A kernel of its own, so the forward kernels carry one
    tile sequence less (compile time).  No cell math in it: every cell with ``n_gates``
    gates shares one compilation per precision (see ``build._input_projection``).
    """
    nrx = n_gates * nu
    rg = 16
    ptiles = mk.row_tiles_source(
        mrx, nrx, mk.tail_heights(mrx, exact=False), "g0", "g1",
        lambda tile, i0: f"{tile}(Xc, {i0}, g1, Wxp, jb, XWc, {i0}, jb * {nu}, Hpad)")
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
{INPUT_PROJECTION.signature("input_projection")}
    """x_t @ W_ih.T for rows b0:b1 of all T steps into XWc ({mrx}x{nrx} tiles)."""
    T = X.shape[0]
    Hpad = max(Wxp.shape[0], 0) * {nu}
    rows = b1 - b0
    Xc = np.empty((T * rows, X.shape[2]), X.dtype)
    for t in range(T):  # element by element: a row assignment compiles Numba's shape-error
        for r in range(rows):  # message (1.6 s of a cold process's first compile)
            for k in range(X.shape[2]):
                Xc[t * rows + r, k] = X[t, b0 + r, k]
    for g0 in range(0, T * rows, {rg}):
        g1 = min(g0 + {rg}, T * rows)
        for jb in range(jb0, jb1):
{ind(ptiles, 12)}
'''

