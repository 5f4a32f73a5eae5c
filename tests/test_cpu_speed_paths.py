"""The CPU fast paths: float32 transcendental variants, chunked time loops, the bench.

No timings are asserted here; speed is measured by ``kernrnn bench``.
"""

import functools
import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn.backends import cpu
from kernrnn.backends.cpu import fused_source, packed, threads, timing, tuning
from kernrnn.plugins import get_registry
from kernrnn.scalar import compile_scalar, math_fingerprint
from kernrnn.scalar_math import _sigmoid_float32, _tanh_float32, sigmoid, tanh
from kernrnn.testing.strategies import make_arrays, problems


@functools.cache
def _vectorised(fn, dtype):
    """``fn`` for ``dtype`` over an array; one compile per (function, dtype), not one per
    hypothesis example."""
    f = compile_scalar(fn, dtype)

    @numba.njit(error_model="numpy")
    def run(xs, out):
        for i in range(xs.size):
            out[i] = f(xs[i])

    def call(xs):
        out = np.empty_like(xs)
        run(xs, out)
        return out

    return call


GRID = np.concatenate([np.linspace(-20, 20, 400_001), np.geomspace(1e-30, 20, 20_000),
                       -np.geomspace(1e-30, 20, 20_000), [0.0, 9.0, -9.0, 1e30, -1e30]])


def test_float32_tanh_variant_is_accurate_everywhere():
    got = _vectorised(tanh, np.float32)(GRID.astype(np.float32)).astype(np.float64)
    want = np.tanh(GRID.astype(np.float32).astype(np.float64))
    err = np.abs(got - want)
    assert err.max() < 4e-7
    small = np.abs(want) < 1e-3  # relative accuracy near zero (tanh x ~ x)
    assert np.max(err[small] / np.abs(want[small]).clip(1e-38)) < 4e-7
    assert np.all(np.abs(got) <= 1.0)


def test_float32_sigmoid_variant_is_accurate_everywhere():
    got = _vectorised(sigmoid, np.float32)(GRID.astype(np.float32)).astype(np.float64)
    with np.errstate(over="ignore"):
        want = 1.0 / (1.0 + np.exp(-GRID.astype(np.float32).astype(np.float64)))
    assert np.abs(got - want).max() < 3e-7
    assert np.all((got >= 0) & (got <= 1))


def test_float32_variants_propagate_nan():
    out = _vectorised(tanh, np.float32)(np.array([np.nan, 1.0], np.float32))
    assert math.isnan(out[0]) and not math.isnan(out[1])
    out = _vectorised(sigmoid, np.float32)(np.array([np.nan], np.float32))
    assert math.isnan(out[0])


@given(st.floats(-30, 30, allow_nan=False, width=64))
def test_float64_keeps_libm(x):
    assert _vectorised(tanh, np.float64)(np.array([x]))[0] == math.tanh(x)
    s = _vectorised(sigmoid, np.float64)(np.array([x]))[0]
    assert s == pytest.approx(1 / (1 + math.exp(-x)), rel=1e-15, abs=1e-300)


def test_variants_are_selected_by_precision_and_in_the_fingerprint():
    assert tanh.kernrnn_variants["float32"] is _tanh_float32
    assert sigmoid.kernrnn_variants["float32"] is _sigmoid_float32
    # the fingerprint covers helpers and their variants, recursively
    fp = math_fingerprint(sigmoid)
    assert "def _sigmoid_float32" in fp and "def _tanh_float32" in fp


def test_user_helper_variant_is_used(tmp_path, monkeypatch):
    src = tmp_path / "user_helpers_mod.py"
    src.write_text(
        "def f(x):\n    return x + 1.0\n\n"
        "def f32(x):\n    return x + 2.0\n\n"
        "f.kernrnn_variants = {'float32': f32}\n\n"
        "def user(x):\n    return f(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_helpers_mod as m

    assert _vectorised(m.user, np.float32)(np.array([1.0], np.float32))[0] == 3.0
    assert _vectorised(m.user, np.float64)(np.array([1.0]))[0] == 2.0


@settings(max_examples=10, deadline=None)
@given(problems(max_T=6, max_B=7, max_I=5, max_H=9, max_layers=2),
       st.sampled_from(["lstm", "gru", "rnn"]), st.sampled_from([np.float32, np.float64]))
def test_chunked_time_loop_matches_one_chunk(p, name, dtype):
    """Splitting the batch over threads changes nothing but speed (and BLAS rounding)."""
    cell = kernrnn.get_registry().get(name)
    params, x, h0 = make_arrays(cell, p, dtype)
    D = 2 if p.bidirectional else 1
    dy = np.random.default_rng(p.seed).uniform(-1, 1, (p.T, p.B, D * p.H)).astype(dtype)

    def run(threads):
        old = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            layer = kernrnn.RNN(name, p.I, p.H, num_layers=p.num_layers,
                                bidirectional=p.bidirectional, dtype=dtype)
            layer.load_state_dict(params)
            hinit = None if h0 is None else (h0[0] if cell.n_state == 1 else h0)
            y, _ = layer(x, hinit, p.lengths)
            dx, _ = layer.backward(dy)
            return [y, dx] + [layer.grads[k] for k in sorted(layer.grads)]
        finally:
            numba.set_num_threads(old)

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    for a, b in zip(run(1), run(2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6 if dtype == np.float32 else 1e-13,
                                   atol=1e-6 if dtype == np.float32 else 1e-13)


def test_same_grads_detection():
    reg = kernrnn.get_registry()
    assert cpu.same_input_and_recurrent_grads(reg.get("lstm"))
    assert cpu.same_input_and_recurrent_grads(reg.get("rnn"))
    assert not cpu.same_input_and_recurrent_grads(reg.get("gru"))


def test_bench_runs_small_case_and_reports(tmp_path):
    from kernrnn.bench import cpu as bench

    cases = bench.run_cases(["gru"], [(3, 4, 5, 6)], repeats=2, warmup=1, threads=1,
                            use_torch=False)
    assert [c.mode for c in cases] == ["forward", "train"]
    assert cases[0].gflop == pytest.approx(2 * 4 * 3 * 3 * 6 * (5 + 6) / 1e9)
    assert cases[1].gflop == pytest.approx(3 * cases[0].gflop)
    text = bench.format_table(cases)
    assert "gru" in text and "3,4,5,6" in text
    md = bench.markdown_report(cases, command="kernrnn bench", repeats=2)
    assert md.startswith("# kernrnn CPU benchmark") and "| gru | 3,4,5,6 | forward |" in md


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_timeline_records_the_parts_of_a_call_and_unwraps(monkeypatch, mode):
    from kernrnn.bench import cpu as bench
    from kernrnn.bench.timeline import format_timeline, step_timeline

    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    def patched():
        return timing.recorder(), kernrnn.RNN.backward

    originals = patched()
    events = step_timeline("lstm", 3, 4, 5, 6, mode, steps=3, warmup=1, threads=1)
    assert patched() == originals
    labels = [label for label, _ in events]
    times = [t for _, t in events]
    assert labels[-1] == "done" and times == sorted(times) and times[0] >= 0
    want = ["backend forward start", "backend forward end"]
    if mode == "train":
        want += ["layer backward start", "backend backward start", "weight gradients start",
                 "weight gradients end", "backend backward end", "layer backward end"]
    assert [label for label in labels if label in want] == want
    kernels = [label for label in labels if label.startswith("caller ")]
    assert kernels and len(kernels) % 2 == 0  # each kernel call's start and end
    text = format_timeline(events)
    assert "backend forward start" in text and text.count("\n") == len(events)
    with pytest.raises(ValueError, match="mode must be one of"):
        step_timeline("lstm", 3, 4, 5, 6, "backward")


def test_bench_cli_timeline(capsys, monkeypatch):
    from kernrnn.bench import cpu as bench
    from kernrnn.cli import main

    monkeypatch.setattr(bench, "SETTLE_S", bench.SETTLE_S)  # --settle sets it: restore after
    assert main(["bench", "--timeline", "--cells", "lstm", "--sizes", "2,3,4,5", "--modes",
                 "train", "--repeats", "2", "--warmup", "0", "--settle", "0",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "lstm 2,3,4,5 train (median of 2 calls):" in out
    assert "backend backward end" in out and out.rstrip().endswith("done")


def test_bench_cli_rejects_bad_options(capsys):
    from kernrnn.cli import main

    assert main(["bench", "--sizes", "1,2,3", "--no-startup"]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["bench", "--cells", "nosuchcell", "--no-startup"]) == 2
    assert "--cells" in capsys.readouterr().err
    assert main(["bench", "--loop-cells", "lstm", "--no-startup"]) == 2
    assert "--loop-cells" in capsys.readouterr().err
    assert main(["bench", "--modes", "backward", "--no-startup"]) == 2
    assert "--modes" in capsys.readouterr().err
    assert main(["bench", "--settle", "-1", "--no-startup"]) == 2
    assert "--settle" in capsys.readouterr().err


def test_bench_plot_draws_one_bar_per_case(tmp_path):
    """The ratio chart has a bar per timed case, at the ratio's height."""
    pytest.importorskip("matplotlib")
    from kernrnn.bench import cpu as bench

    cases = []
    for mode, k, t in (("forward", 1.0, 2.0), ("train", 3.0, 2.0)):
        c = bench.Case("gru", 3, 4, 5, 6, mode, gflop=1.0)
        c.kernrnn, c.torch, c.gemm = [k], [t], [100.0]
        cases.append(c)
    path = tmp_path / "ratios.png"
    drawn = bench.plot_ratios(cases, path)
    assert drawn == [("gru\n3,4,5,6", "forward", 0.5), ("gru\n3,4,5,6", "train", 1.5)]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="needs PyTorch timings"):
        bench.plot_ratios([bench.Case("gru", 3, 4, 5, 6, "train", gflop=1.0, kernrnn=[1.0])],
                          path)


# -- the packed-W_hh tiles (kernrnn.backends.cpu.microkernel) ------------------------

from kernrnn.backends.cpu import microkernel as mk  # noqa: E402


def _tiles(dtype=np.float32):
    """The LSTM's compiled tile functions (mr x 4*nu and its tails, mrb x nu and its tails)."""
    import sys

    k = cpu.get_kernels(kernrnn.get_registry().get("lstm"), dtype)
    mod = sys.modules[k.fused.forward_train.py_func.__module__]
    f = k.fused
    with mk.compile_with_slp():
        shapes = [(m, 4 * f.nu) for m in (f.mr, *mk.tail_heights(f.mr, exact=False))]
        shapes += [(m, f.nu) for m in (f.mrb, *mk.tail_heights(f.mrb, exact=False))]
        return f, {(m, n): getattr(mod, mk.tile_name(m, n)) for m, n in shapes}


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 11), K=st.integers(1, 37), H=st.integers(1, 40), data=st.data())
def test_tiles_on_packed_weights_match_numpy(rows, K, H, data):
    """Every tile, on odd shapes (rows and units not multiples of the block), is A @ W,
    written where its offsets say and nowhere else."""
    f, tiles = _tiles()
    rng = np.random.default_rng(rows * 10_000 + K * 100 + H)
    (mr, nr), tile = data.draw(st.sampled_from(sorted(tiles.items())), label="tile")
    G = nr // f.nu
    if G > 1:  # a forward tile: h [rows, H] @ W_hh.T, W_hh [G*H, H]
        W = rng.uniform(-1, 1, (G * H, H)).astype(np.float32)
        Wp, K, want = mk.pack_forward(W, G, H, f.nu), H, None
    else:  # a backward tile: dHU [rows, K] @ W_hh, W_hh [K, H]
        W = rng.uniform(-1, 1, (K, H)).astype(np.float32)
        Wp = mk.pack_backward(W, H, f.nu)
    A = rng.uniform(-1, 1, (rows, K)).astype(np.float32)
    want = A @ W.T if G > 1 else A @ W
    i0 = data.draw(st.integers(0, rows - 1), label="i0")
    i1 = min(rows, i0 + mr)
    Hp = Wp.shape[0] * f.nu
    C = np.full((mr + 2, G * Hp + 5), np.nan, np.float32)
    for jb in range(Wp.shape[0]):
        tile(A, i0, i1, Wp, jb, C, 1, jb * f.nu, Hp)
    cols = np.concatenate([g * Hp + np.arange(H) for g in range(G)])
    np.testing.assert_allclose(C[1:1 + i1 - i0][:, cols], want[i0:i1], rtol=3e-5, atol=3e-5)
    assert np.isnan(C[0]).all() and np.isnan(C[1 + i1 - i0:]).all()  # no stray rows
    assert np.isnan(C[:, G * Hp:]).all()  # nothing past the padded panels


def test_packing_layouts():
    rng = np.random.default_rng(0)
    G, H, nu = 3, 21, 8
    W = rng.standard_normal((G * H, H))
    Wp = mk.pack_forward(W, G, H, nu)
    assert Wp.shape == (3, H, G * nu)
    for jb in range(3):
        for g in range(G):
            for u in range(nu):
                j = jb * nu + u
                want = W[g * H + j] if j < H else 0
                np.testing.assert_array_equal(Wp[jb, :, g * nu + u], want)
    Wb = mk.pack_backward(W, H, nu)
    assert Wb.shape == (3, G * H, nu)
    np.testing.assert_array_equal(Wb.transpose(1, 0, 2).reshape(G * H, -1)[:, :H], W)
    assert not Wb.transpose(1, 0, 2).reshape(G * H, -1)[:, H:].any()
    f, _ = _tiles()  # the compiled packing the kernels use: the same layout
    for G, H, K in ((4, 21, 5), (3, 16, 7), (1, 33, 2)):
        W = rng.standard_normal((G * H, K)).astype(np.float32)
        np.testing.assert_array_equal(f.pack_forward(W, G, H), mk.pack_forward(W, G, H, f.nu))
        Wh = rng.standard_normal((G * H, H)).astype(np.float32)
        np.testing.assert_array_equal(f.pack_backward(Wh, H), mk.pack_backward(Wh, H, f.nu))


@settings(max_examples=8, deadline=None)
@given(B=st.integers(1, 9), H=st.integers(1, 40), split=st.sampled_from(["rows", "units"]),
       cell=st.sampled_from(["lstm", "gru"]))
def test_training_forward_packs_the_backward_panels(B, H, split, cell):
    """The kernel threads' shares of a training forward's packing (either split) make up
    W_hh in the backward's layout, which the context carries to the backward."""
    rng = np.random.default_rng(B * 100 + H)
    layer = kernrnn.RNN(cell, 5, H, dtype=np.float32, seed=B)
    layer.train()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "SPLIT", split)
        layer(rng.uniform(-1, 1, (3, B, 5)).astype(np.float32))
    ctx = layer._ctx[0][0]
    f = cpu.get_kernels(layer.cell, np.float32).fused
    want = mk.pack_backward(layer.params["weight_hh_l0"], H, f.nu)
    np.testing.assert_array_equal(ctx.panels, want)
    layer.backward(np.zeros((3, B, H), np.float32))
    assert ctx.panels is None  # back in the workspace


def test_fused_path_selection():
    reg = kernrnn.get_registry()
    assert cpu.fused_path(reg.get("lstm")) and cpu.fused_path(reg.get("gru"))
    assert cpu.fused_path(reg.get("lstm_peephole"))  # per-unit parameters ride along
    for name in ("lstm_ln", "slstm", "indrnn", "mingru"):  # norms, heads, no W_hh
        assert not cpu.fused_path(reg.get(name))
    src = fused_source.fused_forward_source(reg.get("lstm"), False, 4, 4, 16)
    assert "tile_4x64(" in src and "tile_2x64(" in src  # full tiles, and tails for a remainder


@settings(max_examples=12, deadline=None)
@given(problems(max_T=5, max_B=9, max_I=5, max_H=35, max_layers=2),
       st.sampled_from(["lstm", "gru", "rnn", "lstm_peephole"]),
       st.sampled_from([np.float32, np.float64]), st.sampled_from(["rows", "units"]))
def test_fused_path_matches_blas_path(p, name, dtype, split):
    """Packed tiles with the step in the epilogue, split by rows or by units (with the
    step barrier), give the BLAS-per-step results: forward, dx and every gradient."""
    cell = kernrnn.get_registry().get(name)
    params, x, h0 = make_arrays(cell, p, dtype)
    D = 2 if p.bidirectional else 1
    dy = np.random.default_rng(p.seed).uniform(-1, 1, (p.T, p.B, D * p.H)).astype(dtype)

    def run(fused):
        mp.setattr(tuning, "FUSED", fused)
        cpu.get_kernels.cache_clear()
        old = numba.get_num_threads()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        try:
            layer = kernrnn.RNN(name, p.I, p.H, num_layers=p.num_layers,
                                bidirectional=p.bidirectional, dtype=dtype)
            layer.load_state_dict(params)
            hinit = None if h0 is None else (h0[0] if cell.n_state == 1 else h0)
            y, hn = layer(x, hinit, p.lengths)
            dx, dh0 = layer.backward(dy)
            return [y, dx] + [layer.grads[k] for k in sorted(layer.grads)]
        finally:
            numba.set_num_threads(old)
            cpu.get_kernels.cache_clear()

    tol = 2e-5 if dtype == np.float32 else 1e-12
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "SPLIT", split)
        for a, b in zip(run(False), run(True), strict=True):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@settings(max_examples=6, deadline=None)
@given(problems(max_T=4, max_B=5, max_I=5, max_H=35, max_layers=1),
       st.sampled_from(["lstm", "gru"]))
def test_fused_forward_is_bitwise_the_same_for_every_split(p, name):
    """Rows or units between the threads, the input projection per step or for all
    steps first: the same values bit for bit (what lets ``SPLIT = "auto"`` choose by
    time), forward and the saved values that BPTT reads."""
    cell = kernrnn.get_registry().get(name)
    params, x, h0 = make_arrays(cell, p, np.float32)
    out = []
    with pytest.MonkeyPatch.context() as mp:
        for split, pre in (("rows", 0), ("rows", 1000), ("units", 0), ("units", 1000)):
            mp.setattr(tuning, "SPLIT", split)
            mp.setattr(tuning, "PRE_PROJECTION_MAX_ROWS", pre)
            old = numba.get_num_threads()
            numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
            try:
                layer = kernrnn.RNN(name, p.I, p.H, bidirectional=p.bidirectional,
                                    dtype=np.float32)
                layer.load_state_dict(params)
                hinit = None if h0 is None else (h0[0] if cell.n_state == 1 else h0)
                y, hn = layer(x, hinit, p.lengths)
                dx, _ = layer.backward(np.ones_like(y))
            finally:
                numba.set_num_threads(old)
            out.append([y, dx] + [layer.grads[k] for k in sorted(layer.grads)])
    for other in out[1:]:
        for a, b in zip(out[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_packed_weights_are_reused_only_while_unchanged():
    """Inference reuses the packed panels of unchanged weights; a weight changed in
    place (by a value, or by one bit) is packed afresh."""
    rng = np.random.default_rng(3)
    layer = kernrnn.RNN("lstm", 5, 20, dtype=np.float32, seed=1)
    layer.eval()
    x = rng.uniform(-1, 1, (3, 2, 5)).astype(np.float32)
    packed._packed_weights.clear()
    y0, _ = layer(x)
    y1, _ = layer(x)
    assert len(packed._packed_weights._entries) == 2  # W_ih and W_hh, packed once
    np.testing.assert_array_equal(y0, y1)

    def bump(w):
        w[0, 0] += 1

    def flip_bit(w):
        w.view(np.uint32)[3, 1] ^= 1 << 12

    for change in (bump, flip_bit):
        for name in ("weight_hh_l0", "weight_ih_l0"):
            change(layer.params[name])
            want = kernrnn.RNN("lstm", 5, 20, dtype=np.float32)
            want.load_state_dict({k: v.copy() for k, v in layer.params.items()})
            want.train()  # training forwards never use the cache
            np.testing.assert_array_equal(layer(x)[0], want(x)[0])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3 * 4096 + 7), dtype=st.sampled_from([np.float32, np.float64]),
       data=st.data())
def test_same_bits_finds_any_changed_bit(n, dtype, data):
    """The inference cache's check: a copy is the same, one flipped bit anywhere (any
    4096-element block, any bit) is not, and neither is another shape."""
    f = cpu.get_kernels(get_registry().get("lstm"), dtype).fused
    a = np.random.default_rng(n).standard_normal((n, 1)).astype(dtype)
    assert packed._same_bits(f, a, a.copy())
    changed = a.copy()
    pos = data.draw(st.integers(0, n - 1), label="element")
    bit = data.draw(st.integers(0, 8 * a.itemsize - 1), label="bit")
    changed.view(f"u{a.itemsize}")[pos, 0] ^= np.array(1, f"u{a.itemsize}") << bit
    assert not packed._same_bits(f, a, changed)
    assert not packed._same_bits(f, a, a.reshape(n).copy())


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 300), k=st.integers(1, 40), n=st.integers(1, 30),
       transposed=st.booleans())
def test_threaded_matmul_is_a_matmul(m, k, n, transposed):
    """The weight-gradient GEMM on the kernel threads: a @ b for any row count, also
    for the transposed views the weight gradients pass."""
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a = rng.standard_normal((k, m)).astype(np.float32).T if transposed else \
        rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    old = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        got = threads.threaded_matmul(a, b)
    finally:
        numba.set_num_threads(old)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


def test_training_step_with_threaded_weight_gradients(monkeypatch):
    """Above THREADED_GEMM_MIN_ROWS the weight gradients run on the kernel threads: the
    same gradients as with BLAS's own threads (threshold lowered so a small problem
    takes that road)."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (6, 5, 4)).astype(np.float32)
    dy = rng.uniform(-1, 1, (6, 5, 7)).astype(np.float32)
    out = {}
    for rows in (10**9, 1):
        monkeypatch.setattr(tuning, "THREADED_GEMM_MIN_ROWS", rows)
        layer = kernrnn.RNN("gru", 4, 7, dtype=np.float32, seed=2)
        layer(x)
        dx, _ = layer.backward(dy)
        out[rows] = [dx] + [layer.grads[k] for k in sorted(layer.grads)]
    for a, b in zip(out[10**9], out[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_timing_hook_marks_the_blas_hold_and_both_gemm_roads(monkeypatch):
    """The hook ``kernrnn bench --timeline`` reads: a training step marks its weight
    gradients' GEMMs on whichever road they took, and the BLAS hold of the kernel
    threads' road; the hook is off again afterwards and refuses to nest."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (6, 5, 4)).astype(np.float32)
    dy = rng.uniform(-1, 1, (6, 5, 7)).astype(np.float32)
    for rows, road in ((10**9, "GEMM (BLAS threads)"), (1, "GEMM (kernel threads)")):
        monkeypatch.setattr(tuning, "THREADED_GEMM_MIN_ROWS", rows)
        layer = kernrnn.RNN("gru", 4, 7, dtype=np.float32, seed=2)
        events = []
        with timing.recording(events.append):
            layer(x)
            layer.backward(dy)
            with pytest.raises(RuntimeError, match="already recording"):
                with timing.recording(events.append):
                    pass
        assert timing.recorder() is None
        marks = [e for e in events if not e.startswith(("caller ", "pool ", "BLAS "))]
        assert marks[:4] == ["backend forward start", "backend forward end",
                             "backend backward start", "weight gradients start"]
        assert marks[-2:] == ["weight gradients end", "backend backward end"]
        gemms = marks[4:-2]  # x's, W_ih's and W_hh's gradients
        assert len(gemms) == 6 and gemms == [road + " start", road + " end"] * 3
        if rows == 1:
            assert "BLAS held to one thread" in events and "BLAS restored" in events


def test_kernel_args_pack_by_name_and_say_what_is_wrong():
    """A kernel's arguments come out in its def line's order whatever order they are
    given in; a missing, unknown or misplaced one is named."""
    from kernrnn.backends.cpu.kernel_args import BACKWARD, FORWARD, KernelArgs

    values = {n: i for i, n in enumerate(FORWARD.names)}
    shuffled = dict(reversed([(n, v) for n, v in values.items() if n not in ("b0", "b1")]))
    assert FORWARD.pack(shuffled, b1=values["b1"], b0=values["b0"]) == tuple(values.values())
    assert FORWARD.signature("forward_train").startswith("def forward_train(XW, b_ih, WT,")
    assert BACKWARD.signature("backward_loop").endswith("b0, b1, jb0, jb1):")
    with pytest.raises(TypeError, match="no value given for XW"):
        FORWARD.pack({n: 0 for n in FORWARD.names[1:-2]}, b0=0, b1=1)
    with pytest.raises(TypeError, match=r"unexpected arguments \['extra'\]"):
        FORWARD.pack({"extra": 0, **{n: 0 for n in FORWARD.names[:-2]}}, b0=0, b1=1)
    with pytest.raises(TypeError, match="must be its last 2 arguments"):
        FORWARD.pack({n: 0 for n in FORWARD.names if n != "XW"}, XW=0, b0=0)
    with pytest.raises(ValueError, match="not in GLOSSARY"):
        KernelArgs("k", "XW nosuchname")


def test_split_chooser_keeps_the_faster_split_and_probes_less_while_it_keeps_winning():
    """Both splits run twice, their first (slow, one-off) calls not counted; the faster
    one is kept, the slower one probed again with the wait doubling (up to 8 calls)
    while it loses, and a split slowed by load is left at once, without a probe."""
    chooser = cpu.SplitChooser(probe_every=2, max_probe_every=8, weight=1.0)
    cost = {"rows": 2.0, "units": 1.0}
    picks = []
    for _ in range(28):
        split = chooser.choose("k")
        first = split not in picks
        picks.append(split)
        chooser.record("k", split, 100.0 if first else cost[split])
    assert picks[:4] == ["rows", "rows", "units", "units"]
    assert [i for i, s in enumerate(picks) if s == "rows"] == [0, 1, 5, 9, 17, 25]
    cost["units"] = 5.0  # the unit split's partner core got busy
    chooser.record("k", chooser.choose("k"), cost["units"])
    assert chooser.choose("k") == "rows"


def test_workspace_hands_out_only_whole_free_arrays():
    from kernrnn.backends.cpu.workspace import Workspace

    ws = Workspace(max_bytes=3 * 8192)
    a = np.empty((16, 128), np.float32)  # 8 KB
    ws.give(a, a, a[:8], np.empty(4, np.float32))  # twice, a view, a tiny one
    assert ws.nbytes == a.nbytes
    assert ws.take((16, 128), np.float64) is not a  # another dtype
    assert ws.take((16, 128), np.float32) is a
    assert ws.take((16, 128), np.float32) is not a  # handed out once
    more = [np.empty((16, 128), np.float32) for _ in range(4)]
    ws.give(*more)
    assert ws.nbytes == 3 * 8192  # the oldest dropped past max_bytes
    assert ws.take((16, 128), np.float32) is more[1]
    few = Workspace(max_arrays=2)
    few.give(*more)
    assert len(few._free) == 2 and few.take((16, 128), np.float32) is more[2]


@settings(max_examples=4, deadline=None)
@given(problems(max_T=4, max_B=5, max_I=5, max_H=20, max_layers=2),
       st.sampled_from(["lstm", "gru", "lstm_ln"]))
def test_reused_buffers_never_leak_old_values(p, name):
    """A training step and an inference call on buffers from the workspace poisoned
    with NaN give bit for bit what they gave on fresh ones."""
    from kernrnn.backends.cpu.workspace import workspace

    cell = kernrnn.get_registry().get(name)
    params, x, h0 = make_arrays(cell, p, np.float32)
    D = 2 if p.bidirectional else 1
    dy = np.random.default_rng(p.seed).uniform(-1, 1, (p.T, p.B, D * p.H)).astype(np.float32)
    layer = kernrnn.RNN(name, p.I, p.H, num_layers=p.num_layers, bidirectional=p.bidirectional,
                        dtype=np.float32)
    layer.load_state_dict(params)
    hinit = None if h0 is None else (h0[0] if cell.n_state == 1 else h0)

    def run():
        layer.zero_grad()
        layer.train()
        y, hn = layer(x, hinit, p.lengths)
        dx, dh0 = layer.backward(dy)
        layer.eval()
        y2, _ = layer(x, hinit, p.lengths)
        return [y, dx, y2] + [layer.grads[k] for k in sorted(layer.grads)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workspace, "min_bytes", 0)  # the small arrays of small shapes too
        workspace.clear()
        fresh = run()
        assert workspace.nbytes > 0  # buffers went back
        for a in list(workspace._free.values()):
            a.fill(np.nan)
        again = run()
    for a, b in zip(fresh, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_kernels_leave_numbas_threading_layer_unlaunched():
    """A forward and backward (on all cores) start no Numba threading layer (kernrnn
    runs no parallel Numba code; an OpenMP layer started before PyTorch is imported
    slows PyTorch's own OpenMP operations 10-30x)."""
    import subprocess
    import sys

    code = (
        "import numpy as np, kernrnn, numba.np.ufunc.parallel as p\n"
        "layer = kernrnn.RNN('rnn', 3, 20, dtype=np.float32)\n"
        "y, _ = layer(np.ones((4, 5, 3), np.float32))\n"
        "layer.backward(np.ones_like(y))\n"
        "print(p._is_initialized)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def _probe_step(xw, hu, prev):
    z = sigmoid(xw[0] + hu[0])
    return (z * prev[0] + (1 - z) * tanh(xw[1] + hu[1]),)


def test_a_bidirectional_layer_compiles_no_second_kernel_signature():
    """One direction's half of a bidirectional output (and of its gradient) is strided; the
    kernels run on contiguous buffers instead, so a bidirectional layer uses the kernels a
    one-direction call (or the background build) compiled, not a second compile of each."""
    from kernrnn.backends.cpu.build import get_kernels
    from kernrnn.cell import Cell

    cell = Cell("t_one_signature", gates="zc", forward=_probe_step)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 2, 3))
    for bidirectional in (False, True):
        layer = kernrnn.RNN(cell, 3, 4, bidirectional=bidirectional, dtype=np.float64, seed=0)
        y, _ = layer(x)
        layer.backward(np.ones_like(y))
    k = get_kernels(cell, np.dtype(np.float64), (False, False), False)
    assert k.fused is not None  # a dense cell: the packed path
    assert len(k.fused.forward_train.signatures) == 1
    assert len(k.fused.backward_loop.signatures) == 1
