"""Inference keeps two state slots on the GPU, as on the CPU, checked under the simulator.

Training keeps the state at every time boundary (``States [S, T+1, B, H]``, for
BPTT); inference needs only the current one, so ``States`` is ``[S, 2, B, H]``
with the slots taking turns.  Every forward form runs here in inference against
the CPU backend: the GEMM loop (with a projection too), the fused pass of a cell
without a recurrent matrix, the parallel scan and the persistent kernel.
"""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from kernrnn.backends import common, cpu  # noqa: E402
from kernrnn.backends.cuda import host  # noqa: E402
from kernrnn.backends.cuda.kernels import SCAN_CHUNK  # noqa: E402
from kernrnn.plugins import get_registry  # noqa: E402
from kernrnn.testing.strategies import Problem, make_arrays  # noqa: E402

REGISTRY = get_registry()


@pytest.fixture
def state_slots(monkeypatch):
    """The time slots of every ``States`` allocated through ``common.time_buffers``."""
    seen = []
    real = common.time_buffers

    def record(*args, **kw):
        buf = real(*args, **kw)
        seen.append(buf.States.shape[1])
        return buf

    monkeypatch.setattr(host.common, "time_buffers", record)
    return seen


CASES = [("lstm", 5, 0, None), ("lstm", 5, 2, None), ("indrnn", 5, 0, None),
         ("mingru", 3 * SCAN_CHUNK + 3, 0, None), ("mingru", 5, 0, None),
         ("gru", 5, 0, "persistent")]


@pytest.mark.parametrize("name, T, proj, path", CASES,
                         ids=[f"{n}-T{T}-P{p}-{path or 'auto'}" for n, T, p, path in CASES])
@pytest.mark.parametrize("reverse", [False, True])
def test_inference_uses_two_state_slots_and_matches_cpu(state_slots, name, T, proj, path,
                                                         reverse):
    cell = REGISTRY.get(name)
    p = Problem(T=T, B=3, I=2, H=4, num_layers=1, bidirectional=False, lengths=None,
                with_h0=True, seed=T + proj + 7 * reverse, proj_size=proj)
    prm, x, h0s = make_arrays(cell, p)
    params = {k.removesuffix("_l0"): v for k, v in prm.items()}
    h0 = np.zeros((cell.n_state, p.B, p.H))
    for s, v in enumerate(h0s):
        h0[s, :, :v.shape[2]] = v[0]
    lens = np.array([T, T // 2, 0], np.int64)
    y_c, hn_c, _ = cpu.forward(cell, x, params, h0, lens, reverse, False)
    state_slots.clear()  # the CPU backend allocates through the same function
    y_g, hn_g, ctx = cb.forward(cell, x, params, h0, cb.lengths(lens), reverse, False, path=path)
    assert ctx is None and state_slots == [2]
    np.testing.assert_allclose(y_g, y_c, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(hn_g, hn_c, rtol=1e-11, atol=1e-12)
    # training keeps every boundary
    cb.forward(cell, x, params, h0, cb.lengths(lens), reverse, True, path=path)
    assert state_slots == [2, T + 1]
