"""kernrnn.torch modules shared by several threads give what sequential calls give.

Modules of one configuration share one native engine (kernrnn.torch._ops): its
calls take turns, and each call's forward context rides on its own handle, so
concurrent inference and concurrent autograd calls cannot mix their states.
"""

import sys
import threading

import pytest

torch = pytest.importorskip("torch")

import kernrnn.torch as kt  # noqa: E402

F64 = torch.float64


def _modules():
    torch.manual_seed(0)
    return {
        "lstm": kt.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64),
        "gru_generic": kt.Recurrent("gru", 3, 4, dtype=F64),
        "lstm_cell": kt.LSTMCell(3, 4, dtype=F64),
        "gru_cell": kt.GRUCell(3, 4, dtype=F64),
    }


def _inputs(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 2, 3, generator=g, dtype=F64) for _ in range(n)]


def _call(m, x):
    """The module's tensors for one input (a step of a cell on the first time step)."""
    out = m(x[0]) if isinstance(m, torch.nn.RNNCellBase) else m(x)
    flat = []
    for o in out if isinstance(out, tuple) else (out,):
        flat.extend(o if isinstance(o, tuple) else (o,))
    return flat


def _in_threads(work, n_threads):
    """Run ``work(k)`` for k < n_threads at once; re-raise the first error."""
    errors = []
    start = threading.Barrier(n_threads)

    def run(k):
        try:
            start.wait(30)
            work(k)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("name", ["lstm", "gru_generic", "lstm_cell", "gru_cell"])
def test_concurrent_inference_equals_sequential(name):
    m = _modules()[name].eval()
    xs = _inputs(12)
    with torch.no_grad():
        want = [_call(m, x) for x in xs]
    got = {}

    def work(k):
        with torch.no_grad():
            for j in range(k, len(xs), 4):
                got[j] = _call(m, xs[j])

    _in_threads(work, 4)
    for j, w in enumerate(want):
        for a, b in zip(got[j], w):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["lstm", "lstm_cell"])
def test_concurrent_training_calls_equal_sequential(name):
    """Forward and backward through autograd from several threads on one module: each
    call's gradients are those of the same call alone."""
    m = _modules()[name].train()
    params = list(m.parameters())
    xs = _inputs(8)

    def grads(x):
        x = x.clone().requires_grad_()
        loss = sum((t * t).sum() for t in _call(m, x))
        return torch.autograd.grad(loss, [x, *params])

    want = [grads(x) for x in xs]
    got = {}

    def work(k):
        for j in range(k, len(xs), 2):
            got[j] = grads(xs[j])

    _in_threads(work, 2)
    for j, w in enumerate(want):
        for a, b in zip(got[j], w):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
