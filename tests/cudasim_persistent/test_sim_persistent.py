"""The persistent recurrence kernels under Numba's CUDA simulator.

Run by ``tests/test_cuda_persistent.py`` in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` (read when ``numba.cuda`` is first imported).

The simulator runs blocks one after another and implements the grid barrier
as a block barrier, so a persistent launch is only meaningful on one block.
With several blocks the tests launch the *same kernel* once per step
(``stepwise``): the per-block code, the split of units over blocks and the
exchange of ``h_t`` / ``dHU_t`` through global memory are exercised, with
kernel boundaries standing in for the barrier.  Hypothesis draws the shapes,
the number of blocks, threads per block and the split of each dot product
over threads (``nslot``), so reductions over several partial sums, idle
slots, partial batch tiles and a short last block all occur.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from numba.cuda import config as cuda_config

if not getattr(cuda_config, "ENABLE_CUDASIM", False):
    pytest.skip("simulator tests: run through tests/test_cuda_persistent.py "
                "(sets NUMBA_ENABLE_CUDASIM=1)", allow_module_level=True)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernrnn.backends import cpu  # noqa: E402
from kernrnn.backends.cuda import persistent as cp  # noqa: E402
from kernrnn.plugins import load_registry  # noqa: E402
from kernrnn.testing import tolerances as tol  # noqa: E402
from kernrnn.testing.reference import reference_direction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin_fixtures"))
import mgu_cells  # noqa: E402

# Every shipped cell plus a third-party-style plugin cell (2 gates, 3 saved values).
REGISTRY = load_registry(autoload=False, plugins=[mgu_cells])
# the persistent kernel runs the cells of the first contract (see Cell.plain)
PLAIN = [n for n in REGISTRY.names() if REGISTRY.get(n).plain]
CELLS = PLAIN
EXAMPLES = int(os.environ.get("KERNRNN_SIM_EXAMPLES", "6"))


@st.composite
def launches(draw):
    """A small problem and a launch configuration for it."""
    T = draw(st.integers(1, 4))
    B = draw(st.integers(1, 5))
    H = draw(st.integers(1, 6))
    I = draw(st.integers(1, 3))
    threads = draw(st.sampled_from([4, 8, 16]))
    blocks = draw(st.integers(1, min(H, 3)))
    nslot = draw(st.sampled_from([n for n in (1, 2, 4, 8, 16) if n <= threads]))
    nb = draw(st.sampled_from([None, 1, 2, 4, 8]))  # None: the plan's choice for B
    reverse = draw(st.booleans())
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, T), min_size=B, max_size=B)))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(T=T, B=B, H=H, I=I, threads=threads, blocks=blocks, nslot=nslot, nb=nb,
                reverse=reverse, lengths=lengths, dtype=dtype, seed=seed)


def _arrays(cell, c):
    rng = np.random.default_rng(c["seed"])
    T, B, H, I, dt = c["T"], c["B"], c["H"], c["I"], c["dtype"]
    G, S = cell.n_gates, cell.n_state
    bound = 1 / np.sqrt(H)
    a = dict(
        W_ih=rng.uniform(-bound, bound, (G * H, I)), W_hh=rng.uniform(-bound, bound, (G * H, H)),
        b_ih=rng.uniform(-bound, bound, G * H), b_hh=rng.uniform(-bound, bound, G * H),
        x=rng.uniform(-1, 1, (T, B, I)), h0=rng.uniform(-1, 1, (S, B, H)),
        dy=rng.uniform(-1, 1, (T, B, H)), dhn=rng.uniform(-1, 1, (S, B, H)),
    )
    a = {k: v.astype(dt) for k, v in a.items()}
    a["lengths"] = np.array(c["lengths"] if c["lengths"] is not None else [T] * B, np.int64)
    return a


def _persistent(cell, a, c, training=True):
    """Forward and backward through the persistent kernels; returns what a layer returns."""
    T, B, H, dt, rev = c["T"], c["B"], c["H"], c["dtype"], c["reverse"]
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    kw = dict(blocks=c["blocks"], threads=c["threads"], nslot=c["nslot"], nb=c.get("nb"),
              stepwise=c.get("stepwise"))
    XW = (a["x"].reshape(T * B, -1) @ a["W_ih"].T).reshape(T, B, G * H) + a["b_ih"]
    # training: every time boundary; inference: two slots taking turns (final in T & 1)
    States = np.full((S, T + 1 if training else 2, B, H), np.nan, dt)
    first, last = (T if rev else 0, 0 if rev else T) if training else (0, T & 1)
    States[:, first] = a["h0"]
    Saved = np.full((K if training else 0, T, B, H), np.nan, dt)
    # y as a strided view into a wider buffer, as a bidirectional layer passes it
    ybuf = np.full((T, B, 2 * H), np.nan, dt)
    Y = ybuf[:, :, H:] if rev else ybuf[:, :, :H]
    cp.forward_loop(cell, XW, a["W_hh"], a["b_hh"], States, Saved, Y, a["lengths"], rev,
                    training, **kw)
    out = dict(y=Y.copy(), hn=States[:, last].copy(), States=States, Saved=Saved)
    if not training:
        return out
    dybuf = np.zeros((T, B, 2 * H), dt)
    dY = dybuf[:, :, :H]
    dY[...] = a["dy"]
    dS = a["dhn"].copy()
    dXW = np.full((T, B, G * H), np.nan, dt)
    dHU = np.full((T, B, G * H), np.nan, dt)
    cp.backward_loop(cell, dY, dS, a["W_hh"], States, Saved, a["lengths"], rev, dXW, dHU, **kw)
    # the post-loop GEMMs, exactly as cpu.backward does them
    Hprev = States[0, 1:] if rev else States[0, :T]
    dXW2, dHU2 = dXW.reshape(T * B, -1), dHU.reshape(T * B, -1)
    out.update(
        dx=(dXW2 @ a["W_ih"]).reshape(T, B, -1), dh0=dS,
        weight_ih=dXW2.T @ a["x"].reshape(T * B, -1),
        weight_hh=dHU2.T @ Hprev.reshape(T * B, H),
        bias_ih=dXW2.sum(0), bias_hh=dHU2.sum(0),
    )
    return out


def _close(got, want, tolerance, what, c):
    np.testing.assert_allclose(got, want, **tolerance, err_msg=f"{what} on {c}")


def _params(a):
    """The layer-direction parameters by the cell's names, from this module's short keys."""
    return {"weight_ih": a["W_ih"], "weight_hh": a["W_hh"], "bias_ih": a["b_ih"],
            "bias_hh": a["b_hh"]}


def _check_against_cpu_and_reference(cell, c):
    a = _arrays(cell, c)
    dt, T, rev = c["dtype"], c["T"], c["reverse"]
    got = _persistent(cell, a, c)

    # forward vs the float64 reference (independent code)
    f64 = {k: np.asarray(v, np.float64) for k, v in a.items() if k != "lengths"}
    y_ref, hn_ref = reference_direction(cell, f64["x"], _params(f64), tuple(f64["h0"]),
                                        a["lengths"], reverse=rev)
    ftol = tol.forward_tolerance(dt)
    _close(got["y"], y_ref, ftol, f"{cell.name} y vs reference", c)
    _close(got["hn"], np.stack(hn_ref), ftol, f"{cell.name} hn vs reference", c)

    # forward and backward vs the CPU kernels (same layouts, same arrays)
    y_c, hn_c, ctx = cpu.forward(cell, a["x"], _params(a), a["h0"], a["lengths"], rev, True)
    _close(got["y"], y_c, ftol, f"{cell.name} y vs cpu", c)
    _close(got["States"], ctx.States, ftol, f"{cell.name} States vs cpu", c)
    active = np.arange(T)[:, None] < a["lengths"][None, :]  # Saved is unspecified elsewhere
    for k in range(cell.n_saved):
        _close(got["Saved"][k][active], ctx.buffers.Saved[k][active], ftol, f"{cell.name} Saved[{k}]", c)
    dx_c, dh0_c, g_c = cpu.backward(ctx, a["dy"], a["dhn"])
    gtol = tol.grad_tolerance(dt)
    _close(got["dx"], dx_c, gtol, f"{cell.name} dx vs cpu", c)
    _close(got["dh0"], dh0_c, gtol, f"{cell.name} dh0 vs cpu", c)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        _close(got[name], g_c[name], gtol, f"{cell.name} d{name} vs cpu", c)

    # backward vs a finite difference of the float64 reference (float64 kernels only)
    if dt == np.float64:
        rng = np.random.default_rng(c["seed"] + 1)
        keys = ("x", "W_ih", "W_hh", "b_ih", "b_hh", "h0")
        V = {k: rng.uniform(-1, 1, f64[k].shape) for k in keys}

        def loss(eps):
            p = {k: f64[k] + eps * V[k] for k in keys}
            y, hn = reference_direction(cell, p["x"], _params(p), tuple(p["h0"]), a["lengths"],
                                        reverse=rev)
            return float((y * f64["dy"]).sum() + (np.stack(hn) * f64["dhn"]).sum())

        h = tol.FD_STEP
        fd = (loss(h) - loss(-h)) / (2 * h)
        grads = dict(x=got["dx"], W_ih=got["weight_ih"], W_hh=got["weight_hh"],
                     b_ih=got["bias_ih"], b_hh=got["bias_hh"], h0=got["dh0"])
        analytic = sum(float((grads[k] * V[k]).sum()) for k in keys)
        np.testing.assert_allclose(analytic, fd, **tol.FD,
                                   err_msg=f"{cell.name} directional derivative on {c}")


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=EXAMPLES, deadline=None)
@given(c=launches())
def test_stepwise_launches_match_cpu_and_reference(cell_name, c):
    """Several blocks, one launch per step (the simulator's stand-in for the grid barrier)."""
    _check_against_cpu_and_reference(REGISTRY.get(cell_name), dict(c, stepwise=True))


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=max(2, EXAMPLES // 2), deadline=None)
@given(c=launches())
def test_persistent_launch_on_one_block(cell_name, c):
    """The real persistent launch (all steps, grid barrier between them) on a one-block grid."""
    _check_against_cpu_and_reference(REGISTRY.get(cell_name), dict(c, blocks=1, stepwise=False))


def test_inference_kernel_leaves_saved_alone():
    cell = REGISTRY.get("lstm")
    c = dict(T=3, B=2, H=5, I=2, threads=8, blocks=2, nslot=2, reverse=False,
             lengths=[3, 1], dtype=np.float64, seed=3, stepwise=True)
    a = _arrays(cell, c)
    train = _persistent(cell, a, c, training=True)
    infer = _persistent(cell, a, c, training=False)
    assert infer["Saved"].shape[0] == 0 and infer["States"].shape[1] == 2
    np.testing.assert_array_equal(infer["y"], train["y"])
    np.testing.assert_array_equal(infer["hn"], train["hn"])
    # masked steps: y is zero and the state after row 1's only step is carried
    assert np.all(infer["y"][1:, 1] == 0)
    np.testing.assert_array_equal(infer["hn"][:, 1], train["States"][:, 1, 1])


def test_persistent_launch_refuses_several_blocks_in_simulator():
    cell = REGISTRY.get("rnn")
    c = dict(T=2, B=1, H=4, I=1, threads=4, blocks=2, nslot=4, reverse=False, lengths=None,
             dtype=np.float64, seed=0, stepwise=False)
    with pytest.raises(ValueError, match="deadlock"):
        _persistent(cell, _arrays(cell, c), c)
