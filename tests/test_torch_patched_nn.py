"""The drop-ins survive a script that replaces ``torch.nn.LSTM``/``GRU``/``RNN`` by them.

A script one does not own is usually switched over with ``torch.nn.LSTM =
kernrnn.torch.LSTM`` before it builds its model.  The drop-ins must then never
look PyTorch's classes up through ``torch.nn`` (that lookup finds themselves and
recursed without end whenever an initial state was passed).
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.modules import rnn as torch_rnn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import kernrnn.torch as kt  # noqa: E402

F64 = torch.float64
SWAPS = {"LSTM": kt.LSTM, "GRU": kt.GRU, "RNN": kt.RNN}


class Script(nn.Module):
    """A model as a script writes it: the class is looked up in ``torch.nn`` when built."""

    def __init__(self, kind, I, H, L):
        super().__init__()
        self.rnn = getattr(nn, kind)(I, H, num_layers=L, batch_first=True, dtype=F64)

    def forward(self, x, hx, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, hn = self.rnn(packed, hx)
        y, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return y, hn


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(sorted(SWAPS)), T=st.integers(1, 4), B=st.integers(1, 3),
       I=st.integers(1, 3), H=st.integers(1, 3), L=st.integers(1, 2),
       data=st.data())
def test_model_built_after_patching_torch_nn(kind, T, B, I, H, L, data):
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    seed = data.draw(st.integers(0, 2**31))
    originals = {k: getattr(nn, k) for k in SWAPS}
    try:
        for k, cls in SWAPS.items():
            setattr(nn, k, cls)
        torch.manual_seed(seed)
        model = Script(kind, I, H, L)
        assert isinstance(model.rnn, SWAPS[kind])
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(B, T, I, generator=g, dtype=F64, requires_grad=True)
        hx = [torch.rand(L, B, H, generator=g, dtype=F64, requires_grad=True)
              for _ in range(2 if kind == "LSTM" else 1)]
        state = tuple(hx) if kind == "LSTM" else hx[0]
        y, hn = model(x, state, lengths)
        hn_flat = hn if isinstance(hn, tuple) else (hn,)
        (y.sum() + sum(h.square().sum() for h in hn_flat)).backward()
    finally:
        for k, cls in originals.items():
            setattr(nn, k, cls)
    assert nn.LSTM is torch_rnn.LSTM and nn.GRU is torch_rnn.GRU and nn.RNN is torch_rnn.RNN

    # the same computation by PyTorch's own class, from the same weights
    ref = Script(kind, I, H, L)
    ref.load_state_dict(model.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    hx2 = [h.detach().clone().requires_grad_(True) for h in hx]
    y2, hn2 = ref(x2, tuple(hx2) if kind == "LSTM" else hx2[0], lengths)
    hn2_flat = hn2 if isinstance(hn2, tuple) else (hn2,)
    (y2.sum() + sum(h.square().sum() for h in hn2_flat)).backward()
    torch.testing.assert_close(y, y2)
    for a, b in zip(hn_flat, hn2_flat):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(x.grad, x2.grad)
    for a, b in zip(hx, hx2):
        torch.testing.assert_close(a.grad, b.grad)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=n: f"{n}: {m}")
