"""State resets inside the sequence (``resets=``, bool ``[T, B]``): episode starts.

At a flagged active step the state restarts from ``h0`` in every layer, forward
and backward; no gradient crosses a flag.  Checked through the public layer
against the float64 reference (which resets step by step, independently of the
chunking the layer does), against the same layer run on the pieces, against
finite differences, and through ``kernrnn.torch``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn import functional
from kernrnn.backends import common
from kernrnn.backends import resets as R
from kernrnn.plugins import resolve_cell
from kernrnn.regularization import Regularization
from kernrnn.testing import tolerances as tol
from kernrnn.testing.reference import reference_direction, reference_rnn
from kernrnn.testing.strategies import Problem, make_arrays

CELLS = ["lstm", "gru"]  # one cell with two states, one whose candidate reads r * (W h + b)


@st.composite
def cases(draw, max_T=6, max_B=3, max_I=4, max_H=5, max_layers=2, bidirectional=None):
    """``(Problem, resets [T, B])``: tiny shapes, some lengths, about one flag in three."""
    T = draw(st.integers(1, max_T))
    B = draw(st.integers(1, max_B))
    I = draw(st.integers(1, max_I))
    H = draw(st.integers(1, max_H))
    L = draw(st.integers(1, max_layers))
    bi = draw(st.booleans()) if bidirectional is None else bidirectional
    lengths = None
    if draw(st.booleans()):
        lengths = tuple(draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    flags = draw(st.lists(st.integers(0, 2), min_size=T * B, max_size=T * B))
    resets = np.array(flags).reshape(T, B) == 0
    p = Problem(T, B, I, H, L, bi, lengths, draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))
    return p, resets


def _layer(cell_name, p, params, dtype, **kw):
    layer = kernrnn.RNN(cell_name, p.I, p.H, num_layers=p.num_layers,
                        bidirectional=p.bidirectional, dtype=dtype, proj_size=p.proj_size, **kw)
    layer.load_state_dict({k: v.astype(dtype) for k, v in params.items()})
    return layer


def _cast(state, dtype):
    if state is None:
        return None
    state = tuple(s.astype(dtype) for s in state)
    return state if len(state) > 1 else state[0]


def _tuple(state):
    return state if isinstance(state, tuple) else (state,)


def _pieces(resets, lengths, b, T):
    """``[(t0, t1), ...]``: row b's episodes within its length, cut at its flags."""
    n = T if lengths is None else lengths[b]
    cuts = [0] + [t for t in range(1, n) if resets[t, b]] + [n]
    return [(t0, t1) for t0, t1 in zip(cuts[:-1], cuts[1:]) if t1 > t0]


# -- forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("cell_name", CELLS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@settings(max_examples=8)
@given(case=cases())
def test_forward_matches_the_reference(cell_name, dtype, case):
    p, resets = case
    cell = resolve_cell(cell_name)
    params, x, h0 = make_arrays(cell, p)
    layer = _layer(cell_name, p, params, dtype)
    y, hn = layer(x.astype(dtype), _cast(h0, dtype), p.lengths, resets=resets)
    y_ref, hn_ref = reference_rnn(cell, params, x, h0, p.lengths, p.num_layers,
                                  p.bidirectional, resets=resets)
    t = tol.forward_tolerance(dtype)
    np.testing.assert_allclose(y, y_ref, **t)
    for got, want in zip(_tuple(hn), hn_ref, strict=True):
        np.testing.assert_allclose(got, want, **t)


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=8)
@given(case=cases())
def test_a_row_equals_its_pieces_run_separately(cell_name, case):
    """Every episode of a row, run alone from that row's h0, gives the row's outputs; the
    padded steps stay zero; h_n is the last episode's (the first one's, reverse)."""
    p, resets = case
    cell = resolve_cell(cell_name)
    params, x, h0 = make_arrays(cell, p)
    layer = _layer(cell_name, p, params, np.float64)
    y, hn = layer(x, _cast(h0, np.float64), p.lengths, resets=resets)
    hn = _tuple(hn)
    D = 2 if p.bidirectional else 1
    for b in range(p.B):
        row_h0 = None if h0 is None else _cast(tuple(h[:, b:b + 1] for h in h0), np.float64)
        pieces = _pieces(resets, p.lengths, b, p.T)
        outs = []
        for t0, t1 in pieces:
            yp, hp = layer(x[t0:t1, b:b + 1], row_h0)
            np.testing.assert_allclose(y[t0:t1, b], yp[:, 0], rtol=1e-12, atol=1e-12)
            outs.append(_tuple(hp))
        end = pieces[-1][1] if pieces else 0
        assert not y[end:, b].any()
        for s in range(cell.n_state):
            for idx in range(p.num_layers * D):
                reverse = idx % D == 1
                if pieces:
                    want = outs[0 if reverse else -1][s][idx, 0]
                else:  # an empty row keeps h0
                    want = np.zeros(p.H) if h0 is None else h0[s][idx, b]
                np.testing.assert_allclose(hn[s][idx, b], want, rtol=1e-12, atol=1e-12)


def test_no_effective_flag_runs_the_plain_path_bit_for_bit():
    """All-False masks, flags at step 0 and flags at padded steps change nothing, and run
    the backend exactly as without resets (one plain context per direction)."""
    rng = np.random.default_rng(3)
    T, B, I, H = 5, 3, 2, 4
    layer = kernrnn.RNN("lstm", I, H, num_layers=2, bidirectional=True, dtype=np.float32, seed=1)
    x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)
    lengths = [5, 2, 0]
    y0, hn0 = layer(x, lengths=lengths)
    dx0, dh00 = layer.backward(np.ones_like(y0))
    g0 = {k: v.copy() for k, v in layer.grads.items()}
    masks = [np.zeros((T, B), bool), np.zeros((T, B), bool), np.zeros((T, B), bool)]
    masks[1][0] = True  # step 0: the state entering it is h0 anyway
    masks[2][2:, 1] = True  # row 1 has 2 steps, row 2 none: padded steps
    masks[2][0, :] = True
    for m in masks:
        assert R.plan(layer._backend, m, np.array(lengths, np.int64)) is None
        layer.zero_grad()
        y, hn = layer(x, lengths=lengths, resets=m)
        assert all(isinstance(c, common.ForwardContext) for c in layer._ctx[0])
        dx, dh0 = layer.backward(np.ones_like(y))
        np.testing.assert_array_equal(y, y0)
        np.testing.assert_array_equal(dx, dx0)
        for a, b in zip(hn + dh0, hn0 + dh00, strict=True):
            np.testing.assert_array_equal(a, b)
        for k in g0:
            np.testing.assert_array_equal(layer.grads[k], g0[k])


# -- gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=6)
@given(case=cases())
def test_no_gradient_crosses_a_reset(cell_name, case):
    """A loss on the steps of a row from a reset on has exactly zero gradient with respect to
    the inputs before it, and a loss before it none with respect to the inputs after it
    (both directions, every layer)."""
    p, resets = case
    cell = resolve_cell(cell_name)
    T, B = p.T, p.B
    lens = np.full(B, T) if p.lengths is None else np.array(p.lengths)
    flagged = [(t, b) for t in range(1, T) for b in range(B) if resets[t, b] and t < lens[b]]
    params, x, h0 = make_arrays(cell, p)
    layer = _layer(cell_name, p, params, np.float64)
    for t_r, b in flagged[:2]:
        for after in (True, False):
            y, _ = layer(x, _cast(h0, np.float64), p.lengths, resets=resets)
            dy = np.zeros_like(y)
            rows = slice(t_r, None) if after else slice(0, t_r)
            dy[rows, b] = 1.0
            dx, dh0 = layer.backward(dy)
            other = slice(0, t_r) if after else slice(t_r, None)
            assert not dx[other, b].any(), (t_r, b, after)
            assert not np.delete(dx, b, axis=1).any()  # rows never mix


def _loss_and_grads(layer, x, h0, lengths, resets, dy, dhn):
    y, hn = layer(x, h0, lengths, resets=resets)
    layer.zero_grad()
    dx, dh0 = layer.backward(dy, dhn)
    loss = float((y * dy).sum() + sum((a * b).sum() for a, b in zip(_tuple(hn), _tuple(dhn))))
    return loss, dx, _tuple(dh0), {k: v.copy() for k, v in layer.grads.items()}


def _check_against_finite_differences(cell_name, p, resets):
    """float64: the gradients of x, h0 and every parameter along random directions, and of
    single elements of x, against central differences (Richardson)."""
    cell = resolve_cell(cell_name)
    params, x, h0 = make_arrays(cell, p)
    layer = _layer(cell_name, p, params, np.float64)
    rng = np.random.default_rng(p.seed ^ 5)
    D = 2 if p.bidirectional else 1
    dy = rng.uniform(-1, 1, (p.T, p.B, D * p.out_size))
    dhn = tuple(rng.uniform(-1, 1, h.shape) for h in h0)
    _, dx, dh0, grads = _loss_and_grads(layer, x, _cast(h0, np.float64), p.lengths, resets, dy,
                                        _cast(dhn, np.float64))

    def loss(x_, h0_, params_):
        layer.load_state_dict(params_)
        layer.eval()
        try:
            y, hn = layer(x_, _cast(h0_, np.float64), p.lengths, resets=resets)
        finally:
            layer.train()
            layer.load_state_dict(params)
        return float((y * dy).sum() + sum((a * b).sum() for a, b in zip(_tuple(hn), dhn)))

    def check(direction_loss, analytic, what):
        fd = tol.directional_derivative(direction_loss)
        assert abs(fd - analytic) <= tol.FD["atol"] + tol.FD["rtol"] * abs(fd), \
            (what, fd, analytic)

    v = rng.uniform(-1, 1, x.shape)
    check(lambda e: loss(x + e * v, h0, params), float((dx * v).sum()), "x")
    for s in range(cell.n_state):
        v = rng.uniform(-1, 1, h0[s].shape)

        def shifted(e, s=s, v=v):
            return tuple(h + e * v if k == s else h for k, h in enumerate(h0))

        check(lambda e, sh=shifted: loss(x, sh(e), params), float((dh0[s] * v).sum()),
              f"h0[{s}]")
    for name, value in params.items():
        v = rng.uniform(-1, 1, value.shape)
        check(lambda e, n=name, v=v: loss(x, h0, {**params, n: params[n] + e * v}),
              float((grads[name] * v).sum()), name)
    for idx in [tuple(int(rng.integers(n)) for n in x.shape) for _ in range(3)]:
        e_x = np.zeros_like(x)
        e_x[idx] = 1
        check(lambda e, ex=e_x: loss(x + e * ex, h0, params), float(dx[idx]), f"x{idx}")


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=6)
@given(case=cases(max_T=5, max_H=4))
def test_bptt_matches_finite_differences(cell_name, case):
    p, resets = case
    # with an initial state: d(output)/d(h0) is part of what is checked
    _check_against_finite_differences(cell_name, dataclasses.replace(p, with_h0=True), resets)


@pytest.mark.parametrize("cell_name", CELLS)
@settings(max_examples=4)
@given(case=cases(max_T=5, max_H=4))
def test_float32_gradients_close_to_float64(cell_name, case):
    p, resets = case
    cell = resolve_cell(cell_name)
    params, x, h0 = make_arrays(cell, p)
    rng = np.random.default_rng(p.seed ^ 9)
    D = 2 if p.bidirectional else 1
    dy = rng.uniform(-1, 1, (p.T, p.B, D * p.H))
    dhn = tuple(rng.uniform(-1, 1, (p.num_layers * D, p.B, p.H)) for _ in range(cell.n_state))
    out = {}
    for dtype in (np.float64, np.float32):
        layer = _layer(cell_name, p, params, dtype)
        out[dtype] = _loss_and_grads(layer, x.astype(dtype), _cast(h0, dtype), p.lengths, resets,
                                     dy.astype(dtype), _cast(dhn, dtype))
    (_, dx64, dh64, g64), (_, dx32, dh32, g32) = out[np.float64], out[np.float32]
    t = tol.FLOAT32_GRAD
    np.testing.assert_allclose(dx32, dx64, **t)
    for a, b in zip(dh32, dh64, strict=True):
        np.testing.assert_allclose(a, b, **t)
    for k in g64:
        np.testing.assert_allclose(g32[k], g64[k], err_msg=k, **t)


# -- layer options -------------------------------------------------------------------


def test_batch_first_takes_the_mask_batch_first():
    rng = np.random.default_rng(0)
    T, B, I, H = 6, 2, 3, 4
    tm = kernrnn.RNN("gru", I, H, dtype=np.float64, seed=2)
    bf = kernrnn.RNN("gru", I, H, dtype=np.float64, seed=2, batch_first=True)
    x = rng.uniform(-1, 1, (T, B, I))
    resets = np.zeros((T, B), bool)
    resets[[2, 4], [0, 1]] = True
    y, _ = tm(x, resets=resets)
    y_bf, _ = bf(x.swapaxes(0, 1), resets=resets.T)
    np.testing.assert_array_equal(y_bf, y.swapaxes(0, 1))
    dx, _ = tm.backward(np.ones_like(y))
    dx_bf, _ = bf.backward(np.ones_like(y_bf))
    np.testing.assert_array_equal(dx_bf, dx.swapaxes(0, 1))
    with pytest.raises(ValueError, match=r"resets must have shape \[B, T\] = \[2, 6\]"):
        bf(x.swapaxes(0, 1), resets=resets)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_projection_with_resets(bidirectional):
    """LSTMP (proj_size): forward against the reference, BPTT against finite differences."""
    cell = resolve_cell("lstm")
    p = Problem(6, 3, 3, 4, 2, bidirectional, (6, 4, 5), True, 11, 2)
    params, x, h0 = make_arrays(cell, p)
    layer = _layer("lstm", p, params, np.float64)
    resets = np.zeros((6, 3), bool)
    resets[[1, 3, 2, 4], [0, 0, 1, 2]] = True
    y, hn = layer(x, h0, p.lengths, resets=resets)
    y_ref, hn_ref = reference_rnn(cell, params, x, h0, p.lengths, 2, bidirectional,
                                  resets=resets)
    np.testing.assert_allclose(y, y_ref, **tol.FLOAT64)
    for a, b in zip(hn, hn_ref, strict=True):
        np.testing.assert_allclose(a, b, **tol.FLOAT64)
    _check_against_finite_differences("lstm", p, resets)


def test_recurrent_and_input_dropout_with_resets_match_the_reference():
    """Per-sequence masks are the same in every chunk, so the reference with the call's seed
    gives the same outputs; zoneout in evaluation (its expectation) works too."""
    cell = resolve_cell("lstm")
    p = Problem(6, 3, 3, 4, 2, True, None, True, 5)
    params, x, h0 = make_arrays(cell, p)
    resets = np.zeros((6, 3), bool)
    resets[[2, 3, 5], [0, 1, 1]] = True
    layer = kernrnn.RNN("lstm", 3, 4, num_layers=2, bidirectional=True, dtype=np.float64,
                        recurrent_dropout=0.3, input_dropout=0.2, seed=4)
    layer.load_state_dict(params)
    seed = layer.mask_seed()
    y, _ = layer(x, h0, resets=resets)
    y_ref, _ = reference_rnn(cell, params, x, h0, None, 2, True, resets=resets,
                             regularization=layer.regularization, seed=seed)
    np.testing.assert_allclose(y, y_ref, **tol.FLOAT64)
    zone = kernrnn.RNN("lstm", 3, 4, num_layers=2, bidirectional=True, dtype=np.float64,
                       zoneout=0.25).eval()
    zone.load_state_dict(params)
    y, _ = zone(x, h0, resets=resets)
    y_ref, _ = reference_rnn(cell, params, x, h0, None, 2, True, resets=resets,
                             regularization=Regularization.build(cell, zoneout=0.25),
                             training=False)
    np.testing.assert_allclose(y, y_ref, **tol.FLOAT64)
    zone.train()
    with pytest.raises(ValueError, match="resets do not combine with zoneout in training"):
        zone(x, h0, resets=resets)


# -- the functional API ---------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
def test_functional_api_with_resets(reverse):
    """rnn_forward against the reference direction; rnn_backward against finite differences
    along a random direction of x and of h0; the chunked context is consumed once."""
    cell = resolve_cell("gru")
    p = Problem(7, 3, 2, 3, 1, False, (7, 3, 6), True, 8)
    params, x, h0 = make_arrays(cell, p)
    d = {k.removesuffix("_l0"): v for k, v in params.items()}
    h0 = (h0[0][0],)
    resets = np.zeros((7, 3), bool)
    resets[[2, 5, 1, 4], [0, 0, 1, 2]] = True
    y, hn, ctx = functional.rnn_forward(cell, x, d, h0=h0, lengths=p.lengths, reverse=reverse,
                                        resets=resets)
    y_ref, hn_ref = reference_direction(cell, x, d, h0, p.lengths, reverse, resets=resets)
    np.testing.assert_allclose(y, y_ref, **tol.FLOAT64)
    np.testing.assert_allclose(hn[0], hn_ref[0], **tol.FLOAT64)
    assert isinstance(ctx, R.ChunkedContext) and ctx.cell is cell and ctx.device == "cpu"
    rng = np.random.default_rng(1)
    dy = rng.uniform(-1, 1, y.shape)
    dx, dh0, _ = functional.rnn_backward(ctx, dy)

    def loss(x_, h_):
        y_, _, _ = functional.rnn_forward(cell, x_, d, h0=(h_,), lengths=p.lengths,
                                          reverse=reverse, training=False, resets=resets)
        return float((y_ * dy).sum())

    for grad, shift in ((dx, lambda e, v: loss(x + e * v, h0[0])),
                        (dh0[0], lambda e, v: loss(x, h0[0] + e * v))):
        v = rng.uniform(-1, 1, grad.shape)
        fd = tol.directional_derivative(lambda e, v=v, f=shift: f(e, v))
        assert abs(fd - float((grad * v).sum())) <= tol.FD["atol"] + tol.FD["rtol"] * abs(fd)
    with pytest.raises(ValueError, match="consumed"):
        functional.rnn_backward(ctx, dy)


# -- bad input -------------------------------------------------------------------------


def test_bad_reset_masks_are_named():
    layer = kernrnn.RNN("lstm", 2, 3, dtype=np.float32)
    x = np.zeros((4, 2, 2), np.float32)
    want = r"resets must have shape \[T, B\] = \[4, 2\]"
    with pytest.raises(ValueError, match=want + r".*got \[2, 4\]"):
        layer(x, resets=np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match=want + r".*got \[4\]"):
        layer(x, resets=np.zeros(4, bool))
    with pytest.raises(TypeError, match="resets must have dtype bool .*got int64"):
        layer(x, resets=np.zeros((4, 2), np.int64))
    with pytest.raises(TypeError, match=r"resets must be a bool array \[T, B\] = \[4, 2\].*list"):
        layer(x, resets=[[False, False]] * 4)
    cell = resolve_cell("rnn")
    w = [np.zeros(s, np.float32) for s in ((3, 2), (3, 3), (3,), (3,))]
    with pytest.raises(TypeError, match="resets must have dtype bool .*got float32"):
        functional.rnn_forward(cell, x, *w, resets=np.zeros((4, 2), np.float32))


# -- kernrnn.torch ---------------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("cell_name", CELLS)
def test_torch_module_matches_the_native_layer(cell_name):
    torch = _torch()
    from kernrnn.torch import Recurrent

    torch.manual_seed(0)
    T, B, I, H = 6, 3, 2, 3
    m = Recurrent(cell_name, I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    native = kernrnn.RNN(cell_name, I, H, num_layers=2, bidirectional=True, dtype=np.float64)
    native.load_state_dict({k: v.detach().numpy() for k, v in m.state_dict().items()})
    S = native.cell.n_state
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(4, B, H, dtype=torch.float64, requires_grad=True) for _ in range(S))
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[[2, 3, 4], [0, 2, 0]] = True
    y, hn = m(x, hx if S > 1 else hx[0], resets=resets)
    y_n, hn_n = native(x.detach().numpy(), _cast(tuple(h.detach().numpy() for h in hx),
                                                  np.float64), resets=resets.numpy())
    np.testing.assert_allclose(y.detach().numpy(), y_n, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    dx_n, dh0_n = native.backward(dy.numpy())
    np.testing.assert_allclose(x.grad.numpy(), dx_n, rtol=1e-12, atol=1e-12)
    for h, d in zip(hx, _tuple(dh0_n), strict=True):
        np.testing.assert_allclose(h.grad.numpy(), d, rtol=1e-12, atol=1e-12)
    for name, prm in m.named_parameters():
        np.testing.assert_allclose(prm.grad.numpy(), native.grads[name], rtol=1e-12,
                                   atol=1e-12, err_msg=name)
    hn = _tuple(hn)
    for a, b in zip(hn, _tuple(hn_n), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b, rtol=1e-12, atol=1e-12)


def test_torch_gradcheck_and_layouts():
    torch = _torch()
    from torch.nn.utils.rnn import pack_padded_sequence

    from kernrnn.torch import LSTM

    torch.manual_seed(1)
    T, B, I, H = 4, 2, 2, 2
    m = LSTM(I, H, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, B, H, dtype=torch.float64, requires_grad=True)
    resets = torch.tensor([[False, False], [False, True], [True, False], [False, False]])
    assert torch.autograd.gradcheck(lambda a, h, c: m(a, (h, c), resets=resets)[0],
                                    (x, h0, c0))
    y, _ = m(x, (h0, c0), resets=resets)
    # without resets (the dispatcher drops the default argument) and with an all-False mask
    # (the argument passed): the same gradients
    grads = []
    for mask in (None, torch.zeros(T, B, dtype=torch.bool)):
        x.grad = None
        m(x, (h0, c0), resets=mask)[0].pow(2).sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # unbatched: [T] for a [T, I] input
    y1, _ = m(x[:, 1], (h0[:, 1], c0[:, 1]), resets=resets[:, 1])
    torch.testing.assert_close(y1, y[:, 1], rtol=1e-12, atol=1e-12)
    # a PackedSequence: the mask in the input's batch order, padded to the longest
    lengths = torch.tensor([2, 4])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    yp, _ = m(packed, (h0, c0), resets=resets)
    native = kernrnn.RNN("lstm", I, H, bidirectional=True, dtype=np.float64)
    native.load_state_dict({k: v.detach().numpy() for k, v in m.state_dict().items()})
    y_n, _ = native(x.detach().numpy(), (h0.detach().numpy(), c0.detach().numpy()),
                    lengths.numpy(), resets=resets.numpy())
    np.testing.assert_allclose(torch.nn.utils.rnn.pad_packed_sequence(yp)[0].detach().numpy(),
                               y_n, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"resets must have shape \[T, B\] = \[4, 2\]"):
        m(x, resets=resets.T)
    with pytest.raises(TypeError, match="resets must have dtype torch.bool"):
        m(x, resets=resets.int())
    with torch.autocast("cpu"), pytest.raises(RuntimeError, match="PyTorch has no resets"):
        m(x, resets=resets)  # a call PyTorch would run instead is an error with resets


def test_torch_op_with_resets_passes_opcheck():
    torch = _torch()
    from kernrnn.torch import GRU, _ops

    m = GRU(2, 3, 2, bidirectional=True, dtype=torch.float64)
    spec = _ops.make_spec("gru", 2, 3, 2, True, True, 0.0)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    hx = [torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)]
    resets = torch.tensor([[False, False], [True, False], [False, True], [True, True]])
    args = (spec, x, hx, None, list(m.parameters()), torch.zeros((), dtype=torch.int64), True,
            resets)
    torch.library.opcheck(torch.ops.kernrnn.rnn_forward.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
