"""cuBLAS GEMMs called directly (ctypes), on handles bound to one stream each.

Why not CuPy's wrappers: every ``cupy_backends.cuda.libs.cublas`` call first
re-binds CuPy's shared handle to the current stream, and that re-binding
raises ``NotImplementedError`` while the stream is capturing a CUDA graph
(CuPy 13 and 14).  cuBLAS itself can be captured (host-pointer ``alpha`` and
``beta`` are captured by value), so the per-step GEMMs of the time loop call
``cublasSgemm_v2``/``cublasDgemm_v2`` (and their ``StridedBatched`` forms, for
per-head products) here instead:

* one handle per stream, bound to it once (``cublasSetStream_v2``) and given
  its own workspace (``cublasSetWorkspace_v2``, after the stream: setting the
  stream resets the workspace), so nothing is allocated or re-bound per call,
  and nothing at all during a capture;
* a graph is captured on a side stream whose handle shares the workspace of
  the stream the graph is replayed on (the graph cache keys on that stream),
  so a replay and eager GEMMs on that stream use one workspace in stream
  order and two streams never share one.

The library is the ``libcublas.so.<major>`` CuPy has loaded (found by soname
with ``RTLD_NOLOAD``: one cuBLAS per process, the one matching CuPy's CUDA),
else the loader's or ``cuda.pathfinder``'s.  Linux only; elsewhere
:func:`for_stream` returns None and callers use ``cupy.matmul``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from collections import OrderedDict
from functools import cache

__all__ = ["CublasError", "library", "unavailable_reason", "for_stream", "capture_stream",
           "workspace_of", "workspace_bytes", "StreamBlas", "MAX_STREAMS"]

MAX_STREAMS = 8  # handles kept per process (LRU); each holds one workspace
_c_int, _c_size, _ptr = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
_GEMM_ARGS = [_ptr, _c_int, _c_int, _c_int, _c_int, _c_int, _ptr, _ptr, _c_int, _ptr, _c_int,
              _ptr, _ptr, _c_int]
_c_ll = ctypes.c_longlong
_BATCHED_ARGS = [_ptr, _c_int, _c_int, _c_int, _c_int, _c_int, _ptr, _ptr, _c_int, _c_ll, _ptr,
                 _c_int, _c_ll, _ptr, _ptr, _c_int, _c_ll, _c_int]


class CublasError(RuntimeError):
    """A cuBLAS call returned a status other than CUBLAS_STATUS_SUCCESS."""


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasError(f"{what} failed with cuBLAS status {status}")


def _declare(lib) -> None:
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(_ptr)]
    lib.cublasSetStream_v2.argtypes = [_ptr, _ptr]
    lib.cublasSetWorkspace_v2.argtypes = [_ptr, _ptr, _c_size]
    lib.cublasDestroy_v2.argtypes = [_ptr]
    lib.cublasSgemm_v2.argtypes = _GEMM_ARGS
    lib.cublasDgemm_v2.argtypes = _GEMM_ARGS
    lib.cublasSgemmStridedBatched.argtypes = _BATCHED_ARGS
    lib.cublasDgemmStridedBatched.argtypes = _BATCHED_ARGS
    for name in ("cublasCreate_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2",
                 "cublasDestroy_v2", "cublasSgemm_v2", "cublasDgemm_v2",
                 "cublasSgemmStridedBatched", "cublasDgemmStridedBatched"):
        getattr(lib, name).restype = _c_int


def _candidates(major: int):
    """(how, loader) pairs, in order: CuPy's copy, the loader's, cuda.pathfinder's."""
    soname = f"libcublas.so.{major}"
    noload = getattr(os, "RTLD_NOLOAD", 0)
    yield "loaded by CuPy", lambda: ctypes.CDLL(soname, mode=noload | ctypes.RTLD_GLOBAL)
    yield "system loader", lambda: ctypes.CDLL(soname)

    def pathfinder():
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return ctypes.CDLL(load_nvidia_dynamic_lib("cublas").abs_path)

    yield "cuda.pathfinder", pathfinder


@cache
def _load():
    """(library or None, description): the cuBLAS CuPy uses, with its functions declared."""
    if not sys.platform.startswith("linux"):
        return None, f"direct cuBLAS calls are implemented for Linux only (this is {sys.platform})"
    try:
        import cupy
        from cupy_backends.cuda.libs import cublas as _cupy_cublas  # noqa: F401 (loads libcublas)

        major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    except Exception as exc:  # noqa: BLE001
        return None, f"CuPy's cuBLAS is not importable ({type(exc).__name__}: {exc})"
    errors = []
    for how, load in _candidates(major):
        try:
            lib = load()
            _declare(lib)
        except Exception as exc:  # noqa: BLE001 - try the next way
            errors.append(f"{how}: {type(exc).__name__}: {exc}")
            continue
        return lib, f"libcublas.so.{major} ({how})"
    return None, f"libcublas.so.{major} not found ({'; '.join(errors)})"


def library():
    """The ctypes handle on cuBLAS, or None (see :func:`unavailable_reason`)."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why :func:`library` is None; the library's description when it is not."""
    return _load()[1]


def workspace_bytes(cc_major: int) -> int:
    """cuBLAS's recommended workspace: 32 MiB from Hopper on, 4 MiB before."""
    return (32 if cc_major >= 9 else 4) << 20


class StreamBlas:
    """A cuBLAS handle bound to one stream, with a workspace it never reallocates."""

    def __init__(self, lib, stream_ptr: int, workspace):
        handle = _ptr()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate_v2")
        try:
            _check(lib.cublasSetStream_v2(handle, stream_ptr), "cublasSetStream_v2")
            # after the stream: cublasSetStream resets the workspace to cuBLAS's own pool
            _check(lib.cublasSetWorkspace_v2(handle, workspace.data.ptr, workspace.nbytes),
                   "cublasSetWorkspace_v2")
        except CublasError:
            lib.cublasDestroy_v2(handle)
            raise
        self.lib = lib
        self.handle = handle.value
        # destroyed when the last reference goes (an evicted handle may still be in use by
        # another thread's time loop), not at interpreter exit (the context may be gone)
        self._finalizer = weakref.finalize(self, lib.cublasDestroy_v2, handle.value)
        self._finalizer.atexit = False
        self.stream_ptr = stream_ptr
        self.workspace = workspace  # referenced by every GEMM (and graph) issued with it
        self.sgemm = lib.cublasSgemm_v2
        self.dgemm = lib.cublasDgemm_v2
        self.sgemm_batched = lib.cublasSgemmStridedBatched
        self.dgemm_batched = lib.cublasDgemmStridedBatched

    def destroy(self) -> None:
        """Release the handle (cuBLAS synchronises the device here).  Graphs captured
        with it keep its workspace alive through their cache entry
        (:func:`workspace_of`), since their cuBLAS kernels write into it."""
        if self.handle:
            self._finalizer()
            self.handle = None


_handles: OrderedDict = OrderedDict()  # (device, stream ptr) -> StreamBlas
_capture_streams: dict = {}  # (device, replay stream ptr) -> CuPy stream
_lock = threading.RLock()  # guards both caches: time loops may run in several threads


def _new_workspace():
    import cupy

    cc_major = int(cupy.cuda.Device().compute_capability[:-1] or 0)
    return cupy.empty(workspace_bytes(cc_major), dtype=cupy.uint8)


def _entry(stream_ptr: int, workspace=None) -> StreamBlas:
    import cupy

    key = (cupy.cuda.Device().id, int(stream_ptr))
    with _lock:
        blas = _handles.get(key)
        if blas is not None:
            _handles.move_to_end(key)
            return blas
        blas = StreamBlas(library(), int(stream_ptr),
                          workspace if workspace is not None else _new_workspace())
        _handles[key] = blas
        while len(_handles) > MAX_STREAMS:
            _handles.popitem(last=False)  # destroyed once no time loop holds it
        return blas


def for_stream(stream_ptr: int) -> StreamBlas | None:
    """The handle bound to ``stream_ptr`` on the current device (made on first use;
    never during a capture, see :func:`capture_stream`); None without cuBLAS."""
    if library() is None:
        return None
    return _entry(stream_ptr)


def capture_stream(replay_ptr: int):
    """A side stream to capture graphs that will replay on ``replay_ptr``, with its
    cuBLAS handle made now (before the capture) and sharing the replay stream's
    workspace.  None without cuBLAS."""
    if library() is None:
        return None
    import cupy

    with _lock:
        replay = for_stream(replay_ptr)
        key = (cupy.cuda.Device().id, int(replay_ptr))
        side = _capture_streams.get(key)
        if side is None:
            side = _capture_streams[key] = cupy.cuda.Stream(non_blocking=True)
        dev = cupy.cuda.Device().id
        blas = _handles.get((dev, side.ptr))
        if blas is None or blas.workspace is not replay.workspace:
            if blas is not None:
                del _handles[(dev, side.ptr)]  # destroyed once no time loop holds it
            _entry(side.ptr, workspace=replay.workspace)
        return side


def workspace_of(stream_ptr: int):
    """The workspace of the handle bound to ``stream_ptr`` on the current device, or None.

    A graph captured on that stream holds it for as long as the graph lives: the
    captured cuBLAS kernels write into it at every replay, and the handle may be
    evicted (and the workspace otherwise returned to CuPy's pool) meanwhile."""
    if not _handles:
        return None
    import cupy

    with _lock:
        blas = _handles.get((cupy.cuda.Device().id, int(stream_ptr)))
    return None if blas is None else blas.workspace
