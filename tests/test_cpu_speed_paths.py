"""The CPU fast paths: float32 transcendental variants, chunked time loops, the bench.

No timings are asserted here; speed is measured by ``kernrnn bench``.
"""

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn.backends import cpu
from kernrnn.cell import _sigmoid_float32, _tanh_float32, sigmoid, tanh
from kernrnn.scalar import compile_scalar, math_fingerprint
from kernrnn.testing.strategies import make_arrays, problems


def _vectorised(fn, dtype):
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


def test_bench_cli_rejects_bad_options(capsys):
    from kernrnn.cli import main

    assert main(["bench", "--sizes", "1,2,3", "--no-startup"]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["bench", "--cells", "cifg", "--no-startup"]) == 2
    assert "--cells" in capsys.readouterr().err
    assert main(["bench", "--modes", "backward", "--no-startup"]) == 2
    assert "--modes" in capsys.readouterr().err


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
