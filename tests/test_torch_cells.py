"""kernrnn.torch's cell modules against PyTorch's LSTMCell/GRUCell/RNNCell (the oracle), float64."""

import inspect
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import kernrnn.torch as kt  # noqa: E402

F64 = torch.float64
PAIRS = {
    "lstm": (kt.LSTMCell, nn.LSTMCell, {}),
    "gru": (kt.GRUCell, nn.GRUCell, {}),
    "rnn_tanh": (kt.RNNCell, nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (kt.RNNCell, nn.RNNCell, {"nonlinearity": "relu"}),
}


def _n_state(kind):
    return 2 if kind == "lstm" else 1


def _pack(parts, S):
    return None if parts is None else (tuple(parts) if S > 1 else parts[0])


def _unpack(out):
    return list(out) if isinstance(out, tuple) else [out]


def _run(m, x0, hx0, S, seed):
    """(outputs, gradients of x, hx and every parameter) for a random projection of the outputs."""
    x = x0.clone().requires_grad_()
    hx = None if hx0 is None else [h.clone().requires_grad_() for h in hx0]
    out = _unpack(m(x, _pack(hx, S)))
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in out)
    leaves = [x, *(hx or []), *m.parameters()]
    return out, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("kind", sorted(PAIRS))
@given(B=st.integers(1, 3), I=st.integers(1, 4), H=st.integers(1, 4), bias=st.booleans(),
       batched=st.booleans(), with_hx=st.booleans(), seed=st.integers(0, 2**31))
def test_same_outputs_states_and_gradients_as_pytorch(kind, B, I, H, bias, batched, with_hx,
                                                       seed):
    ours_cls, ref_cls, extra = PAIRS[kind]
    S = _n_state(kind)
    torch.manual_seed(seed)
    ref = ref_cls(I, H, bias=bias, dtype=F64, **extra)
    torch.manual_seed(seed)
    ours = ours_cls(I, H, bias=bias, dtype=F64, **extra)
    for (n, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), n  # the same draws from torch's RNG
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if batched else ()
    x0 = torch.rand(*lead, I, generator=g, dtype=F64) * 2 - 1
    hx0 = [torch.rand(*lead, H, generator=g, dtype=F64) * 2 - 1 for _ in range(S)] \
        if with_hx else None
    want_out, want_grads = _run(ref, x0, hx0, S, seed + 1)
    got_out, got_grads = _run(ours, x0, hx0, S, seed + 1)
    for a, b in zip(want_out, got_out):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert len(want_grads) == len(got_grads)
    for a, b in zip(want_grads, got_grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("batched", [True, False])
def test_gradcheck(kind, batched):
    ours_cls, _, extra = PAIRS[kind]
    S = _n_state(kind)
    torch.manual_seed(3)
    m = ours_cls(2, 3, dtype=F64, **extra)
    names = [n for n, _ in m.named_parameters()]
    lead = (2,) if batched else ()
    x = torch.randn(*lead, 2, dtype=F64, requires_grad=True)
    hx = [torch.randn(*lead, 3, dtype=F64, requires_grad=True) for _ in range(S)]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, *rest):
        hs, ps = rest[:S], rest[S:]
        return torch.func.functional_call(m, dict(zip(names, ps)), (x, _pack(list(hs), S)))

    assert torch.autograd.gradcheck(f, (x, *hx, *params))


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_same_attributes_repr_and_state_dicts(kind):
    ours_cls, ref_cls, extra = PAIRS[kind]
    for bias in (True, False):
        ref, ours = ref_cls(3, 5, bias=bias, **extra), ours_cls(3, 5, bias=bias, **extra)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert repr(ours) == repr(ref)
        for attr in ("input_size", "hidden_size", "bias"):
            assert getattr(ours, attr) == getattr(ref, attr)
        ours.load_state_dict(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
        assert isinstance(ours, nn.RNNCellBase) and not isinstance(ours, ref_cls)


def test_constructor_signatures_match_pytorch():
    for ours, ref in ((kt.LSTMCell, nn.LSTMCell), (kt.GRUCell, nn.GRUCell),
                      (kt.RNNCell, nn.RNNCell)):
        a, b = inspect.signature(ours.__init__), inspect.signature(ref.__init__)
        assert [(p.name, p.default) for p in a.parameters.values()] == \
            [(p.name, p.default) for p in b.parameters.values()]


def test_recurrent_cell_equals_dropin_and_the_layer_step():
    torch.manual_seed(0)
    drop = kt.GRUCell(3, 4, dtype=F64)
    gen = kt.RecurrentCell("gru", 3, 4, dtype=F64)
    assert [n for n, _ in gen.named_parameters()] == [n for n, _ in drop.named_parameters()]
    gen.load_state_dict(drop.state_dict())
    layer = kt.Recurrent("gru", 3, 4, dtype=F64)
    layer.load_state_dict({f"{k}_l0": v for k, v in drop.state_dict().items()})
    x, h = torch.randn(2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    torch.testing.assert_close(gen(x, h), drop(x, h), rtol=0, atol=0)
    _, hn = layer(x[None], h[None])
    torch.testing.assert_close(gen(x, h), hn[0], rtol=0, atol=0)
    assert repr(gen) == "RecurrentCell('gru', 3, 4)"


def test_recurrent_cell_unregistered_cell_gradcheck():
    from cuda_test_cells import MGU

    torch.manual_seed(0)
    m = kt.RecurrentCell(MGU, 2, 3, dtype=F64)
    names = [n for n, _ in m.named_parameters()]
    assert names[:2] == ["weight_ih", "weight_hh"]
    x = torch.randn(2, 2, dtype=F64, requires_grad=True)
    h = torch.randn(2, 3, dtype=F64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, h, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x, h))

    assert torch.autograd.gradcheck(f, (x, h, *params))
    assert m(x[0]).shape == (3,)  # unbatched, no state
    torch.manual_seed(5)
    m.reset_parameters()
    first = [p.detach().clone() for p in m.parameters()]
    torch.manual_seed(5)
    m.reset_parameters()  # the cell's initialisers, seeded from torch's RNG
    assert all(torch.equal(a, p) for a, p in zip(first, m.parameters()))
    assert not all(torch.equal(a, p) for a, p in zip(first, params))


def test_cell_in_a_compiled_loop_fullgraph():
    torch.manual_seed(0)
    cell = kt.LSTMCell(2, 3, dtype=F64)
    head = nn.Linear(3, 1, dtype=F64)

    def unroll(x, h, c):
        outs = []
        for t in range(x.shape[0]):
            h, c = cell(x[t], (h, c))
            outs.append(head(h))
        return torch.stack(outs).square().sum()

    x = torch.randn(3, 2, 2, dtype=F64)
    h0, c0 = torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)
    params = [*cell.parameters(), *head.parameters()]
    compiled = torch.compile(unroll, fullgraph=True)  # a graph break is an error
    got = compiled(x, h0, c0)
    got_grads = torch.autograd.grad(got, params)
    want = unroll(x, h0, c0)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_no_grad_saves_nothing_and_double_backward_raises():
    m = kt.LSTMCell(2, 3, dtype=F64)
    x = torch.randn(2, 2, dtype=F64, requires_grad=True)
    with torch.no_grad():
        h, c = m(x)
    assert h.grad_fn is None and c.grad_fn is None
    h, c = m(x)
    (gx,) = torch.autograd.grad(h.sum() + c.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_bad_inputs_like_pytorch():
    m = kt.LSTMCell(2, 3, dtype=F64)
    x = torch.randn(4, 2, dtype=F64)
    h = torch.zeros(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="LSTMCell: Expected input to be 1D or 2D, got 3D"):
        m(x[None])
    with pytest.raises(ValueError, match="Expected hx\\[1\\] to be 1D or 2D, got 3D"):
        m(x, (h, h[None]))
    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 5 expected 2"):
        m(torch.randn(4, 5, dtype=F64))
    with pytest.raises(RuntimeError, match="Input batch size 4 doesn't match hidden\\[0\\] batch"):
        m(x, (h[:2], h))
    with pytest.raises(RuntimeError, match="hidden\\[1\\] has inconsistent hidden_size: got 2"):
        m(x, (h, h[:, :2]))
    with pytest.raises(TypeError, match="hx must be a tuple of 2 Tensors"):
        m(x, h)
    with pytest.raises(ValueError, match="input dtype \\(torch.float32\\) does not match"):
        m(x.float())
    with pytest.raises(TypeError, match="input must be a Tensor"):
        m([1.0, 2.0])
    g = kt.GRUCell(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="GRUCell: Expected hidden to be 1D or 2D, got 3D"):
        g(x, h[None])
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        kt.RNNCell(2, 3, nonlinearity="sigmoid")
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        kt.RecurrentCell("gru", 2, 3, dtype=torch.float16)


def test_unsupported_dtype_falls_back_to_pytorch_once():
    torch.manual_seed(0)
    ref = nn.GRUCell(2, 3, dtype=torch.bfloat16)
    ours = kt.GRUCell(2, 3, dtype=torch.bfloat16)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, dtype=torch.bfloat16)
    kt.modules._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = [ours(x) for _ in range(3)]
    fallbacks = [m for m in w if issubclass(m.category, kt.FallbackWarning)]
    assert len(fallbacks) == 1 and "dtype torch.bfloat16" in str(fallbacks[0].message)
    assert torch.equal(got[0], ref(x))
    m = kt.RecurrentCell("gru", 2, 3).to(torch.bfloat16)  # no PyTorch implementation: an error
    with pytest.raises(RuntimeError, match="no kernels for dtype torch.bfloat16.*no PyTorch"):
        m(x)


def test_weights_changed_between_inference_steps_are_used():
    """The CPU backend reuses packed weights for the same array; a parameter changed in
    place, or given new memory, must still reach the kernels."""
    torch.manual_seed(0)
    ours, ref = kt.LSTMCell(3, 4, dtype=F64), nn.LSTMCell(3, 4, dtype=F64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, dtype=F64)
    with torch.no_grad():
        for change in (lambda m: m.weight_hh.mul_(2.0),
                       lambda m: setattr(m.weight_ih, "data", m.weight_ih.data * -1.5)):
            ours(x)
            change(ours)
            change(ref)
            for a, b in zip(ours(x), ref(x)):
                torch.testing.assert_close(a, b)
