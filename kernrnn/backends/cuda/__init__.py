"""CUDA backend: Numba-CUDA kernels and cuBLAS GEMMs (via CuPy) for one layer and direction.

Same interface and array layouts as :mod:`kernrnn.backends.cpu` (``XW
[T,B,G*H]``, ``States [S,T+1,B,H]`` indexed by time boundary, ``Saved
[K,T,B,H]``, ``dXW``/``dHU [T,B,G*H]``), so :mod:`kernrnn.layer` and
:mod:`kernrnn.functional` run unchanged with ``device="cuda"``.

Per layer and direction:

* forward: ``XW = x @ W_ih.T + b_ih`` for all steps in one cuBLAS GEMM, then
  per step one GEMM ``HU = h_{t-1} @ W_hh.T`` and one fused pointwise kernel
  (bias ``b_hh``, the cell's math, lengths masking, output and saved values);
* backward: per step one fused pointwise kernel (adds the pending recurrent
  gradient ``dHrec`` and ``dy_t``, runs the cell's backward, writes
  ``dXW_t``, ``dHU_t`` and the element-wise part of ``dh_{t-1}``) and one GEMM
  ``dHrec = dHU_t @ W_hh``; the weight gradients are large GEMMs afterwards.

So each step costs two launches; nothing waits on the host inside the time
loop.  Kernels run on CuPy's current stream.  Arrays are wrapped once per call
with ``cuda.as_cuda_array(..., sync=False)`` (Numba would otherwise
synchronise the producer stream at every launch, see DESIGN.md); after the
first launch of a loop, kernels are launched without Numba's type dispatch and
the per-step GEMMs call cuBLAS directly (:mod:`kernrnn.backends.cuda._cublas`,
a handle bound to the stream).  With ``KERNRNN_CUDA_GRAPHS=1`` (or
:func:`set_graphs`) a loop seen twice with the same buffers is captured into a
CUDA graph and replayed, removing the per-launch Python cost; that needs the
direct cuBLAS calls (CuPy's own cuBLAS wrappers refuse to run while a stream
captures).

The recurrence can instead run in the persistent fused kernel of
:mod:`kernrnn.backends.cuda.persistent` (when that module exists); choose with
``KERNRNN_CUDA_PATH=auto|gemm|persistent`` or :func:`set_path`.  ``auto``
asks the module's ``supports``, which says no until the kernel has been
measured correct and faster on a GPU (``persistent.AUTO``).  Its contract:

* ``supports(cell, dtype, B, H, training) -> bool`` (optional; used by ``auto``)
* ``forward_loop(cell, XW, W_hh, b_hh, States, Saved, Y, lengths, reverse,
  training)`` fills ``States`` (all boundaries after the initial one), ``Saved``
  (when ``training``) and ``Y``, exactly as :func:`_gemm_forward_loop` does;
* ``backward_loop(cell, dY, dS, W_hh, States, Saved, lengths, reverse, dXW,
  dHU)``: ``dS [S,B,H]`` holds ``dhn`` on entry and the complete ``dh0`` on
  exit; fills ``dXW`` and ``dHU`` (zero rows at masked steps).

Both run on CuPy's current stream without host synchronisation; ``lengths``
is int64 ``[B]`` on the device; ``Y`` and ``dY`` may be strided views (a
slice of a bidirectional layer's output); all other arrays are C-contiguous.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) NumPy stands in for
CuPy and the same kernels run on the CPU, so CI tests this module's logic.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from kernrnn.backends import input_and_weight_gradients
from kernrnn.backends.codegen import backward_body, cell_fingerprint, forward_body, load_module
from kernrnn.scalar import compile_scalar

__all__ = [
    "xp", "SIMULATOR", "CudaUnavailableError", "require", "asarray", "from_host", "lengths",
    "forward", "backward", "ForwardContext", "get_kernels", "kernel_sources", "set_path",
    "get_path", "PATHS", "BLOCK", "set_graphs", "graphs_enabled", "graph_stats",
]

PATHS = ("auto", "gemm", "persistent")
PATH_ENV = "KERNRNN_CUDA_PATH"
BLOCK = 256  # threads per block of the pointwise kernels
# The simulator runs each thread of a block as a Python thread: small blocks keep it
# fast and give small problems several blocks (and a partial last one) to check.
SIM_BLOCK = 8
INSTALL_HINT = (
    "install the CUDA extra matching your driver: pip install 'kernrnn[cuda12]' "
    "(CUDA 12) or pip install 'kernrnn[cuda13]' (CUDA 13)"
)


class CudaUnavailableError(RuntimeError):
    """device='cuda' was asked for but CuPy, numba-cuda or a GPU is missing."""


# -- what is available ---------------------------------------------------------

_import_error: str | None = None
try:
    from numba import cuda
except Exception as exc:  # numba-cuda missing or broken
    cuda = None
    _import_error = f"numba-cuda could not be imported ({type(exc).__name__}: {exc})"


def _simulator_enabled() -> bool:
    if cuda is None:
        return False
    try:
        from numba.cuda.core import config as cuda_config  # numba-cuda
    except ImportError:  # numba's built-in target
        from numba import config as cuda_config
    return bool(getattr(cuda_config, "ENABLE_CUDASIM", False))


SIMULATOR = _simulator_enabled()

cupy = None
if not SIMULATOR:
    try:
        import cupy  # noqa: F811
    except Exception as exc:
        cupy = None
        _cupy_error = f"CuPy could not be imported ({type(exc).__name__}: {exc})"
    else:
        _cupy_error = None
else:
    _cupy_error = None

#: The array module of this backend: CuPy on a GPU, NumPy under the simulator
#: (or, so that importing never fails, when CuPy is missing; :func:`require`
#: then refuses to run).
xp = cupy if cupy is not None else np


def require() -> None:
    """Raise :class:`CudaUnavailableError` naming what is missing and how to install it."""
    if SIMULATOR:
        return
    if cuda is None:
        raise CudaUnavailableError(f"device='cuda' needs numba-cuda: {_import_error}; "
                                   + INSTALL_HINT)
    if cupy is None:
        raise CudaUnavailableError(f"device='cuda' needs CuPy: {_cupy_error}; " + INSTALL_HINT)
    problem = _gpu_problem()
    if problem:
        raise CudaUnavailableError(
            f"device='cuda' needs an NVIDIA GPU with a working driver: {problem}. If the GPU "
            f"is there, check that the CuPy and numba-cuda builds match its CUDA version; "
            + INSTALL_HINT
        )


@lru_cache(maxsize=1)
def _gpu_problem() -> str:
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy finds no usable GPU ({type(exc).__name__}: {exc})"
    if n < 1:
        return "CuPy reports 0 GPUs"
    try:
        if not cuda.is_available():
            return "numba-cuda finds no usable GPU (cuda.is_available() is False)"
    except Exception as exc:
        return f"numba-cuda cannot reach the GPU ({type(exc).__name__}: {exc})"
    return ""


# -- arrays ----------------------------------------------------------------------


def asarray(a):
    """The backend's array for ``a``, without a copy and without a dtype change.

    Accepts CuPy arrays and anything with DLPack (e.g. PyTorch CUDA tensors,
    taken through DLPack so that CuPy's current stream waits for the
    producer's current stream) or ``__cuda_array_interface__``; the result
    shares its memory.  NumPy arrays are copied to the device once (under
    the simulator they stay NumPy).  Non-contiguous inputs become contiguous
    (one device copy).
    """
    if SIMULATOR or cupy is None:
        if hasattr(a, "__cuda_array_interface__") or _is_cuda_tensor(a):
            raise TypeError(
                f"got a GPU array ({type(a).__name__}) but the CUDA backend runs under the "
                f"simulator, where arrays are NumPy arrays"
            )
        return np.ascontiguousarray(a)
    if isinstance(a, cupy.ndarray):
        return cupy.ascontiguousarray(a)
    if hasattr(a, "detach") and _is_cuda_tensor(a):
        # a PyTorch tensor that requires grad refuses to export itself; we only read it
        a = a.detach()
    if hasattr(a, "__dlpack__") and _is_cuda_tensor(a):
        # DLPack first: CuPy hands the producer its current stream, and the producer
        # (PyTorch) makes that stream wait for its own current stream.  PyTorch's
        # __cuda_array_interface__ (version 2) carries no stream, so kernrnn could
        # read a tensor that torch is still writing.
        return cupy.ascontiguousarray(cupy.from_dlpack(a))
    if hasattr(a, "__cuda_array_interface__"):
        # version 3 names its stream, and CuPy synchronises on it
        return cupy.ascontiguousarray(cupy.asarray(a))
    if hasattr(a, "detach") and hasattr(a, "numpy"):  # a CPU torch tensor
        a = a.detach().numpy()
    if isinstance(a, np.ndarray):
        return cupy.asarray(np.ascontiguousarray(a))
    raise TypeError(
        f"expected a CuPy array, an array with __cuda_array_interface__ or DLPack (e.g. a "
        f"PyTorch CUDA tensor) or a NumPy array, got {type(a).__name__}"
    )


def _is_cuda_tensor(a) -> bool:
    dev = getattr(a, "device", None)
    if getattr(dev, "type", None) == "cuda":
        return True
    dl = getattr(a, "__dlpack_device__", None)
    if callable(dl):
        try:
            return dl()[0] in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:
            return False
    return False


def from_host(a: np.ndarray):
    """Copy a host array to the device (a NumPy copy under the simulator)."""
    a = np.ascontiguousarray(a)
    if SIMULATOR or cupy is None:
        return a.copy()
    return cupy.asarray(a)


def lengths(lens: np.ndarray):
    """Sequence lengths ``int64 [B]`` on the device, copied once per forward call."""
    return from_host(np.asarray(lens, dtype=np.int64))


# -- kernels -----------------------------------------------------------------------


def _forward_source(G: int, S: int, K: int, train: bool) -> str:
    body = forward_body(
        G, S, K,
        xw=lambda g: f"XW[t, b, {g} * H + j]",
        hu=lambda g: f"HU[b, {g} * H + j] + b_hh[{g} * H + j]",
        prev=lambda s: f"States[{s}, p, b, j]",
        new=lambda s: f"States[{s}, n, b, j]",
        saved=(lambda k: f"Saved[{k}, t, b, j]") if train else None,
        y="Y[t, b, j]",
        indent=8,
    )
    carry = "\n".join(f"        States[{s}, n, b, j] = States[{s}, p, b, j]" for s in range(S))
    name = "forward_train" if train else "forward_infer"
    return f'''
def {name}_py(XW, HU, b_hh, States, Saved, Y, lengths, t, p, n):
    """One forward step for every (batch, unit) element; thread = element."""
    idx = cuda.grid(1)
    B = XW.shape[1]
    H = States.shape[3]
    if idx >= B * H:
        return
    b = idx // H
    j = idx - b * H
    if t < lengths[b]:
{body}
    else:
{carry}
        Y[t, b, j] = 0


{name} = cuda.jit(cache=CACHE)({name}_py)
'''


def _backward_source(G: int, S: int, K: int) -> str:
    body = backward_body(
        G, S, K,
        saved=lambda k: f"Saved[{k}, t, b, j]",
        prev=lambda s: f"States[{s}, p, b, j]",
        dstate=lambda s: ("dS[0, b, j] + dHrec[b, j] + dY[t, b, j]" if s == 0
                          else f"dS[{s}, b, j]"),
        dxw=lambda g: f"dXW[t, b, {g} * H + j]",
        dhu=lambda g: f"dHU[t, b, {g} * H + j]",
        dprev=lambda s: f"dS[{s}, b, j]",
        indent=8,
    )
    zero = "\n".join(f"        dXW[t, b, {g} * H + j] = 0\n        dHU[t, b, {g} * H + j] = 0"
                     for g in range(G))
    return f'''
def backward_step_py(dY, dS, dHrec, Saved, States, lengths, dXW, dHU, t, p):
    """One BPTT step per element.  dHrec holds dHU_(t+1) @ W_hh, the recurrent part
    of dh_t not yet added to dS[0]; a masked step passes the state gradient on."""
    idx = cuda.grid(1)
    B = dS.shape[1]
    H = dS.shape[2]
    if idx >= B * H:
        return
    b = idx // H
    j = idx - b * H
    if t < lengths[b]:
{body}
    else:
        dS[0, b, j] = dS[0, b, j] + dHrec[b, j]
{zero}


backward_step = cuda.jit(cache=CACHE)(backward_step_py)


def add_py(out, a):
    """out += a, element-wise over [B, H] (the last step's pending recurrent gradient)."""
    idx = cuda.grid(1)
    B = out.shape[0]
    H = out.shape[1]
    if idx < B * H:
        b = idx // H
        j = idx - b * H
        out[b, j] = out[b, j] + a[b, j]


add = cuda.jit(cache=CACHE)(add_py)
'''


def kernel_sources(cell) -> str:
    """The generated CUDA module source of ``cell`` (the same for every dtype)."""
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    return (
        f"# kernrnn CUDA kernels: cell {cell.name!r}, math {cell_fingerprint(cell)}\n"
        "from numba import cuda\n"
        + _forward_source(G, S, K, True) + _forward_source(G, S, K, False)
        + _backward_source(G, S, K)
    )


@dataclass(frozen=True)
class CudaKernels:
    """The CUDA kernels of one cell in one precision, plus their Python sources."""

    forward_train: object
    forward_infer: object
    backward_step: object
    add: object
    module: object  # the generated module (``*_py`` functions for compile_ptx)


@cache
def get_kernels(cell, dtype) -> CudaKernels:
    """Build the CUDA kernels of ``cell`` for ``dtype`` (compiled lazily per argument types)."""
    if cuda is None:
        raise CudaUnavailableError(f"CUDA kernels need numba-cuda: {_import_error}; "
                                   + INSTALL_HINT)
    dtype = np.dtype(dtype)
    source = kernel_sources(cell)
    source = f"# dtype {dtype}\n" + source
    namespace = {
        "cell_forward": compile_scalar(cell.forward, dtype),
        "cell_backward": compile_scalar(cell.backward, dtype),
        "CACHE": not SIMULATOR,
    }
    tag = f"cuda{'sim' if SIMULATOR else ''}_{cell.name}_{dtype.name}"
    m = load_module(source, tag, namespace)
    return CudaKernels(m.forward_train, m.forward_infer, m.backward_step, m.add, m)


def ptx_signatures(dtype, y_layout: str = "A"):
    """Numba signatures of the kernels for :func:`numba.cuda.compile_ptx`.

    ``Y``/``dY`` are views into a layer's ``[T, B, D*H]`` output, hence
    layout ``"A"``; all other arrays are C-contiguous.
    """
    from numba import types as nt

    f = nt.float32 if np.dtype(dtype) == np.float32 else nt.float64
    i = nt.int64

    def arr(ndim, layout="C", dt=f):
        return nt.Array(dt, ndim, layout)

    fwd = (arr(3), arr(2), arr(1), arr(4), arr(4), arr(3, y_layout), arr(1, dt=i), i, i, i)
    bwd = (arr(3, y_layout), arr(3), arr(2), arr(4), arr(4), arr(1, dt=i), arr(3), arr(3), i, i)
    add = (arr(2), arr(2))
    return {"forward_train_py": fwd, "forward_infer_py": fwd, "backward_step_py": bwd,
            "add_py": add}


@contextlib.contextmanager
def _quiet_low_occupancy():
    """Silence Numba's low-occupancy warning: small grids are intended here (a
    pointwise step over B*H elements, a persistent grid of at most one block per SM)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU "
                                r"under-utilization")
        yield


def _numba_stream():
    """CuPy's current stream (and device) as a Numba stream."""
    dev = cupy.cuda.Device().id
    if cuda.get_current_device().id != dev:  # follow CuPy's current GPU
        cuda.select_device(dev)
    ptr = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


class _Launcher:
    """Launches kernels on one stream with arguments wrapped once.

    The first launch of a kernel in a loop goes through Numba's dispatcher
    (type dispatch, compilation or the disk cache); later launches call the
    compiled kernel's ``launch`` directly, skipping the per-call typing of
    every argument.  They pass the stream object the dispatcher itself passed
    (its launch configuration's ``stream``: from numba-cuda 0.23 on a
    ``cuda.core`` stream built from the handle once per loop, before that the
    Numba stream), so cuda.core never converts a foreign stream, with a
    DeprecationWarning, at every launch.  If that internal
    entry point is missing or raises (another numba-cuda version), launches
    go through the dispatcher.
    """

    fast_enabled = True  # cleared (with one warning) the first time a fast launch raises

    def __init__(self, stream=None):
        self.stream = None if SIMULATOR else (stream if stream is not None else _numba_stream())
        self._launch_stream = self.stream
        self._fast = {}

    @staticmethod
    def wrap(a):
        """A Numba device view of a CuPy array, without syncing its stream.

        Under the simulator: a view of the NumPy array that the simulated
        kernel writes through (plain NumPy arguments would be copied in and
        out at every launch, and strided ones refused).
        """
        if SIMULATOR:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            return FakeCUDAArray(a)
        return cuda.as_cuda_array(a, sync=False)

    def __call__(self, kernel, nthreads, *args):
        if nthreads <= 0:
            return
        if SIMULATOR:
            kernel[(nthreads + SIM_BLOCK - 1) // SIM_BLOCK, SIM_BLOCK](*args)
            return
        grid = (nthreads + BLOCK - 1) // BLOCK
        fast = self._fast.get(id(kernel))
        if fast is not None and _Launcher.fast_enabled:
            try:
                fast.launch(args, (grid, 1, 1), (BLOCK, 1, 1), self._launch_stream, 0)
                return
            except Exception as exc:  # noqa: BLE001 - the dispatcher below still works
                _Launcher.fast_enabled = False
                warnings.warn(f"kernrnn: direct kernel launch failed ({type(exc).__name__}: "
                              f"{exc}); launching through Numba's dispatcher from now on",
                              RuntimeWarning, stacklevel=3)
        with _quiet_low_occupancy():
            configured = kernel[grid, BLOCK, self.stream]
        configured(*args)
        self._launch_stream = getattr(configured, "stream", self.stream)
        try:
            argtypes = tuple(kernel.typeof_pyval(a) for a in args)
            compiled = kernel.overloads[argtypes]
            if callable(getattr(compiled, "launch", None)):
                self._fast[id(kernel)] = compiled
        except Exception:  # noqa: BLE001 - keep the dispatcher path
            pass


# -- per-step GEMMs ----------------------------------------------------------------------

_raw_gemm_ok: dict = {}  # dtype -> direct cuBLAS call checked against cupy.matmul


def _step_gemm(A_stack, Bm, C, trans_b: bool):
    """``f(i)``: ``C = A_stack[i] @ (Bm.T if trans_b else Bm)`` for the time loop.

    On a GPU this calls cuBLAS's ``sgemm``/``dgemm`` directly
    (:mod:`kernrnn.backends.cuda._cublas`: a handle bound to the current
    stream, pointers computed once), which also works while the stream is
    capturing a CUDA graph; ``cupy.matmul`` costs tens of microseconds of
    Python per call, more than a small step's GEMM itself, and cannot be
    captured.  The direct call is checked once per process and dtype against
    ``cupy.matmul`` and falls back to it on any mismatch or error.
    """
    def fallback(i):
        xp.matmul(A_stack[i], Bm.T if trans_b else Bm, out=C)

    if SIMULATOR or not (A_stack.flags.c_contiguous and Bm.flags.c_contiguous
                         and C.flags.c_contiguous):
        return fallback
    dtype = np.dtype(C.dtype)
    if dtype not in _raw_gemm_ok:
        _raw_gemm_ok[dtype] = _check_raw_gemm(dtype)
    blas = _current_blas() if _raw_gemm_ok[dtype] else None
    if blas is None:
        return fallback
    return _raw_step_gemm(blas, A_stack, Bm, C, trans_b)


def _current_blas():
    from kernrnn.backends.cuda import _cublas

    return _cublas.for_stream(cupy.cuda.get_current_stream().ptr)


def _raw_step_gemm(blas, A_stack, Bm, C, trans_b):
    """Row-major ``C = A @ op(B)`` is column-major ``C^T = op(B)^T @ A^T``, hence the
    swapped operands; ``alpha``/``beta`` are host values (cuBLAS's default pointer
    mode), which a graph capture records by value."""
    from kernrnn.backends.cuda._cublas import CublasError

    dtype = np.dtype(C.dtype)
    gemm = blas.sgemm if dtype == np.float32 else blas.dgemm
    handle = blas.handle
    M, K = A_stack.shape[1], A_stack.shape[2]
    N = C.shape[1]
    consts = np.array([1, 0], dtype=dtype)  # alpha, beta
    alpha, beta = consts.ctypes.data, consts.ctypes.data + dtype.itemsize
    base, step = A_stack.data.ptr, M * K * dtype.itemsize
    b_ptr, c_ptr = Bm.data.ptr, C.data.ptr
    op_n, op_t = 0, 1  # CUBLAS_OP_N, CUBLAS_OP_T
    op_b = op_t if trans_b else op_n
    ldb = Bm.shape[1]
    keep = (A_stack, Bm, C, consts, blas)  # the closure keeps buffers and workspace alive

    def f(i, _keep=keep):
        status = gemm(handle, op_b, op_n, N, M, K, alpha, b_ptr, ldb,
                      base + i * step, K, beta, c_ptr, N)
        if status:
            raise CublasError(f"cublas{'S' if dtype == np.float32 else 'D'}gemm_v2 failed "
                              f"with status {status} (C[{M}, {N}], K={K})")

    return f


def _check_raw_gemm(dtype) -> bool:
    """One small comparison of the direct cuBLAS call with cupy.matmul (synchronises once)."""
    from kernrnn.backends.cuda import _cublas

    try:
        blas = _current_blas()
        if blas is None:
            warnings.warn(f"kernrnn: direct cuBLAS calls unavailable ({_cublas.unavailable_reason()}); "
                          f"using cupy.matmul per step (and no CUDA graphs)", RuntimeWarning,
                          stacklevel=3)
            return False
        rs = cupy.random.RandomState(0)
        A = rs.uniform(-1, 1, (3, 5, 7)).astype(dtype)
        ok = True
        for trans_b, shape in ((True, (6, 7)), (False, (7, 6))):
            Bm = rs.uniform(-1, 1, shape).astype(dtype)
            C = cupy.empty((5, 6), dtype=dtype)
            _raw_step_gemm(blas, A, Bm, C, trans_b)(2)
            want = A[2] @ (Bm.T if trans_b else Bm)
            ok = ok and bool(cupy.allclose(C, want, rtol=1e-4, atol=1e-5))
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"kernrnn: direct cuBLAS GEMM failed ({type(exc).__name__}: {exc}); "
                      f"using cupy.matmul per step", RuntimeWarning, stacklevel=3)
        return False
    if not ok:
        warnings.warn("kernrnn: direct cuBLAS GEMM disagreed with cupy.matmul; using cupy.matmul "
                      "per step", RuntimeWarning, stacklevel=3)
    return ok


# -- path choice ----------------------------------------------------------------------

_path_override: str | None = None


def set_path(path: str | None) -> None:
    """Choose the recurrence implementation: ``"auto"``, ``"gemm"``, ``"persistent"``.

    None restores the default (environment variable ``KERNRNN_CUDA_PATH``, else
    ``"auto"``).
    """
    global _path_override
    if path is not None:
        _check_path(path, "path")
    _path_override = path


def get_path() -> str:
    """The configured path (``set_path`` first, then ``KERNRNN_CUDA_PATH``, else auto)."""
    if _path_override is not None:
        return _path_override
    return _check_path(os.environ.get(PATH_ENV, "auto").strip().lower() or "auto", PATH_ENV)


def _check_path(path, name):
    if path not in PATHS:
        raise ValueError(f"{name} must be one of {', '.join(PATHS)}; got {path!r}")
    return path


def _persistent_module():
    try:
        return importlib.import_module("kernrnn.backends.cuda.persistent")
    except ModuleNotFoundError as exc:
        if exc.name != "kernrnn.backends.cuda.persistent":
            raise
        return None


def _resolve_path(path, cell, dtype, B, H, training) -> str:
    path = get_path() if path is None else _check_path(path, "path")
    if path == "gemm":
        return "gemm"
    mod = _persistent_module()
    if path == "persistent":
        if mod is None:
            raise ValueError(
                "path='persistent' needs kernrnn.backends.cuda.persistent, which this "
                "installation lacks; use path='gemm' or 'auto'"
            )
        return "persistent"
    supports = getattr(mod, "supports", None) if mod is not None else None
    if supports is not None and supports(cell, np.dtype(dtype), B, H, training):
        return "persistent"
    return "gemm"


# -- forward / backward -----------------------------------------------------------------


@dataclass
class ForwardContext:
    """What backward needs from one forward call (one layer, one direction)."""

    cell: object
    x: object
    W_ih: object
    W_hh: object
    States: object
    Saved: object
    lengths: object
    reverse: bool
    path: str = "gemm"
    device: str = "cuda"


# -- the GEMM-per-step loops, optionally replayed as CUDA graphs --------------------------

GRAPHS_ENV = "KERNRNN_CUDA_GRAPHS"
_GRAPH_CACHE_SIZE = 64
_graphs_override: bool | None = None
_graph_cache: OrderedDict = OrderedDict()  # key -> (graph or None, scratch)
_graph_seen: OrderedDict = OrderedDict()  # keys run once eagerly
graph_stats = {"eager": 0, "captured": 0, "replayed": 0, "capture_failed": 0}


def set_graphs(enabled: bool | None) -> None:
    """Replay the per-step loop as a CUDA graph (True), never (False), or as
    ``KERNRNN_CUDA_GRAPHS`` says (None; default off)."""
    global _graphs_override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {enabled!r}")
    _graphs_override = enabled
    _graph_cache.clear()
    _graph_seen.clear()


def graphs_enabled() -> bool:
    if SIMULATOR:
        return False
    if _graphs_override is not None:
        return _graphs_override
    return os.environ.get(GRAPHS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _layout_key(*arrays):
    """Every device pointer, shape and stride a loop bakes in, plus the device and the
    stream it runs on (a graph replays on the stream whose cuBLAS workspace it uses)."""
    where = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    return where + tuple((a.data.ptr, a.shape, a.strides) for a in arrays)


def _run_loop(key, issue, make_scratch):
    """Run ``issue(scratch)`` (which enqueues one whole time loop on CuPy's current stream).

    With graphs enabled, a loop is captured into a CUDA graph the second time
    the same key is seen and replayed from then on.  The key holds every
    device pointer, shape and stride the loop bakes in (plus cell, dtype,
    direction, device and stream), so a replay does exactly what issuing the
    loop again would; per-loop scratch buffers live with the graph.  The
    first sighting runs eagerly, which also compiles the kernels and checks
    the direct cuBLAS call, so nothing is compiled, allocated or synchronised
    during a capture.  A failed capture (say, cuBLAS not found, so the per-step
    GEMM is ``cupy.matmul``) warns once and falls back to eager runs for that key.
    """
    if key is None or not graphs_enabled():
        graph_stats["eager"] += 1
        issue(make_scratch())
        return
    entry = _graph_cache.get(key)
    if entry is None and key not in _graph_seen:
        _graph_seen[key] = True
        while len(_graph_seen) > 4 * _GRAPH_CACHE_SIZE:
            _graph_seen.popitem(last=False)
        graph_stats["eager"] += 1
        issue(make_scratch())
        return
    if entry is None:
        scratch = make_scratch()
        graph = _capture(issue, scratch)
        _graph_cache[key] = entry = (graph, scratch)
        while len(_graph_cache) > _GRAPH_CACHE_SIZE:
            _graph_cache.popitem(last=False)
    else:
        _graph_cache.move_to_end(key)
        graph_stats["replayed"] += 1
    graph, scratch = entry
    if graph is None:
        graph_stats["eager"] += 1
        issue(scratch)
    else:
        graph.launch(stream=cupy.cuda.get_current_stream())


def _capture(issue, scratch):
    """Capture ``issue(scratch)`` on the side stream kept for the current stream,
    whose cuBLAS handle exists (bound, with its workspace) before the capture begins."""
    from kernrnn.backends.cuda import _cublas

    graph = None
    try:
        side = _cublas.capture_stream(cupy.cuda.get_current_stream().ptr)
        if side is None:
            raise RuntimeError(f"no direct cuBLAS calls: {_cublas.unavailable_reason()}")
        with side:
            side.begin_capture()
            try:
                issue(scratch)
            finally:
                graph = side.end_capture()
        graph_stats["captured"] += 1
    except Exception as exc:  # noqa: BLE001 - eager runs still work
        graph_stats["capture_failed"] += 1
        warnings.warn(f"kernrnn: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                      f"running this loop without graphs", RuntimeWarning, stacklevel=4)
        graph = None
    return graph


def _gemm_forward_loop(cell, XW, W_hh, b_hh, States, Saved, Y, lengths, reverse, training):
    """Per step: HU = h_{t-1} @ W_hh.T (cuBLAS) then one fused pointwise kernel."""
    T, B, GH = XW.shape
    H = W_hh.shape[1]
    dtype = XW.dtype
    k = get_kernels(cell, dtype)
    kernel = k.forward_train if training else k.forward_infer

    def make_scratch():
        HU = xp.empty((B, GH), dtype=dtype)
        dummy = xp.empty((1, 1, 1, 1), dtype=dtype)
        return HU, dummy

    def issue(scratch):
        HU, dummy = scratch
        saved = Saved if Saved.size else dummy  # empty: inference or nothing saved
        recurrent_gemm = _step_gemm(States[0], W_hh, HU, trans_b=True)  # HU = h_p @ W_hh.T
        launch = _Launcher()
        w = launch.wrap
        args = [w(XW), w(HU), w(b_hh), w(States), w(saved), w(Y), w(lengths)]
        for step in range(T):
            if reverse:
                t = T - 1 - step
                p, n = t + 1, t
            else:
                t = step
                p, n = t, t + 1
            recurrent_gemm(p)
            launch(kernel, B * H, *args, t, p, n)

    key = None
    if graphs_enabled():
        key = ("forward", cell, np.dtype(dtype).str, bool(training), bool(reverse),
               _layout_key(XW, W_hh, b_hh, States, Saved, Y, lengths))
    _run_loop(key, issue, make_scratch)


def _gemm_backward_loop(cell, dY, dS, W_hh, States, Saved, lengths, reverse, dXW, dHU):
    """Per step: fused pointwise backward, then dHrec = dHU_t @ W_hh (cuBLAS)."""
    T, B, _ = dXW.shape
    H = W_hh.shape[1]
    dtype = dXW.dtype
    k = get_kernels(cell, dtype)

    def make_scratch():
        return xp.empty((B, H), dtype=dtype), xp.empty((1, 1, 1, 1), dtype=dtype)

    def issue(scratch):
        dHrec, dummy = scratch
        dHrec.fill(0)
        saved = Saved if Saved.size else dummy  # a cell that saves nothing
        recurrent_gemm = _step_gemm(dHU, W_hh, dHrec, trans_b=False)  # dHrec = dHU_t @ W_hh
        launch = _Launcher()
        w = launch.wrap
        args = [w(dY), w(dS), w(dHrec), w(saved), w(States), w(lengths), w(dXW), w(dHU)]
        for step in range(T):
            t = step if reverse else T - 1 - step
            p = t + 1 if reverse else t
            launch(k.backward_step, B * H, *args, t, p)
            recurrent_gemm(t)
        launch(k.add, B * H, w(dS[0]), w(dHrec))

    key = None
    if graphs_enabled():
        key = ("backward", cell, np.dtype(dtype).str, bool(reverse),
               _layout_key(dY, dS, W_hh, States, Saved, lengths, dXW, dHU))
    _run_loop(key, issue, make_scratch)


def forward(cell, x, W_ih, W_hh, b_ih, b_hh, h0, lengths, reverse, training, y=None,
            path=None):
    """Run one layer in one direction on the GPU; arguments are already validated.

    ``h0`` is ``[S, B, H]``, ``lengths`` int64 ``[B]`` on the device; ``y`` an
    optional ``[T, B, H]`` (possibly strided) view to write the output into.
    Returns ``(y, hn, ctx)``; ``ctx`` is None unless ``training``.
    """
    T, B, I = x.shape
    H = W_hh.shape[1]
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    dtype = x.dtype
    chosen = _resolve_path(path, cell, dtype, B, H, training)
    XW = xp.matmul(x.reshape(T * B, I), W_ih.T).reshape(T, B, G * H)
    XW += b_ih
    States = xp.empty((S, T + 1, B, H), dtype=dtype)
    States[:, T if reverse else 0] = h0
    Saved = xp.empty((K if training else 0, T, B, H), dtype=dtype)
    if y is None:
        y = xp.empty((T, B, H), dtype=dtype)
    if T > 0 and B > 0:
        if chosen == "persistent":
            _persistent_module().forward_loop(cell, XW, W_hh, b_hh, States, Saved, y, lengths,
                                              reverse, training)
        else:
            _gemm_forward_loop(cell, XW, W_hh, b_hh, States, Saved, y, lengths, reverse,
                               training)
    hn = States[:, 0 if reverse else T].copy()
    ctx = None
    if training:
        ctx = ForwardContext(cell, x, W_ih, W_hh, States, Saved, lengths, reverse, chosen)
    return y, hn, ctx


def backward(ctx: ForwardContext, dy, dhn):
    """BPTT for one forward call.  Returns ``(dx, dh0, grads)``.

    ``dy`` is ``[T, B, H]`` (may be a strided view), ``dhn`` ``[S, B, H]``.
    """
    x, W_hh = ctx.x, ctx.W_hh
    T, B, _ = x.shape
    GH = W_hh.shape[0]
    dtype = x.dtype
    dS = xp.array(dhn, dtype=dtype, copy=True)
    dXW = xp.empty((T, B, GH), dtype=dtype)
    dHU = xp.empty((T, B, GH), dtype=dtype)
    if T > 0 and B > 0:
        if ctx.path == "persistent":
            _persistent_module().backward_loop(ctx.cell, dy, dS, W_hh, ctx.States, ctx.Saved,
                                               ctx.lengths, ctx.reverse, dXW, dHU)
        else:
            _gemm_backward_loop(ctx.cell, dy, dS, W_hh, ctx.States, ctx.Saved, ctx.lengths,
                                ctx.reverse, dXW, dHU)
    dx, dW_ih, dW_hh = input_and_weight_gradients(ctx, dXW, dHU)
    grads = {
        "weight_ih": dW_ih,
        "weight_hh": dW_hh,
        "bias_ih": dXW.sum(axis=(0, 1)),
        "bias_hh": dHU.sum(axis=(0, 1)),
    }
    return dx, dS, grads
