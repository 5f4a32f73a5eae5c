"""SequenceModel: forward vs the float64 reference, gradients vs finite differences."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernrnn.functional import resolve_cell
from kernrnn.testing.reference import reference_rnn
from kernrnn.testing.tolerances import FD, FD_STEP
from kernrnn.train.model import SequenceModel


@st.composite
def model_problems(draw):
    p = dict(
        cell=draw(st.sampled_from(["rnn", "lstm", "gru", "lstmp", "sru"])),
        head=draw(st.sampled_from(["seq", "last"])),
        tokens=draw(st.booleans()),
        T=draw(st.integers(1, 5)),
        B=draw(st.integers(1, 3)),
        H=draw(st.integers(1, 4)),
        I=draw(st.integers(1, 3)),
        O=draw(st.integers(1, 3)),
        layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()),
        var_len=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
        proj=0,
    )
    if p["cell"] == "lstmp":  # LSTM with projections: 1 <= proj_size < hidden_size
        p.update(cell="lstm", H=max(p["H"], 2))
        p["proj"] = draw(st.integers(1, p["H"] - 1))
    if p["cell"] == "sru":  # the raw input: a stack above layer 0 reads D*H = H inputs
        if p["layers"] > 1:
            p["bidirectional"] = False
        if p["tokens"]:  # real input of another size goes through input.weight
            p["I"] = p["H"]
    return p


def _build(p, dtype=np.float64):
    rng = np.random.default_rng(p["seed"])
    kw = dict(vocab_size=4, embedding_dim=p["I"]) if p["tokens"] else dict(input_size=p["I"])
    model = SequenceModel(p["cell"], hidden_size=p["H"], output_size=p["O"],
                          num_layers=p["layers"], head=p["head"],
                          bidirectional=p["bidirectional"], dtype=dtype, seed=p["seed"],
                          proj_size=p.get("proj", 0), **kw)
    if p["tokens"]:
        x = rng.integers(0, 4, size=(p["T"], p["B"])).astype(np.int32)
    else:
        x = rng.uniform(-1, 1, (p["T"], p["B"], p["I"])).astype(dtype)
    lengths = rng.integers(1 if p["head"] == "last" else 0, p["T"] + 1, size=p["B"]) \
        if p["var_len"] else None
    return model, x, lengths, rng


def _reference_forward(model, x, lengths):
    """The model's maths in float64 from the reference layer (no kernels)."""
    P = {k: np.asarray(v, np.float64) for k, v in model.params.items()}
    inp = P["embedding.weight"][x] if model.vocab_size else x
    if "input.weight" in P:  # the projection a raw-input cell's real input goes through
        inp = inp @ P["input.weight"].T + P["input.bias"]
    rnn = {k[4:]: v for k, v in P.items() if k.startswith("rnn.")}
    y, _ = reference_rnn(resolve_cell(model.cell), rnn, inp, None, lengths,
                         model.num_layers, model.rnn.bidirectional)
    if model.head == "last":
        T, B = y.shape[:2]
        lens = np.full(B, T) if lengths is None else np.asarray(lengths)
        H = model.rnn.output_size
        feats = y[np.maximum(lens - 1, 0), np.arange(B), :H]
        if model.rnn.bidirectional:
            feats = np.concatenate([feats, y[0, :, H:]], axis=1)
        y = feats
    return y @ P["head.weight"].T + P["head.bias"]


@given(model_problems())
def test_forward_matches_reference(p):
    model, x, lengths, _ = _build(p)
    out, _ = model.forward(x, None, lengths)
    np.testing.assert_allclose(out, _reference_forward(model, x, lengths), rtol=1e-10, atol=1e-10)


@given(model_problems())
def test_gradients_match_finite_differences(p):
    model, x, lengths, rng = _build(p)
    out, _ = model.forward(x, None, lengths)
    R = rng.normal(size=out.shape)  # loss = sum(out * R)
    model.zero_grad()
    model.backward(R)
    grads = {k: v.copy() for k, v in model.grads.items()}
    params = model.params
    model.eval()
    for _ in range(2):
        v = {k: rng.normal(size=a.shape) for k, a in params.items()}

        def loss_at(sign, v=v):
            for k, a in params.items():
                a += sign * FD_STEP * v[k]
            val = float(np.sum(model.forward(x, None, lengths)[0] * R))
            for k, a in params.items():
                a -= sign * FD_STEP * v[k]
            return val

        fd = (loss_at(1) - loss_at(-1)) / (2 * FD_STEP)
        analytic = sum(float(np.sum(grads[k] * v[k])) for k in params)
        np.testing.assert_allclose(analytic, fd, **FD)


def test_a_raw_input_cell_gets_an_input_projection_and_its_input_gradient():
    """SRU reads x_t itself: 3 input features go through input.weight [H, 3] first; the
    model's input gradient is the projection's, checked by finite differences."""
    model = SequenceModel("sru", input_size=3, hidden_size=4, dtype=np.float64, seed=1)
    assert model.param_shapes()["input.weight"] == (4, 3)
    assert model.rnn.input_size == 4
    same = SequenceModel("sru", input_size=4, hidden_size=4, dtype=np.float64, seed=1)
    assert "input.weight" not in same.params  # sizes already match: no projection
    x = np.random.default_rng(0).uniform(-1, 1, (5, 2, 3))
    R = np.random.default_rng(1).normal(size=(5, 2, 1))
    model.forward(x)
    model.backward(R)
    v = np.random.default_rng(2).normal(size=x.shape)
    model.eval()
    fd = (np.sum(model.forward(x + FD_STEP * v)[0] * R)
          - np.sum(model.forward(x - FD_STEP * v)[0] * R)) / (2 * FD_STEP)
    np.testing.assert_allclose(np.sum(model.last_dx * v), fd, **FD)
    rebuilt = SequenceModel.from_config(model.config())
    rebuilt.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(rebuilt.forward(x)[0], model.forward(x)[0])


def test_backward_accumulates_and_zero_grad_keeps_arrays():
    p = dict(cell="gru", head="seq", tokens=True, T=3, B=2, H=3, I=2, O=4, layers=1,
             bidirectional=False, var_len=False, seed=1)
    model, x, lengths, rng = _build(p)
    ids = {k: id(v) for k, v in model.grads.items()}
    out, _ = model.forward(x)
    R = rng.normal(size=out.shape)
    model.backward(R)
    once = {k: v.copy() for k, v in model.grads.items()}
    model.forward(x)
    model.backward(R)
    for k in once:
        np.testing.assert_allclose(model.grads[k], 2 * once[k], rtol=1e-12, atol=1e-15)
    model.zero_grad()
    assert {k: id(v) for k, v in model.grads.items()} == ids
    assert not any(v.any() for v in model.grads.values())


def test_state_dict_round_trip_and_errors():
    a = SequenceModel("lstm", input_size=2, hidden_size=3, seed=0)
    b = SequenceModel("lstm", input_size=2, hidden_size=3, seed=1)
    ids = {k: id(v) for k, v in b.params.items()}
    b.load_state_dict(a.state_dict())
    for k, v in a.params.items():
        np.testing.assert_array_equal(b.params[k], v)
    assert {k: id(v) for k, v in b.params.items()} == ids  # in place: optimizers keep working
    other = SequenceModel("lstm", input_size=2, hidden_size=4, seed=0)
    with pytest.raises(ValueError, match=r"parameter 'rnn.weight_ih_l0' must have shape \[12, 2\]"):
        b.load_state_dict(other.state_dict())
    gru = SequenceModel("gru", input_size=2, hidden_size=3, seed=0)
    with pytest.raises(ValueError, match="must have shape"):
        b.load_state_dict(gru.state_dict())
    sd = a.state_dict()
    del sd["head.bias"]
    sd["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['head.bias'\], unexpected \['extra'\]"):
        b.load_state_dict(sd)
    sd = a.state_dict()
    sd["head.bias"] = sd["head.bias"].astype(np.float64)
    with pytest.raises(TypeError, match="dtype float32"):
        b.load_state_dict(sd)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cell="nope", input_size=1), ValueError, "nope"),
    (dict(input_size=1, hidden_size=0), ValueError, "hidden_size must be >= 1"),
    (dict(input_size=1, num_layers=0), ValueError, "num_layers must be >= 1"),
    (dict(input_size=1, output_size=0), ValueError, "output_size must be >= 1"),
    (dict(input_size=1, head="mean"), ValueError, "head must be one of"),
    (dict(input_size=1, vocab_size=5), ValueError, "not both"),
    (dict(), TypeError, "needs input_size"),
    (dict(input_size=2.5), TypeError, "input_size must be an int"),
])
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SequenceModel(**kwargs)


def test_bad_token_input():
    m = SequenceModel("rnn", vocab_size=3, hidden_size=2)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 3\)"):
        m.forward(np.array([[0], [3]], dtype=np.int32))
    with pytest.raises(TypeError, match="integer token ids"):
        m.forward(np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match=r"shape \[T, B\]"):
        m.forward(np.zeros((2, 1, 1), np.int32))
    with pytest.raises(ValueError, match="forward"):
        m.backward(np.zeros((2, 1, 3), np.float32))
