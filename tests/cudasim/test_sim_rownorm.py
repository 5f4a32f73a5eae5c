"""The row-statistics kernels (layer/RMS norm, one block per row) against NumPy.

Run under the simulator by ``tests/test_cuda_sim.py``.  The simulator's blocks
have ``SIM_BLOCK`` threads, so rows shorter than a block, of a block's length,
and several blocks long (with a ragged tail) all go through the block reduction.
"""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from zoo_test_cells import LSTM_RMS  # noqa: E402

from kernrnn.backends.cuda.launch import SIM_BLOCK, Launcher  # noqa: E402
from kernrnn.plugins import get_registry  # noqa: E402
from kernrnn.scalar_math import NORM_EPS  # noqa: E402

LSTM_LN = get_registry().get("lstm_ln")  # layer norms, recurrent norm over the whole row
# H: below, at and above one block (the RMS cell has 2 heads: even H)
SIZES = {LSTM_LN: [1, 3, SIM_BLOCK, 13, 4 * SIM_BLOCK + 5], LSTM_RMS: [2, SIM_BLOCK, 14, 38]}


def _norm(x, kind):
    """Normalise the last axis; returns (xhat, rstd)."""
    mean = x.mean(axis=-1, keepdims=True) if kind == "layer" else 0.0
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + NORM_EPS)
    return (x - mean) * rstd, rstd[..., 0]


def _norm_backward(g, xhat, rstd, kind):
    m1 = g.mean(axis=-1, keepdims=True) if kind == "layer" else 0.0
    m2 = (g * xhat).mean(axis=-1, keepdims=True)
    return rstd[..., None] * (g - m1 - xhat * m2)


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-11)


CASES = [(c, H, d) for c, sizes in SIZES.items() for H in sizes
         for d in (np.float64, np.float32)]
IDS = [f"{c.name}-H{H}-{np.dtype(d).name}" for c, H, d in CASES]


@pytest.mark.parametrize("cell, H, dtype", CASES, ids=IDS)
def test_norm_z_matches_numpy(cell, H, dtype):
    """norm_z and norm_z_backward: each segment's row over H units; finished rows untouched."""
    k = cb.get_kernels(cell, dtype)
    rng = np.random.default_rng(H)
    NZ, T, B, t = cell.n_norm, 3, 4, 1
    lens = np.array([3, 1, 2, 0], np.int64)  # rows 1 and 3 have ended at t = 1
    live = lens > t
    Zhat = rng.uniform(-2, 3, (NZ, T, B, H)).astype(dtype)
    Rz = np.full((NZ, T, B), -1, dtype)
    want_z = Zhat.copy()
    xhat, rstd = _norm(Zhat[:, t].astype(np.float64), cell.normalize_kind)
    want_z[:, t][:, live] = xhat[:, live]
    launch = Launcher()
    w = launch.wrap
    launch.rows(k.norm_z, B * NZ, w(Zhat), w(Rz), w(lens), t, t, H, NZ)
    np.testing.assert_allclose(Zhat, want_z, **_tol(dtype))
    np.testing.assert_allclose(Rz[:, t][:, live], rstd[:, live], **_tol(dtype))
    assert (Rz[:, t][:, ~live] == -1).all() and (Rz[:, [0, 2]] == -1).all()

    DZ = rng.uniform(-1, 1, (NZ, B, H)).astype(dtype)
    want = DZ.astype(np.float64).copy()
    back = _norm_backward(DZ.astype(np.float64), Zhat[:, t].astype(np.float64),
                          Rz[:, t].astype(np.float64), cell.normalize_kind)
    want[:, live] = back[:, live]
    launch.rows(k.norm_z_backward, B * NZ, w(DZ), w(Zhat), w(Rz), w(lens), t, H, NZ)
    np.testing.assert_allclose(DZ, want, **_tol(dtype))


@pytest.mark.parametrize("cell, H, dtype", CASES, ids=IDS)
def test_norm_hu_matches_numpy(cell, H, dtype):
    """norm_hu and norm_hu_backward: over the whole row of Gr*H products (lstm_ln) or per
    recurrent gate across heads (the RMS test cell); the backward's bias and gain sums."""
    k = cb.get_kernels(cell, dtype)
    rng = np.random.default_rng(100 + H)
    NH, Gr = cell.n_heads, cell.n_recurrent_gates
    dh = H // NH
    T, B, t = 3, 4, 2
    lens = np.array([3, 2, 3, 0], np.int64)
    live = lens > t
    row = cell.recurrent_norm.over == "row"
    nseg = 1 if row else Gr
    HU = rng.uniform(-2, 3, (T, NH, B, Gr * dh)).astype(dtype)
    Rhh = np.full((T, B, nseg), -1, dtype)

    def by_gate(a):  # [NH, B, Gr*dh] -> [B, Gr, H] (gate-major units, as g_hh)
        return a.reshape(NH, B, Gr, dh).transpose(1, 2, 0, 3).reshape(B, Gr, H)

    def from_gate(a):
        return a.reshape(B, Gr, NH, dh).transpose(2, 0, 1, 3).reshape(NH, B, Gr * dh)

    x = by_gate(HU[t].astype(np.float64))
    if row:
        xhat, rstd = _norm(x.reshape(B, 1, Gr * H), cell.recurrent_norm.kind)
        xhat = xhat.reshape(B, Gr, H)
    else:
        xhat, rstd = _norm(x, cell.recurrent_norm.kind)
    want = HU.astype(np.float64).copy()
    want[t][:, live] = from_gate(xhat)[:, live]
    launch = Launcher()
    w = launch.wrap
    launch.rows(k.norm_hu, B * nseg, w(HU), w(Rhh), w(lens), t, t, H, dh, nseg)
    np.testing.assert_allclose(HU, want, **_tol(dtype))
    np.testing.assert_allclose(Rhh[t][live], rstd[live], **_tol(dtype))
    assert (Rhh[t][~live] == -1).all() and (Rhh[:t] == -1).all()

    dHU = rng.uniform(-1, 1, (NH, T, B, Gr * dh)).astype(dtype)
    g_hh = rng.uniform(0.5, 1.5, Gr * H).astype(dtype)
    db = rng.uniform(-1, 1, (B, Gr * H)).astype(dtype)
    dg = rng.uniform(-1, 1, (B, Gr * H)).astype(dtype)
    v = by_gate(dHU[:, t].astype(np.float64))
    xh = by_gate(HU[t].astype(np.float64))
    want_db = db + np.where(live[:, None], v.reshape(B, -1), 0)
    want_dg = dg + np.where(live[:, None], (v * xh).reshape(B, -1), 0)
    gv = v * g_hh.reshape(Gr, H)
    r = Rhh[t].astype(np.float64)
    if row:
        back = _norm_backward(gv.reshape(B, 1, -1), xh.reshape(B, 1, -1), r,
                              cell.recurrent_norm.kind).reshape(B, Gr, H)
    else:
        back = _norm_backward(gv, xh, r, cell.recurrent_norm.kind)
    want_d = dHU.astype(np.float64).copy()
    want_d[:, t][:, live] = from_gate(back)[:, live]
    launch.rows(k.norm_hu_backward, B * nseg, w(dHU), w(HU), w(Rhh), w(g_hh), w(db), w(dg),
                w(lens), t, H, dh, nseg)
    np.testing.assert_allclose(dHU, want_d, **_tol(dtype))
    np.testing.assert_allclose(db, want_db, **_tol(dtype))
    np.testing.assert_allclose(dg, want_dg, **_tol(dtype))
