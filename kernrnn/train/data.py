"""Training tasks: data, the held-out set, the naive baseline and metrics.

A task produces one epoch of training examples at a time (already shuffled,
drawn from a generator the trainer owns, so a checkpoint can rebuild the epoch
exactly) and a fixed held-out set.  Arrays are time-major host arrays:

* ``x``: ``[T, N, I]`` floats, or ``[T, N]`` int32 token ids;
* ``y``: ``[T, N, O]`` floats / ``[T, N]`` ids (sequence-to-sequence) or
  ``[N, O]`` floats (sequence-to-one);
* ``lengths``: int64 ``[N]``; steps past a sequence's length are padding.

Tasks, each defined in its own module and re-exported here:

* :class:`~kernrnn.train.forecast.ForecastTask`: one-step-ahead forecasting of a univariate series
  (the embedded yearly sunspot numbers, or a column of a CSV file); baseline:
  the last-value (persistence) forecast.
* :class:`~kernrnn.train.charlm.CharLMTask`: character-level language model of a text file;
  baseline: the unigram model of the training text.
* :class:`~kernrnn.train.synthetic.AddingTask`: the adding problem (Hochreiter & Schmidhuber 1997);
  baseline: always predict 1 (MSE 1/6).
* :class:`~kernrnn.train.synthetic.CopyTask`: copy memory (Arjovsky et al. 2016); baseline: the
  memoryless strategy (blanks, then uniform guesses).

This module picks and builds a task from options (:func:`make_task`) or from
a checkpoint (:func:`task_from_config`); reading files and CSV series is in
:mod:`kernrnn.train.dataio`.
"""

from __future__ import annotations

import os

from kernrnn.train.charlm import CharLMTask, _charlm_from_source
from kernrnn.train.dataio import EMBEDDED, EpochData, load_sunspots, read_csv_series
from kernrnn.train.forecast import ForecastTask, _forecast_from_source
from kernrnn.train.synthetic import AddingTask, CopyTask

__all__ = ["EpochData", "ForecastTask", "CharLMTask", "AddingTask", "CopyTask",
           "read_csv_series", "load_sunspots", "make_task", "task_from_config", "TASKS"]

TASKS = ("forecast", "charlm", "adding", "copy")


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
