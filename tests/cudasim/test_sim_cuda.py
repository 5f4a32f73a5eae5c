"""The CUDA backend's kernels and orchestration under Numba's CUDA simulator.

Run by ``tests/test_cuda_sim.py`` in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``
(the variable must be set before ``numba.cuda`` is first imported, while the
rest of the suite needs the real target for the PTX check).  NumPy stands in
for CuPy; the same generated kernels run on the CPU, thread by thread.
"""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from cuda_test_cells import registry_with_test_cells  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernrnn.backends import cpu  # noqa: E402
from kernrnn.testing import tolerances as tol  # noqa: E402
from kernrnn.testing.conformance import forward_errors, gradient_errors, run_layer  # noqa: E402
from kernrnn.testing.strategies import make_arrays, problems  # noqa: E402

REGISTRY = registry_with_test_cells()
CELLS = REGISTRY.names()  # shipped cells + the test plugin's

# The simulator runs every GPU thread as a Python thread: keep shapes small and
# the example count modest.  The cells of the first contract get more examples;
# each cell of the zoo (one capability each: per-unit parameters, heads, no
# recurrent matrix, normalisation, scan) gets a few, which the CPU tests
# complement with many more.
SMALL = dict(max_T=5, max_B=3, max_I=4, max_H=4, max_layers=2)
CLASSIC = {"rnn", "rnn_relu", "lstm", "gru"} | {n for n in CELLS if n.startswith("test_")}
EXAMPLES = 10
ZOO_EXAMPLES = 2


def _problems(data, cell_name, n_classic=EXAMPLES, n_zoo=ZOO_EXAMPLES):
    cell = REGISTRY.get(cell_name)
    n = n_classic if cell_name in CLASSIC else n_zoo
    return cell, [data.draw(problems(**SMALL, cell=cell)) for _ in range(n)]


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=1)
@given(data=st.data())
def test_forward_matches_reference(cell_name, data):
    cell, ps = _problems(data, cell_name)
    for p in ps:
        for dtype in (np.float64, np.float32):
            scaled, absolute = forward_errors(cell, p, dtype, device="cuda")
            assert scaled <= 1, (f"{cell_name} {np.dtype(dtype)}: error {absolute:.3e} over "
                                 f"tolerance {tol.forward_tolerance(dtype)} on {p}")


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=1)
@given(data=st.data())
def test_gradients_match_finite_differences(cell_name, data):
    cell, ps = _problems(data, cell_name)
    for p in ps:  # raises ConformanceError naming the tensor on disagreement
        gradient_errors(cell, p, device="cuda")


@pytest.mark.parametrize("cell_name", sorted(CLASSIC) + ["slstm", "lstm_ln", "mingru"])
@settings(max_examples=1)
@given(data=st.data())
def test_float32_gradients_close_to_float64(cell_name, data):
    """float32 kernels (typed constants, float32 GEMMs) stay within the float32 tolerance
    (the cells of the first contract, and one zoo cell per new capability)."""
    cell, ps = _problems(data, cell_name, n_classic=4, n_zoo=2)
    for p in ps:
        params, x, h0 = make_arrays(cell, p, np.float64)
        rng = np.random.default_rng(p.seed ^ 7)
        D = 2 if p.bidirectional else 1
        dy = rng.uniform(-1, 1, (p.T, p.B, D * p.H))
        dhn = tuple(rng.uniform(-1, 1, (p.num_layers * D, p.B, p.H))
                    for _ in range(cell.n_state))
        ref = run_layer(cell, p, params, x, h0, "cpu", dy, dhn)
        f32 = lambda a: a.astype(np.float32)  # noqa: E731
        got = run_layer(cell, p, {k: f32(v) for k, v in params.items()}, f32(x),
                        None if h0 is None else tuple(map(f32, h0)), "cuda", f32(dy),
                        tuple(map(f32, dhn)))
        t = tol.grad_tolerance(np.float32)
        np.testing.assert_allclose(got[2], ref[2], **t)  # dx
        for a, b in zip(got[3], ref[3], strict=True):  # dh0
            np.testing.assert_allclose(a, b, **t)
        for k in ref[4]:
            np.testing.assert_allclose(got[4][k], ref[4][k], **t, err_msg=k)


def test_parallel_scan_matches_the_sequential_pass():
    """A linear-in-state cell over more steps than one scan chunk: the chunked parallel
    scan (forward and backward) against the CPU's sequential pass, with lengths."""
    from kernrnn.backends.cuda.kernels import SCAN_CHUNK

    cell = REGISTRY.get("mingru")
    rng = np.random.default_rng(11)
    T, B, I, H = 3 * SCAN_CHUNK + 5, 3, 2, 3
    params = {"weight_ih": rng.uniform(-0.5, 0.5, (2 * H, I)),
              "bias_ih": rng.uniform(-0.5, 0.5, 2 * H)}
    x = rng.uniform(-1, 1, (T, B, I))
    h0 = rng.uniform(-1, 1, (1, B, H))
    lens = np.array([T, SCAN_CHUNK + 1, 0], np.int64)
    for reverse in (False, True):
        y_c, hn_c, ctx_c = cpu.forward(cell, x, params, h0, lens, reverse, True)
        y_g, hn_g, ctx_g = cb.forward(cell, x, params, h0, cb.lengths(lens), reverse, True)
        np.testing.assert_allclose(y_g, y_c, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(hn_g, hn_c, rtol=1e-12, atol=1e-12)
        dy, dhn = rng.uniform(-1, 1, y_c.shape), rng.uniform(-1, 1, hn_c.shape)
        dx_c, dS_c, g_c = cpu.backward(ctx_c, dy, dhn)
        dx_g, dS_g, g_g = cb.backward(ctx_g, dy, dhn)
        np.testing.assert_allclose(dx_g, dx_c, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(dS_g, dS_c, rtol=1e-11, atol=1e-12)
        for k in g_c:
            np.testing.assert_allclose(g_g[k], g_c[k], rtol=1e-11, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("cell_name", ["lstm", "gru", "test_mgu"])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_backend_matches_cpu_backend(cell_name, data):
    """One direction through the backend functions: same layouts and results as cpu.py."""
    cell = REGISTRY.get(cell_name)
    T, B = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3))
    I, H = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    reverse, training = data.draw(st.booleans()), data.draw(st.booleans())
    lens = np.array(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)), np.int64)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    G, S = cell.n_gates, cell.n_state
    x = rng.uniform(-1, 1, (T, B, I))
    W_ih, W_hh = rng.uniform(-0.5, 0.5, (G * H, I)), rng.uniform(-0.5, 0.5, (G * H, H))
    b_ih, b_hh = rng.uniform(-0.5, 0.5, G * H), rng.uniform(-0.5, 0.5, G * H)
    h0 = rng.uniform(-1, 1, (S, B, H))
    params = {"weight_ih": W_ih, "weight_hh": W_hh, "bias_ih": b_ih, "bias_hh": b_hh}
    y_c, hn_c, ctx_c = cpu.forward(cell, x, params, h0, lens, reverse, training)
    y_g, hn_g, ctx_g = cb.forward(cell, x, params, h0, cb.lengths(lens), reverse, training)
    np.testing.assert_allclose(y_g, y_c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hn_g, hn_c, rtol=1e-12, atol=1e-12)
    if not training:
        assert ctx_g is None
        return
    assert ctx_g.device == "cuda" and ctx_g.cell is cell and ctx_g.x is x
    np.testing.assert_allclose(ctx_g.States, ctx_c.States, rtol=1e-12, atol=1e-12)
    dy = rng.uniform(-1, 1, (T, B, H))
    dhn = rng.uniform(-1, 1, (S, B, H))
    dx_c, dS_c, g_c = cpu.backward(ctx_c, dy, dhn)
    dx_g, dS_g, g_g = cb.backward(ctx_g, dy, dhn)
    np.testing.assert_allclose(dx_g, dx_c, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(dS_g, dS_c, rtol=1e-11, atol=1e-12)
    assert set(g_g) == {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    for k in g_c:
        np.testing.assert_allclose(g_g[k], g_c[k], rtol=1e-11, atol=1e-12, err_msg=k)


def test_layer_moves_between_devices():
    """layer.to('cuda') / to('cpu') keeps the parameters; results agree."""
    import kernrnn

    layer = kernrnn.RNN("gru", input_size=3, hidden_size=4, num_layers=2, bidirectional=True,
                        dtype=np.float64, seed=3)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 2, 3))
    y_cpu, h_cpu = layer(x)
    layer.to("cuda")
    assert layer.device == "cuda"
    y_gpu, h_gpu = layer(cb.from_host(x))
    np.testing.assert_allclose(y_gpu, y_cpu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_gpu, h_cpu, rtol=1e-12, atol=1e-12)
    layer.to("cpu")
    y_back, _ = layer(x)
    np.testing.assert_array_equal(y_back, y_cpu)


def test_functional_api_on_the_cuda_backend(monkeypatch):
    """rnn_forward / rnn_backward run unchanged on the CUDA backend (device chosen by the
    arrays; under the simulator the arrays are NumPy, so the choice is forced here)."""
    from kernrnn import functional

    cell = REGISTRY.get("lstm")
    rng = np.random.default_rng(4)
    T, B, I, H = 4, 3, 2, 5
    x = rng.uniform(-1, 1, (T, B, I))
    w = [rng.uniform(-0.4, 0.4, s) for s in ((4 * H, I), (4 * H, H), (4 * H,), (4 * H,))]
    h0 = (rng.uniform(-1, 1, (B, H)), rng.uniform(-1, 1, (B, H)))
    dy = rng.uniform(-1, 1, (T, B, H))
    results = {}
    for device in ("cpu", "cuda"):
        monkeypatch.setattr(functional, "device_of", lambda a, d=device: d)
        y, hn, ctx = functional.rnn_forward(cell, x, *w, h0=h0, lengths=[4, 2, 3], reverse=True)
        assert ctx.device == device
        results[device] = (y, hn, *functional.rnn_backward(ctx, dy, dhn=hn))
    (y_c, hn_c, dx_c, dh0_c, g_c), (y_g, hn_g, dx_g, dh0_g, g_g) = results["cpu"], results["cuda"]
    np.testing.assert_allclose(y_g, y_c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx_g, dx_c, rtol=1e-11, atol=1e-12)
    for a, b in zip(hn_g + dh0_g, hn_c + dh0_c, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
    for k in g_c:
        np.testing.assert_allclose(g_g[k], g_c[k], rtol=1e-11, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("cell_name", ["lstm", "slstm", "lstm_ln", "mingru"])
def test_regularised_kernels_match_the_cpu_mask_for_mask(cell_name):
    """Recurrent dropout, input dropout and zoneout with one seed: the CUDA kernels
    (simulated) draw the same Philox masks as the CPU kernels, forward and backward,
    in training and (zoneout's expectation) in evaluation."""
    from kernrnn.regularization import Regularization, RegularizationCall

    cell = REGISTRY.get(cell_name)
    rng = np.random.default_rng(21)
    T, B, I, H = 7, 3, 3, 4
    params = {k: rng.uniform(-0.5, 0.5, s) for k, s in cell.param_shapes(I, H).items()}
    x = rng.uniform(-1, 1, (T, B, I))
    h0 = np.stack(cell.sample_states(rng, (B, H)))
    lens = np.array([T, 3, 0], np.int64)
    settings = Regularization.build(cell, 0.3 if cell.has_recurrent else 0.0, 0.25,
                                    tuple(0.2 + 0.1 * s for s in range(cell.n_state)))
    for reverse, training in ((False, True), (True, True), (False, False)):
        reg = RegularizationCall(settings, 987654321987, 1, int(reverse), training)
        y_c, hn_c, ctx_c = cpu.forward(cell, x, params, h0, lens, reverse, training, reg=reg)
        y_g, hn_g, ctx_g = cb.forward(cell, x, params, h0, cb.lengths(lens), reverse, training,
                                      reg=reg)
        np.testing.assert_allclose(y_g, y_c, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(hn_g, hn_c, rtol=1e-12, atol=1e-13)
        if not training:
            continue
        dy, dhn = rng.uniform(-1, 1, y_c.shape), rng.uniform(-1, 1, hn_c.shape)
        dx_c, dS_c, g_c = cpu.backward(ctx_c, dy, dhn)
        dx_g, dS_g, g_g = cb.backward(ctx_g, dy, dhn)
        np.testing.assert_allclose(dx_g, dx_c, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(dS_g, dS_c, rtol=1e-11, atol=1e-12)
        for k in g_c:
            np.testing.assert_allclose(g_g[k], g_c[k], rtol=1e-11, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("cell_name", ["lstm", "lstm_peephole"])
@settings(max_examples=1)
@given(data=st.data())
def test_projection_matches_reference(cell_name, data):
    """LSTMP: the projection GEMM and the proj_* kernels in the GEMM-per-step loops."""
    cell = REGISTRY.get(cell_name)
    n = EXAMPLES // 2 if cell_name in CLASSIC else ZOO_EXAMPLES
    for _ in range(n):
        p = data.draw(problems(**SMALL, cell=cell, projection=True))
        for dtype in (np.float64, np.float32):
            scaled, absolute = forward_errors(cell, p, dtype, device="cuda")
            assert scaled <= 1, f"{cell_name} {np.dtype(dtype)}: error {absolute:.3e} on {p}"
        gradient_errors(cell, p, device="cuda")
