"""Synthetic long-memory tasks: the adding problem and copy memory.

* :class:`AddingTask`: the adding problem (Hochreiter & Schmidhuber 1997);
  baseline: always predict 1 (MSE 1/6).
* :class:`CopyTask`: copy memory (Arjovsky et al. 2016); baseline: the
  memoryless strategy (blanks, then uniform guesses).

Fresh samples every epoch, a fixed held-out set from its own seed.
"""

from __future__ import annotations

import math

import numpy as np

from kernrnn import _checks
from kernrnn.train.dataio import EpochData

__all__ = ["AddingTask", "CopyTask"]


class _SyntheticTask:
    """Fresh samples every epoch; a fixed held-out set from its own seed."""

    def __init__(self, seq_len, steps_per_epoch=50, test_size=1000, data_seed=12345):
        self.seq_len = _checks.positive_int(seq_len, "seq_len", 2)
        self._steps = _checks.positive_int(steps_per_epoch, "steps_per_epoch", 1)
        self.test_size = _checks.positive_int(test_size, "test_size", 1)
        self.data_seed = _checks.positive_int(data_seed, "data_seed", 0)
        self._eval = None

    def steps_per_epoch(self, batch_size: int) -> int:
        return self._steps

    def epoch(self, rng, batch_size, dtype=np.float32) -> EpochData:
        return self.sample(rng, self._steps * batch_size, dtype)

    def eval_data(self, dtype=np.float32) -> EpochData:
        if self._eval is None or self._eval[0] != np.dtype(dtype):
            rng = np.random.default_rng([self.data_seed, 7])
            self._eval = (np.dtype(dtype), self.sample(rng, self.test_size, dtype))
        return self._eval[1]


class AddingTask(_SyntheticTask):
    """The adding problem: sum the two marked values of a long sequence.

    Input ``[T, N, 2]``: a value uniform in [0, 1) and a marker; one marker in
    the first half, one in the second.  Target: the sum of the two marked
    values, read out after the last step (sequence-to-one, MSE).  Predicting
    1 always gives MSE 1/6 = 0.167, the trivial baseline.  With
    ``vary_lengths`` each sequence has its own length in [T/2, T].
    """

    name = "adding"
    loss = "mse"
    head = "last"
    input_size = 2
    vocab_size = None
    output_size = 1

    def __init__(self, seq_len=100, steps_per_epoch=50, test_size=1000, data_seed=12345,
                 vary_lengths=False):
        super().__init__(seq_len, steps_per_epoch, test_size, data_seed)
        self.vary_lengths = bool(vary_lengths)

    def sample(self, rng, n, dtype=np.float32) -> EpochData:
        T = self.seq_len
        if self.vary_lengths:
            lengths = rng.integers(max(2, T // 2), T + 1, size=n)
        else:
            lengths = np.full(n, T, dtype=np.int64)
        x = np.zeros((T, n, 2))
        x[:, :, 0] = rng.random((T, n))
        half = lengths // 2
        first = (rng.random(n) * half).astype(np.int64)
        second = half + (rng.random(n) * (lengths - half)).astype(np.int64)
        cols = np.arange(n)
        x[first, cols, 1] = 1.0
        x[second, cols, 1] = 1.0
        x[np.arange(T)[:, None] >= lengths[None, :]] = 0.0
        y = (x[first, cols, 0] + x[second, cols, 0])[:, None]
        return EpochData(x.astype(dtype), y.astype(dtype), lengths.astype(np.int64))

    def describe(self) -> str:
        vary = " (variable lengths)" if self.vary_lengths else ""
        return (f"adding problem: T={self.seq_len}{vary}, "
                f"{self._steps} fresh batches per epoch, {self.test_size} held-out sequences")

    def evaluate(self, outputs) -> dict:
        y = self.eval_data(outputs.dtype).y.astype(np.float64)
        mse = float(np.mean((outputs.astype(np.float64) - y) ** 2))
        base = float(np.mean((1.0 - y) ** 2))
        return {"loss": mse, "metric": "MSE", "model": mse, "baseline": base,
                "baseline_name": "always 1 (trivial)", "lower_is_better": True,
                "n": int(y.shape[0])}

    def config(self) -> dict:
        return {"task": self.name, "seq_len": self.seq_len, "steps_per_epoch": self._steps,
                "test_size": self.test_size, "data_seed": self.data_seed,
                "vary_lengths": self.vary_lengths}


class CopyTask(_SyntheticTask):
    """Copy memory: reproduce 10 symbols after ``seq_len`` blank steps.

    Tokens: 0 blank, 1..8 symbols, 9 the delimiter.  Input: 10 symbols,
    ``seq_len - 1`` blanks, the delimiter, 10 blanks (length ``seq_len + 20``).
    Target: blanks, then the 10 symbols in the last 10 steps.  The memoryless
    baseline predicts blanks and then guesses uniformly: cross-entropy
    ``10 ln 8 / (seq_len + 20)``.
    """

    name = "copy"
    loss = "ce"
    head = "seq"
    input_size = None
    vocab_size = 10
    output_size = 9
    n_copy = 10

    def __init__(self, seq_len=100, steps_per_epoch=50, test_size=500, data_seed=12345):
        super().__init__(seq_len, steps_per_epoch, test_size, data_seed)

    def sample(self, rng, n, dtype=np.float32) -> EpochData:
        K, Tb = self.n_copy, self.seq_len
        T = Tb + 2 * K
        sym = rng.integers(1, 9, size=(K, n))
        x = np.zeros((T, n), dtype=np.int32)
        y = np.zeros((T, n), dtype=np.int32)
        x[:K] = sym
        x[K + Tb - 1] = 9
        y[T - K:] = sym
        return EpochData(x, y, np.full(n, T, dtype=np.int64))

    def describe(self) -> str:
        return (f"copy memory: {self.n_copy} symbols after {self.seq_len} blanks, "
                f"{self._steps} fresh batches per epoch, {self.test_size} held-out sequences")

    def evaluate(self, outputs) -> dict:
        d = self.eval_data()
        logits = outputs.astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll = -np.take_along_axis(logp, d.y[..., None].astype(np.int64), axis=-1)[..., 0]
        T = d.y.shape[0]
        acc = float((outputs[T - self.n_copy:].argmax(-1) == d.y[T - self.n_copy:]).mean())
        base = self.n_copy * math.log(8) / T
        return {"loss": float(nll.mean()), "metric": "cross-entropy", "model": float(nll.mean()),
                "baseline": base, "baseline_name": "memoryless (blanks, then uniform)",
                "lower_is_better": True, "copy_accuracy": acc, "baseline_copy_accuracy": 1 / 8,
                "n": int(d.size)}

    def config(self) -> dict:
        return {"task": self.name, "seq_len": self.seq_len, "steps_per_epoch": self._steps,
                "test_size": self.test_size, "data_seed": self.data_seed}
