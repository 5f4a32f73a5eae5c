"""Hyperparameters and a parametrised W_hh on the CUDA backend under Numba's simulator.

Run by ``tests/test_cuda_sim.py`` in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``.  The
values ride at the end of the per-unit vector ``P`` the step kernels read; a value other
than the default must reach forward and BPTT.
"""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from hyper_test_cells import HYP  # noqa: E402

from kernrnn.testing.conformance import forward_errors, gradient_errors  # noqa: E402
from kernrnn.testing.strategies import Problem  # noqa: E402


def test_hyperparameters_reach_forward_and_bptt():
    p = Problem(T=3, B=2, I=2, H=3, num_layers=1, bidirectional=True, lengths=(3, 2),
                with_h0=True, seed=5)
    args = {"eps": -0.7, "gamma": 0.4, "k": 2, "flip": True}
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(HYP, p, dtype, device="cuda", cell_args=args)
        assert scaled <= 1, (dtype, absolute)
    gradient_errors(HYP, p, device="cuda", cell_args=args)


def test_parametrised_recurrent_weight_on_the_gpu_path():
    """AntisymmetricRNN: the effective W_hh made on the device (CuPy, here NumPy), the
    stored weight's gradient chained after the GEMM-per-step BPTT."""
    from kernrnn.plugins import get_registry

    cell = get_registry().get("antisymmetric")
    p = Problem(T=3, B=2, I=2, H=3, num_layers=2, bidirectional=False, lengths=None,
                with_h0=False, seed=7)
    args = {"eps": 0.6, "gamma": 0.3}
    scaled, absolute = forward_errors(cell, p, np.float32, device="cuda", cell_args=args)
    assert scaled <= 1, absolute
    gradient_errors(cell, p, device="cuda", cell_args=args)
