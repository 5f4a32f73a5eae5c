"""Resets on the CUDA backend under the simulator (run by tests/test_cuda_sim.py).

The resets are cut into backend calls above the backends
(:mod:`kernrnn.backends.resets`), so one small case checks the CUDA side: the
chunk lengths on the device, the entering states chosen on the device, and
BPTT through the chunks, against the CPU backend.
"""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import kernrnn  # noqa: E402
from kernrnn.backends import resets as R  # noqa: E402


@pytest.mark.cudasim
def test_resets_on_the_cuda_backend_match_the_cpu():
    rng = np.random.default_rng(5)
    T, B, I, H = 5, 3, 2, 3
    layer = kernrnn.RNN("lstm", I, H, bidirectional=True, dtype=np.float64, seed=2)
    x = rng.uniform(-1, 1, (T, B, I))
    h0 = tuple(rng.uniform(-1, 1, (2, B, H)) for _ in range(2))
    lengths = [5, 3, 4]
    resets = np.zeros((T, B), bool)
    resets[[2, 1, 3], [0, 1, 2]] = True
    dy = rng.uniform(-1, 1, (T, B, 2 * H))
    out = {}
    for device in ("cpu", "cuda"):
        layer.to(device)
        put = (lambda a: a) if device == "cpu" else cb.from_host
        y, hn = layer(put(x), tuple(put(h) for h in h0), lengths, resets=resets)
        assert all(isinstance(c, R.ChunkedContext) for c in layer._ctx[0])
        layer.zero_grad()
        dx, dh0 = layer.backward(put(dy))
        host = cb.xp.asnumpy if hasattr(cb.xp, "asnumpy") else np.asarray
        out[device] = [host(a) for a in (y, dx, *hn, *dh0, *layer.grads.values())]
    for a, b in zip(out["cuda"], out["cpu"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
