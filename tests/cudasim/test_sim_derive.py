"""Derived cell math (kernrnn.autodiff) called from CUDA kernels under Numba's simulator.

Run by ``tests/test_cuda_sim.py`` in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``.  Each
derived function (forward, backward; the two stages of a normalised step) is called from a
one-thread kernel on the values of a consistent Python run, and gives the Python results:
to 1e-12 in float64, to float32 rounding in float32.
"""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from derive_helpers import Program, chain, flat, make_driver, programs, relclose  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from numba import cuda  # noqa: E402

from kernrnn.autodiff import derive_for_cell  # noqa: E402
from kernrnn.plugins import get_registry  # noqa: E402
from kernrnn.scalar import compile_scalar  # noqa: E402


def _run_in_kernels(d, prog, seed):
    rng = np.random.default_rng(seed)
    calls = chain(d, prog, rng)
    for dtype in (np.float64, np.float32):
        for name, fn, args, result in calls:
            kernel = cuda.jit(make_driver(compile_scalar(fn, dtype), args, result))
            inp = np.array([v for a in args for v in a] or [0.0], dtype=dtype)
            want = flat(result)
            out = cuda.to_device(np.zeros(max(1, len(want)), dtype=dtype))
            kernel[1, 1](cuda.to_device(inp), out)
            got = out.copy_to_host()
            scale = 1.0 + max([abs(v) for v in inp] + [abs(v) for v in want])
            for a, b in zip(got, want):
                if dtype == np.float64:
                    assert relclose(float(a), b, 1e-12), (name, got, want, d.source)
                else:
                    assert abs(float(a) - b) <= 1e-3 * scale, (name, got, want, d.source)


@settings(max_examples=3, deadline=None)
@given(prog=programs(norm=False) | programs(norm=True), seed=st.integers(0, 2**32 - 1))
def test_random_derived_math_in_simulated_kernels(prog, seed):
    _run_in_kernels(prog.derive(), prog, seed)


@pytest.mark.parametrize("name", ["lstm", "slstm", "lstm_ln", "lstm_peephole", "indrnn"])
def test_shipped_cells_derived_math_in_simulated_kernels(name):
    from test_derive import FORWARDS

    cell = get_registry().get(name)
    d = derive_for_cell(cell, FORWARDS[name])
    prog = Program("", cell.n_gates, cell.n_state, cell.has_recurrent,
                   tuple(p.blocks for p in cell.params), bool(cell.normalize))
    _run_in_kernels(d, prog, 3)
