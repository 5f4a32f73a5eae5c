"""The raw input (``raw_input=True``) on the CUDA kernels, under Numba's CUDA simulator.

The step kernels of a dense recurrence, the two-stage kernels with an input norm, and
the parallel scan of a linear cell (T > 16) read x_t as block G of ``XW`` and write its
gradient to block G of ``dXW``: forward against the float64 reference, BPTT against
finite differences, with input dropout and zoneout.  ``sru`` runs in test_sim_cuda.py
with every registered cell.  Run by ``tests/test_cuda_sim.py``.
"""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import raw_input_cells  # noqa: E402

import kernrnn  # noqa: E402
from kernrnn._checks import to_host  # noqa: E402
from kernrnn.testing.conformance import forward_errors, gradient_errors  # noqa: E402
from kernrnn.testing.strategies import Problem  # noqa: E402

CASES = {
    "raw_highway": Problem(4, 3, 3, 3, 2, False, (4, 2, 0), True, 1),
    "raw_ln": Problem(3, 2, 3, 3, 1, True, (1, 3), False, 2),
    "raw_linear": Problem(18, 2, 2, 2, 1, True, (18, 7), True, 3),  # the scan: T > 16
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_raw_input_on_the_cuda_kernels(name):
    cell = next(c for c in raw_input_cells.CELLS if c.name == name)
    p = CASES[name]
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(cell, p, dtype, device="cuda")
        assert scaled <= 1, f"{name} {np.dtype(dtype)}: error {absolute:.3e} on {p}"
    assert gradient_errors(cell, p, device="cuda") <= 1e-5
    reg = dict(input_dropout=0.3, zoneout=0.2,
               recurrent_dropout=0.3 if cell.has_recurrent else 0.0)
    assert gradient_errors(cell, p, device="cuda", regularization=reg) <= 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_raw_input_inference_matches_the_cpu(name):
    """The inference kernels (two state slots; the scan for the linear cell) read x too."""
    cell = next(c for c in raw_input_cells.CELLS if c.name == name)
    p = CASES[name]
    x = np.random.default_rng(p.seed).uniform(-1, 1, (p.T, p.B, p.I))
    cpu = kernrnn.RNN(cell, p.I, p.H, dtype=np.float64, seed=4).eval()
    gpu = kernrnn.RNN(cell, p.I, p.H, dtype=np.float64, seed=4, device="cuda").eval()
    y_cpu, _ = cpu(x, lengths=p.lengths)
    y_gpu, _ = gpu(x, lengths=p.lengths)
    np.testing.assert_allclose(to_host(y_gpu), y_cpu, rtol=1e-12, atol=1e-13)
