"""Training on ``device="cuda"`` under the CUDA simulator agrees with the CPU.

Run by ``tests/test_cuda_sim.py`` in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``.
NumPy stands in for CuPy, so this checks that the training loop drives the
CUDA backend correctly (state carried between TBPTT chunks, variable lengths,
embedding, both heads, the CLI's ``--device cuda``), not CuPy specifics.
"""

import numpy as np
import pytest

from kernrnn.backends import cuda as cb

if not cb.SIMULATOR:
    pytest.skip("simulator tests: run through tests/test_cuda_sim.py (sets NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from kernrnn.train import Adam, SequenceModel, train_batch  # noqa: E402


@pytest.mark.parametrize("cell,tokens,head,tbptt", [
    ("lstm", False, "seq", 2),
    ("gru", True, "seq", 0),
    ("rnn", False, "last", 3),
])
def test_train_batch_matches_cpu(cell, tokens, head, tbptt):
    rng = np.random.default_rng(0)
    T, B = 5, 2
    kw = dict(vocab_size=4) if tokens else dict(input_size=2)
    O = 4 if tokens else 2
    if tokens:
        x = rng.integers(0, 4, size=(T, B)).astype(np.int32)
        y = rng.integers(0, 4, size=(T, B)).astype(np.int32)
    else:
        x = rng.normal(size=(T, B, 2)).astype(np.float64)
        y = rng.normal(size=(T, B, O) if head == "seq" else (B, O))
    lengths = np.array([5, 3])
    out = []
    for device in ("cpu", "cuda"):
        m = SequenceModel(cell, hidden_size=3, output_size=O, head=head, dtype=np.float64,
                          device=device, seed=1, **kw)
        res = train_batch(m, "ce" if tokens else "mse", Adam(lr=0.01), x, y, lengths,
                          tbptt=tbptt, clip=1.0)
        out.append((float(res.loss), float(res.grad_norm), m.state_dict()))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-10)
    assert out[1][1] == pytest.approx(out[0][1], rel=1e-10)
    for k in out[0][2]:
        np.testing.assert_allclose(out[1][2][k], out[0][2][k], rtol=1e-9, atol=1e-12)


def test_cli_device_cuda(tmp_path, capsys):
    from kernrnn.cli import main

    rc = main(["train", "--task", "adding", "--seq-len", "4", "--steps-per-epoch", "1",
               "--epochs", "1", "--batch-size", "2", "--hidden", "2", "--device", "cuda",
               "--no-progress", "--no-plot", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "device cuda" in err and "held-out MSE" in out
