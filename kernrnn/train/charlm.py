"""Character-level language model of a text file (:class:`CharLMTask`).

The baseline is the unigram model of the training text.
"""

from __future__ import annotations

import math
import os

import numpy as np

from kernrnn import _checks
from kernrnn.train.dataio import EpochData, _check_sha, _fraction, _read_bytes, _sha256

__all__ = ["CharLMTask"]


class CharLMTask:
    """Next-character prediction on a text file (cross-entropy, token input).

    The first ``1 - test_fraction`` of the text trains, the rest is held out.
    An epoch draws up to ``max_windows`` windows at random offsets; the
    held-out text is cut into consecutive windows.  Metric: bits per character
    against the unigram model of the training text (add-one smoothed).
    """

    name = "charlm"
    loss = "ce"
    head = "seq"
    input_size = None

    def __init__(self, text: str, seq_len=100, test_fraction=0.1, source="<text>",
                 sha256=None, vocab=None, max_windows=2048, max_eval_windows=128):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        self.seq_len = _checks.positive_int(seq_len, "seq_len", 2)
        self.test_fraction = _fraction(test_fraction, "test_fraction")
        self.max_windows = _checks.positive_int(max_windows, "max_windows", 1)
        self.max_eval_windows = _checks.positive_int(max_eval_windows, "max_eval_windows", 1)
        if not text:
            raise ValueError(f"text file {source!r} is empty")
        n = len(text)
        n_test = max(2, int(round(n * self.test_fraction)))
        n_train = n - n_test
        need = self.seq_len + 1
        if n_train < need:
            raise ValueError(
                f"text file {source!r} has {n} characters: too short for windows of "
                f"seq_len={self.seq_len} (the training part needs at least {need} characters "
                f"and {self.test_fraction:.0%} are held out); use a longer text or a smaller "
                f"--seq-len"
            )
        chars = sorted(set(text)) if vocab is None else list(vocab)
        if len(chars) < 2:
            raise ValueError(f"text file {source!r} uses {len(chars)} distinct character(s); "
                             "a language model needs at least 2")
        index = {c: i for i, c in enumerate(chars)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"text has characters outside the vocabulary: {unknown[:10]}")
        self.vocab = chars
        self.vocab_size = self.output_size = len(chars)
        self._index = index
        self.ids = np.fromiter((index[c] for c in text), dtype=np.int32, count=n)
        self.n_train, self.n_test = n_train, n_test
        self.source, self.sha256 = source, sha256
        counts = np.bincount(self.ids[:n_train], minlength=len(chars)) + 1.0
        self.unigram = counts / counts.sum()
        self._eval = self._eval_windows()

    def encode(self, s: str) -> np.ndarray:
        bad = sorted(set(s) - set(self._index))
        if bad:
            raise ValueError(f"characters not in the model's vocabulary: {bad[:10]}")
        return np.array([self._index[c] for c in s], dtype=np.int32)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def describe(self) -> str:
        return (f"charlm: {self.source}, {self.n_train} characters for training, {self.n_test} "
                f"held out, vocabulary {self.vocab_size}; windows of {self.seq_len}")

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self._n_windows() / batch_size)

    def _n_windows(self) -> int:
        return max(1, min(self.max_windows, (self.n_train - 1) // self.seq_len))

    def epoch(self, rng, batch_size, dtype=np.float32) -> EpochData:
        T, N = self.seq_len, self._n_windows()
        starts = rng.integers(0, self.n_train - T, size=N)  # last target index < n_train
        idx = starts[None, :] + np.arange(T)[:, None]
        return EpochData(self.ids[idx], self.ids[idx + 1], np.full(N, T, dtype=np.int64))

    def _eval_windows(self) -> EpochData:
        test = self.ids[self.n_train - 1:]  # first input is the last training character
        T = self.seq_len
        n_pred = test.shape[0] - 1
        N = min(self.max_eval_windows, math.ceil(n_pred / T))
        x = np.zeros((T, N), dtype=np.int32)
        y = np.zeros((T, N), dtype=np.int32)
        lengths = np.empty(N, dtype=np.int64)
        for i in range(N):
            a = i * T
            L = min(T, n_pred - a)
            x[:L, i] = test[a:a + L]
            y[:L, i] = test[a + 1:a + 1 + L]
            lengths[i] = L
        return EpochData(x, y, lengths)

    def eval_data(self, dtype=np.float32) -> EpochData:
        return self._eval

    def evaluate(self, outputs) -> dict:
        d = self._eval
        T = outputs.shape[0]
        mask = np.arange(T)[:, None] < d.lengths[None, :]
        logits = outputs.astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll = -np.take_along_axis(logp, d.y[..., None].astype(np.int64), axis=-1)[..., 0]
        ce = float(nll[mask].mean())
        base = float(-np.log(self.unigram[d.y[mask]]).mean())
        return {
            "loss": ce, "metric": "bits/char", "model": ce / math.log(2),
            "baseline": base / math.log(2), "baseline_name": "unigram model",
            "lower_is_better": True, "n": int(mask.sum()),
        }

    def config(self) -> dict:
        return {"task": self.name, "source": self.source, "sha256": self.sha256,
                "seq_len": self.seq_len, "test_fraction": self.test_fraction,
                "vocab": self.vocab, "max_windows": self.max_windows,
                "max_eval_windows": self.max_eval_windows}


def _charlm_from_source(source, seq_len=100, test_fraction=0.1, expect_sha=None, vocab=None,
                        **kw):
    if source is None:
        raise ValueError("task 'charlm' needs a text file: pass --data FILE")
    raw = _read_bytes(source)
    source = os.path.abspath(source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {source!r} is not UTF-8 ({e})") from None
    sha = _sha256(raw)
    _check_sha(source, sha, expect_sha)
    return CharLMTask(text, seq_len, test_fraction, source=source, sha256=sha, vocab=vocab, **kw)
