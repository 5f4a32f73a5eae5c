"""``kernrnn.torch.patch()`` and ``convert(model)``, parametrisations and hooks, and the
fallback to PyTorch's implementation for calls kernrnn cannot run."""

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.modules import rnn as torch_rnn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import kernrnn.torch as kt  # noqa: E402

F64 = torch.float64
NAMES = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")


def _originals():
    return all(getattr(nn, n) is getattr(torch_rnn, n) for n in NAMES)


# -- patch ----------------------------------------------------------------------------


def test_patch_as_a_call_and_restore():
    assert _originals()
    p = kt.patch()
    try:
        for n in NAMES:
            assert getattr(nn, n) is getattr(kt, n)
        m = nn.LSTM(2, 3)
        assert isinstance(m, kt.LSTM) and isinstance(m, nn.LSTM)  # nn.LSTM is kernrnn's now
        assert not isinstance(m, torch_rnn.LSTM)
    finally:
        p.restore()
    assert _originals() and not p.active
    assert not isinstance(m, nn.LSTM)  # restored: the module stays kernrnn's
    p.restore()  # a second restore does nothing
    assert _originals()


def test_patch_context_manager_restores_even_when_the_body_raises():
    before = torch_rnn.LSTM(2, 3)
    with pytest.raises(KeyError):
        with kt.patch() as p:
            assert nn.LSTMCell is kt.LSTMCell and p.active
            assert not isinstance(before, nn.LSTM)  # built before the patch: PyTorch's
            with kt.patch("GRU"):  # nested
                raise KeyError("body fails")
    assert _originals()


def test_patch_some_names_and_unknown_names():
    with kt.patch("GRUCell"):
        assert nn.GRUCell is kt.GRUCell and nn.LSTM is torch_rnn.LSTM
    assert _originals()
    with pytest.raises(ValueError, match="unknown name\\(s\\) \\['Transformer'\\]"):
        kt.patch("LSTM", "Transformer")
    assert _originals()


def test_script_using_cells_runs_kernrnn_under_patch():
    torch.manual_seed(0)
    ref = torch_rnn.LSTMCell(2, 3, dtype=F64)
    with kt.patch():
        torch.manual_seed(0)
        cell = nn.LSTMCell(2, 3, dtype=F64)  # a script's own line
    assert type(cell) is kt.LSTMCell
    x = torch.randn(4, 2, dtype=F64)
    for a, b in zip(cell(x), ref(x)):
        torch.testing.assert_close(a, b)


def test_patched_model_compiles_fullgraph():
    with kt.patch():
        m = nn.GRU(2, 3, dtype=F64)  # an instance of (patched) torch.nn.GRU: Dynamo traces it
        x = torch.randn(3, 1, 2, dtype=F64)
        y = torch.compile(lambda z: m(z)[0], fullgraph=True)(x)
    torch.testing.assert_close(y, m(x)[0])
    import torch._dynamo.config as dynamo_config

    assert dynamo_config.allow_rnn is False  # put back


# -- convert --------------------------------------------------------------------------


class Inner(nn.Module):
    def __init__(self, shared):
        super().__init__()
        self.rnn = shared
        self.cell = nn.GRUCell(3, 3, dtype=F64)
        self.rnn_cell = nn.RNNCell(3, 3, nonlinearity="relu", dtype=F64)


class Model(nn.Module):
    """Nested and shared recurrent modules, as a built model has them."""

    def __init__(self):
        super().__init__()
        shared = nn.LSTM(2, 3, num_layers=2, batch_first=True, dtype=F64)
        self.first = shared
        self.inner = Inner(shared)
        self.blocks = nn.ModuleList([nn.RNN(3, 3, dtype=F64), nn.LSTMCell(3, 3, dtype=F64)])
        self.head = nn.Linear(3, 1, dtype=F64)

    def forward(self, x):
        y, (h, c) = self.first(x)
        y, _ = self.inner.rnn(x, (h, c))
        y, _ = self.blocks[0](y)
        z = self.inner.cell(y[:, -1])
        z = self.inner.rnn_cell(z, z)
        z, _ = self.blocks[1](z)
        return self.head(z).square().sum()


def test_convert_nested_and_shared_modules():
    torch.manual_seed(0)
    model = Model()
    model.blocks[0].weight_hh_l0.requires_grad_(False)
    model.inner.cell.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    trained = [p for p in params.values() if p.requires_grad]
    x = torch.randn(2, 4, 2, dtype=F64)
    want = model(x)
    want_grads = torch.autograd.grad(want, trained)

    assert kt.convert(model) is model
    assert type(model.first) is kt.LSTM and model.inner.rnn is model.first  # still shared
    assert type(model.inner.cell) is kt.GRUCell and type(model.inner.rnn_cell) is kt.RNNCell
    assert type(model.blocks[0]) is kt.RNN and type(model.blocks[1]) is kt.LSTMCell
    assert type(model.head) is nn.Linear
    assert not isinstance(model.first, nn.LSTM)
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameters
    assert not model.blocks[0].weight_hh_l0.requires_grad
    assert model.training and not model.inner.cell.training
    got = model(x)
    got_grads = torch.autograd.grad(got, trained)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    assert kt.convert(model) is model  # twice: nothing left to convert


def test_convert_a_bare_module_and_a_subclass():
    m = nn.GRU(2, 3)
    assert kt.convert(m) is m and type(m) is kt.GRU

    class MyLSTM(nn.LSTM):
        pass

    holder = nn.Sequential(MyLSTM(2, 3))
    with pytest.warns(UserWarning, match="left 0 \\(.*MyLSTM\\).*subclasses"):
        kt.convert(holder)
    assert type(holder[0]) is MyLSTM
    with pytest.raises(TypeError, match="convert\\(\\) takes an nn.Module"):
        kt.convert(nn.LSTM)


def test_convert_keeps_hooks():
    torch.manual_seed(0)
    m = nn.LSTM(2, 3, dtype=F64)
    calls = []
    handle = m.register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    m.register_forward_pre_hook(lambda mod, inp: (inp[0] * 2,))
    x = torch.randn(3, 1, 2, dtype=F64)
    want = m(x)[0]
    kt.convert(m)
    got = m(x)[0]
    torch.testing.assert_close(got, want)
    assert calls == [torch_rnn.LSTM, kt.LSTM]
    handle.remove()  # the handle still reaches the hook
    m(x)
    assert len(calls) == 2


class Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w


def test_convert_keeps_parametrisations():
    torch.manual_seed(0)
    m = nn.LSTM(2, 3, dtype=F64)
    parametrize.register_parametrization(m, "weight_hh_l0", Scale())
    x = torch.randn(3, 1, 2, dtype=F64)
    original = m.parametrizations.weight_hh_l0.original
    want = m(x)[0]
    (want_grad,) = torch.autograd.grad(want.sum(), original)
    kt.convert(m)
    assert parametrize.is_parametrized(m, "weight_hh_l0")
    assert parametrize.type_before_parametrizations(m) is kt.LSTM
    got = m(x)[0]
    (got_grad,) = torch.autograd.grad(got.sum(), original)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    parametrize.remove_parametrizations(m, "weight_hh_l0")
    assert type(m) is kt.LSTM


def test_parametrize_works_on_recurrent():
    torch.manual_seed(0)
    m = kt.Recurrent("gru", 2, 3, dtype=F64)
    plain = kt.Recurrent("gru", 2, 3, dtype=F64)
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        plain.weight_hh_l0.mul_(0.5)
    parametrize.register_parametrization(m, "weight_hh_l0", Scale())
    x = torch.randn(3, 2, 2, dtype=F64)
    y = m(x)[0]
    torch.testing.assert_close(y, plain(x)[0])
    original = m.parametrizations.weight_hh_l0.original
    (g,) = torch.autograd.grad(y.sum(), original)
    (g_plain,) = torch.autograd.grad(plain(x)[0].sum(), plain.weight_hh_l0)
    torch.testing.assert_close(g, 0.5 * g_plain)  # the chain rule through the parametrisation


# -- fallback ------------------------------------------------------------------------------


def _fallbacks(w):
    return [str(m.message) for m in w if issubclass(m.category, kt.FallbackWarning)]


def test_bfloat16_model_falls_back_with_one_warning():
    torch.manual_seed(0)
    ref = nn.LSTM(2, 3, dtype=torch.bfloat16)
    ours = kt.convert(nn.LSTM(2, 3, dtype=torch.bfloat16))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 1, 2, dtype=torch.bfloat16)
    kt.modules._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ys = [ours(x)[0] for _ in range(3)]
    assert len(_fallbacks(w)) == 1
    assert torch.equal(ys[0], ref(x)[0])


def test_autocast_falls_back():
    m = kt.LSTM(2, 3)
    lin = nn.Linear(2, 2)
    kt.modules._warned.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y, _ = m(lin(torch.randn(4, 1, 2)))  # bfloat16 input, float32 weights: PyTorch casts
    assert y.dtype == torch.bfloat16
    assert any("autocast is enabled for cpu" in s for s in _fallbacks(w))


def test_non_finite_input_falls_back_and_propagates_nan():
    torch.manual_seed(0)
    ref = nn.GRU(2, 3, dtype=F64)
    ours = kt.GRU(2, 3, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 2, dtype=F64)
    x[1, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kt.FallbackWarning)
        y, _ = ours(x)
    torch.testing.assert_close(y, ref(x)[0], equal_nan=True)
    assert y[1:, 0].isnan().all() and not y[:, 1].isnan().any()


def test_torch_func_transforms_fall_back_or_refuse():
    torch.manual_seed(0)
    ref = nn.LSTM(2, 3, dtype=F64)
    ours = kt.LSTM(2, 3, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    x, t = torch.randn(4, 1, 2, dtype=F64), torch.randn(4, 1, 2, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kt.FallbackWarning)
        _, got = torch.func.jvp(lambda z: ours(z)[0], (x,), (t,))  # was silently zero
        (g,) = torch.func.grad(lambda z: ours(z)[0].sum(), argnums=(0,))(x)
        with pytest.raises(RuntimeError, match="Batching rule not implemented for aten::lstm"):
            torch.func.vmap(lambda z: ours(z)[0], in_dims=1)(x)  # PyTorch's own limit
    _, want = torch.func.jvp(lambda z: ref(z)[0], (x,), (t,))
    torch.testing.assert_close(got, want)
    assert want.abs().max() > 0
    torch.testing.assert_close(g, torch.func.grad(lambda z: ref(z)[0].sum())(x))
    gen = kt.Recurrent("lstm", 2, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="torch.func transforms.*no PyTorch implementation"):
        torch.func.jvp(lambda z: gen(z)[0], (x,), (t,))


def test_unsupported_device_falls_back():
    m = kt.GRU(2, 3).to("meta")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        kt.modules._warned.clear()
        y, h = m(torch.randn(4, 1, 2, device="meta"))
    assert y.device.type == "meta" and y.shape == (4, 1, 3)
    assert any("device type 'meta'" in s for s in _fallbacks(w))


def test_fallback_warning_can_be_an_error():
    m = kt.RNNCell(2, 3, dtype=torch.float16)
    kt.modules._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kt.FallbackWarning)
        with pytest.raises(kt.FallbackWarning, match="float16"):
            m(torch.randn(2, 2, dtype=torch.float16))


def test_cuda_without_kernrnns_backend_is_a_fallback(monkeypatch):
    """CUDA tensors where kernrnn's CUDA backend cannot run (no CuPy or numba-cuda): the
    check, on stand-ins for CUDA tensors (this test needs no GPU)."""
    from types import SimpleNamespace

    cuda = torch.device("cuda")
    x = SimpleNamespace(is_cpu=False, is_cuda=True, dtype=torch.float32, device=cuda)
    params = [SimpleNamespace(dtype=torch.float32, device=cuda)]
    monkeypatch.setattr(kt.modules, "_autocast_on", lambda device_type: False)
    monkeypatch.setattr(kt.modules, "_cuda_checked", ["CUDA tensors need kernrnn's CUDA backend "
                                                      "(device='cuda' needs CuPy)"])
    assert "needs CuPy" in kt.modules.unsupported(x, params)
    monkeypatch.setattr(kt.modules, "_cuda_checked", [None])  # the backend runs: no fallback
    assert kt.modules.unsupported(x, params) is None
    cpu_params = [SimpleNamespace(dtype=torch.float32, device=torch.device("cpu"))]
    assert kt.modules.unsupported(x, cpu_params) is None  # mixed devices: the usual error
