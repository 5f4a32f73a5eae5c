"""Training tasks: data, the held-out set, the naive baseline and metrics.

A task produces one epoch of training examples at a time (already shuffled,
drawn from a generator the trainer owns, so a checkpoint can rebuild the epoch
exactly) and a fixed held-out set.  Arrays are time-major host arrays:

* ``x``: ``[T, N, I]`` floats, or ``[T, N]`` int32 token ids;
* ``y``: ``[T, N, O]`` floats / ``[T, N]`` ids (sequence-to-sequence) or
  ``[N, O]`` floats (sequence-to-one);
* ``lengths``: int64 ``[N]``; steps past a sequence's length are padding.

Tasks:

* :class:`ForecastTask`: one-step-ahead forecasting of a univariate series
  (the embedded yearly sunspot numbers, or a column of a CSV file); baseline:
  the last-value (persistence) forecast.
* :class:`CharLMTask`: character-level language model of a text file;
  baseline: the unigram model of the training text.
* :class:`AddingTask`: the adding problem (Hochreiter & Schmidhuber 1997);
  baseline: always predict 1 (MSE 1/6).
* :class:`CopyTask`: copy memory (Arjovsky et al. 2016); baseline: the
  memoryless strategy (blanks, then uniform guesses).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import stat
from dataclasses import dataclass
from importlib import resources

import numpy as np

from kernrnn import _checks

__all__ = ["EpochData", "ForecastTask", "CharLMTask", "AddingTask", "CopyTask",
           "read_csv_series", "load_sunspots", "make_task", "task_from_config", "TASKS"]

TASKS = ("forecast", "charlm", "adding", "copy")
EMBEDDED = "sunspots"


@dataclass
class EpochData:
    x: np.ndarray
    y: np.ndarray
    lengths: np.ndarray

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])


def _fraction(value, name):
    v = float(value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return v


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path) -> bytes:
    """The bytes of a regular file; a FIFO, device or socket is refused before it is opened.

    (Opening a FIFO blocks until someone writes to it: the run would hang.)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"data file {path!r} is a directory, expected a file")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"data file {path!r} is not a regular file (a FIFO, device or "
                         f"socket), expected a file")
    with open(path, "rb") as f:
        return f.read()


# -- CSV time series ----------------------------------------------------------


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_csv_series(text: str, column=None, name="CSV data"):
    """Parse a numeric column out of CSV text.

    The first non-empty row is a header when any of its fields is not a number.
    ``column`` is a header name or a 0-based index (default: the last column).
    Returns ``(values float64 [N], labels list[str] | None, column_name)``;
    ``labels`` is the first column when it is not the value column (years,
    dates), used to label forecasts.  Every problem names the line.
    """
    rows = []
    reader = csv.reader(io.StringIO(text))
    try:
        for row in reader:
            if not row or all(not f.strip() for f in row) or row[0].lstrip().startswith("#"):
                continue
            rows.append((reader.line_num, [f.strip() for f in row]))
    except csv.Error as e:  # e.g. a field over csv.field_size_limit(), an unclosed quote
        raise ValueError(f"{name} line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise ValueError(f"{name} has no data rows (empty file?)")
    header = None
    if not all(_is_number(f) for f in rows[0][1]):
        header = rows[0][1]
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{name} has a header line but no data rows")
    width = len(header) if header is not None else len(rows[0][1])
    for lineno, row in rows:
        if len(row) != width:
            raise ValueError(
                f"{name} line {lineno}: expected {width} comma-separated fields "
                f"(as the {'header' if header else 'first row'}), got {len(row)}"
            )
    if column is None:
        col = width - 1
    elif isinstance(column, str) and not column.lstrip("-").isdigit():
        if header is None or column not in header:
            raise ValueError(
                f"{name}: no column named {column!r}; "
                + (f"columns are {header}" if header else "the file has no header line")
            )
        col = header.index(column)
    else:
        col = int(column)
        if not 0 <= col < width:
            raise ValueError(f"{name}: column index must lie in [0, {width}), got {col}")
    values = np.empty(len(rows))
    for i, (lineno, row) in enumerate(rows):
        field = row[col]
        try:
            v = float(field)
        except ValueError:
            raise ValueError(
                f"{name} line {lineno}, column {col}: {field!r} is not a number"
            ) from None
        if not math.isfinite(v):
            raise ValueError(f"{name} line {lineno}, column {col}: {field!r} is not finite")
        values[i] = v
    labels = [row[0] for _, row in rows] if col != 0 and width > 1 else None
    col_name = header[col] if header is not None else f"column {col}"
    return values, labels, col_name


def load_sunspots():
    """The embedded yearly sunspot series: ``(values, years, column, sha256)``."""
    data = resources.files("kernrnn.train").joinpath("datasets", "sunspots.csv").read_bytes()
    values, labels, col = read_csv_series(data.decode("utf-8"), name="sunspots.csv")
    return values, labels, col, _sha256(data)


# -- forecasting --------------------------------------------------------------


class ForecastTask:
    """One-step-ahead forecast of a series, trained sequence-to-sequence.

    Training examples are the windows of up to ``seq_len`` steps ending at
    every point of the training part (those near the start are shorter, so
    batches have variable lengths); inputs and targets are standardised with
    the training part's mean and standard deviation.  The held-out part is the
    last ``test_fraction`` of the series; each held-out value is forecast from
    the ``seq_len`` values before it, as the persistence baseline
    (``x_hat_t = x_{t-1}``) is.
    """

    name = "forecast"
    loss = "mse"
    head = "seq"
    input_size = 1
    vocab_size = None
    output_size = 1

    def __init__(self, values, seq_len=20, test_fraction=0.2, source=EMBEDDED, column=None,
                 labels=None, sha256=None, column_arg=None, mean=None, std=None):
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"series must be 1-D, got shape {list(values.shape)}")
        self.seq_len = _checks.positive_int(seq_len, "seq_len", 2)
        self.test_fraction = _fraction(test_fraction, "test_fraction")
        n = values.shape[0]
        n_test = max(1, int(round(n * self.test_fraction)))
        n_train = n - n_test
        if n_train < 4:
            raise ValueError(
                f"series from {source} has {n} values: too few to hold out "
                f"{self.test_fraction:.0%} and train on the rest (need at least "
                f"{math.ceil(4 / (1 - self.test_fraction)) + 1})"
            )
        train = values[:n_train]
        if std is None:
            with np.errstate(over="ignore", invalid="ignore"):
                std = float(train.std())
                mean = float(train.mean())
        if not (math.isfinite(mean) and math.isfinite(std)):
            raise ValueError(
                f"series from {source}: its mean ({mean}) or standard deviation ({std}) "
                f"overflows float64 (values up to {np.max(np.abs(train)):.3g}); rescale the data")
        if not std > 0:
            raise ValueError(
                f"series from {source}: the training part is constant, nothing to learn")
        self.values, self.labels = values, labels
        self.n_train, self.n_test = n_train, n_test
        self.mean, self.std = float(mean), float(std)
        self.source, self.column, self.sha256 = source, column, sha256
        self.column_arg = column_arg
        with np.errstate(over="ignore", invalid="ignore"):
            self.z = ((values - self.mean) / self.std).astype(np.float64)
        if not np.isfinite(self.z).all():
            raise ValueError(f"series from {source}: standardising with mean {self.mean:.6g} "
                             f"and std {self.std:.6g} overflows float64; rescale the data")
        self._train = self._windows(range(1, n_train), with_targets=True)
        self._eval = self._windows(range(n_train, n), with_targets=False)

    def _windows(self, ends, with_targets):
        """Windows of inputs ``z[a:e]`` (targets ``z[a+1:e+1]``), left-aligned, zero-padded."""
        ends = list(ends)
        W = self.seq_len
        x = np.zeros((W, len(ends), 1))
        y = np.zeros((W, len(ends), 1))
        lengths = np.empty(len(ends), dtype=np.int64)
        for i, e in enumerate(ends):
            a = max(0, e - W)
            L = e - a
            x[:L, i, 0] = self.z[a:e]
            if with_targets:
                y[:L, i, 0] = self.z[a + 1:e + 1]
            else:
                y[L - 1, i, 0] = self.z[e]
            lengths[i] = L
        return EpochData(x, y, lengths)

    def describe(self) -> str:
        src = self.source
        if src == EMBEDDED:
            src = "embedded yearly sunspot numbers 1700-2008"
        return (f"forecast: {src} ({self.column}), {self.n_train} values for training, "
                f"{self.n_test} held out; windows of {self.seq_len} steps")

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self._train.size / batch_size)

    def epoch(self, rng, batch_size, dtype=np.float32) -> EpochData:
        perm = rng.permutation(self._train.size)
        d = self._train
        return EpochData(d.x[:, perm].astype(dtype), d.y[:, perm].astype(dtype), d.lengths[perm])

    def eval_data(self, dtype=np.float32) -> EpochData:
        d = self._eval
        return EpochData(d.x.astype(dtype), d.y.astype(dtype), d.lengths)

    def forecasts(self, outputs) -> np.ndarray:
        """Standardised model outputs ``[T, N, 1]`` -> forecasts in data units ``[N]``."""
        d = self._eval
        z = outputs[d.lengths - 1, np.arange(d.size), 0].astype(np.float64)
        return z * self.std + self.mean

    def evaluate(self, outputs) -> dict:
        """Held-out metrics from the model's outputs on ``eval_data()``."""
        pred = self.forecasts(outputs)
        truth = self.values[self.n_train:]
        naive = self.values[self.n_train - 1:-1]
        rmse = float(np.sqrt(np.mean((pred - truth) ** 2)))
        base = float(np.sqrt(np.mean((naive - truth) ** 2)))
        return {
            "loss": float(np.mean(((pred - truth) / self.std) ** 2)),
            "metric": "RMSE", "model": rmse, "baseline": base,
            "baseline_name": "last-value forecast", "lower_is_better": True,
            "mae": float(np.mean(np.abs(pred - truth))),
            "baseline_mae": float(np.mean(np.abs(naive - truth))),
            "n": int(truth.shape[0]),
        }

    def config(self) -> dict:
        return {"task": self.name, "source": self.source, "column": self.column_arg,
                "column_name": self.column, "sha256": self.sha256, "seq_len": self.seq_len,
                "test_fraction": self.test_fraction, "mean": self.mean, "std": self.std}


def _forecast_from_source(source, column=None, seq_len=20, test_fraction=0.2, expect_sha=None,
                          mean=None, std=None):
    if source in (None, EMBEDDED):
        if column is not None:
            raise ValueError("column applies to a CSV file given with data, not the embedded data")
        values, labels, col, sha = load_sunspots()
        source = EMBEDDED
    else:
        raw = _read_bytes(source)
        source = os.path.abspath(source)  # a resumed run may start in another directory
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"CSV file {source!r} is not UTF-8 text ({e})") from None
        values, labels, col = read_csv_series(text, column, name=f"CSV file {source!r}")
        sha = _sha256(raw)
    _check_sha(source, sha, expect_sha)
    return ForecastTask(values, seq_len, test_fraction, source=source, column=col,
                        labels=labels, sha256=sha, column_arg=column, mean=mean, std=std)


def _check_sha(source, sha, expect_sha):
    if expect_sha is not None and sha != expect_sha:
        raise ValueError(
            f"data {source!r} has changed since the checkpoint was written "
            f"(sha256 {sha[:12]}..., checkpoint has {expect_sha[:12]}...)"
        )


# -- character-level language model -------------------------------------------


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


# -- synthetic long-memory tasks ------------------------------------------------


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


# -- construction -----------------------------------------------------------------

DEFAULT_SEQ_LEN = {"forecast": 20, "charlm": 100, "adding": 100, "copy": 100}


def make_task(task=None, data=None, seq_len=None, column=None, steps_per_epoch=None,
              vary_lengths=False):
    """Build a task from command-line style arguments.

    ``task`` None picks ``forecast`` for no data or a ``.csv`` file, ``charlm``
    for any other file.
    """
    if task is None:
        if data is None or os.fspath(data).lower().endswith(".csv"):
            task = "forecast"
        else:
            task = "charlm"
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    seq_len = DEFAULT_SEQ_LEN[task] if seq_len is None else seq_len
    if task in ("adding", "copy") and data is not None:
        raise ValueError(f"task {task!r} is synthetic and takes no --data, got {data!r}")
    if task != "forecast" and column is not None:
        raise ValueError("--column applies to task 'forecast' (CSV data) only")
    if task not in ("adding", "copy") and steps_per_epoch is not None:
        raise ValueError("--steps-per-epoch applies to the synthetic tasks (adding, copy) only")
    if vary_lengths and task != "adding":
        raise ValueError("--vary-lengths applies to task 'adding' only")
    if task == "forecast":
        return _forecast_from_source(data, column, seq_len)
    if task == "charlm":
        return _charlm_from_source(data, seq_len)
    steps = 50 if steps_per_epoch is None else steps_per_epoch
    if task == "adding":
        return AddingTask(seq_len, steps, vary_lengths=vary_lengths)
    return CopyTask(seq_len, steps)


def task_from_config(cfg: dict, data=None):
    """Rebuild a task from ``config()`` (a checkpoint); ``data`` overrides the source path.

    The data file's SHA-256 must match the recorded one unless ``data`` is given.
    """
    name = cfg.get("task")
    try:
        return _task_from_config(name, cfg, data)
    except KeyError as e:
        raise ValueError(f"task config ({name!r}) lacks key {e.args[0]!r}") from None


def _task_from_config(name, cfg, data):
    if name == "forecast":
        src = cfg["source"] if data is None else data
        col = cfg.get("column") if src != EMBEDDED else None
        # The model learned on data standardised with the training run's statistics.
        return _forecast_from_source(src, col, cfg["seq_len"], cfg["test_fraction"],
                                     expect_sha=cfg.get("sha256") if data is None else None,
                                     mean=cfg["mean"], std=cfg["std"])
    if name == "charlm":
        src = cfg["source"] if data is None else data
        return _charlm_from_source(src, cfg["seq_len"], cfg["test_fraction"],
                                   expect_sha=cfg.get("sha256") if data is None else None,
                                   vocab=cfg.get("vocab"), max_windows=cfg["max_windows"],
                                   max_eval_windows=cfg["max_eval_windows"])
    if name == "adding":
        return AddingTask(cfg["seq_len"], cfg["steps_per_epoch"], cfg["test_size"],
                          cfg["data_seed"], cfg.get("vary_lengths", False))
    if name == "copy":
        return CopyTask(cfg["seq_len"], cfg["steps_per_epoch"], cfg["test_size"], cfg["data_seed"])
    raise ValueError(f"unknown task {name!r} in checkpoint (known: {list(TASKS)})")
