"""CUDA backend behaviour that needs neither a GPU nor the simulator."""

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="needs numba-cuda (extra 'cudasim')")

import kernrnn  # noqa: E402
from kernrnn.backends import cuda as cb  # noqa: E402
from kernrnn.backends.cuda import graphs, paths, stepgemm  # noqa: E402
from kernrnn.backends.cuda import launch as cuda_launch  # noqa: E402


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
    assert paths.resolve_path("gemm", lstm, np.float32, 4, 8, True) == "gemm"
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

    monkeypatch.setattr(paths, "persistent_module", lambda: None)
    lstm = get_registry().get("lstm")
    with pytest.raises(ValueError, match="cuda.persistent"):
        paths.resolve_path("persistent", lstm, np.float32, 4, 8, True)
    assert paths.resolve_path("auto", lstm, np.float32, 4, 8, True) == "gemm"


def test_auto_path_asks_the_persistent_module(monkeypatch):
    from kernrnn.plugins import get_registry

    class Fake:
        @staticmethod
        def supports(cell, dtype, B, H, training):
            return B <= 16

    monkeypatch.setattr(paths, "persistent_module", lambda: Fake)
    lstm = get_registry().get("lstm")
    assert paths.resolve_path("auto", lstm, np.float32, 8, 64, True) == "persistent"
    assert paths.resolve_path("auto", lstm, np.float32, 64, 64, True) == "gemm"


def test_auto_path_stays_on_gemm_until_the_persistent_kernel_is_measured(monkeypatch):
    """The persistent kernel has not run on a GPU yet: ``auto`` must not pick it, even
    where it would fit, until ``persistent.AUTO`` is switched on after a device check."""
    from kernrnn.backends.cuda import persistent as cp
    from kernrnn.plugins import get_registry

    lstm = get_registry().get("lstm")
    monkeypatch.setattr(cp, "_simulator", lambda: False)
    monkeypatch.setattr(cp, "_cudadevrt_found", lambda: True)
    monkeypatch.setattr(cp, "supported", lambda *a, **k: True)
    assert cp.AUTO is False
    assert paths.resolve_path("auto", lstm, np.float32, 4, 256, True) == "gemm"
    assert paths.resolve_path("persistent", lstm, np.float32, 4, 256, True) == "persistent"
    monkeypatch.setattr(cp, "AUTO", True)
    assert paths.resolve_path("auto", lstm, np.float32, 4, 256, True) == "persistent"


def test_configured_persistent_path_falls_back_for_cells_it_cannot_run(monkeypatch):
    """``KERNRNN_CUDA_PATH=persistent`` (or set_path) is process-wide: a cell the
    persistent kernel refuses runs on gemm with one warning; an explicit
    ``path="persistent"`` still raises."""
    import warnings

    from kernrnn.plugins import get_registry

    registry = get_registry()
    lstm, lstm_ln, mingru = (registry.get(n) for n in ("lstm", "lstm_ln", "mingru"))
    monkeypatch.setattr(paths, "_fallback_warned", set())
    monkeypatch.setenv(cb.PATH_ENV, "persistent")
    cb.set_path(None)
    args = (np.float32, 4, 8, True)
    assert paths.choose_path(None, lstm, *args) == "persistent"
    assert paths.choose_path(None, lstm, *args, regularised=True) == "gemm"
    assert paths.choose_path(None, lstm, *args, projected=True) == "gemm"
    for cell in (lstm_ln, mingru):
        with pytest.warns(RuntimeWarning, match=f"cell '{cell.name}' runs on the 'gemm' path"):
            assert paths.choose_path(None, cell, *args) == "gemm"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per cell
            assert paths.choose_path(None, cell, *args) == "gemm"
        with pytest.raises(ValueError, match="path='persistent' runs cells with a dense"):
            paths.choose_path("persistent", cell, *args)
    monkeypatch.delenv(cb.PATH_ENV)
    try:
        cb.set_path("persistent")
        with pytest.warns(RuntimeWarning, match="runs on the 'gemm' path"):
            assert paths.choose_path(None, registry.get("indrnn"), *args) == "gemm"
    finally:
        cb.set_path(None)


class _FakeGraph:
    def __init__(self, log):
        self.log = log

    def launch(self, stream=None):
        self.log.append("replay")


class _FakeStream:
    def __init__(self, log, fail):
        self.log, self.fail, self.capturing, self.ptr = log, fail, False, 77

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


def _fake_cupy():
    import types

    current = types.SimpleNamespace(ptr=5)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=lambda: current))


@pytest.mark.parametrize("mode", ["works", "fails", "no cuBLAS"])
def test_graph_cache_runs_eager_then_captures_then_replays(monkeypatch, mode):
    from kernrnn.backends.cuda import _cublas

    log, asked = [], []
    side = _FakeStream(log, fail=mode == "fails")

    def capture_stream(replay_ptr):
        asked.append(replay_ptr)
        return None if mode == "no cuBLAS" else side

    workspace = object()
    monkeypatch.setattr(graphs, "cupy", _fake_cupy())
    monkeypatch.setattr(_cublas, "capture_stream", capture_stream)
    monkeypatch.setattr(_cublas, "workspace_of", lambda ptr: workspace if ptr == 77 else None)
    scratches = []

    def make_scratch():
        scratches.append(object())
        return scratches[-1]

    def issue(scratch):
        log.append(("capture" if side.capturing else "eager", scratch))

    cb.set_graphs(True)
    before = dict(cb.graph_stats)
    try:
        if mode != "works":
            with pytest.warns(RuntimeWarning, match="graph capture failed"):
                for _ in range(4):
                    graphs.run_loop(("backward", 1), issue, make_scratch)
        else:
            for _ in range(4):
                graphs.run_loop(("backward", 1), issue, make_scratch)
        graphs.run_loop(("other",), issue, make_scratch)  # a new layout runs eagerly first
        entry = graphs._graph_cache[("backward", 1)]
    finally:
        cb.set_graphs(None)
    kinds = [e if isinstance(e, str) else e[0] for e in log]
    assert asked == [5]  # one capture, on the side stream kept for the replay stream
    if mode != "works":  # every run eager; the scratch kept for the key is reused
        assert kinds == ["eager"] * 5
        assert log[1][1] is log[2][1] is log[3][1]
    else:
        assert kinds == ["eager", "capture", "replay", "replay", "replay", "eager"]
        assert cb.graph_stats["replayed_backward"] - before["replayed_backward"] == 2
        assert cb.graph_stats["replayed_forward"] == before["replayed_forward"]
        # the graph's GEMMs write the side stream's cuBLAS workspace: its entry keeps it
        # alive, whatever happens to the handle that owns it
        assert entry[2] is workspace


def test_graphs_off_by_default(monkeypatch):
    monkeypatch.delenv(cb.GRAPHS_ENV, raising=False)
    cb.set_graphs(None)
    assert not cb.graphs_enabled()
    monkeypatch.setenv(cb.GRAPHS_ENV, "1")
    assert cb.graphs_enabled() is (not cb.SIMULATOR)
    cb.set_graphs(False)
    assert not cb.graphs_enabled()  # set_graphs wins over the environment
    cb.set_graphs(None)
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
def test_raw_cublas_arguments_compute_the_row_major_products(dtype):
    """The per-step GEMMs pass row-major operands to column-major cuBLAS; check the
    argument mapping against a host emulation of cuBLAS's gemm."""
    import types

    def status_ok(gemm):
        def call(*args):
            gemm(*args)
            return 0
        return call

    blas = types.SimpleNamespace(sgemm=status_ok(_column_major_gemm(np.float32)),
                                 dgemm=status_ok(_column_major_gemm(np.float64)), handle=0)
    rng = np.random.default_rng(0)
    T, B, H, G = 4, 3, 5, 4
    arr = lambda *shape: rng.uniform(-1, 1, shape).astype(dtype).view(_HostArray)  # noqa: E731
    States0, W_hh, dHU = arr(T + 1, B, H), arr(G * H, H), arr(T, B, G * H)
    HU, dHrec = arr(B, G * H), arr(B, H)
    fwd = stepgemm.raw_step_gemm(blas, States0, W_hh, HU, trans_b=True)
    bwd = stepgemm.raw_step_gemm(blas, dHU, W_hh, dHrec, trans_b=False)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for i in range(T):
        fwd(i)
        np.testing.assert_allclose(HU, np.asarray(States0[i]) @ np.asarray(W_hh).T, rtol=rtol)
        bwd(i)
        np.testing.assert_allclose(dHrec, np.asarray(dHU[i]) @ np.asarray(W_hh), rtol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_raw_batched_cublas_computes_the_per_head_products(dtype):
    """The heads product (forward: a head's slice of h times its W_hh block, into HU's
    time slot; backward: a time slice of dHU times the block) as one strided-batched
    cuBLAS call per step, checked against a host emulation of cuBLAS's semantics."""
    import types

    gemm = _column_major_gemm(dtype)
    item = np.dtype(dtype).itemsize

    def batched(handle, opa, opb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc,
                count):
        for h in range(count):
            gemm(handle, opa, opb, m, n, k, alpha, A + h * sa * item, lda, B + h * sb * item,
                 ldb, beta, C + h * sc * item, ldc)
        return 0

    blas = types.SimpleNamespace(sgemm_batched=batched, dgemm_batched=batched, handle=0)
    rng = np.random.default_rng(1)
    T, B, NH, dh, Gr = 3, 2, 4, 3, 4
    H = NH * dh
    arr = lambda *shape: rng.uniform(-1, 1, shape).astype(dtype).view(_HostArray)  # noqa: E731
    States0, W3 = arr(T + 1, B, H), arr(NH, Gr * dh, dh)
    HU, dHU, dHrec = arr(T, NH, B, Gr * dh), arr(NH, T, B, Gr * dh), arr(NH, B, dh)
    heads = States0.reshape(T + 1, B, NH, dh).transpose(0, 2, 1, 3)
    fwd = stepgemm.raw_batched_step_gemm(blas, heads, W3, HU, trans_b=True)
    bwd = stepgemm.raw_batched_step_gemm(blas, dHU.transpose(1, 0, 2, 3), W3, dHrec[None],
                                         trans_b=False)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    h, W, dU = np.asarray(States0), np.asarray(W3), np.asarray(dHU)
    for i in range(T):
        fwd(i + 1, i)
        want = np.matmul(h[i + 1].reshape(B, NH, dh).transpose(1, 0, 2), W.transpose(0, 2, 1))
        np.testing.assert_allclose(HU[i], want, rtol=rtol)
        bwd(i, 0)
        np.testing.assert_allclose(dHrec, np.matmul(dU[:, i], W), rtol=rtol)
    assert stepgemm._batch_strides(np.zeros((2, 3, 4, 5))[:, :, :, ::2]) is None


def test_raw_cublas_status_is_checked():
    import types

    from kernrnn.backends.cuda._cublas import CublasError

    blas = types.SimpleNamespace(sgemm=lambda *a: 13, dgemm=lambda *a: 13, handle=0)
    a = np.zeros((2, 3, 4), np.float32).view(_HostArray)
    f = stepgemm.raw_step_gemm(blas, a, np.zeros((5, 4), np.float32).view(_HostArray),
                               np.zeros((3, 5), np.float32).view(_HostArray), trans_b=True)
    with pytest.raises(CublasError, match="status 13"):
        f(1)


# -- kernel launches, with Numba's dispatcher faked --------------------------------------


class _Configured:
    def __init__(self, kernel, stream):
        import warnings

        self.kernel, self.stream = kernel, ("core", stream)
        # what numba-cuda's launch configuration does for grids under 128 blocks
        warnings.warn("Grid size 1 will likely result in GPU under-utilization due to low "
                      "occupancy.", UserWarning, stacklevel=2)

    def __call__(self, *args):
        self.kernel.log.append(("dispatcher", self.stream))


class _Compiled:
    def __init__(self, log, fail):
        self.log, self.fail = log, fail

    def launch(self, args, grid, block, stream, smem):
        if self.fail == "cuda":
            raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")
        if self.fail:
            raise TypeError("launch() changed")
        self.log.append(("fast", stream))


class _FakeDispatcher:
    def __init__(self, fail=False):
        self.log = []
        self.overloads = {(int,): _Compiled(self.log, fail)}

    def __getitem__(self, cfg):
        grid, block, stream = cfg
        return _Configured(self, stream)

    def typeof_pyval(self, a):
        return int


def test_launcher_reuses_the_dispatchers_stream_and_silences_low_occupancy(monkeypatch):
    import warnings

    monkeypatch.setattr(cuda_launch, "SIMULATOR", False)
    monkeypatch.setattr(cuda_launch.Launcher, "fast_enabled", True)
    kernel = _FakeDispatcher()
    launch = cuda_launch.Launcher(stream="numba-stream")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no low-occupancy warning, no deprecation warning
        for _ in range(3):
            launch(kernel, 10, 1)
    # first through the dispatcher, then directly with the stream object it built
    assert kernel.log == [("dispatcher", ("core", "numba-stream"))] + [
        ("fast", ("core", "numba-stream"))] * 2


def test_launcher_falls_back_to_the_dispatcher_when_the_fast_launch_raises(monkeypatch):
    monkeypatch.setattr(cuda_launch, "SIMULATOR", False)
    monkeypatch.setattr(cuda_launch.Launcher, "fast_enabled", True)
    kernel = _FakeDispatcher(fail=True)
    launch = cuda_launch.Launcher(stream="s")
    launch(kernel, 10, 1)
    with pytest.warns(RuntimeWarning, match="direct kernel launch failed"):
        launch(kernel, 10, 1)
    launch(kernel, 10, 1)
    assert [e[0] for e in kernel.log] == ["dispatcher"] * 3  # every launch still happened
    assert cuda_launch.Launcher.fast_enabled is False


def test_a_cuda_error_in_a_fast_launch_propagates_and_keeps_fast_launches(monkeypatch):
    """Only a changed entry point (TypeError/AttributeError) turns fast launches off for
    the process; a CUDA error (say, a sticky one from an earlier kernel) is raised."""
    monkeypatch.setattr(cuda_launch, "SIMULATOR", False)
    monkeypatch.setattr(cuda_launch.Launcher, "fast_enabled", True)
    kernel = _FakeDispatcher(fail="cuda")
    launch = cuda_launch.Launcher(stream="s")
    launch(kernel, 10, 1)
    with pytest.raises(RuntimeError, match="ILLEGAL_ADDRESS"):
        launch(kernel, 10, 1)
    assert cuda_launch.Launcher.fast_enabled is True


def test_kernels_take_only_the_arguments_they_read():
    """No one-element stand-ins in the generated signatures: each array argument costs
    launch time at every step.  The LSTM's inference step takes no saved values, no
    per-unit parameters, no norm vectors and no regularisation arrays; its regularised
    variant takes the masks and seeds."""
    import re

    from kernrnn.backends.cuda.kernels import kernel_args, kernel_specs
    from kernrnn.plugins import get_registry

    reg = get_registry()
    for name in reg.names():
        for flags in ((False, False), (True, True)):
            for spec in kernel_specs(reg.get(name), flags):
                unused = [a for a, _ in spec.args if not re.search(rf"\b{a}\b", spec.body)]
                assert not unused, f"{name} {flags} {spec.name}: unused arguments {unused}"
    plain = kernel_args(reg.get("lstm"))
    assert plain["step_forward_infer"] == ("XW", "HU", "b_hh", "States", "Y", "lengths", "t",
                                           "p", "n", "tt", "H", "dh")
    assert "Saved" in plain["step_forward_train"] and "Mr" not in plain["step_backward"]
    regd = kernel_args(reg.get("lstm"), (True, True))
    assert {"Mr", "Hd", "Zthr", "Zp", "seed_lo"} <= set(regd["step_forward_train"])
