"""Tests on a real GPU (marker ``gpu``); skipped where CuPy, numba-cuda or a GPU is missing.

Run them with ``pytest -m gpu`` (``python -m benchmarks.devicecheck`` does, too).
The tests of the layer run once per recurrence path (``gemm``, ``persistent``;
test ids end in the path); ``KERNRNN_CUDA_PATH=gemm`` (or ``persistent``)
runs only that path's.
"""

import contextlib
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from kernrnn.testing import tolerances as tol


def _gpu_reason() -> str:
    try:
        from kernrnn.backends import cuda as cb
    except Exception as exc:  # numba-cuda missing
        return f"CUDA backend unavailable: {exc}"
    if cb.SIMULATOR:
        return "running under the CUDA simulator"
    try:
        cb.require()
    except cb.CudaUnavailableError as exc:
        return str(exc).split(";")[0]
    return ""


REASON = _gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(REASON), reason=REASON or "GPU present")]

_ENV_PATH = os.environ.get("KERNRNN_CUDA_PATH", "").strip().lower()
PATHS = [_ENV_PATH] if _ENV_PATH in ("gemm", "persistent") else ["gemm", "persistent"]
on_each_path = pytest.mark.parametrize("path", PATHS)


@contextlib.contextmanager
def on_path(path, cell=None):
    """Run the CUDA backend on ``path`` (set_path wins over the environment); skip the
    persistent path for a ``cell`` it does not run (it would fall back to gemm)."""
    if path == "persistent" and cb.paths.persistent_module() is None:
        pytest.skip("kernrnn.backends.cuda.persistent is not installed")
    if path == "persistent" and cell is not None and not cell.plain:
        pytest.skip(f"the persistent path does not run cell {cell.name!r} (not a plain cell)")
    cb.set_path(path)
    try:
        yield
    finally:
        cb.set_path(None)

if not REASON:
    import cupy
    from cuda_test_cells import registry_with_test_cells
    from hypothesis import given, settings

    from kernrnn.backends import cuda as cb
    from kernrnn.testing import check_cell
    from kernrnn.testing.conformance import forward_errors, gradient_errors, run_layer
    from kernrnn.testing.strategies import make_arrays, problems

    REGISTRY = registry_with_test_cells()
    CELLS = REGISTRY.names()
else:  # keep the module importable for collection
    CELLS = []

    def given(**kw):  # noqa: D103
        return lambda f: f

    def settings(**kw):  # noqa: D103
        return lambda f: f

    def problems(**kw):  # noqa: D103
        return None


@on_each_path
@pytest.mark.parametrize("cell_name", CELLS)
def test_conformance_on_gpu(cell_name, path):
    with on_path(path, REGISTRY.get(cell_name)):
        report = check_cell(REGISTRY.get(cell_name), device="cuda", examples=3, seed=1)
    assert report.examples == 3


@on_each_path
@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=8, deadline=None)
@given(p=problems())
def test_gpu_gradients_match_finite_differences(cell_name, p, path):
    with on_path(path, REGISTRY.get(cell_name)):
        gradient_errors(REGISTRY.get(cell_name), p, device="cuda")


# Shapes with B*H over one block of 256 threads, so several blocks and a partial
# last block run.  Gradients are compared with the CPU backend in float64 (itself
# checked against finite differences): finite differences across a relu kink
# are unreliable at these sizes.
@on_each_path
@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=8, deadline=None)
@given(p=problems(max_T=12, max_B=9, max_I=20, max_H=70, max_layers=2))
def test_gpu_matches_reference_and_cpu(cell_name, p, path):
    cell = REGISTRY.get(cell_name)
    with on_path(path, cell):
        for dtype in (np.float64, np.float32):
            scaled, absolute = forward_errors(cell, p, dtype, device="cuda")
            assert scaled <= 1, f"{cell_name} {np.dtype(dtype)}: error {absolute:.3e} on {p}"
    params, x, h0 = make_arrays(cell, p, np.float64)
    rng = np.random.default_rng(p.seed ^ 11)
    D = 2 if p.bidirectional else 1
    dy = rng.uniform(-1, 1, (p.T, p.B, D * p.H))
    dhn = tuple(rng.uniform(-1, 1, (p.num_layers * D, p.B, p.H)) for _ in range(cell.n_state))
    want = run_layer(cell, p, params, x, h0, "cpu", dy, dhn)
    with on_path(path, cell):
        got = run_layer(cell, p, params, x, h0, "cuda", dy, dhn)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-9, atol=1e-11)
    for a, b in zip(got[3], want[3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
    for k in want[4]:
        np.testing.assert_allclose(got[4][k], want[4][k], rtol=1e-9, atol=1e-11, err_msg=k)


@settings(max_examples=8, deadline=None)
@given(p=problems(max_T=12, max_B=9, max_I=20, max_H=70, max_layers=2, projection=True))
def test_gpu_lstm_with_projections(p):
    """LSTMP on the GEMM path (a projection forces it): the reference, finite differences."""
    cell = REGISTRY.get("lstm")
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(cell, p, dtype, device="cuda")
        assert scaled <= 1, f"LSTMP {np.dtype(dtype)}: error {absolute:.3e} on {p}"
    gradient_errors(cell, p, device="cuda")


@on_each_path
@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_float32_training_step_matches_cpu_float64(cell_name, path):
    from kernrnn.testing.strategies import Problem

    cell = REGISTRY.get(cell_name)
    p = Problem(T=30, B=16, I=64, H=96, num_layers=2, bidirectional=True,
                lengths=tuple(range(30, 14, -1)), with_h0=True, seed=5)
    params, x, h0 = make_arrays(cell, p, np.float64)
    rng = np.random.default_rng(0)
    dy = rng.uniform(-1, 1, (p.T, p.B, 2 * p.H))
    dhn = tuple(rng.uniform(-1, 1, (4, p.B, p.H)) for _ in range(cell.n_state))
    ref = run_layer(cell, p, params, x, h0, "cpu", dy, dhn)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    with on_path(path):
        got = run_layer(cell, p, {k: f32(v) for k, v in params.items()}, f32(x),
                        tuple(map(f32, h0)), "cuda", f32(dy), tuple(map(f32, dhn)))
    t = tol.grad_tolerance(np.float32)
    np.testing.assert_allclose(got[0], ref[0], **tol.FLOAT32)
    for k in ref[4]:
        scale = max(1.0, float(np.abs(ref[4][k]).max()))
        np.testing.assert_allclose(got[4][k] / scale, ref[4][k] / scale, **t, err_msg=k)


def test_outputs_are_cupy_and_inputs_not_copied():
    import kernrnn

    layer = kernrnn.RNN("lstm", 8, 16, device="cuda", seed=0)
    x = cupy.random.uniform(-1, 1, (5, 3, 8)).astype(cupy.float32)
    assert cb.asarray(x).data.ptr == x.data.ptr
    y, (h, c) = layer(x)
    assert isinstance(y, cupy.ndarray) and isinstance(h, cupy.ndarray)
    assert y.dtype == cupy.float32 and y.shape == (5, 3, 16)


def test_torch_cuda_tensors_are_used_without_copy():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    import kernrnn

    m = torch.nn.GRU(6, 10, num_layers=2, bidirectional=True).cuda().double()
    layer = kernrnn.RNN("gru", 6, 10, num_layers=2, bidirectional=True, dtype=np.float64,
                        device="cuda")
    layer.load_state_dict(m.state_dict())
    x = torch.randn(7, 4, 6, device="cuda", dtype=torch.float64)
    assert cb.asarray(x).data.ptr == x.data_ptr()
    y, h = layer(x)
    with torch.no_grad():
        y_t, h_t = m(x)
    np.testing.assert_allclose(cupy.asnumpy(y), y_t.cpu().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(cupy.asnumpy(h), h_t.cpu().numpy(), rtol=1e-10, atol=1e-10)


@on_each_path
def test_runs_on_cupys_current_stream(path):
    import kernrnn

    layer = kernrnn.RNN("gru", 12, 20, num_layers=2, device="cuda", dtype=np.float64, seed=2)
    x = cupy.random.uniform(-1, 1, (9, 4, 12))
    with on_path(path):
        y0, _ = layer(x)
        dx0, _ = layer.backward(cupy.ones_like(y0))
    g0 = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    # the side stream below does not wait for the default stream: finish x, y0 and the
    # zeroed gradients first, or the comparison races (and flakes with cuBLAS)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream, on_path(path):
        y1, _ = layer(x)
        dx1, _ = layer.backward(cupy.ones_like(y1))
    stream.synchronize()
    cupy.testing.assert_allclose(y1, y0, rtol=0, atol=0)
    cupy.testing.assert_allclose(dx1, dx0, rtol=1e-13, atol=1e-13)
    for k in g0:
        cupy.testing.assert_allclose(layer.grads[k], g0[k], rtol=1e-13, atol=1e-13)


def test_to_cuda_and_back():
    import kernrnn

    layer = kernrnn.RNN("rnn", 4, 6, num_layers=2, dtype=np.float64, seed=1)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 2, 4))
    y_cpu, _ = layer(x)
    layer.to("cuda")
    y_gpu, _ = layer(cupy.asarray(x))
    np.testing.assert_allclose(cupy.asnumpy(y_gpu), y_cpu, rtol=1e-12, atol=1e-12)
    layer.to("cpu")
    assert isinstance(layer.params["weight_hh_l0"], np.ndarray)


def test_paths_agree():
    if cb.paths.persistent_module() is None:
        pytest.skip("kernrnn.backends.cuda.persistent is not installed")
    from kernrnn.testing.strategies import Problem

    cell = REGISTRY.get("lstm")
    p = Problem(T=20, B=4, I=32, H=64, num_layers=1, bidirectional=True, lengths=None,
                with_h0=True, seed=3)
    params, x, h0 = make_arrays(cell, p, np.float32)
    outs = {}
    for path in ("gemm", "persistent"):
        cb.set_path(path)
        try:
            dy = np.ones((20, 4, 128), np.float32)
            dhn = tuple(np.zeros((2, 4, 64), np.float32) for _ in range(2))
            outs[path] = run_layer(cell, p, params, x, h0, "cuda", dy, dhn)
        finally:
            cb.set_path(None)
    np.testing.assert_allclose(outs["persistent"][0], outs["gemm"][0], **tol.FLOAT32)
    for k in outs["gemm"][4]:
        np.testing.assert_allclose(outs["persistent"][4][k], outs["gemm"][4][k],
                                   **tol.FLOAT32_GRAD, err_msg=k)


def test_cuda_graph_replays_match_eager_runs():
    """KERNRNN_CUDA_GRAPHS: eager, capture, then replays give the eager results (fresh
    inputs each call, so a replay must read the current buffers, not stale ones).
    Graphs replay the GEMM path's per-step loop, so the test pins that path.  Each
    ``dy`` is copied into one buffer, as a training loop's would be: ``dy`` is in the
    backward's key, so fresh arrays would never let the top layer's backward replay."""
    import kernrnn

    cb.set_path("gemm")

    layer = kernrnn.RNN("lstm", 12, 24, num_layers=2, bidirectional=True, device="cuda",
                        dtype=np.float64, seed=4)
    rs = cupy.random.RandomState(0)
    xs = [rs.uniform(-1, 1, (9, 5, 12)) for _ in range(4)]
    dys = [rs.uniform(-1, 1, (9, 5, 48)) for _ in range(4)]
    lens = [9, 3, 5, 9, 1]

    dy_buf = cupy.empty_like(dys[0])

    def run(x, dy):
        layer.zero_grad()
        y, _ = layer(x, lengths=lens)
        dy_buf[...] = dy
        dx, _ = layer.backward(dy_buf)
        return [cupy.asnumpy(y), cupy.asnumpy(dx)] + [cupy.asnumpy(layer.grads[k])
                                                      for k in sorted(layer.grads)]

    try:
        cb.set_graphs(False)
        want = [run(x, dy) for x, dy in zip(xs, dys, strict=True)]
        cb.set_graphs(True)
        before = dict(cb.graph_stats)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns
            got = [run(x, dy) for x, dy in zip(xs, dys, strict=True)]
    finally:
        cb.set_graphs(None)
        cb.set_path(None)
    assert cb.graph_stats["capture_failed"] == before["capture_failed"], cb.graph_stats
    assert cb.graph_stats["captured"] > before["captured"], cb.graph_stats
    assert cb.graph_stats["replayed"] > before["replayed"], cb.graph_stats
    for loop in ("forward", "backward"):  # 2 layers x 2 directions, replayed from call 3 on
        assert cb.graph_stats[f"replayed_{loop}"] - before[f"replayed_{loop}"] >= 4, \
            cb.graph_stats
    for g_run, w_run in zip(got, want, strict=True):
        for a, b in zip(g_run, w_run, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


@on_each_path
def test_no_deprecation_or_occupancy_warnings(path):
    """The fast launch hands cuda.core the stream object the dispatcher built, never a
    foreign stream it would convert (with a DeprecationWarning) at every launch; the
    small grids are intended, so Numba's low-occupancy warning is silenced."""
    import kernrnn

    layer = kernrnn.RNN("lstm", 8, 16, device="cuda", seed=0)
    x = cupy.random.uniform(-1, 1, (6, 3, 8)).astype(cupy.float32)
    with on_path(path):
        layer(x)  # compile, first launches
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            y, _ = layer(x)
            layer.backward(cupy.ones_like(y))
            cupy.cuda.Device().synchronize()
    bad = [str(w.message) for w in seen
           if issubclass(w.category, DeprecationWarning) or "under-utilization" in str(w.message)]
    assert not bad, bad


def test_torch_tensor_written_on_another_stream_is_read_after_it_is_ready():
    """A tensor still being written on torch's current (non-default) stream: DLPack makes
    CuPy's stream wait for it; __cuda_array_interface__ (v2, no stream) would not."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    import kernrnn

    layer = kernrnn.RNN("rnn", 16, 8, device="cuda", dtype=np.float32, seed=0)
    src = torch.rand(5, 256, 16, device="cuda")
    want, _ = layer(cupy.asarray(src))
    want = cupy.asnumpy(want)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.zeros_like(src)
        torch.cuda._sleep(200_000_000)  # keep the side stream busy (~0.1 s)
        x.copy_(src)  # lands only after the sleep
        got, _ = layer(x)  # kernrnn on CuPy's current stream, torch's current is `side`
        got = cupy.asnumpy(got)
    np.testing.assert_array_equal(got, want)


def test_persistent_kernels_load_from_the_disk_cache_in_a_second_process(tmp_path):
    """cache=True on the cooperative kernels: a second process compiles nothing."""
    if cb.paths.persistent_module() is None:
        pytest.skip("kernrnn.backends.cuda.persistent is not installed")
    script = textwrap.dedent("""
        import numpy as np, cupy
        from kernrnn.backends.cuda import persistent as cp
        from kernrnn.plugins import get_registry
        cell = get_registry().get("rnn")
        T, B, H = 3, 1, 40
        f = np.float32
        States = cupy.zeros((1, T + 1, B, H), f)
        cp.forward_loop(cell, cupy.ones((T, B, H), f), cupy.zeros((H, H), f),
                        cupy.zeros(H, f), States, cupy.zeros((0, T, B, H), f),
                        cupy.zeros((T, B, H), f), cupy.full(B, T, np.int64), False, False)
        cupy.cuda.Device().synchronize()
        d = cp.get_kernels(cell, f, cp.plan(cell, B, H, f, 1).NB).forward_infer
        print(sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()))
    """)
    env = dict(os.environ, KERNRNN_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    first, second = (tuple(map(int, r.stdout.split()[-2:])) for r in runs)
    assert first == (0, 1), first  # compiled and saved
    assert second == (1, 0), second  # loaded
