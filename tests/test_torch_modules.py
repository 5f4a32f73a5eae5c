"""kernrnn.torch against PyTorch's own nn.LSTM/GRU/RNN (the oracle), float64."""

import inspect
import io
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

import kernrnn.torch as kt  # noqa: E402
from kernrnn.torch import _ops  # noqa: E402

F64 = torch.float64
PAIRS = {
    "lstm": (kt.LSTM, nn.LSTM, {}),
    "lstmp": (kt.LSTM, nn.LSTM, {"proj_size": 1}),  # LSTM with projections (H >= 2 below)
    "gru": (kt.GRU, nn.GRU, {}),
    "rnn_tanh": (kt.RNN, nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (kt.RNN, nn.RNN, {"nonlinearity": "relu"}),
}


@st.composite
def setups(draw):
    """Sizes and options of one comparison; ``kind``: tensor, packed or unbatched input."""
    T, B = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["tensor", "packed", "unbatched"]))
    lengths = None
    if kind == "packed":
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    return dict(T=T, B=B, I=draw(st.integers(1, 4)), H=draw(st.integers(1, 4)),
                L=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
                batch_first=draw(st.booleans()), bias=draw(st.booleans()), kind=kind,
                lengths=lengths, with_hx=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


def _inputs(s, S, proj=0):
    """(input, hx leaves or None); ``proj``: the size of an LSTMP's h."""
    g = torch.Generator().manual_seed(s["seed"])
    T, B, I, H = s["T"], s["B"], s["I"], s["H"]
    D = 2 if s["bidirectional"] else 1
    widths = [proj or H] + [H] * (S - 1)
    if s["kind"] == "unbatched":
        x = torch.rand(T, I, generator=g, dtype=F64) * 2 - 1
        hx = [torch.rand(s["L"] * D, w, generator=g, dtype=F64) for w in widths]
    else:
        shape = (B, T, I) if s["batch_first"] else (T, B, I)
        x = torch.rand(*shape, generator=g, dtype=F64) * 2 - 1
        hx = [torch.rand(s["L"] * D, B, w, generator=g, dtype=F64) for w in widths]
    return x, (hx if s["with_hx"] else None)


def _as_input(s, x):
    if s["kind"] != "packed":
        return x
    return pack_padded_sequence(x, torch.tensor(s["lengths"]), batch_first=s["batch_first"],
                                enforce_sorted=False)


def _flat(out):
    """The tensors of a module's (output, h_n)."""
    y, h = out
    y = y.data if isinstance(y, PackedSequence) else y
    return [y, *(h if isinstance(h, tuple) else (h,))]


@pytest.mark.parametrize("kind", sorted(PAIRS))
@given(s=setups())
def test_same_outputs_and_gradients_as_pytorch(kind, s):
    ours_cls, ref_cls, extra = PAIRS[kind]
    if "proj_size" in extra:
        s = {**s, "H": max(s["H"], 2)}  # proj_size < hidden_size
    S = 2 if kind.startswith("lstm") else 1
    args = (s["I"], s["H"], s["L"])
    opts = dict(bias=s["bias"], batch_first=s["batch_first"],
                bidirectional=s["bidirectional"], dtype=F64, **extra)
    ref = ref_cls(*args, **opts)
    ours = ours_cls(*args, **opts)
    ours.load_state_dict(ref.state_dict())
    x0, hx0 = _inputs(s, S, extra.get("proj_size", 0))
    results = []
    for m in (ref, ours):
        x = x0.clone().requires_grad_()
        hx = None if hx0 is None else [h.clone().requires_grad_() for h in hx0]
        out = m(_as_input(s, x), None if hx is None else (hx[0] if S == 1 else tuple(hx)))
        flat = _flat(out)
        g = torch.Generator().manual_seed(s["seed"] + 1)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in flat)
        leaves = [x, *(hx or []), *m.parameters()]
        results.append((flat, torch.autograd.grad(loss, leaves)))
    if s["kind"] == "packed":
        assert torch.equal(_as_input(s, x0).batch_sizes, out[0].batch_sizes)
        assert torch.equal(out[0].unsorted_indices, _as_input(s, x0).unsorted_indices)
    for a, b in zip(results[0][0], results[1][0]):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_same_init_attributes_and_state_dicts(kind):
    ours_cls, ref_cls, extra = PAIRS[kind]
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, **extra)
    torch.manual_seed(7)
    ref = ref_cls(3, 5, **kw)
    torch.manual_seed(7)
    ours = ours_cls(3, 5, **kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), n  # the same draws from torch's RNG
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size", "_flat_weights_names"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert [[tuple(w.shape) for w in ws] for ws in ours.all_weights] == \
        [[tuple(w.shape) for w in ws] for ws in ref.all_weights]
    assert repr(ours) == repr(ref)
    # state dicts load both ways
    other = ref_cls(3, 5, **kw)
    other.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref_cls(3, 5, **kw).state_dict())
    assert ours.flatten_parameters() is None


def test_constructor_signatures_match_pytorch_docs():
    base = list(inspect.signature(nn.RNNBase.__init__).parameters)[2:]  # after self, mode
    assert list(inspect.signature(kt.LSTM.__init__).parameters)[1:] == base
    no_proj = [p for p in base if p != "proj_size"]
    assert list(inspect.signature(kt.GRU.__init__).parameters)[1:] == no_proj
    rnn = list(inspect.signature(kt.RNN.__init__).parameters)[1:]
    assert rnn == no_proj[:3] + ["nonlinearity"] + no_proj[3:]
    for cls in (kt.LSTM, kt.GRU, kt.RNN):
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        assert defaults["num_layers"] == 1 and defaults["bias"] is True
        assert defaults["batch_first"] is False and defaults["dropout"] == 0.0
        assert defaults["device"] is None and defaults["dtype"] is None
    # positional use as with nn.RNN: the fourth argument is the nonlinearity
    assert kt.RNN(2, 3, 1, "relu").mode == nn.RNN(2, 3, 1, "relu").mode == "RNN_RELU"


# -- the generic module -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mgu():
    from cuda_test_cells import MGU

    return MGU


def test_recurrent_gradcheck_unregistered_cell(mgu):
    torch.manual_seed(0)
    m = kt.Recurrent(mgu, 2, 3, num_layers=2, bidirectional=True, dtype=F64)
    names = [n for n, _ in m.named_parameters()]
    assert names == list(m._flat_weights_names)
    x = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, h0, *ps):
        y, hn = torch.func.functional_call(m, dict(zip(names, ps)), (x, h0))
        return y, hn

    assert torch.autograd.gradcheck(f, (x, h0, *params))


def test_recurrent_equals_dropin_for_a_builtin_cell():
    torch.manual_seed(1)
    ref = nn.GRU(3, 4, 2, batch_first=True, dtype=F64)
    gen = kt.Recurrent("gru", 3, 4, num_layers=2, batch_first=True, dtype=F64)
    gen.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 3, dtype=F64)
    for a, b in zip(ref(x), gen(x)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_recurrent_init_follows_torch_seed_and_the_cells_initialisers():
    torch.manual_seed(3)
    a = kt.Recurrent("lstm", 2, 3)
    torch.manual_seed(3)
    b = kt.Recurrent("lstm", 2, 3)
    torch.manual_seed(4)
    c = kt.Recurrent("lstm", 2, 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.weight_hh_l0, c.weight_hh_l0)
    before = a.weight_ih_l0.detach().clone()
    a.reset_parameters()
    assert not torch.equal(before, a.weight_ih_l0)


# -- autograd details --------------------------------------------------------------


def test_double_backward_raises_clearly():
    m = kt.LSTM(2, 3, dtype=F64)
    x = torch.randn(3, 1, 2, dtype=F64, requires_grad=True)
    y, _ = m(x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_no_grad_and_eval_save_nothing(monkeypatch):
    m = kt.GRU(2, 3, num_layers=2, dtype=F64)
    saved = []
    real = _ops._stash
    monkeypatch.setattr(_ops, "_stash", lambda ctx: saved.append(ctx) or real(ctx))
    x = torch.randn(3, 2, 2, dtype=F64)
    with torch.no_grad():
        y, _ = m(x)
    m.eval()
    with torch.inference_mode():
        m(x)
    assert y.grad_fn is None and saved == []
    m.train()
    y, _ = m(x)  # parameters require grad: the context is kept
    assert y.grad_fn is not None and len(saved) == 1


def test_cpu_tensors_reach_the_kernels_without_copies(monkeypatch):
    m = kt.LSTM(2, 3, dtype=F64)
    engine = _ops.engine_for(_ops.make_spec("lstm", 2, 3, 1, False, True, 0.0, masks=True),
                             m.weight_ih_l0)
    seen = {}
    real = engine.forward_with

    def spy(params, x, *args, **kw):
        seen.update(params, x=x)
        return real(params, x, *args, **kw)

    monkeypatch.setattr(engine, "forward_with", spy)
    x = torch.randn(4, 2, 2, dtype=F64)
    m(x)
    assert seen["x"].ctypes.data == x.data_ptr()
    for name, p in m.named_parameters():
        assert seen[name].ctypes.data == p.data_ptr(), name


def test_in_place_change_of_a_saved_input_is_caught():
    m = kt.GRU(2, 3, dtype=F64)
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    inp = x * 1.0
    y, _ = m(inp)
    inp.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_gradients_do_not_depend_on_other_pending_calls():
    """Two forwards before two backwards: each backward uses its own context."""
    m = kt.LSTM(2, 3, num_layers=2, dtype=F64)
    ref = nn.LSTM(2, 3, num_layers=2, dtype=F64)
    ref.load_state_dict(m.state_dict())
    xs = [torch.randn(3, 2, 2, dtype=F64) for _ in range(2)]
    ys = [m(x)[0].pow(2).sum() for x in xs]
    ys[1].backward()
    ys[0].backward()
    sum(ref(x)[0].pow(2).sum() for x in xs).backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11), n


@pytest.mark.parametrize("proj", [0, 2])
def test_custom_ops_pass_opcheck(proj):
    if proj:  # LSTMP: h [L*D, B, P], c [L*D, B, H]
        spec = _ops.make_spec("lstm", 2, 3, 2, True, True, 0.0, proj_size=proj)
        m = kt.LSTM(2, 3, 2, bidirectional=True, proj_size=proj, dtype=F64)
        hx = [torch.randn(4, 2, proj, dtype=F64, requires_grad=True),
              torch.randn(4, 2, 3, dtype=F64, requires_grad=True)]
    else:
        spec = _ops.make_spec("gru", 2, 3, 2, True, True, 0.0)
        m = kt.GRU(2, 3, 2, bidirectional=True, dtype=F64)
        hx = [torch.randn(4, 2, 3, dtype=F64, requires_grad=True)]
    x = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)
    args = (spec, x, hx, None, list(m.parameters()), torch.zeros((), dtype=torch.int64), True)
    torch.library.opcheck(torch.ops.kernrnn.rnn_forward.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


# -- dropout ---------------------------------------------------------------------


def test_dropout_properties():
    torch.manual_seed(0)
    m = kt.LSTM(3, 4, num_layers=3, dropout=0.5, dtype=F64)
    plain = kt.LSTM(3, 4, num_layers=3, dtype=F64)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    m.eval()
    torch.testing.assert_close(m(x)[0], plain(x)[0], rtol=0, atol=0)  # eval: identity
    m.train()
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(m(x)[0])
    assert torch.equal(outs[0], outs[1])  # masks come from torch's RNG
    assert not torch.equal(outs[0], outs[2])
    assert not torch.allclose(outs[0], plain(x)[0])
    with torch.no_grad():  # dropout follows the mode, not grad mode (as PyTorch)
        torch.manual_seed(1)
        assert torch.equal(m(x)[0], outs[0])

    def f(x, *ps):  # the same masks in forward and backward, or this fails
        torch.manual_seed(11)
        names = [n for n, _ in m.named_parameters()]
        y, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        return y, c

    ps = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x, *ps))


def test_dropout_one_zeroes_the_input_of_upper_layers():
    m = kt.GRU(3, 4, num_layers=2, dropout=1.0, dtype=F64)
    y1 = m(torch.randn(5, 2, 3, dtype=F64))[0]
    y2 = m(torch.randn(5, 2, 3, dtype=F64))[0]
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # the top layer sees zeros only


# -- pickling, torch.compile -------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: kt.LSTM(2, 3, 2, batch_first=True),
                                  lambda: kt.Recurrent("rnn_relu", 2, 3, bidirectional=True)])
def test_torch_save_load_whole_module(make):
    m = make()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert type(back) is type(m)
    x = torch.randn(2, 4, 2)
    for a, b in zip(_flat(m(x)), _flat(back(x))):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_forward_and_backward():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = kt.LSTM(3, 4, batch_first=True)
            self.cell = kt.Recurrent("gru", 4, 3, batch_first=True)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            y, (h, _) = self.rnn(x)
            y, h2 = self.cell(y)
            return self.head(y).square().mean() + h.sum() + h2.sum()

    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 5, 3)
    compiled = torch.compile(model, fullgraph=True)  # a graph break is an error
    loss = compiled(x)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(x)
    want.backward()
    torch.testing.assert_close(loss, want)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)


# -- bad input ---------------------------------------------------------------------


def test_bad_arguments_like_pytorch():
    for p in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="dropout"):
            kt.LSTM(2, 3, 2, dropout=p)
        with pytest.raises(ValueError, match="dropout"):
            kt.Recurrent("gru", 2, 3, 2, dropout=p)
    with pytest.raises(ValueError, match="unknown cell 'nope'.*lstm"):
        kt.Recurrent("nope", 2, 3)
    with pytest.raises(TypeError, match="cell must be"):
        kt.Recurrent(3, 2, 3)
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        kt.LSTM(2, 3, proj_size=3)
    with pytest.raises(ValueError, match="nonlinearity"):
        kt.RNN(2, 3, nonlinearity="sigmoid")
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        kt.Recurrent("gru", 2, 3, dtype=torch.float16)  # the drop-ins fall back instead
    with pytest.raises(TypeError, match="hidden_size should be of type int"):
        kt.Recurrent("gru", 2, 3.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        kt.Recurrent("gru", 2, 3, dropout=0.5)
    assert any("num_layers greater than 1" in str(x.message) for x in w)


def test_bad_inputs_like_pytorch():
    m = kt.LSTM(2, 3, dtype=F64)
    x = torch.randn(4, 2, 2, dtype=F64)
    with pytest.raises(ValueError, match="input dtype \\(torch.float32\\) does not match"):
        m(x.float())
    with pytest.raises(ValueError, match="input dtype \\(torch.int64\\)"):
        m(torch.ones(4, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        m(x[None])
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(torch.randn(4, 2, 5, dtype=F64))
    h = torch.zeros(1, 2, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size \\(1, 2, 3\\), got"):
        m(x, (torch.zeros(1, 3, 3, dtype=F64), h))
    with pytest.raises(TypeError, match="hx must be a tuple of 2 Tensors"):
        m(x, h)
    with pytest.raises(ValueError, match="hx dtype \\(torch.float32\\)"):
        m(x, (h.float(), h))
    with pytest.raises(RuntimeError, match="not at the same device.*hidden tensor at meta"):
        m(x, (h.to("meta"), h))
    with pytest.raises(RuntimeError, match="not at the same device.*parameter tensor"):
        m.to("meta")(x.to("cpu"))
    with pytest.raises(RuntimeError, match="float point and complex dtype|floating point"):
        torch.ones(3, dtype=torch.int64, requires_grad=True)  # torch refuses it first
    # an unsorted batch with enforce_sorted=True: PyTorch's own error, before any module
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):
        kt.GRU(2, 3)(pack_padded_sequence(torch.randn(3, 2, 2), torch.tensor([1, 3])))
