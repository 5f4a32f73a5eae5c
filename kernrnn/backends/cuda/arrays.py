"""What the CUDA backend can use here (numba-cuda, CuPy, a GPU, or the simulator), and
array interop: device arrays from CuPy, DLPack, ``__cuda_array_interface__`` or NumPy.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) NumPy stands in for
CuPy and the same kernels run on the CPU, so CI tests the backend's logic.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from kernrnn import numba_gc
from kernrnn.numba_inline import install as install_inliner

__all__ = ["cuda", "cupy", "xp", "SIMULATOR", "INSTALL_HINT", "CudaUnavailableError", "require",
           "asarray", "from_host", "lengths", "need_numba_cuda"]

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
else:
    install_inliner()  # the cheaper inlining of kernrnn's math (numba_inline) in CUDA kernels
    numba_gc.install_cuda()  # numba-cuda's compiles with the garbage collector paused too


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
    need_numba_cuda("device='cuda' needs")
    if cupy is None:
        raise CudaUnavailableError(f"device='cuda' needs CuPy: {_cupy_error}; " + INSTALL_HINT)
    problem = _gpu_problem()
    if problem:
        raise CudaUnavailableError(
            f"device='cuda' needs an NVIDIA GPU with a working driver: {problem}. If the GPU "
            f"is there, check that the CuPy and numba-cuda builds match its CUDA version; "
            + INSTALL_HINT
        )


def need_numba_cuda(prefix: str) -> None:
    """Raise :class:`CudaUnavailableError` (``"<prefix> numba-cuda: why; how to install"``)
    when numba-cuda could not be imported."""
    if cuda is None:
        raise CudaUnavailableError(f"{prefix} numba-cuda: {_import_error}; " + INSTALL_HINT)


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


