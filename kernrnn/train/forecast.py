"""One-step-ahead forecasting of a univariate series (:class:`ForecastTask`).

The series is the embedded yearly sunspot numbers or a column of a CSV file;
the baseline is the last-value (persistence) forecast.
"""

from __future__ import annotations

import math
import os

import numpy as np

from kernrnn import _checks
from kernrnn.train.dataio import (
    EMBEDDED,
    EpochData,
    _check_sha,
    _fraction,
    _read_bytes,
    _sha256,
    load_sunspots,
    read_csv_series,
)

__all__ = ["ForecastTask"]


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
