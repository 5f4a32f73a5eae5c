"""Persistent fused recurrence kernels (Numba-CUDA): one launch for all T steps.

Why: with one GEMM launch and one pointwise launch per step, a 100-step
sequence at small batch spends its time in launch overhead and in re-reading
``W_hh`` from memory every step.  Here one cooperative launch runs the whole
time loop (Diamos et al. 2016, "Persistent RNNs"):

* each block owns a slice of ``U`` hidden units and keeps the matching rows of
  ``W_hh`` (all G gates of its units: ``G*U x H``; for the backward-data pass
  the matching columns, ``U x G*H``) in shared memory for the whole sequence;
* per step, a block computes its units' recurrent pre-activations for the
  whole batch (a small GEMM out of shared memory, split over the block's
  threads along the reduction and summed through shared memory), and runs the
  cell's pointwise step on them in the same kernel (the "epilogue"); the
  epilogue is generated from the cell's single definition, exactly as the CPU
  kernels are, so every registered cell gets a persistent kernel;
* ``h_t`` (backward: ``dHU_t``) goes through global memory to the other blocks,
  with one grid-wide barrier per step (``cuda.cg.this_grid().sync()``).  The
  grid is never larger than what can be co-resident (checked at launch).

Only the recurrence is here; ``XW`` (input GEMM, ``b_ih`` included) comes in
precomputed, and the weight gradients are large GEMMs afterwards (caller).
Array layouts are those of :mod:`kernrnn.backends.cpu`.

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

Limits, and what to tune first on a GPU (nothing here has been timed yet):

* shared memory per block: ``G*ceil(H/SMs)*H`` values of ``W_hh`` plus
  ``THREADS*G*NB`` of scratch; on an H100 (132 SMs, 227 KiB) an fp32 LSTM
  fits up to H = 1,320 (1,216 at B = 64), fp64 up to about 870
  (:func:`supported`);
* one block per SM, so the grid is co-resident whatever the register count
  (ptxas for sm_90: 135-175 registers per thread, 250 for the LSTM forward
  with NB = 8, no spills; see the tests);
* every block reads all of ``h_{t-1}`` (``B*H`` values) from L2 each step, and
  the inner loop issues G + NB loads per G*NB FMAs, so large batches are
  load-bound: bigger register tiles (several units per thread), staging
  ``h_{t-1}`` in shared memory and the ``MAX_BATCH``/``NB``/``NSLOT``
  heuristics are the knobs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import cache

import numba
import numpy as np

from kernrnn.backends.codegen import backward_body, cell_fingerprint, forward_body, load_module
from kernrnn.scalar import compile_scalar

__all__ = [
    "Plan", "DeviceProps", "plan", "supported", "supports", "device_props", "get_kernels",
    "kernel_sources", "forward_loop", "backward_loop", "ptx_signatures", "benchmark",
    "THREADS", "MAX_BATCH",
]

THREADS = 256  # threads per block on a GPU (8 warps)
MAX_BATCH = 64  # above this the per-step cuBLAS GEMM is the better tool (heuristic, unmeasured)
_STATIC_SMEM = 48 * 1024  # dynamic shared memory above this needs an opt-in attribute


def _simulator() -> bool:
    try:
        from numba.cuda import config as cuda_config
    except Exception:  # pragma: no cover - numba-cuda missing
        from numba import config as cuda_config
    return bool(getattr(cuda_config, "ENABLE_CUDASIM", False))


# -- generated kernels ------------------------------------------------------------------


NB_CHOICES = (1, 2, 4, 8)


def _nb_for(B: int, G: int) -> int:
    """Batch rows per thread in the GEMM (register tile): W is read once per NB rows.

    NB = 8 from B = 32 on: the threads of a warp then share one batch tile, so
    each ``h`` load is one cache line, and the inner loop issues G + 8 loads
    per 8*G FMAs instead of G + 4 per 4*G (a model, to be checked on a GPU).
    At most 32 accumulators (G*NB) per thread: an LSTM forward at NB = 8
    already takes 250 of the 255 registers (ptxas, sm_90), more would spill.
    """
    nb = 1 if B <= 1 else 2 if B == 2 else 4 if B < 32 else 8
    return max(c for c in NB_CHOICES if c <= nb and (c == 1 or G * c <= 32))


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
    rows = _unroll([f"bb{m} = min(b0 + {m}, B - 1)" for m in range(NB)], 12)
    init = _unroll([f"a{g}_{m} = zero" for g in range(G) for m in range(NB)], 12)
    loads = _unroll(
        [f"w{g} = sm[({g} * U + u) * HP + k]" for g in range(G)]
        + [f"h{m} = States[0, p, bb{m}, k]" for m in range(NB)]
        + [f"a{g}_{m} += w{g} * h{m}" for g in range(G) for m in range(NB)],
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
@cuda.jit
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
        if reverse:
            t = T - 1 - step
            p = t + 1
            n = t
        else:
            t = step
            p = t
            n = t + 1
        for r0 in range(0, ngroups, NSLOT):
            grp = min(r0 + slot, ngroups - 1)  # idle slots redo the last group, results unused
            u = grp % nu
            b0 = (grp // nu) * {NB}
{rows}
{init}
            for k in range(kp, H, KP):
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
    loads = _unroll(
        ["w = sm[u * LP + k]"] + [f"a{m} += w * dHU[tq, bb{m}, k]" for m in range(NB)], 16
    )
    store = _unroll([f"sm[RED + {m} * NT + tid] = a{m}" for m in range(NB)], 12)
    tree = _unroll(
        [f"sm[RED + {m} * NT + tid] += sm[RED + {m} * NT + tid + half]" for m in range(NB)], 20
    )
    return f'''
@cuda.jit
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
        kend = GH if step > 0 else 0  # nothing has flowed back before the first step
        for r0 in range(0, ngroups, NSLOT):
            grp = min(r0 + slot, ngroups - 1)
            u = grp % nu
            b0 = (grp // nu) * {NB}
{rows}
{init}
            for k in range(kp, kend, KP):
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
    dtype = np.dtype(dtype)
    sim = _simulator()
    intrinsics = None if sim else _grid_intrinsics()
    source = (
        f"# kernrnn persistent CUDA kernels: cell {cell.name!r}, {dtype}, NB={NB}, "
        f"math {cell_fingerprint(cell)}{', simulator' if sim else ''}\n"
        + kernel_sources(cell, NB, public_barrier=intrinsics is None)
    )
    namespace = {
        "cell_forward": compile_scalar(cell.forward, dtype),
        "cell_backward": compile_scalar(cell.backward, dtype),
        "DT": dtype.type,
        "NBT": numba.from_dtype(dtype),
    }
    if intrinsics is not None:
        namespace.update(intrinsics)
    tag = f"persist{'sim' if sim else ''}_{cell.name}_{dtype.name}_nb{NB}"
    mod = load_module(source, tag, namespace)
    return PersistentKernels(
        getattr(mod, f"forward_train_nb{NB}"), getattr(mod, f"forward_infer_nb{NB}"),
        getattr(mod, f"backward_nb{NB}"),
    )


# -- launch planning --------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProps:
    """What the plan needs to know about a GPU."""

    sm_count: int
    smem_per_block_optin: int  # bytes of shared memory one block may use (opt-in)
    name: str = "?"


def device_props() -> DeviceProps:
    """Properties of the current CUDA device."""
    from numba import cuda

    dev = cuda.get_current_device()
    return DeviceProps(
        int(dev.MULTIPROCESSOR_COUNT), int(dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
        dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name),
    )


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _nslot(groups: int, red_len: int, threads: int) -> int:
    """Outputs computed side by side; the other factor of ``threads`` splits the reduction.

    As many slots as groups (up to ``threads``), but keep at least ~8 terms
    per thread in the reduction so that the partial-sum exchange stays cheap.
    """
    nslot = min(threads, _pow2_at_least(groups))
    min_slots = threads // _pow2_at_least(max(1, red_len // 8))
    return max(nslot, min(threads, max(1, min_slots)))


@dataclass(frozen=True)
class Plan:
    """Grid shape and shared memory of one persistent launch pair."""

    U: int  # hidden units per block
    blocks: int
    threads: int
    NB: int
    nslot_fwd: int
    nslot_bwd: int
    smem_fwd: int  # bytes of dynamic shared memory
    smem_bwd: int

    @property
    def smem(self) -> int:
        return max(self.smem_fwd, self.smem_bwd)


def plan(cell, B: int, H: int, dtype, blocks: int, threads: int = THREADS,
         nb: int | None = None) -> Plan:
    """Split ``H`` units over at most ``blocks`` blocks of ``threads`` threads."""
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"threads must be a power of two, got {threads}")
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    G = cell.n_gates
    isz = np.dtype(dtype).itemsize
    U = -(-H // min(blocks, H))
    nblocks = -(-H // U)
    if nb is not None and nb not in NB_CHOICES:
        raise ValueError(f"nb must be one of {NB_CHOICES}, got {nb!r}")
    NB = _nb_for(B, G) if nb is None else nb
    groups = U * (-(-B // NB))
    return _with_nslot(
        Plan(U=U, blocks=nblocks, threads=threads, NB=NB, nslot_fwd=0, nslot_bwd=0,
             smem_fwd=0, smem_bwd=0),
        cell, H, isz, _nslot(groups, H, threads), _nslot(groups, G * H, threads))


def _padded(n: int, kp: int) -> int:
    """Row stride >= n with stride = kp (mod 32), as the kernels compute it."""
    return n + (kp % 32 - n % 32) % 32


def _with_nslot(p: Plan, cell, H: int, isz: int, nslot_fwd: int, nslot_bwd: int) -> Plan:
    G, T_ = cell.n_gates, p.threads
    return replace(
        p, nslot_fwd=nslot_fwd, nslot_bwd=nslot_bwd,
        smem_fwd=(G * p.U * _padded(H, T_ // nslot_fwd) + T_ * G * p.NB) * isz,
        smem_bwd=(p.U * _padded(G * H, T_ // nslot_bwd) + T_ * p.NB) * isz,
    )


def supported(cell, B: int, H: int, dtype, device_props: DeviceProps | None = None) -> bool:
    """Whether the persistent path should run this problem (the automatic choice).

    Heuristic: one block per SM (so the grid is co-resident whatever the
    register use), each block keeps ``G*ceil(H/SMs)`` rows of ``W_hh`` (and
    the same number of values of ``W_hh^T`` for the backward pass) plus a
    reduction scratch in shared memory; the problem is taken when that fits
    the per-block opt-in limit (on an H100, 227 KiB: an fp32 LSTM up to
    H = 1,320, a GRU 1,504, an Elman RNN 2,688 at B = 16) and
    ``B <= MAX_BATCH``.  At larger batches the per-step GEMM is
    compute-bound and cuBLAS uses the GPU better than this simple
    shared-memory GEMM; the batch limit is a guess to be tuned on a GPU.
    """
    if B < 1 or H < 1 or B > MAX_BATCH:
        return False
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        return False
    props = device_props if device_props is not None else globals()["device_props"]()
    p = plan(cell, B, H, dtype, blocks=props.sm_count)
    return p.smem <= props.smem_per_block_optin


@cache
def _cudadevrt_found() -> bool:
    """The grid barrier links libcudadevrt.a; without it the kernels cannot be built."""
    try:
        from numba.cuda.cudadrv import libs

        libs.check_static_lib(libs.get_cudalib("cudadevrt", static=True))
    except Exception:
        return False
    return True


def supports(cell, dtype, B: int, H: int, training: bool) -> bool:
    """The hook :mod:`kernrnn.backends.cuda` asks for its ``auto`` choice.

    False under the simulator (it runs blocks one at a time), where no device
    answers, or where ``libcudadevrt`` is missing: ``auto`` then stays on the
    GEMM path instead of failing.
    """
    if _simulator() or not _cudadevrt_found():
        return False
    try:
        return supported(cell, B, H, dtype)
    except Exception:
        return False


# -- launching --------------------------------------------------------------------------


def _default_stream():
    """CuPy's current stream as a Numba stream (the backend's stream rule)."""
    from numba import cuda

    try:
        import cupy
    except ImportError:
        return cuda.default_stream()
    ptr = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


def _wrap(a):
    from numba import cuda

    if cuda.is_cuda_array(a) and not isinstance(a, cuda.devicearray.DeviceNDArray):
        return cuda.as_cuda_array(a, sync=False)
    return a


_smem_optin: dict = {}  # id(compiled kernel) -> dynamic shared memory opted in so far
_coop_limit: dict = {}  # (id(compiled kernel), threads, smem) -> co-resident blocks


def _prepare(dispatcher, args, threads: int, smem: int, blocks: int):
    """Compile for these argument types, opt in to large shared memory, check co-residency.

    The opt-in only ever grows, so a kernel launched with several shared
    memory sizes (different H) keeps working for all of them.
    """
    argtypes = tuple(dispatcher.typeof_pyval(a) for a in args)
    kernel = dispatcher.compile(argtypes)
    kid = id(kernel)
    if smem > _STATIC_SMEM and _smem_optin.get(kid, 0) < smem:
        from numba.cuda.cudadrv.driver import binding, driver

        cufunc = kernel._codelibrary.get_cufunc()
        attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attr, smem, cufunc.handle, cufunc.device.id)
        _smem_optin[kid] = smem
    key = (kid, threads, smem)
    if key not in _coop_limit:
        _coop_limit[key] = kernel.max_cooperative_grid_blocks(threads, smem)
    if blocks > _coop_limit[key]:
        raise ValueError(
            f"persistent kernel: {blocks} blocks of {threads} threads with {smem} bytes of shared "
            f"memory cannot all be resident at once (at most {_coop_limit[key]}); use the GEMM "
            f"path"
        )


def _resolve(cell, B, H, dtype, blocks, threads, stepwise, nslot, nb):
    sim = _simulator()
    if threads is None:
        threads = 32 if sim else THREADS
    props = None
    if blocks is None:
        if sim:
            blocks = min(H, 4)
        else:
            props = device_props()
            blocks = props.sm_count
    p = plan(cell, B, H, dtype, blocks, threads, nb)
    if nslot is not None:
        if nslot < 1 or nslot & (nslot - 1) or nslot > threads:
            raise ValueError(f"nslot must be a power of two <= threads={threads}, got {nslot}")
        p = _with_nslot(p, cell, H, np.dtype(dtype).itemsize, nslot, nslot)
    if stepwise is None:
        stepwise = sim and p.blocks > 1
    if sim and not stepwise and p.blocks > 1:
        raise ValueError(
            f"the CUDA simulator runs blocks one after another, so a persistent launch of "
            f"{p.blocks} blocks would deadlock at its grid barrier; use stepwise=True or blocks=1"
        )
    if not sim:
        props = props or device_props()
        if p.smem > props.smem_per_block_optin:
            raise ValueError(
                f"persistent kernel for cell {cell.name!r}, H={H}, B={B}, {np.dtype(dtype)}: "
                f"needs {p.smem} bytes of shared memory per block, the device allows "
                f"{props.smem_per_block_optin}; use the GEMM path"
            )
    return p, stepwise


def _launch(kernel, p: Plan, smem: int, stream, args, steps, stepwise):
    """Run ``kernel`` over ``steps`` (list of (s0, s1, extra...)) launches."""
    sim = _simulator()
    if sim:
        # The simulator copies each argument as one contiguous buffer, so a
        # strided view (y of a bidirectional layer) goes in as a contiguous
        # copy and is written back afterwards.  On a GPU strides are native.
        views = [(i, a) for i, a in enumerate(args)
                 if isinstance(a, np.ndarray) and not a.flags.c_contiguous]
        args = list(args)
        for i, a in views:
            args[i] = np.ascontiguousarray(a)
        for s in steps:
            kernel[p.blocks, p.threads, 0, smem](*args, *s)
        for i, a in views:
            a[...] = args[i]
        return
    stream = _default_stream() if stream is None else stream
    args = tuple(_wrap(a) for a in args)
    _prepare(kernel, args + steps[0], p.threads, smem, p.blocks)
    for s in steps:
        kernel[p.blocks, p.threads, stream, smem](*args, *s)


def forward_loop(cell, XW, W_hh, b_hh, States, Saved, Y, lengths, reverse, training, *,
                 blocks=None, threads=None, stepwise=None, nslot=None, nb=None,
                 stream=None):
    """Fill ``States``, ``Saved`` (when ``training``) and ``Y`` like the CPU forward kernels.

    ``XW [T,B,G*H]`` has ``b_ih`` added; ``States [S,T+1,B,H]`` holds the
    initial state at boundary 0 (``reverse``: T); ``Y [T,B,H]`` may be a
    strided view.  ``blocks``, ``threads``, ``nslot`` (outputs computed
    side by side; ``threads // nslot`` threads split each dot product) and
    ``nb`` (batch rows per thread) override the plan, for tests;
    ``stepwise`` launches the same kernel once per step (the simulator's
    default when there are several blocks).
    """
    T, B, GH = XW.shape
    H = W_hh.shape[1]
    if T == 0 or B == 0:
        return
    p, stepwise = _resolve(cell, B, H, XW.dtype, blocks, threads, stepwise, nslot, nb)
    k = get_kernels(cell, XW.dtype, p.NB)
    kernel = k.forward_train if training else k.forward_infer
    args = (XW, W_hh, b_hh, States, Saved, Y, lengths, bool(reverse), p.U, p.nslot_fwd)
    steps = [(s, s + 1) for s in range(T)] if stepwise else [(0, T)]
    _launch(kernel, p, p.smem_fwd, stream, args, steps, stepwise)


def backward_loop(cell, dY, dS, W_hh, States, Saved, lengths, reverse, dXW, dHU, *,
                  blocks=None, threads=None, stepwise=None, nslot=None, nb=None,
                  stream=None):
    """BPTT of the recurrence like the CPU ``backward_loop``.

    ``dS [S,B,H]`` holds ``dhn`` on entry and ``dh0`` on exit (the per-step
    ``dS[0] += dHU_t @ W_hh`` runs inside the kernel); fills ``dXW`` and
    ``dHU`` (zero at masked steps).  Weight gradients are the caller's.
    """
    T, B, H = dY.shape
    if T == 0 or B == 0:
        return
    p, stepwise = _resolve(cell, B, H, dY.dtype, blocks, threads, stepwise, nslot, nb)
    kernel = get_kernels(cell, dY.dtype, p.NB).backward
    args = (dY, dS, W_hh, States, Saved, lengths, bool(reverse), dXW, dHU, p.U, p.nslot_bwd)
    if stepwise:
        steps = [(s, s + 1, False) for s in range(T)] + [(T, T, True)]
    else:
        steps = [(0, T, True)]
    _launch(kernel, p, p.smem_bwd, stream, args, steps, stepwise)


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


# -- benchmark (needs a GPU, CuPy and PyTorch) ----------------------------------------


def _flops(cell, T, B, I, H) -> float:
    """Forward FLOPs of one layer: input and recurrent GEMMs (the pointwise math is extra)."""
    return 2.0 * T * B * cell.n_gates * H * (I + H)


def benchmark(cells=("lstm", "gru"), T=100, hidden=(256, 512, 1024), batches=(1, 4, 16, 64),
              repeats=20, warmup=3, tf32=False, file=None):
    """Forward and training step, kernrnn (persistent and GEMM paths) vs PyTorch cuDNN.

    float32, I = H, one layer, one direction; prints one row per case with
    median times (ms), the time ratio kernrnn/cuDNN and achieved TFLOP/s
    (forward 2*T*B*G*H*(I+H) FLOPs, training step 3x that).  Times are CUDA
    event times around the whole call, on CuPy's current stream, after
    warm-up.  ``tf32=False`` keeps cuDNN in true float32 (PyTorch allows TF32
    tensor cores in cuDNN by default; kernrnn computes in float32), so both
    sides do the same arithmetic.  Returns the rows as dicts.
    """
    import sys

    import cupy
    import torch

    from kernrnn.functional import rnn_backward, rnn_forward
    from kernrnn.plugins import get_registry

    out = file or sys.stdout
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    props = device_props()
    rows = []
    print(f"# persistent-kernel benchmark on {props.name} ({props.sm_count} SMs), float32, "
          f"T={T}, I=H, cuDNN TF32 {'on' if tf32 else 'off'}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", file=out)
    print("| cell | H | B | path | fwd ms | cuDNN fwd ms | fwd ratio | fwd TFLOP/s | train ms "
          "| cuDNN train ms | train ratio | train TFLOP/s |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", file=out)

    def timed(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))

    def torch_timed(fn):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return float(np.median(times))

    from kernrnn.backends import cuda as cuda_backend  # the GEMM path and the layer plumbing

    for name in cells:
        cell = get_registry().get(name)
        for H in hidden:
            for B in batches:
                rows += _bench_case(cell, T, B, H, props, timed, torch_timed, cuda_backend,
                                    rnn_forward, rnn_backward, out)
    return rows


def _bench_case(cell, T, B, H, props, timed, torch_timed, cuda_backend, rnn_forward,
                rnn_backward, out):
    """One row per path for one (cell, H, B): kernrnn vs cuDNN, I = H."""
    import cupy
    import torch

    I, G = H, cell.n_gates
    rng = np.random.default_rng(0)
    bound = 1.0 / np.sqrt(H)

    def uniform(lo, hi, shape):
        return cupy.asarray(rng.uniform(lo, hi, shape).astype(np.float32))

    w_ih, w_hh = uniform(-bound, bound, (G * H, I)), uniform(-bound, bound, (G * H, H))
    b_ih, b_hh = uniform(-bound, bound, G * H), uniform(-bound, bound, G * H)
    x, dy = uniform(-1, 1, (T, B, I)), uniform(-1, 1, (T, B, H))
    f = _flops(cell, T, B, I, H)

    t_fwd = t_train = float("nan")
    tmod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}.get(cell.name)
    if tmod is not None:
        m = tmod(I, H).cuda()
        with torch.no_grad():
            for pname, arr in (("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh),
                               ("bias_ih_l0", b_ih), ("bias_hh_l0", b_hh)):
                getattr(m, pname).copy_(torch.as_tensor(arr, device="cuda"))
        tx = torch.as_tensor(x, device="cuda")
        tdy = torch.as_tensor(dy, device="cuda")
        txg = tx.clone().requires_grad_(True)

        def torch_fwd():
            with torch.no_grad():
                m(tx)

        def torch_train():
            y, _ = m(txg)
            y.backward(tdy)

        t_fwd = torch_timed(torch_fwd)
        t_train = torch_timed(torch_train)

    def k_fwd():
        rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, training=False)

    def k_train():
        _, _, ctx = rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, training=True)
        rnn_backward(ctx, dy)

    rows = []
    for path in ("persistent", "gemm"):
        if path == "persistent" and not supported(cell, B, H, np.float32, props):
            print(f"| {cell.name} | {H} | {B} | {path} | not supported |", file=out)
            continue
        cuda_backend.set_path(path)
        try:
            k_f = timed(k_fwd)
            k_t = timed(k_train)
        except Exception as exc:  # report and go on with the table
            print(f"| {cell.name} | {H} | {B} | {path} | failed: {type(exc).__name__}: {exc} |",
                  file=out)
            continue
        finally:
            cuda_backend.set_path(None)
        row = dict(cell=cell.name, H=H, B=B, path=path, fwd_ms=k_f, cudnn_fwd_ms=t_fwd,
                   train_ms=k_t, cudnn_train_ms=t_train,
                   fwd_tflops=f / k_f / 1e9, train_tflops=3 * f / k_t / 1e9)
        rows.append(row)
        print(f"| {cell.name} | {H} | {B} | {path} | {k_f:.3f} | {t_fwd:.3f} | "
              f"{k_f / t_fwd:.2f} | {row['fwd_tflops']:.2f} | {k_t:.3f} | "
              f"{t_train:.3f} | {k_t / t_train:.2f} | {row['train_tflops']:.2f} |",
              file=out, flush=True)
    return rows


def loop_benchmark(cell_name="lstm", T=100, H=512, B=4, repeats=20):
    """Time forward_loop/backward_loop alone on the GPU (no cuda.py needed)."""
    import cupy

    from kernrnn.plugins import get_registry

    cell = get_registry().get(cell_name)
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    f32 = np.float32
    XW = cupy.random.uniform(-1, 1, (T, B, G * H)).astype(f32)
    W = cupy.random.uniform(-1, 1, (G * H, H)).astype(f32) / math.sqrt(H)
    bh = cupy.zeros(G * H, f32)
    States = cupy.zeros((S, T + 1, B, H), f32)
    Saved = cupy.zeros((K, T, B, H), f32)
    Y = cupy.zeros((T, B, H), f32)
    lens = cupy.full(B, T, dtype=np.int64)
    dS = cupy.zeros((S, B, H), f32)
    dXW = cupy.zeros((T, B, G * H), f32)
    dHU = cupy.zeros((T, B, G * H), f32)

    def run_f():
        forward_loop(cell, XW, W, bh, States, Saved, Y, lens, False, True)

    def run_b():
        backward_loop(cell, Y, dS, W, States, Saved, lens, False, dXW, dHU)

    res = {}
    for label, fn in (("forward_loop", run_f), ("backward_loop", run_b)):
        fn()
        cupy.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        cupy.cuda.get_current_stream().synchronize()
        res[label] = (time.perf_counter() - t0) / repeats * 1e3
    return res



# -- GPU self-check (correctness on real hardware, before any timing) ---------------------


SELFCHECK_CASES = (  # T, B, H, I, reverse, lengths: several blocks, odd sizes, masking
    (7, 3, 200, 5, False, None),
    (5, 5, 300, 3, True, (5, 0, 3, 5, 1)),
    (6, 16, 1024, 8, False, None),
    (4, 1, 33, 2, True, None),
    (3, 64, 256, 4, False, (1, 2, 3) * 21 + (0,)),
)


def gpu_selfcheck(cells=None, cases=None, file=None) -> bool:
    """Run the persistent kernels on the GPU and compare them with the CPU kernels.

    Several-block grids with the real grid barrier (what the simulator cannot
    run): forward and BPTT for every registered cell (or ``cells``), float32
    and float64, variable lengths and the reverse direction, against
    :mod:`kernrnn.backends.cpu` on the same inputs (tolerances of
    :mod:`kernrnn.testing.tolerances`).  Also launches the same kernels once
    per step: per-block work is deterministic, so the persistent launch must
    match the stepwise one bit for bit; a broken barrier would show as a
    difference.  Prints one line per case and returns whether all passed.
    """
    import sys

    import cupy

    from kernrnn.backends import cpu
    from kernrnn.plugins import get_registry
    from kernrnn.testing import tolerances as tol

    out = file or sys.stdout
    reg = get_registry()
    names = list(cells) if cells is not None else reg.names()
    cases = SELFCHECK_CASES if cases is None else cases
    ok = True
    for name in names:
        cell = reg.get(name)
        G, S, K = cell.n_gates, cell.n_state, cell.n_saved
        for T, B, H, I, rev, lens in cases:
            for dt in (np.float32, np.float64):
                if not supported(cell, B, H, dt):
                    print(f"{name} T={T} B={B} H={H} {np.dtype(dt).name}: not supported, skipped",
                          file=out)
                    continue
                rng = np.random.default_rng(T * 1000 + B * 10 + H)
                bd = 1 / np.sqrt(H)
                W_ih = rng.uniform(-bd, bd, (G * H, I)).astype(dt)
                W_hh = rng.uniform(-bd, bd, (G * H, H)).astype(dt)
                b_ih = rng.uniform(-bd, bd, G * H).astype(dt)
                b_hh = rng.uniform(-bd, bd, G * H).astype(dt)
                x = rng.uniform(-1, 1, (T, B, I)).astype(dt)
                h0 = rng.uniform(-1, 1, (S, B, H)).astype(dt)
                dy = rng.uniform(-1, 1, (T, B, H)).astype(dt)
                dhn = rng.uniform(-1, 1, (S, B, H)).astype(dt)
                lengths = np.array(lens if lens is not None else [T] * B, np.int64)
                y_c, hn_c, ctx = cpu.forward(cell, x, W_ih, W_hh, b_ih, b_hh, h0, lengths,
                                             rev, True)
                dx_c, dh0_c, g_c = cpu.backward(ctx, dy, dhn)
                XW = (x.reshape(T * B, I) @ W_ih.T).reshape(T, B, G * H) + b_ih
                results = {}
                for mode in ("persistent", "stepwise"):
                    States = cupy.zeros((S, T + 1, B, H), dt)
                    States[:, T if rev else 0] = cupy.asarray(h0)
                    Saved = cupy.zeros((K, T, B, H), dt)
                    ybuf = cupy.full((T, B, 2 * H), np.nan, dt)
                    Y = ybuf[:, :, :H]  # strided, as in a bidirectional layer
                    d_len = cupy.asarray(lengths)
                    d_W = cupy.asarray(W_hh)
                    forward_loop(cell, cupy.asarray(XW), d_W, cupy.asarray(b_hh), States, Saved,
                                 Y, d_len, rev, True, stepwise=mode == "stepwise")
                    dS = cupy.asarray(dhn)
                    dXW = cupy.full((T, B, G * H), np.nan, dt)
                    dHU = cupy.full((T, B, G * H), np.nan, dt)
                    backward_loop(cell, cupy.asarray(dy), dS, d_W, States, Saved, d_len, rev,
                                  dXW, dHU, stepwise=mode == "stepwise")
                    cupy.cuda.get_current_stream().synchronize()
                    dXW_h, dHU_h = dXW.get().reshape(T * B, -1), dHU.get().reshape(T * B, -1)
                    Hprev = States.get()[0, 1:] if rev else States.get()[0, :T]
                    results[mode] = dict(
                        y=Y.get(), hn=States.get()[:, 0 if rev else T],
                        dx=(dXW_h @ W_ih).reshape(T, B, I), dh0=dS.get(),
                        weight_hh=dHU_h.T @ Hprev.reshape(T * B, H),
                        weight_ih=dXW_h.T @ x.reshape(T * B, I),
                    )
                r = results["persistent"]
                want = dict(y=y_c, hn=hn_c, dx=dx_c, dh0=dh0_c, weight_hh=g_c["weight_hh"],
                            weight_ih=g_c["weight_ih"])
                errs, bad = [], []
                for key, w in want.items():
                    t = tol.forward_tolerance(dt) if key in ("y", "hn") else tol.grad_tolerance(dt)
                    err = float(np.max(np.abs(r[key] - w) / (t["atol"] + t["rtol"] * np.abs(w))))
                    errs.append(f"{key} {err:.2f}")
                    if not err <= 1:
                        bad.append(key)
                same = all(np.array_equal(r[k], results["stepwise"][k], equal_nan=True)
                           for k in r)
                if not same:
                    bad.append("persistent != stepwise")
                ok &= not bad
                print(f"{'ok  ' if not bad else 'FAIL'} {name} T={T} B={B} H={H} rev={rev} "
                      f"{np.dtype(dt).name}: error/tolerance {', '.join(errs)}"
                      f"{'; ' + ', '.join(bad) if bad else ''}", file=out, flush=True)
    return ok


def main(argv=None) -> int:
    """``python -m kernrnn.backends.cuda_persistent [check|bench|loops]`` on a GPU machine."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("what", nargs="*", help="check, bench, loops (default: check bench)")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--hidden", default="256,512,1024")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    what = args.what or ["check", "bench"]
    bad = sorted(set(what) - {"check", "bench", "loops"})
    if bad:
        ap.error(f"unknown task(s) {', '.join(bad)}; choose from check, bench, loops")
    cells = [c for c in args.cells.split(",") if c]
    status = 0
    if "check" in what and not gpu_selfcheck():
        status = 1
    if "loops" in what:
        for name in cells:
            for H in (int(h) for h in args.hidden.split(",")):
                for B in (int(b) for b in args.batches.split(",")):
                    res = loop_benchmark(name, 100, H, B, args.repeats)
                    print(f"{name} H={H} B={B}: " + ", ".join(
                        f"{k} {v:.3f} ms" for k, v in res.items()), flush=True)
    if "bench" in what:
        benchmark(cells=cells, hidden=tuple(int(h) for h in args.hidden.split(",")),
                  batches=tuple(int(b) for b in args.batches.split(",")),
                  repeats=args.repeats)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
