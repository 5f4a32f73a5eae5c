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

This module plans and launches the kernels; their generated source (how a
block splits its work, and how the simulator runs them step by step) is in
:mod:`kernrnn.backends.cuda.persistent_kernels`.

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

from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from kernrnn.backends.cuda.persistent_kernels import (  # noqa: F401 - re-exported
    ACC_REGISTERS,
    NB_CHOICES,
    PersistentKernels,
    _nb_fits,
    _nb_for,
    _simulator,
    get_kernels,
    kernel_sources,
    ptx_signatures,
)

__all__ = [
    "Plan", "DeviceProps", "plan", "supported", "supports", "device_props", "get_kernels",
    "kernel_sources", "forward_loop", "backward_loop", "ptx_signatures",
    "THREADS", "MAX_BATCH", "AUTO",
]

THREADS = 256  # threads per block on a GPU (8 warps)
MAX_BATCH = 64  # above this the per-step cuBLAS GEMM is the better tool (heuristic, unmeasured)
_STATIC_SMEM = 48 * 1024  # dynamic shared memory above this needs an opt-in attribute


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
    NB = _nb_for(B, G, isz) if nb is None else nb
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

    Only cells of the first contract (:attr:`kernrnn.cell.Cell.plain`: a
    dense recurrence over all gates, no per-unit parameters,
    normalisation or raw input).  Heuristic: one block per SM (so the grid
    is co-resident whatever the register use), each block keeps
    ``G*ceil(H/SMs)`` rows of ``W_hh`` (and the same number of values of
    ``W_hh^T`` for the backward pass) plus a
    reduction scratch in shared memory; the problem is taken when that fits
    the per-block opt-in limit (on an H100, 227 KiB: an fp32 LSTM up to
    H = 1,320, a GRU 1,504, an Elman RNN 2,688 at B = 16) and
    ``B <= MAX_BATCH``.  At larger batches the per-step GEMM is
    compute-bound and cuBLAS uses the GPU better than this simple
    shared-memory GEMM; the batch limit is a guess to be tuned on a GPU.
    """
    if not cell.plain:
        return False
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


#: Whether ``KERNRNN_CUDA_PATH=auto`` may pick this kernel.  False until a
#: device check (``python -m benchmarks.devicecheck``) has shown it equal
#: to the CPU and faster than the GEMM path on a real GPU; the path stays
#: selectable explicitly (``persistent``) meanwhile.
AUTO = False


def supports(cell, dtype, B: int, H: int, training: bool) -> bool:
    """The hook :mod:`kernrnn.backends.cuda` asks for its ``auto`` choice.

    False while :data:`AUTO` is False, under the simulator (it runs blocks
    one at a time), where no device answers, or where ``libcudadevrt`` is
    missing: ``auto`` then stays on the GEMM path instead of failing.
    """
    if not AUTO or _simulator() or not _cudadevrt_found():
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


# Both caches are keyed by (device, compiled kernel): the opt-in is an attribute of
# the kernel on one device, and co-residency depends on the device.
_smem_optin: dict = {}  # (device id, id(kernel)) -> dynamic shared memory opted in so far
_coop_limit: dict = {}  # (device id, id(kernel), threads, smem) -> co-resident blocks
_local_mem_warned: set = set()
_compiled: dict = {}  # (device id, id(kernel)) -> (compiled kernel, "module.function"), for reports


def _set_max_dynamic_smem(cufunc, nbytes: int) -> None:
    """Allow ``nbytes`` of dynamic shared memory for this kernel on its device.

    numba-cuda >= 0.23 loads kernels through the library API, so
    ``cufunc.handle`` is a ``CUkernel`` (attribute set per device); 0.20-0.22
    load modules, so it is a ``CUfunction``.  The ctypes binding of those
    older versions (``NUMBA_CUDA_USE_NVIDIA_BINDING=0``) has no way to set it.
    """
    from numba.cuda.cudadrv.driver import binding, driver

    handle = cufunc.handle
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    kernel_type = getattr(binding, "CUkernel", None)
    if kernel_type is not None and isinstance(handle, kernel_type):
        driver.cuKernelSetAttribute(attr, nbytes, handle, cufunc.device.id)
    elif isinstance(handle, binding.CUfunction):
        driver.cuFuncSetAttribute(handle, attr, nbytes)
    else:
        raise ValueError(
            f"persistent kernel: cannot allow {nbytes} bytes of shared memory through a "
            f"{type(handle).__name__} handle (numba-cuda's ctypes binding); use numba-cuda "
            f">= 0.23 or NUMBA_CUDA_USE_NVIDIA_BINDING=1, or the GEMM path"
        )


def _prepare(dispatcher, args, threads: int, smem: int, blocks: int):
    """Compile for these argument types, opt in to large shared memory, check co-residency.

    A block may use 48 KiB of shared memory, static and dynamic together,
    without the opt-in.  The opt-in only ever grows, so a kernel launched
    with several shared memory sizes (different H) keeps working for all of
    them.  Local memory (register spills) is allowed but warned about once.
    Returns the compiled kernel.
    """
    argtypes = tuple(dispatcher.typeof_pyval(a) for a in args)
    kernel = dispatcher.compile(argtypes)
    cufunc = kernel._codelibrary.get_cufunc()
    dev = cufunc.device.id
    static = int(cufunc.attrs.shared)
    kid = (dev, id(kernel))
    py = getattr(dispatcher, "py_func", None)
    _compiled[kid] = (kernel, f"{getattr(py, '__module__', '?')}.{getattr(py, '__name__', '?')}")
    limit = int(cufunc.device.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    if smem + static > limit:
        raise ValueError(
            f"persistent kernel: {smem} bytes of dynamic and {static} of static shared memory "
            f"per block exceed the device's {limit}; use the GEMM path"
        )
    if smem + static > _STATIC_SMEM and _smem_optin.get(kid, 0) < smem:
        _set_max_dynamic_smem(cufunc, smem)
        _smem_optin[kid] = smem
    key = kid + (threads, smem)
    if key not in _coop_limit:
        _coop_limit[key] = kernel.max_cooperative_grid_blocks(threads, smem)
    if blocks > _coop_limit[key]:
        raise ValueError(
            f"persistent kernel: {blocks} blocks of {threads} threads with {smem} bytes of shared "
            f"memory cannot all be resident at once (at most {_coop_limit[key]}); use the GEMM "
            f"path"
        )
    local = int(cufunc.attrs.local)
    if local and kid not in _local_mem_warned:
        import warnings

        _local_mem_warned.add(kid)
        warnings.warn(f"persistent kernel {cufunc.name}: {local} bytes of local memory per "
                      f"thread (register spills); correct but slower", RuntimeWarning,
                      stacklevel=4)
    return kernel


def _resolve(cell, B, H, dtype, blocks, threads, stepwise, nslot, nb):
    sim = _simulator()
    if threads is None:
        threads = 32 if sim else THREADS
    props = None
    if not sim:  # plan for, and launch on, CuPy's current GPU
        from kernrnn.backends.cuda.launch import follow_cupy_device

        follow_cupy_device()
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
    from kernrnn.backends.cuda.launch import quiet_low_occupancy

    stream = _default_stream() if stream is None else stream
    args = tuple(_wrap(a) for a in args)
    _prepare(kernel, args + steps[0], p.threads, smem, p.blocks)
    with quiet_low_occupancy():  # the grid is at most one block per SM on purpose
        for s in steps:
            kernel[p.blocks, p.threads, stream, smem](*args, *s)


def forward_loop(cell, XW, W_hh, b_hh, States, Saved, Y, lengths, reverse, training, *,
                 blocks=None, threads=None, stepwise=None, nslot=None, nb=None,
                 stream=None):
    """Fill ``States``, ``Saved`` (when ``training``) and ``Y`` like the CPU forward kernels.

    ``XW [T,B,G*H]`` has ``b_ih`` added; ``States [S,T+1,B,H]`` holds the
    initial state at boundary 0 (``reverse``: T); in inference ``States
    [S,2,B,H]``, two slots taking turns, holds it in slot 0 and ends with the
    final state in slot ``T & 1``; ``Y [T,B,H]`` may be a strided view.
    ``blocks``, ``threads``, ``nslot`` (outputs computed side by side;
    ``threads // nslot`` threads split each dot product) and
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
