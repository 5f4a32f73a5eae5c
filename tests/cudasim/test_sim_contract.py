"""The GEMM-per-step CUDA path of the round-3 contract's test cells (recurrence on several
states, stages with recurrent products) under the simulator: forward against the float64
reference in float64 and float32, BPTT against finite differences.  The zoo's ``cornn`` and
``rhn`` run in test_sim_cuda.py with every registered cell."""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from contract_test_cells import CONTRACT_CELLS  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernrnn.testing import tolerances as tol  # noqa: E402
from kernrnn.testing.conformance import forward_errors, gradient_errors  # noqa: E402
from kernrnn.testing.strategies import problems  # noqa: E402

CELLS = {c.name: c for c in CONTRACT_CELLS}
SMALL = dict(max_T=4, max_B=3, max_I=3, max_H=4, max_layers=2)


@pytest.mark.parametrize("name", sorted(CELLS))
@settings(max_examples=2)
@given(data=st.data())
def test_forward_matches_reference(name, data):
    cell = CELLS[name]
    p = data.draw(problems(cell=cell, **SMALL), label="problem")
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(cell, p, dtype, device="cuda")
        assert scaled <= 1, (f"{name} {np.dtype(dtype)}: error {absolute:.3e} over tolerance "
                             f"{tol.forward_tolerance(dtype)} on {p}")


@pytest.mark.parametrize("name", sorted(CELLS))
@settings(max_examples=2)
@given(data=st.data())
def test_gradients_match_finite_differences(name, data):
    cell = CELLS[name]
    p = data.draw(problems(cell=cell, **SMALL), label="problem")
    gradient_errors(cell, p, device="cuda")  # raises ConformanceError naming the tensor


@pytest.mark.parametrize("name", sorted(CELLS))
def test_inference_and_training_match_the_cpu(name):
    """The GEMM loop in inference (two state slots, one time slot of the stages' buffers) and
    in training against the CPU backend, one direction each way, with lengths."""
    from kernrnn.backends import cpu
    from kernrnn.testing.strategies import Problem, make_arrays

    cell = CELLS[name]
    p = Problem(T=4, B=3, I=2, H=4, num_layers=1, bidirectional=False, lengths=(4, 1, 0),
                with_h0=True, seed=3)
    prm, x, h0s = make_arrays(cell, p)
    params = {k.removesuffix("_l0"): v for k, v in prm.items()}
    h0 = np.stack([v[0] for v in h0s])
    lens = np.array(p.lengths, np.int64)
    for reverse in (False, True):
        y_c, hn_c, _ = cpu.forward(cell, x, params, h0, lens, reverse, True)
        for training in (True, False):
            y_g, hn_g, _ = cb.forward(cell, x, params, h0, cb.lengths(lens), reverse, training)
            np.testing.assert_allclose(y_g, y_c, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(hn_g, hn_c, rtol=1e-12, atol=1e-12)
