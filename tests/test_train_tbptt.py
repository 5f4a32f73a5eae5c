"""Truncated BPTT: k >= T is full BPTT; shorter chunks stop the gradient at their edges.

The gradients each chunk hands to the optimizer are checked against finite
differences of the float64 reference, where the chunk's initial state is the
carried (constant) state: exactly what "gradient stopped at the edge" means.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernrnn.functional import resolve_cell
from kernrnn.testing.reference import reference_rnn
from kernrnn.testing.tolerances import FD_STEP
from kernrnn.train.loop import train_batch
from kernrnn.train.model import SequenceModel


class Recorder:
    """An optimizer that records the gradients it is given and changes nothing."""

    name = "recorder"

    def __init__(self):
        self.seen = []

    def step(self, params, grads):
        self.seen.append({k: np.array(v, copy=True) for k, v in grads.items()})


def _problem(seed, cell, T, B, H, layers, head="seq", var_len=True):
    rng = np.random.default_rng(seed)
    model = SequenceModel(cell, input_size=2, hidden_size=H, output_size=2, num_layers=layers,
                          head=head, dtype=np.float64, seed=seed)
    x = rng.uniform(-1, 1, (T, B, 2))
    lengths = rng.integers(1, T + 1, size=B) if var_len else np.full(B, T)
    y = rng.normal(size=(T, B, 2)) if head == "seq" else rng.normal(size=(B, 2))
    return model, x, y, lengths, rng


@given(st.integers(0, 2**32 - 1), st.sampled_from(["rnn", "lstm", "gru"]),
       st.integers(1, 6), st.sampled_from(["seq", "last"]))
def test_chunk_of_T_or_more_is_full_bptt(seed, cell, T, head):
    model, x, y, lengths, _ = _problem(seed, cell, T, 3, 3, 2, head)
    runs = []
    for k in (0, T, T + 3):
        rec = Recorder()
        res = train_batch(model, "mse", rec, x, y, lengths, tbptt=k)
        assert len(rec.seen) == 1 and res.chunks == 1
        runs.append((float(res.loss), rec.seen[0]))
    for loss, grads in runs[1:]:
        assert loss == runs[0][0]
        for key in grads:
            np.testing.assert_array_equal(grads[key], runs[0][1][key])


def _ref_chunk_losses(model, P, x, y, lengths, k, freeze_state):
    """Float64 reference: per-chunk MSE (mean over the chunk's valid positions).

    ``freeze_state`` is a dict of carried states computed at the unperturbed
    parameters (gradient stopped) or None (states recomputed: full gradient).
    """
    cell = resolve_cell(model.cell)
    rnn = {kk[4:]: v for kk, v in P.items() if kk.startswith("rnn.")}
    T = x.shape[0]
    state, out = None, []
    for c, s in enumerate(range(0, T, k)):
        e = min(T, s + k)
        lens = np.clip(lengths - s, 0, e - s)
        h0 = state if freeze_state is None else freeze_state.get(c)
        yy, hn = reference_rnn(cell, rnn, x[s:e], h0, lens, model.num_layers)
        pred = yy @ P["head.weight"].T + P["head.bias"]
        mask = (np.arange(e - s)[:, None] < lens[None, :])[..., None]
        out.append(float((((pred - y[s:e]) ** 2) * mask).sum() / (lens.sum() * 2)))
        state = hn
    return out


def _carried_states(model, P, x, lengths, k):
    cell = resolve_cell(model.cell)
    rnn = {kk[4:]: v for kk, v in P.items() if kk.startswith("rnn.")}
    states, state = {}, None
    for c, s in enumerate(range(0, x.shape[0], k)):
        e = min(x.shape[0], s + k)
        states[c] = state
        _, state = reference_rnn(cell, rnn, x[s:e], state, np.clip(lengths - s, 0, e - s),
                                 model.num_layers)
    return states


@given(st.integers(0, 2**32 - 1), st.sampled_from(["rnn", "lstm", "gru"]),
       st.integers(4, 9), st.integers(1, 3))
def test_gradient_is_stopped_at_chunk_edges(seed, cell, T, k):
    model, x, y, _, rng = _problem(seed, cell, T, 3, 3, 2)
    lengths = np.full(3, T)  # every chunk holds positions of every sequence
    lengths[0] = rng.integers(1, T + 1)
    rec = Recorder()
    train_batch(model, "mse", rec, x, y, lengths, tbptt=k)
    n_chunks = -(-int(lengths.max()) // k)
    assert len(rec.seen) == n_chunks
    P = {kk: np.array(v) for kk, v in model.params.items()}
    frozen = _carried_states(model, P, x, lengths, k)
    v = {kk: rng.normal(size=a.shape) for kk, a in P.items()}

    def fd(freeze):
        def at(sign):
            Q = {kk: P[kk] + sign * FD_STEP * v[kk] for kk in P}
            return np.array(_ref_chunk_losses(model, Q, x, y, lengths, k, freeze))
        return (at(1) - at(-1)) / (2 * FD_STEP)

    stopped, full = fd(frozen), fd(None)
    for c, grads in enumerate(rec.seen):
        analytic = sum(float(np.sum(grads[kk] * v[kk])) for kk in P)
        np.testing.assert_allclose(analytic, stopped[c], rtol=1e-6, atol=1e-8)
    # the check has power: where a chunk has history, the full gradient differs
    if n_chunks > 1:
        assert not np.allclose(stopped[1:], full[1:], rtol=1e-6, atol=1e-8)


def test_state_is_carried_across_chunks():
    """Chunked forward gives the same outputs as one pass (the state carries over)."""
    model, x, y, lengths, _ = _problem(0, "lstm", 9, 4, 3, 2)
    model.eval()
    full, _ = model.forward(x, None, lengths)
    state, parts = None, []
    for s in range(0, 9, 4):
        out, state = model.forward(x[s:s + 4], state, np.clip(lengths - s, 0, 4))
        parts.append(out)
    got = np.concatenate(parts)
    mask = (np.arange(9)[:, None] < lengths[None, :])[..., None]
    np.testing.assert_allclose(got * mask, full * mask, rtol=1e-12, atol=1e-12)


def test_last_head_losses_land_in_the_chunk_where_each_sequence_ends():
    model, x, y, _, _ = _problem(1, "gru", 8, 3, 2, 1, head="last")
    lengths = np.array([2, 5, 8])
    rec = Recorder()
    res = train_batch(model, "mse", rec, x, y, lengths, tbptt=3)
    # chunks [0,3) [3,6) [6,8): one sequence ends in each
    assert res.chunks == 3 and res.count == 3
    lengths = np.array([1, 2, 8])
    rec = Recorder()
    res = train_batch(model, "mse", rec, x, y, lengths, tbptt=3)
    assert res.chunks == 2  # the middle chunk only carries the state


def test_bad_tbptt():
    model, x, y, lengths, _ = _problem(0, "rnn", 4, 2, 2, 1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="tbptt must be an int >= 0"):
            train_batch(model, "mse", Recorder(), x, y, lengths, tbptt=bad)
    bi = SequenceModel("rnn", input_size=2, hidden_size=2, output_size=2, bidirectional=True,
                       dtype=np.float64)
    with pytest.raises(ValueError, match="unidirectional"):
        train_batch(bi, "mse", Recorder(), x, y, lengths, tbptt=2)
    with pytest.raises(ValueError, match="loss must be one of"):
        train_batch(model, "mae", Recorder(), x, y, lengths)
