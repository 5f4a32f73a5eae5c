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
