"""Property tests: CPU kernels vs the float64 reference and finite differences."""

import numpy as np
import pytest
from hypothesis import given

from kernrnn.plugins import get_registry
from kernrnn.testing.conformance import forward_errors, gradient_errors
from kernrnn.testing.strategies import problems

SHIPPED = ["rnn", "rnn_relu", "lstm", "gru"]

# Largest errors seen, reported at the end of the run (see tests/conftest.py).
MAX_SEEN: dict = {}


def _record(key, value):
    MAX_SEEN[key] = max(MAX_SEEN.get(key, 0.0), value)


@pytest.mark.parametrize("cell_name", SHIPPED)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@given(p=problems())
def test_forward_matches_reference(cell_name, dtype, p):
    cell = get_registry().get(cell_name)
    scaled, absolute = forward_errors(cell, p, dtype)
    _record(f"forward {np.dtype(dtype).name}", absolute)
    assert scaled <= 1.0, f"error {absolute:.3e} beyond tolerance on {p}"


@pytest.mark.parametrize("cell_name", SHIPPED)
@given(p=problems(max_T=6, max_B=3, max_I=4, max_H=4))
def test_gradients_match_finite_differences(cell_name, p):
    cell = get_registry().get(cell_name)
    worst = gradient_errors(cell, p)  # raises on a disagreement
    _record("gradient vs finite differences (relative)", worst)
    assert worst < 1e-6


@pytest.mark.parametrize("cell_name", SHIPPED)
@given(p=problems(max_T=6, max_B=3, max_I=4, max_H=4))
def test_float32_gradients_close_to_float64(cell_name, p):
    """float32 BPTT tracks the float64 gradients within the documented tolerance."""
    from kernrnn.testing import tolerances as tol
    from kernrnn.testing.conformance import run_layer
    from kernrnn.testing.strategies import make_arrays

    cell = get_registry().get(cell_name)
    params, x, h0 = make_arrays(cell, p, np.float64)
    rng = np.random.default_rng(p.seed)
    D = 2 if p.bidirectional else 1
    dy = rng.uniform(-1, 1, (p.T, p.B, D * p.H))
    dhn = tuple(rng.uniform(-1, 1, (p.num_layers * D, p.B, p.H)) for _ in range(cell.n_state))
    *_, dx64, dh064, g64 = run_layer(cell, p, params, x, h0, "cpu", dy, dhn)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    *_, dx32, dh032, g32 = run_layer(
        cell, p, {k: f32(v) for k, v in params.items()}, f32(x),
        None if h0 is None else tuple(map(f32, h0)), "cpu", f32(dy), tuple(map(f32, dhn)))
    t = tol.grad_tolerance(np.float32)
    worst = 0.0
    for got, want in [(dx32, dx64), *zip(dh032, dh064), *((g32[k], g64[k]) for k in g64)]:
        np.testing.assert_allclose(got, want, **t)
        worst = max(worst, float(np.max(np.abs(got - want), initial=0)))
    _record("gradient float32 vs float64 (absolute)", worst)
