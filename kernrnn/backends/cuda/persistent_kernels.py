"""Source of the persistent fused recurrence kernels, and building them for a cell.

The launch plan, the launches and the design notes are in
:mod:`kernrnn.backends.cuda.persistent`, which re-exports what is public here.

Every kernel takes ``(s0, s1)``: the steps it runs.  A persistent launch runs
``(0, T)``; ``stepwise=True`` runs the *same kernel* once per step, ``(t,
t+1)``, so the grid barrier is never reached.  That mode exists for Numba's
CUDA simulator, which runs blocks one after another and implements the grid
barrier as a block barrier (correct only for one-block grids): the simulator
tests run the persistent launch on one block and the stepwise launch on
several blocks, i.e. the same per-block code and the same cross-block data
exchange, with kernel boundaries in place of the barrier.

The reduction goes through shared memory and ``syncthreads`` rather than warp
shuffles, because the simulator has no shuffles: the code the tests run is
the code the GPU runs.

Work split inside a block (``THREADS`` = 256 threads): an output group is
one hidden unit for ``NB`` (1, 2 or 4) batch rows, all G gates (forward) or
the ``dh`` of that unit (backward); ``NSLOT`` groups are computed side by side
and each dot product is split over ``KP = THREADS // NSLOT`` threads on
interleaved ``k`` (neighbouring threads read neighbouring ``k``: coalesced
``h`` loads, and with the shared-memory row stride padded to ``KP`` mod 32,
bank-conflict-free ``W`` loads), then summed by a shared-memory tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numba
import numpy as np

from kernrnn.backends.codegen import backward_body, cell_fingerprint, forward_body, load_module
from kernrnn.scalar import compile_scalar, python_scalar

__all__ = ["NB_CHOICES", "ACC_REGISTERS", "PersistentKernels", "kernel_sources", "get_kernels",
           "ptx_signatures"]


def _simulator() -> bool:
    try:
        from numba.cuda import config as cuda_config
    except Exception:  # pragma: no cover - numba-cuda missing
        from numba import config as cuda_config
    return bool(getattr(cuda_config, "ENABLE_CUDASIM", False))


# -- generated kernels ------------------------------------------------------------------


NB_CHOICES = (1, 2, 4, 8)


ACC_REGISTERS = 32  # 32-bit registers per thread for the G*NB accumulators


def _nb_fits(G: int, nb: int, itemsize: int = 4) -> bool:
    """Whether G*NB accumulators fit the register budget (a float64 takes two registers)."""
    return nb == 1 or G * nb * max(1, itemsize // 4) <= ACC_REGISTERS


def _nb_for(B: int, G: int, itemsize: int = 4) -> int:
    """Batch rows per thread in the GEMM (register tile): W is read once per NB rows.

    NB = 8 from B = 32 on: the threads of a warp then share one batch tile, so
    each ``h`` load is one cache line, and the inner loop issues G + 8 loads
    per 8*G FMAs instead of G + 4 per 4*G (a model, to be checked on a GPU).
    At most 32 registers of accumulators per thread (ptxas, sm_90): an fp32
    LSTM forward at NB = 8 already takes 250 of the 255 registers, and the
    fp64 LSTM forward at NB = 8 (64 registers of accumulators) spills 80
    bytes, so fp64 stops at G*NB <= 16.
    """
    nb = 1 if B <= 1 else 2 if B == 2 else 4 if B < 32 else 8
    return max(c for c in NB_CHOICES if c <= nb and _nb_fits(G, c, itemsize))


def _unroll(lines, indent: int) -> str:
    pad = " " * indent
    return "\n".join(pad + line for line in lines)


def _forward_source(G: int, S: int, K: int, NB: int, train: bool) -> str:
    name = f"forward_{'train' if train else 'infer'}_nb{NB}"
    body = forward_body(
        G, S, K,
        xw=lambda g: f"XW[t, b, {g} * H + j]",
        hu=lambda g: f"hu{g} + b_hh[{g} * H + j]",
        prev=lambda s: f"States[{s}, p, b, j]",
        new=lambda s: f"States[{s}, n, b, j]",
        saved=(lambda k: f"Saved[{k}, t, b, j]") if train else None,
        y="Y[t, b, j]",
        indent=28,
    )
    carry = _unroll(
        [f"States[{s}, n, b, j] = States[{s}, p, b, j]" for s in range(S)] + ["Y[t, b, j] = zero"],
        28,
    )
    # training keeps the state at every time boundary; inference two slots taking turns
    slots = _unroll(["if reverse:", "    t = T - 1 - step", "    p = t + 1", "    n = t",
                     "else:", "    t = step", "    p = t", "    n = t + 1"] if train else
                    ["t = T - 1 - step if reverse else step", "p = step & 1", "n = 1 - p"], 8)
    rows = _unroll([f"bb{m} = min(b0 + {m}, B - 1)" for m in range(NB)], 12)
    init = _unroll([f"a{g}_{m} = zero" for g in range(G) for m in range(NB)], 12)
    # The k-loop on unsigned offsets from row bases computed once per group: an unsigned
    # index has no negative-index fix-up, and LLVM turns each load into a pointer that
    # steps by KP (one add per load).  Unsigned 64-bit, not 32: the zero-extension of a
    # 32-bit index that may wrap keeps LLVM from that rewrite (3 integer ops per load).
    bases = _unroll([f"wb{g} = U64(({g} * U + u) * HP)" for g in range(G)]
                    + [f"hr{m} = States[0, p, bb{m}]" for m in range(NB)], 12)
    loads = _unroll(
        [f"w{g} = sm[wb{g} + k]" for g in range(G)]
        + [f"h{m} = hr{m}[k]" for m in range(NB)]
        + [f"a{g}_{m} += w{g} * h{m}" for g in range(G) for m in range(NB)]
        + ["k += KPu"],
        16,
    )
    store = _unroll(
        [f"sm[RED + {g * NB + m} * NT + tid] = a{g}_{m}" for g in range(G) for m in range(NB)], 12
    )
    tree = _unroll(
        [f"sm[RED + {i} * NT + tid] += sm[RED + {i} * NT + tid + half]" for i in range(G * NB)],
        20,
    )
    hu_sum = _unroll([f"hu{g} = sm[RED + ({g} * {NB} + m) * NT + es * KP]" for g in range(G)],
                     24)
    return f'''
@cuda.jit(cache=CACHE)
def {name}(XW, W_hh, b_hh, States, Saved, Y, lengths, reverse, U, NSLOT, s0, s1):
    T = XW.shape[0]
    B = XW.shape[1]
    H = W_hh.shape[1]
    NT = cuda.blockDim.x
    tid = cuda.threadIdx.x
    j0 = cuda.blockIdx.x * U
    nu = min(U, H - j0)
    zero = DT(0)
    KP = NT // NSLOT  # threads per dot product, on interleaved k: coalesced, conflict-free
    kp = tid % KP
    slot = tid // KP
    kpu, KPu, Hu = U64(kp), U64(KP), U64(H)
    # Row stride = KP (mod 32): a warp's KP-wide runs of k on different rows hit distinct banks.
    HP = H + (KP % 32 - H % 32) % 32
    RED = {G} * U * HP
    sm = cuda.shared.array(0, NBT)
    # This block's rows of W_hh (gates g of units j0..j0+nu) stay here for all steps.
    for idx in range(tid, {G} * nu * H, NT):
        r = idx // H
        k = idx - r * H
        g = r // nu
        u = r - g * nu
        sm[(g * U + u) * HP + k] = W_hh[g * H + j0 + u, k]
    cuda.syncthreads()
    ngroups = nu * ((B + {NB} - 1) // {NB})
    grid = this_grid_()
    for step in range(s0, s1):
        if step > s0:
            grid_sync_(grid)  # h of the previous step is complete in every block
{slots}
        for r0 in range(0, ngroups, NSLOT):
            grp = min(r0 + slot, ngroups - 1)  # idle slots redo the last group, results unused
            u = grp % nu
            b0 = (grp // nu) * {NB}
{rows}
{init}
{bases}
            k = kpu
            while k < Hu:
{loads}
{store}
            cuda.syncthreads()
            half = KP // 2
            while half > 0:  # tree sum of the KP partial sums of each output
                if kp < half:
{tree}
                cuda.syncthreads()
                half //= 2
            for e in range(tid, NSLOT * {NB}, NT):
                es = e % NSLOT
                m = e // NSLOT
                eg = r0 + es
                if eg < ngroups:
                    b = (eg // nu) * {NB} + m
                    if b < B:
                        j = j0 + eg % nu
{hu_sum}
                        if t < lengths[b]:
{body}
                        else:
{carry}
            cuda.syncthreads()
'''


def _backward_source(G: int, S: int, K: int, NB: int) -> str:
    name = f"backward_nb{NB}"
    body = backward_body(
        G, S, K,
        saved=lambda k: f"Saved[{k}, t, b, j]",
        prev=lambda s: f"States[{s}, p, b, j]",
        dstate=lambda s: "dh + dY[t, b, j]" if s == 0 else f"dS[{s}, b, j]",
        dxw=lambda g: f"dXW[t, b, {g} * H + j]",
        dhu=lambda g: f"dHU[t, b, {g} * H + j]",
        dprev=lambda s: f"dS[{s}, b, j]",
        indent=28,
    )
    masked = _unroll(
        ["dS[0, b, j] = dh"]
        + [f"dXW[t, b, {g} * H + j] = zero" for g in range(G)]
        + [f"dHU[t, b, {g} * H + j] = zero" for g in range(G)],
        28,
    )
    rows = _unroll([f"bb{m} = min(b0 + {m}, B - 1)" for m in range(NB)], 12)
    init = _unroll([f"a{m} = zero" for m in range(NB)], 12)
    bases = _unroll(["wb = U64(u * LP)"] + [f"dr{m} = dHU[tq, bb{m}]" for m in range(NB)], 12)
    loads = _unroll(
        ["w = sm[wb + k]"] + [f"a{m} += w * dr{m}[k]" for m in range(NB)] + ["k += KPu"],
        16,
    )
    store = _unroll([f"sm[RED + {m} * NT + tid] = a{m}" for m in range(NB)], 12)
    tree = _unroll(
        [f"sm[RED + {m} * NT + tid] += sm[RED + {m} * NT + tid + half]" for m in range(NB)], 20
    )
    return f'''
@cuda.jit(cache=CACHE)
def {name}(dY, dS, W_hh, States, Saved, lengths, reverse, dXW, dHU, U, NSLOT, s0, s1, final):
    T = dY.shape[0]
    B = dY.shape[1]
    H = dS.shape[2]
    GH = W_hh.shape[0]
    NT = cuda.blockDim.x
    tid = cuda.threadIdx.x
    j0 = cuda.blockIdx.x * U
    nu = min(U, H - j0)
    zero = DT(0)
    KP = NT // NSLOT
    kp = tid % KP
    slot = tid // KP
    kpu, KPu = U64(kp), U64(KP)
    LP = GH + (KP % 32 - GH % 32) % 32
    RED = U * LP
    sm = cuda.shared.array(0, NBT)
    # Columns j0..j0+nu of W_hh (rows of W_hh^T) stay here for all steps.
    for idx in range(tid, nu * GH, NT):
        i = idx // nu
        u = idx - i * nu
        sm[u * LP + i] = W_hh[i, j0 + u]
    cuda.syncthreads()
    ngroups = nu * ((B + {NB} - 1) // {NB})
    grid = this_grid_()
    send = s1 + 1 if final else s1
    for step in range(s0, send):
        if step > s0:
            grid_sync_(grid)  # dHU of the previous step is complete in every block
        last = step >= s1  # only the recurrent GEMM of the last step is left
        if reverse:
            t = step
            tq = max(t - 1, 0)  # the step processed before this one
            p = t + 1
        else:
            t = T - 1 - step
            tq = min(t + 1, T - 1)
            p = t
        kend = U64(GH if step > 0 else 0)  # nothing has flowed back before the first step
        for r0 in range(0, ngroups, NSLOT):
            grp = min(r0 + slot, ngroups - 1)
            u = grp % nu
            b0 = (grp // nu) * {NB}
{rows}
{init}
{bases}
            k = kpu
            while k < kend:
{loads}
{store}
            cuda.syncthreads()
            half = KP // 2
            while half > 0:
                if kp < half:
{tree}
                cuda.syncthreads()
                half //= 2
            for e in range(tid, NSLOT * {NB}, NT):
                es = e % NSLOT
                m = e // NSLOT
                eg = r0 + es
                if eg < ngroups:
                    b = (eg // nu) * {NB} + m
                    if b < B:
                        j = j0 + eg % nu
                        dh = dS[0, b, j] + sm[RED + m * NT + es * KP]
                        if last:
                            dS[0, b, j] = dh
                        elif t < lengths[b]:
{body}
                        else:
{masked}
            cuda.syncthreads()
'''


# The grid barrier.  On the GPU the kernels call Numba-CUDA's cooperative-groups
# intrinsics directly: ``cuda.cg.this_grid()`` goes through an ``@overload``
# whose implementation is compiled as a device function, which needs a live
# GPU context, so ``compile_ptx`` on a machine without a GPU would fail.  The
# intrinsics emit the same calls (``cudaCGGetIntrinsicHandle`` /
# ``cudaCGSynchronize``) and mark the kernel cooperative, like the overload.
# The simulator has no intrinsics, and a numba-cuda without these private
# names may come along: then the kernels spell the barrier the public way
# (``cuda.cg.this_grid()`` / ``grid.sync()``), the only textual difference.


def _grid_intrinsics() -> dict | None:
    try:
        from numba.cuda import cg

        return {"this_grid_": cg._this_grid, "grid_sync_": cg._grid_group_sync}
    except (ImportError, AttributeError):
        return None


def kernel_sources(cell, NB: int, public_barrier: bool = False) -> str:
    """Python source of the persistent kernels of ``cell`` with batch tile ``NB``."""
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    src = "from numba import cuda\n" + "\n".join([
        _forward_source(G, S, K, NB, True),
        _forward_source(G, S, K, NB, False),
        _backward_source(G, S, K, NB),
    ])
    if public_barrier:
        src = src.replace("this_grid_()", "cuda.cg.this_grid()")
        src = src.replace("grid_sync_(grid)", "grid.sync()")
    return src


@dataclass(frozen=True)
class PersistentKernels:
    forward_train: object
    forward_infer: object
    backward: object


@cache
def get_kernels(cell, dtype, NB: int) -> PersistentKernels:
    """Build the persistent kernels of ``cell`` for ``dtype`` and batch tile ``NB``."""
    if not cell.plain:
        from kernrnn.cell import CellError

        raise CellError(f"cell {cell.name!r}: the persistent kernel runs cells with a dense "
                        f"recurrence over all gates and no per-unit parameters, normalisation or "
                        f"raw input")
    dtype = np.dtype(dtype)
    sim = _simulator()
    intrinsics = None if sim else _grid_intrinsics()
    source = (
        f"# kernrnn persistent CUDA kernels: cell {cell.name!r}, {dtype}, NB={NB}, "
        f"math {cell_fingerprint(cell)}{', simulator' if sim else ''}\n"
        + kernel_sources(cell, NB, public_barrier=intrinsics is None)
    )
    build_math = python_scalar if sim else compile_scalar  # the simulator runs Python
    namespace = {
        "cell_forward": build_math(cell.forward, dtype),
        "cell_backward": build_math(cell.backward, dtype),
        "DT": dtype.type,
        "NBT": numba.from_dtype(dtype),
        "U64": numba.uint64,
        # numba-cuda caches cooperative kernels (it records that they need cudadevrt):
        # without the disk cache every process recompiles and relinks each variant
        "CACHE": not sim,
    }
    if intrinsics is not None:
        namespace.update(intrinsics)
    tag = f"persist{'sim' if sim else ''}_{cell.name}_{dtype.name}_nb{NB}"
    mod = load_module(source, tag, namespace)
    return PersistentKernels(
        getattr(mod, f"forward_train_nb{NB}"), getattr(mod, f"forward_infer_nb{NB}"),
        getattr(mod, f"backward_nb{NB}"),
    )


# -- compile check ----------------------------------------------------------------------


def ptx_signatures(dtype, strided: bool = True):
    """Numba signatures of the three kernels (for ``cuda.compile_ptx``)."""
    from numba import types

    f = types.float32 if np.dtype(dtype) == np.float32 else types.float64
    lay = "A" if strided else "C"

    def arr(nd, layout="C", dt=f):
        return types.Array(dt, nd, layout)

    i64, b1 = types.int64, types.boolean
    fwd = (arr(3), arr(2), arr(1), arr(4), arr(4), arr(3, lay), arr(1, dt=i64), b1,
           i64, i64, i64, i64)
    bwd = (arr(3, lay), arr(3), arr(2), arr(4), arr(4), arr(1, dt=i64), b1, arr(3), arr(3),
           i64, i64, i64, i64, b1)
    return fwd, bwd
