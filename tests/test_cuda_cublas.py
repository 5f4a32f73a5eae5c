"""The direct cuBLAS binding of the CUDA backend, with the library and CuPy faked.

What a GPU is needed for (the GEMMs themselves, a real capture) runs in
``tests/test_gpu.py``; here: the order of the handle set-up calls, that a
handle is made once per stream and never while capturing, that a capture
stream shares the workspace of the stream its graphs replay on, and what
happens where cuBLAS or CuPy is missing.
"""

import ctypes
import itertools
import sys
import types

import numpy as np
import pytest

from kernrnn.backends.cuda import _cublas


class FakeLib:
    """Records the cuBLAS calls; statuses can be made to fail per function."""

    def __init__(self, fail=()):
        self.calls, self.fail, self._next = [], set(fail), itertools.count(1000)

    def _status(self, name):
        return 7 if name in self.fail else 0

    def cublasCreate_v2(self, out):
        handle = next(self._next)
        ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = handle
        self.calls.append(("create", handle))
        return self._status("create")

    def cublasSetStream_v2(self, handle, stream):
        self.calls.append(("stream", handle.value, stream))
        return self._status("stream")

    def cublasSetWorkspace_v2(self, handle, ptr, nbytes):
        self.calls.append(("workspace", handle.value, ptr, nbytes))
        return self._status("workspace")

    def cublasDestroy_v2(self, handle):
        self.calls.append(("destroy", getattr(handle, "value", handle)))
        return 0

    cublasSgemm_v2 = cublasDgemm_v2 = staticmethod(lambda *a: 0)
    cublasSgemmStridedBatched = cublasDgemmStridedBatched = staticmethod(lambda *a: 0)


class FakeBuffer:
    _ptrs = itertools.count(1 << 20, 1 << 20)

    def __init__(self, n):
        self.nbytes, self.data = n, types.SimpleNamespace(ptr=next(self._ptrs))


def fake_cupy(cc="90"):
    streams = itertools.count(500)

    class Stream:
        def __init__(self, non_blocking=False):
            self.ptr = next(streams)

    device = types.SimpleNamespace(id=0, compute_capability=cc)
    cuda = types.SimpleNamespace(Device=lambda: device, Stream=Stream)
    return types.SimpleNamespace(cuda=cuda, uint8=np.uint8, empty=lambda n, dtype: FakeBuffer(n))


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLib()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    monkeypatch.setattr(_cublas, "_load", lambda: (lib, "fake"))
    monkeypatch.setattr(_cublas, "_handles", type(_cublas._handles)())
    monkeypatch.setattr(_cublas, "_capture_streams", {})
    return lib


def test_handle_is_bound_to_its_stream_then_given_its_workspace(fake):
    blas = _cublas.for_stream(42)
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["create", "stream", "workspace"]  # setStream resets the workspace
    assert fake.calls[1][1:] == (blas.handle, 42)
    assert fake.calls[2][1:] == (blas.handle, blas.workspace.data.ptr, 32 << 20)
    assert _cublas.for_stream(42) is blas and len(fake.calls) == 3  # made once


def test_failed_setup_destroys_the_handle(monkeypatch):
    lib = FakeLib(fail={"workspace"})
    with pytest.raises(_cublas.CublasError, match="cublasSetWorkspace_v2 failed"):
        _cublas.StreamBlas(lib, 3, FakeBuffer(16))
    assert [c[0] for c in lib.calls] == ["create", "stream", "workspace", "destroy"]


def test_least_recently_used_handles_are_destroyed_once_unused(fake):
    """An evicted handle is destroyed when the last reference goes, not while another
    thread's time loop (whose GEMM closure holds it) may still call it."""
    import gc

    first = [_cublas.for_stream(p) for p in range(_cublas.MAX_STREAMS)]
    handles = [b.handle for b in first]
    _cublas.for_stream(0)  # most recent again
    _cublas.for_stream(99)  # one too many: stream 1's handle is evicted, not stream 0's
    assert len(_cublas._handles) == _cublas.MAX_STREAMS
    assert (0, 1) not in _cublas._handles and (0, 0) in _cublas._handles
    assert not [c for c in fake.calls if c[0] == "destroy"]  # still referenced here
    evicted = first.pop(1)
    assert evicted.handle == handles[1]
    del evicted
    gc.collect()
    assert [c[1] for c in fake.calls if c[0] == "destroy"] == [handles[1]]
    assert first[0].handle == handles[0]


def test_capture_stream_shares_the_replay_streams_workspace(fake):
    side = _cublas.capture_stream(42)
    replay = _cublas.for_stream(42)
    capture = _cublas.for_stream(side.ptr)
    assert capture is not replay and capture.stream_ptr == side.ptr
    assert capture.workspace is replay.workspace
    n = len(fake.calls)
    assert _cublas.capture_stream(42) is side and len(fake.calls) == n  # nothing new made
    other = _cublas.capture_stream(43)
    assert other is not side
    assert _cublas.for_stream(other.ptr).workspace is not replay.workspace


def test_a_graphs_workspace_outlives_its_handles_eviction(fake):
    """A graph keeps ``workspace_of(side stream)``: when the LRU evicts and destroys the
    replay stream's handles, the workspace the graph's GEMMs write is still that one."""
    side = _cublas.capture_stream(42)
    kept = _cublas.workspace_of(side.ptr)
    assert kept is _cublas.for_stream(42).workspace
    for p in range(100, 100 + _cublas.MAX_STREAMS):  # evicts stream 42's and the side's handles
        _cublas.for_stream(p)
    assert _cublas.workspace_of(42) is None and _cublas.workspace_of(side.ptr) is None
    assert _cublas.capture_stream(42) is side  # new handles, a new workspace for new graphs
    assert _cublas.workspace_of(side.ptr) is not kept
    assert _cublas.workspace_of(side.ptr) is _cublas.for_stream(42).workspace


def test_workspace_size_follows_the_architecture():
    assert _cublas.workspace_bytes(9) == _cublas.workspace_bytes(10) == 32 << 20
    assert _cublas.workspace_bytes(8) == 4 << 20


def test_without_cupy_there_is_no_library_and_no_capture_stream(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails
    lib, reason = _cublas._load.__wrapped__()
    assert lib is None and "CuPy" in reason
    monkeypatch.setattr(_cublas, "_load", lambda: (None, reason))
    assert _cublas.for_stream(0) is None and _cublas.capture_stream(0) is None


def _installed_cublas():
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return load_nvidia_dynamic_lib("cublas").abs_path
    except Exception:
        return None


@pytest.mark.skipif(_installed_cublas() is None, reason="no cuBLAS library installed here")
def test_real_library_declares_and_reports_a_missing_gpu():
    """The declared functions exist in the real library, RTLD_NOLOAD finds the copy
    already loaded by its soname, and without a usable GPU the handle set-up raises
    CublasError instead of crashing."""
    import os

    path = _installed_cublas()
    lib = ctypes.CDLL(path)
    _cublas._declare(lib)
    soname = os.path.basename(path).split(".so")[0] + ".so." + path.split(".so.")[1].split(".")[0]
    again = ctypes.CDLL(soname, mode=os.RTLD_NOLOAD)
    assert again._handle == lib._handle
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed: there may be a GPU, which the fakes above cover")
    except ImportError:
        pass
    with pytest.raises(_cublas.CublasError, match="cublasCreate_v2"):
        _cublas.StreamBlas(lib, 0, FakeBuffer(16))
