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
from functools import cache, lru_cache

import numpy as np

from kernrnn import regularization
from kernrnn.backends import common
from kernrnn.backends.codegen import cell_fingerprint, load_module, math_namespace
from kernrnn.backends.common import ForwardContext
from kernrnn.backends.cuda.kernels import SCAN_CHUNK, kernel_source, signatures

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


def kernel_sources(cell, reg=(False, False)) -> str:
    """The generated CUDA module source of ``cell`` (the same for every dtype); ``reg`` =
    (recurrent dropout, zoneout) selects a regularised variant."""
    return (f"# kernrnn CUDA kernels: cell {cell.name!r}, regularisation {tuple(reg)}, "
            f"math {cell_fingerprint(cell)}\n" + kernel_source(cell, reg))


@cache
def get_kernels(cell, dtype, reg=(False, False)):
    """The CUDA kernels of ``cell`` for ``dtype``: the generated module, one attribute per
    kernel (compiled lazily per argument types; ``*_py`` are the plain functions)."""
    if cuda is None:
        raise CudaUnavailableError(f"CUDA kernels need numba-cuda: {_import_error}; "
                                   + INSTALL_HINT)
    dtype = np.dtype(dtype)
    reg = (bool(reg[0]), bool(reg[1]))
    source = f"# dtype {dtype}\n" + kernel_sources(cell, reg)
    namespace = math_namespace(cell, dtype)
    namespace["CACHE"] = not SIMULATOR
    tag = (f"cuda{'sim' if SIMULATOR else ''}_{cell.name}_{dtype.name}"
           + ("_reg" if any(reg) else ""))
    return load_module(source, tag, namespace)


def ptx_signatures(cell, dtype, y_layout: str = "A", reg=(False, False)):
    """Numba signatures of ``cell``'s kernels for :func:`numba.cuda.compile_ptx`, by
    ``name_py``.  ``Y``/``dY`` are views into a layer's ``[T, B, D*H]`` output, hence
    layout ``"A"``; all other arrays are C-contiguous."""
    return signatures(cell, dtype, y_layout, reg)


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


def _reg_args(w, ka):
    """The regularisation arguments of the step kernels (kernels.REG_ARGS), wrapped."""
    return (w(ka.Mr), w(ka.Hd), w(ka.Zthr), w(ka.Zp), ka.seed_lo, ka.seed_hi, ka.zstream,
            ka.ztrain)


def _gemm_forward_loop(cell, XW, params, P, buf, Y, lengths, reverse, training, reg, ka):
    """Per step: the recurrent product (cuBLAS; per head for ``heads``), its
    normalisation if any, then the cell's fused step (one or three kernels).
    With recurrent dropout the product reads ``ka.Hd``, the masked state the
    step kernels write."""
    T, B, _ = XW.shape
    H = buf.States.shape[3]
    dtype = XW.dtype
    k = get_kernels(cell, dtype, reg.flags() if reg is not None else (False, False))
    rdrop = reg is not None and reg.recurrent_dropout
    tag = "train" if training else "infer"
    NH = cell.n_heads(H)
    dh = H // NH
    W3 = common.recurrent_weights(cell, params, H)
    b_hh = params["bias_hh"]
    g_hh, Gz, Bz = common.norm_vectors(xp, cell, params, H, dtype)
    keep_hu = buf.HU.shape[0] > 1 or (training and cell.recurrent_norm is not None)
    nseg = buf.Rhh.shape[2]

    def make_scratch():
        return (xp.empty((NH, dh, W3.shape[1]), dtype=dtype),)

    def issue(scratch):
        (WT,) = scratch
        WT[...] = W3.transpose(0, 2, 1)
        dense = cell.recurrent == "dense" and not keep_hu
        h_in = ka.Hd[None] if rdrop else buf.States[0]  # the product's input, by step
        if rdrop:
            ka.Hd[...] = buf.States[0, T if reverse else 0] * ka.Mr
        recurrent_gemm = _step_gemm(h_in, params["weight_hh"], buf.HU[0, 0],
                                    trans_b=True) if dense else None
        launch = _Launcher()
        w = launch.wrap
        saved = buf.Saved if buf.Saved.size else buf.Mid  # a one-element stand-in
        elem = [w(XW), w(buf.HU), w(b_hh), w(g_hh), w(P), w(buf.States), w(saved), w(buf.Mid),
                w(buf.Zhat), w(Y), w(lengths)]
        regs = _reg_args(w, ka)
        for step in range(T):
            t, p, n = _step_indices(step, T, reverse)
            tt = t if keep_hu else 0
            tm = t if training else 0
            if dense:
                recurrent_gemm(0 if rdrop else p)
            else:  # one product per head: [NH, B, dh] @ [NH, dh, Gr*dh]
                heads = h_in[0 if rdrop else p].reshape(B, NH, dh).transpose(1, 0, 2)
                xp.matmul(heads, WT, out=buf.HU[tt])
            if cell.recurrent_norm is not None:
                launch(k.norm_hu, B * nseg, w(buf.HU), w(buf.Rhh), w(lengths), t, tt, H, dh, NH,
                       nseg)
            scalars = (t, p, n, tt, tm, H, dh)
            if cell.normalize:
                launch(k.step_stage1, B * H, *elem, *scalars)
                launch(k.norm_z, B * cell.n_norm, w(buf.Zhat), w(buf.Rz), w(lengths), t, tm, H,
                       cell.n_norm)
                launch(getattr(k, f"step_stage2_{tag}"), B * H, *elem, *scalars, w(Gz), w(Bz),
                       *regs)
            else:
                launch(getattr(k, f"step_forward_{tag}"), B * H, *elem, *scalars, *regs)

    key = None
    if graphs_enabled():
        key = ("forward", cell, np.dtype(dtype).str, bool(training), bool(reverse),
               _layout_key(XW, buf.States, buf.Saved, buf.HU, Y, lengths, *params.values()))
    _run_loop(key, issue, make_scratch)


def _step_indices(step, T, reverse):
    """``(t, p, n)``: the step's time, and the time boundaries of its previous and new state."""
    if reverse:
        t = T - 1 - step
        return t, t + 1, t
    return step, step, step + 1


def _fused_forward(cell, XW, P, buf, Y, lengths, reverse, training, reg, ka):
    """A cell without a recurrent matrix: one launch runs every step of every element,
    or, for a linear-in-state cell, the three launches of a parallel scan over time
    (not with zoneout, whose masks make the step's coefficients)."""
    T, B, _ = XW.shape
    H = buf.States.shape[3]
    flags = reg.flags() if reg is not None else (False, False)
    k = get_kernels(cell, XW.dtype, flags)
    tag = "train" if training else "infer"
    launch = _Launcher()
    w = launch.wrap
    saved = buf.Saved if buf.Saved.size else buf.Mid
    if not cell.linear or T <= SCAN_CHUNK or flags[1]:
        launch(getattr(k, f"fused_forward_{tag}"), B * H, w(XW), w(P), w(buf.States), w(saved),
               w(Y), w(lengths), int(reverse), H, H, 0, T, *_reg_args(w, ka))
        return
    S = cell.n_state
    NC = (T + SCAN_CHUNK - 1) // SCAN_CHUNK
    CA = xp.empty((S, NC, B, H), dtype=XW.dtype)
    CB = xp.empty_like(CA)
    Start = xp.empty_like(CA)
    Start[:, 0] = buf.States[:, T if reverse else 0]
    cargs = (w(CA), w(CB), w(lengths), int(reverse), H, T, NC, SCAN_CHUNK)
    launch(k.scan_reduce, B * H * NC, w(XW), w(P), *cargs)
    launch(k.scan_carry, B * H, w(CA), w(CB), w(Start), w(lengths), H)
    launch(getattr(k, f"scan_apply_{tag}"), B * H * NC, w(XW), w(P), w(Start), w(buf.States),
           w(saved), w(Y), *cargs[2:])


def forward(cell, x, params, h0, lengths, reverse, training, y=None, path=None, reg=None):
    """Run one layer in one direction on the GPU; arguments are already validated.

    ``params`` maps the cell's parameter names to device arrays; ``h0`` is
    ``[S, B, H]``, ``lengths`` int64 ``[B]`` on the device; ``y`` an optional
    ``[T, B, H]`` (possibly strided) view to write the output into; ``reg`` a
    :class:`~kernrnn.regularization.RegularizationCall` or None.  Returns
    ``(y, hn, ctx)``; ``ctx`` is None unless ``training``.
    """
    T, B, _ = x.shape
    H = h0.shape[2]
    dtype = x.dtype
    chosen = _resolve_path(path, cell, dtype, B, H, training)
    if reg is not None and chosen == "persistent":  # the persistent kernel has no masks
        chosen = "gemm"
    if chosen == "persistent" and not cell.plain:
        raise ValueError(f"path='persistent' runs cells with a dense recurrence over all gates "
                         f"and no per-unit parameters or normalisation; cell {cell.name!r} "
                         f"needs path='gemm' or 'auto'")
    x, input_mask = common.input_dropout(xp, reg, x)
    ka = regularization.kernel_arrays(xp, reg, cell, B, H, dtype)
    XW, input_cache = common.input_projection(xp, cell, x, params)
    XW += params["bias_ih"]
    buf = common.time_buffers(xp, cell, T, B, H, dtype, training)
    buf.States[:, T if reverse else 0] = h0
    if y is None:
        y = xp.empty((T, B, H), dtype=dtype)
    if T > 0 and B > 0:
        P = common.param_vector(xp, cell, params, H, dtype)
        if chosen == "persistent":
            _persistent_module().forward_loop(cell, XW, params["weight_hh"], params["bias_hh"],
                                              buf.States, buf.Saved, y, lengths, reverse,
                                              training)
        elif not cell.has_recurrent and not cell.normalize:
            _fused_forward(cell, XW, P, buf, y, lengths, reverse, training, reg, ka)
        else:
            _gemm_forward_loop(cell, XW, params, P, buf, y, lengths, reverse, training, reg, ka)
    hn = buf.States[:, 0 if reverse else T].copy()
    ctx = None
    if training:
        ctx = ForwardContext(cell, x, params, input_cache, buf, lengths, reverse, "cuda", chosen,
                             reg=reg, input_mask=input_mask)
    return y, hn, ctx


def _gemm_backward_loop(cell, ctx, dy, dS, dXW, dHU, acc, ka):
    """Per step: the fused backward (one or three kernels), the recurrent norm's
    backward if any, then ``dHrec = dHU_t @ W_hh`` (cuBLAS; per head)."""
    params, buf = ctx.params, ctx.buffers
    T, B, _ = dXW.shape
    H = dS.shape[2]
    dtype = dXW.dtype
    k = get_kernels(cell, dtype, ctx.reg.flags() if ctx.reg is not None else (False, False))
    NH = cell.n_heads(H)
    dh = H // NH
    rec = cell.has_recurrent
    W3 = common.recurrent_weights(cell, params, H) if rec else None
    P = common.param_vector(xp, cell, params, H, dtype)
    g_hh, Gz, Bz = common.norm_vectors(xp, cell, params, H, dtype)
    one = xp.zeros((1, 1, 1), dtype=dtype)
    DZ = xp.empty((max(cell.n_norm, 1), B, H), dtype=dtype)
    DM = xp.empty((max(cell.n_mid, 1), B, H), dtype=dtype)

    def make_scratch():
        return (xp.empty((NH, B, dh), dtype=dtype),)

    def issue(scratch):
        (dHrec,) = scratch
        dHrec.fill(0)
        launch = _Launcher()
        w = launch.wrap
        dense = cell.recurrent == "dense"
        recurrent_gemm = _step_gemm(dHU[0], params["weight_hh"], dHrec[0], trans_b=False) \
            if dense else None
        saved = buf.Saved if buf.Saved.size else buf.Mid
        args = [w(dy), w(dS), w(dHrec if rec else one), w(saved), w(buf.States), w(buf.Mid),
                w(buf.Zhat), w(P), w(ctx.lengths), w(dXW), w(dHU), w(acc["params"]), w(DZ),
                w(DM), w(Gz), w(Bz), w(acc["gz"]), w(acc["bz"])]
        nseg = buf.Rhh.shape[2]
        regs = _reg_args(w, ka)
        for step in range(T):
            t = step if ctx.reverse else T - 1 - step
            p = t + 1 if ctx.reverse else t
            if cell.normalize:
                launch(k.step_backward2, B * H, *args, t, p, H, dh, *regs)
                launch(k.norm_z_backward, B * cell.n_norm, w(DZ), w(buf.Zhat), w(buf.Rz),
                       w(ctx.lengths), t, H, cell.n_norm)
                launch(k.step_backward1, B * H, *args, t, p, H, dh, *regs)
            else:
                launch(k.step_backward, B * H, *args, t, p, H, dh, *regs)
            if not rec:
                continue
            if cell.recurrent_norm is not None:
                launch(k.norm_hu_backward, B * nseg, w(dHU), w(buf.HU), w(buf.Rhh), w(g_hh),
                       w(acc["bias_hh"]), w(acc["norm_hh"]), w(ctx.lengths), t, H, dh, NH, nseg)
            if dense:
                recurrent_gemm(t)
            else:
                xp.matmul(dHU[:, t], W3, out=dHrec)
        if rec:
            launch(k.add_recurrent, B * H, w(dS), w(dHrec), w(ctx.lengths), H, dh, w(ka.Mr))

    key = None
    if graphs_enabled():
        key = ("backward", cell, np.dtype(dtype).str, bool(ctx.reverse),
               _layout_key(dy, dS, dXW, dHU, buf.States, buf.Saved, ctx.lengths,
                           *params.values()))
    _run_loop(key, issue, make_scratch)


def _fused_backward(cell, ctx, dy, dS, dXW, acc, ka):
    """Backward of :func:`_fused_forward`: one launch, or the parallel scan's three."""
    buf = ctx.buffers
    T, B, _ = dXW.shape
    H = dS.shape[2]
    flags = ctx.reg.flags() if ctx.reg is not None else (False, False)
    k = get_kernels(cell, dXW.dtype, flags)
    P = common.param_vector(xp, cell, ctx.params, H, dXW.dtype)
    launch = _Launcher()
    w = launch.wrap
    saved = buf.Saved if buf.Saved.size else buf.Mid
    if not cell.linear or T <= SCAN_CHUNK or flags[1]:
        launch(k.fused_backward, B * H, w(dy), w(dS), w(saved), w(buf.States), w(P),
               w(ctx.lengths), w(dXW), w(acc["params"]), int(ctx.reverse), H, H, 0, T,
               *_reg_args(w, ka))
        return
    S = cell.n_state
    NC = (T + SCAN_CHUNK - 1) // SCAN_CHUNK
    CA = xp.empty((S, NC, B, H), dtype=dXW.dtype)
    CB, Start = xp.empty_like(CA), xp.empty_like(CA)
    Start[:, 0] = dS
    dP = xp.zeros((NC * B, acc["params"].shape[1]), dtype=dXW.dtype)
    cargs = (w(CA), w(CB), w(ctx.lengths), int(ctx.reverse), H, T, NC, SCAN_CHUNK)
    launch(k.scan_reduce_backward, B * H * NC, w(dy), w(saved), w(buf.States), w(P), *cargs)
    launch(k.scan_carry, B * H, w(CA), w(CB), w(Start), w(ctx.lengths), H)
    launch(k.scan_apply_backward, B * H * NC, w(dy), w(saved), w(buf.States), w(P), w(Start),
           w(dXW), w(dP), w(dS), *cargs[2:])
    acc["params"] += dP.reshape(NC, B, -1).sum(axis=0)


def backward(ctx: ForwardContext, dy, dhn):
    """BPTT for one forward call.  Returns ``(dx, dh0, grads)``.

    ``dy`` is ``[T, B, H]`` (may be a strided view), ``dhn`` ``[S, B, H]``;
    ``grads`` has the keys of the forward call's ``params``.
    """
    cell, params, buf = ctx.cell, ctx.params, ctx.buffers
    T, B, _ = ctx.x.shape
    H = dhn.shape[2]
    dtype = ctx.x.dtype
    G, NH, Gr = cell.n_gates, cell.n_heads(H), cell.n_recurrent_gates
    dS = xp.array(dhn, dtype=dtype, copy=True)
    dXW = xp.empty((T, B, G * H), dtype=dtype)
    rec = cell.has_recurrent
    dHU = xp.empty((NH, T, B, Gr * H // NH), dtype=dtype) if rec else \
        xp.empty((1, 1, 1, 1), dtype=dtype)
    # per-(b, j) accumulators, each written by the thread owning the element; summed over b
    acc = {name: xp.zeros((B, max(n, 1)), dtype=dtype) for name, n in (
        ("bias_hh", Gr * H), ("norm_hh", Gr * H), ("params", cell.n_param_scalars * H),
        ("gz", cell.n_norm * H), ("bz", cell.n_norm * H))}
    ka = regularization.kernel_arrays(xp, ctx.reg, cell, B, H, dtype)  # masks regenerated
    if T > 0 and B > 0:
        if ctx.path == "persistent":
            _persistent_module().backward_loop(cell, dy, dS, params["weight_hh"], buf.States,
                                               buf.Saved, ctx.lengths, ctx.reverse, dXW, dHU[0])
        elif not rec and not cell.normalize:
            _fused_backward(cell, ctx, dy, dS, dXW, acc, ka)
        else:
            _gemm_backward_loop(cell, ctx, dy, dS, dXW, dHU, acc, ka)
    elif rec:
        dHU.fill(0)
    if T == 0 or B == 0:
        dXW.fill(0)
    sums = {name: a.sum(axis=0) for name, a in acc.items()}
    grads = {"bias_ih": dXW.sum(axis=(0, 1))}
    if rec:
        if cell.recurrent_norm is not None:
            grads["bias_hh"] = sums["bias_hh"]
        else:  # [NH, Gr*dh] per head -> gate-major [Gr*H]
            dh = H // NH
            grads["bias_hh"] = dHU.sum(axis=(1, 2)).reshape(NH, Gr, dh).transpose(1, 0, 2) \
                .reshape(Gr * H)
    dx, wgrads = common.weight_gradients(xp, cell, ctx, dXW, dHU if rec else None)
    grads.update(wgrads)
    grads.update(common.per_unit_gradients(cell, sums["params"], sums["norm_hh"], sums["gz"],
                                           sums["bz"], H))
    return dx, dS, grads
