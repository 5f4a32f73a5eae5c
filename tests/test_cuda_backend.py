"""CUDA backend behaviour that needs neither a GPU nor the simulator."""

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="needs numba-cuda (extra 'cudasim')")

import kernrnn  # noqa: E402
from kernrnn.backends import cuda as cb  # noqa: E402


def _gpu_usable() -> bool:
    try:
        cb.require()
    except cb.CudaUnavailableError:
        return False
    return True


@pytest.mark.skipif(cb.SIMULATOR or _gpu_usable(), reason="a GPU (or the simulator) is usable here")
def test_device_cuda_without_gpu_says_what_is_missing():
    with pytest.raises(cb.CudaUnavailableError) as info:
        kernrnn.RNN("lstm", input_size=3, hidden_size=4, device="cuda")
    msg = str(info.value)
    assert "kernrnn[cuda12]" in msg and "kernrnn[cuda13]" in msg
    assert "CuPy" in msg or "GPU" in msg or "numba-cuda" in msg


def test_path_choice(monkeypatch):
    from kernrnn.plugins import get_registry

    lstm = get_registry().get("lstm")
    monkeypatch.delenv(cb.PATH_ENV, raising=False)
    cb.set_path(None)
    assert cb.get_path() == "auto"
    assert cb._resolve_path("gemm", lstm, np.float32, 4, 8, True) == "gemm"
    monkeypatch.setenv(cb.PATH_ENV, "gemm")
    assert cb.get_path() == "gemm"
    monkeypatch.setenv(cb.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="KERNRNN_CUDA_PATH"):
        cb.get_path()
    with pytest.raises(ValueError, match="path must be one of"):
        cb.set_path("fastest")
    try:
        cb.set_path("gemm")
        assert cb.get_path() == "gemm"  # set_path wins over the environment
    finally:
        cb.set_path(None)


def test_persistent_path_needs_its_module(monkeypatch):
    from kernrnn.plugins import get_registry

    monkeypatch.setattr(cb, "_persistent_module", lambda: None)
    lstm = get_registry().get("lstm")
    with pytest.raises(ValueError, match="cuda.persistent"):
        cb._resolve_path("persistent", lstm, np.float32, 4, 8, True)
    assert cb._resolve_path("auto", lstm, np.float32, 4, 8, True) == "gemm"


def test_auto_path_asks_the_persistent_module(monkeypatch):
    from kernrnn.plugins import get_registry

    class Fake:
        @staticmethod
        def supports(cell, dtype, B, H, training):
            return B <= 16

    monkeypatch.setattr(cb, "_persistent_module", lambda: Fake)
    lstm = get_registry().get("lstm")
    assert cb._resolve_path("auto", lstm, np.float32, 8, 64, True) == "persistent"
    assert cb._resolve_path("auto", lstm, np.float32, 64, 64, True) == "gemm"


class _FakeGraph:
    def __init__(self, log):
        self.log = log

    def launch(self, stream=None):
        self.log.append("replay")


class _FakeStream:
    def __init__(self, log, fail):
        self.log, self.fail, self.capturing = log, fail, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self, mode=None):
        if self.fail:
            raise RuntimeError("capture not supported here")
        self.capturing = True

    def end_capture(self):
        self.capturing = False
        return _FakeGraph(self.log)


def _fake_cupy(log, fail=False):
    class Cuda:
        @staticmethod
        def Stream(non_blocking=False):  # noqa: N802 - CuPy's name
            Cuda.last = _FakeStream(log, fail)
            return Cuda.last

        @staticmethod
        def get_current_stream():
            return None

    class Cupy:
        cuda = Cuda

    return Cupy


@pytest.mark.parametrize("fail", [False, True], ids=["capture works", "capture fails"])
def test_graph_cache_runs_eager_then_captures_then_replays(monkeypatch, fail):
    log = []
    fake = _fake_cupy(log, fail)
    monkeypatch.setattr(cb, "cupy", fake)
    scratches = []

    def make_scratch():
        scratches.append(object())
        return scratches[-1]

    def issue(scratch):
        stream = getattr(fake.cuda, "last", None)
        log.append(("capture" if stream is not None and stream.capturing else "eager", scratch))

    cb.set_graphs(True)
    try:
        if fail:
            with pytest.warns(RuntimeWarning, match="graph capture failed"):
                for _ in range(4):
                    cb._run_loop(("k",), issue, make_scratch)
        else:
            for _ in range(4):
                cb._run_loop(("k",), issue, make_scratch)
        cb._run_loop(("other",), issue, make_scratch)  # a new layout runs eagerly first
    finally:
        cb.set_graphs(None)
    kinds = [e if isinstance(e, str) else e[0] for e in log]
    if fail:  # every run eager; the scratch kept for the key is reused
        assert kinds == ["eager"] * 5
        assert log[1][1] is log[2][1] is log[3][1]
    else:
        assert kinds == ["eager", "capture", "replay", "replay", "replay", "eager"]


def test_graphs_off_by_default(monkeypatch):
    monkeypatch.delenv(cb.GRAPHS_ENV, raising=False)
    cb.set_graphs(None)
    assert not cb.graphs_enabled()
    monkeypatch.setenv(cb.GRAPHS_ENV, "1")
    assert cb.graphs_enabled() is (not cb.SIMULATOR)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        cb.set_graphs("yes")


def _column_major_gemm(dtype):
    """cuBLAS's gemm semantics (column-major, host pointers) on host memory."""
    import ctypes

    dt = np.dtype(dtype)

    def view(ptr, ld, rows, cols):
        n = ld * (cols - 1) + rows
        raw = (ctypes.c_char * (n * dt.itemsize)).from_address(ptr)
        flat = np.ctypeslib.as_array(raw).view(dt)
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (dt.itemsize, ld * dt.itemsize))

    def gemm(handle, opa, opb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        a = view(A, lda, m, k) if opa == 0 else view(A, lda, k, m).T
        b = view(B, ldb, k, n) if opb == 0 else view(B, ldb, n, k).T
        al = view(alpha, 1, 1, 1)[0, 0]
        be = view(beta, 1, 1, 1)[0, 0]
        c = view(C, ldc, m, n)
        c[...] = al * (a @ b) + (be * c if be else 0)

    return gemm


class _HostArray(np.ndarray):
    """A NumPy array with CuPy's ``.data.ptr``."""

    @property
    def data(self):
        import types

        return types.SimpleNamespace(ptr=self.ctypes.data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_raw_cublas_arguments_compute_the_row_major_products(monkeypatch, dtype):
    """The per-step GEMMs pass row-major operands to column-major cuBLAS; check the
    argument mapping against a host emulation of cuBLAS's gemm."""
    import types

    fake_blas = types.SimpleNamespace(sgemm=_column_major_gemm(np.float32),
                                      dgemm=_column_major_gemm(np.float64),
                                      CUBLAS_OP_N=0, CUBLAS_OP_T=1)
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        device=types.SimpleNamespace(get_cublas_handle=lambda: 0)))
    monkeypatch.setattr(cb, "_cublas_module", lambda: fake_blas)
    monkeypatch.setattr(cb, "cupy", fake_cupy)
    rng = np.random.default_rng(0)
    T, B, H, G = 4, 3, 5, 4
    arr = lambda *shape: rng.uniform(-1, 1, shape).astype(dtype).view(_HostArray)  # noqa: E731
    States0, W_hh, dHU = arr(T + 1, B, H), arr(G * H, H), arr(T, B, G * H)
    HU, dHrec = arr(B, G * H), arr(B, H)
    fwd = cb._raw_step_gemm(States0, W_hh, HU, trans_b=True)
    bwd = cb._raw_step_gemm(dHU, W_hh, dHrec, trans_b=False)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for i in range(T):
        fwd(i)
        np.testing.assert_allclose(HU, np.asarray(States0[i]) @ np.asarray(W_hh).T, rtol=rtol)
        bwd(i)
        np.testing.assert_allclose(dHrec, np.asarray(dHU[i]) @ np.asarray(W_hh), rtol=rtol)
