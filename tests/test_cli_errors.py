"""Every user error of the CLI is one ``error:`` line and a non-zero exit, never a traceback.

Each case checks the exit status, that stderr holds exactly one line naming
the problem, and (where it matters) that nothing was trained or allocated.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kernrnn.cli import main
from kernrnn.train import load_checkpoint, save_checkpoint

TINY = ["--hidden", "4", "--no-progress", "--no-plot", "--threads", "1"]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error(rc, err, *fragments):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def forecast_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--epochs", "1", "--out", str(out), *TINY]) == 0
    return out / "checkpoint.npz"


# -- sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--hidden", 10**10],
    ["--batch-size", 10**10, "--task", "adding"],
    ["--seq-len", 10**10, "--task", "adding"],
    ["--layers", 10**12],
    ["--hidden", 10**40],
])
def test_absurd_sizes_are_refused_before_allocating(tmp_path, capsys, argv):
    rc, _, err = _run(capsys, "train", "--out", tmp_path / "o", "--no-progress", "--no-plot",
                      *argv)
    _one_error(rc, err, "would need at least", "more than this machine's")
    assert not (tmp_path / "o").exists()


def test_checkpoint_claiming_absurd_sizes(forecast_ckpt, tmp_path, capsys):
    ck = load_checkpoint(forecast_ckpt)
    meta = {k: v for k, v in ck.meta.items() if k not in ("format", "format_version")}
    meta["model"] = {**meta["model"], "hidden_size": 10**10}
    forged = save_checkpoint(tmp_path / "forged.npz", meta, ck.arrays)
    for cmd in (["predict", forged], ["train", "--resume", forged, "--no-progress"]):
        rc, _, err = _run(capsys, *cmd)
        _one_error(rc, err, "forged.npz", "would need at least")


# -- data files ------------------------------------------------------------------------


def test_csv_field_over_the_csv_limit(tmp_path, capsys):
    f = tmp_path / "big.csv"
    f.write_text("t,v\n1,2\n3," + "9" * 200_000 + "\n")
    rc, _, err = _run(capsys, "train", "--data", f, "--out", tmp_path, *TINY)
    _one_error(rc, err, "line 3", "not valid CSV", "field larger than field limit")


def test_fifo_data_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "kernrnn", "train", "--data", str(fifo),
                           "--out", str(tmp_path), *TINY], capture_output=True, text=True,
                          timeout=120)
    _one_error(proc.returncode, proc.stderr, "not a regular file")


def test_overflowing_statistics_are_not_called_constant(tmp_path, capsys):
    f = tmp_path / "huge.csv"
    f.write_text("v\n" + "\n".join(str(1.7e308 * (-1) ** i) for i in range(40)))
    rc, _, err = _run(capsys, "train", "--data", f, "--out", tmp_path, *TINY)
    line = _one_error(rc, err, "overflows float64")
    assert "constant" not in line


# -- option values ---------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--clip", "1e400"), ("--clip", "nan"),
                                        ("--weight-decay", "inf"), ("--lr", "nan")])
def test_values_json_cannot_hold_are_refused_up_front(tmp_path, capsys, flag, value):
    rc, _, err = _run(capsys, "train", flag, value, "--out", tmp_path / "o", *TINY)
    _one_error(rc, err, f"{flag} must be a finite number")
    assert not (tmp_path / "o").exists()


def test_negative_seed_names_the_option(tmp_path, capsys, forecast_ckpt):
    rc, _, err = _run(capsys, "train", "--seed", "-1", "--out", tmp_path, *TINY)
    _one_error(rc, err, "--seed must be >= 0")
    rc, _, err = _run(capsys, "generate", forecast_ckpt, "--seed", "-1")
    _one_error(rc, err, "--seed must be >= 0")


@pytest.mark.parametrize("t", ["1e-320", "0", "-1", "inf", "nan"])
def test_underflowing_temperature_names_the_option(capsys, forecast_ckpt, t):
    rc, _, err = _run(capsys, "generate", forecast_ckpt, "--temperature", t)
    _one_error(rc, err, "--temperature")


# -- runs that go wrong ------------------------------------------------------------------


def test_diverging_run_without_checkpoint(tmp_path, capsys):
    rc, _, err = _run(capsys, "train", "--optimizer", "sgd", "--lr", "1e30", "--clip", "0",
                      "--epochs", "2", "--out", tmp_path, *TINY)
    _one_error(rc, err, "training diverged", "no checkpoint was saved")


def test_diverging_resumed_run_names_the_last_good_checkpoint(forecast_ckpt, tmp_path, capsys):
    ck = load_checkpoint(forecast_ckpt)
    meta = {k: v for k, v in ck.meta.items() if k not in ("format", "format_version")}
    arrays = dict(ck.arrays)
    arrays["param/head.weight"] = np.full_like(arrays["param/head.weight"], 1e30)
    meta["target_epochs"] = 3
    start = save_checkpoint(tmp_path / "start.npz", meta, arrays)
    rc, _, err = _run(capsys, "train", "--resume", start, "--no-progress", "--no-plot")
    _one_error(rc, err, "training diverged", f"last good checkpoint is {start}",
               f"(step {meta['position']['global_step']})")


def test_missing_train_extra_names_the_extra_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    rc, _, err = _run(capsys, "train", "--epochs", "1", "--out", tmp_path / "o", "--hidden", "4",
                      "--no-progress")
    _one_error(rc, err, "needs matplotlib", "pip install 'kernrnn[train]'")
    assert not (tmp_path / "o").exists()
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr("kernrnn.cli.train._isatty", lambda stream: True)
    rc, _, err = _run(capsys, "train", "--epochs", "1", "--out", tmp_path / "o", "--hidden", "4",
                      "--no-plot")
    _one_error(rc, err, "needs tqdm", "pip install 'kernrnn[train]'")


def test_progress_off_a_terminal_is_plain_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kernrnn.cli._train_progress.PLAIN_EVERY_S", 0.0)
    rc, _, err = _run(capsys, "train", "--epochs", "1", "--out", tmp_path, "--hidden", "4",
                      "--no-plot", "--threads", "1")
    assert rc == 0, err
    assert "\r" not in err and "\x1b" not in err
    steps = [line for line in err.splitlines() if line.startswith("step ")]
    assert len(steps) >= 2 and all("loss" in line for line in steps)


# -- pipes -------------------------------------------------------------------------------


def test_closed_stdout_pipe_is_not_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "kernrnn", "cells", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (| head -0)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == "", err


# -- checkpoints with missing metadata -------------------------------------------------------


@pytest.mark.parametrize("section,key", [("train", None), ("task", "seq_len"), ("model", None),
                                         ("optimizer", "lr"), ("train", "batch_size"),
                                         ("task", "mean")])
def test_resume_from_checkpoint_missing_metadata(forecast_ckpt, tmp_path, capsys, section, key):
    ck = load_checkpoint(forecast_ckpt)
    meta = {k: v for k, v in ck.meta.items() if k not in ("format", "format_version")}
    if key is None:
        del meta[section]
    else:
        meta[section] = {k: v for k, v in meta[section].items() if k != key}
    path = save_checkpoint(tmp_path / "edited.npz", meta, ck.arrays)
    commands = [["train", "--resume", path, "--no-progress", "--no-plot"]]
    if section in ("task", "model"):
        commands.append(["predict", path])
    for cmd in commands:
        rc, _, err = _run(capsys, *cmd)
        _one_error(rc, err, str(path), repr(key or section))


def test_resume_without_optimizer_state(forecast_ckpt, tmp_path, capsys):
    ck = load_checkpoint(forecast_ckpt)
    meta = {k: v for k, v in ck.meta.items() if k not in ("format", "format_version")}
    arrays = {k: v for k, v in ck.arrays.items() if not k.startswith("optim/")}
    path = save_checkpoint(tmp_path / "noopt.npz", meta, arrays)
    rc, _, err = _run(capsys, "train", "--resume", path, "--no-progress", "--no-plot")
    _one_error(rc, err, str(path), "optimizer state lacks 'exp_avg'")


def test_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    from kernrnn.cli import cells

    def noisy(args):
        warnings.warn("first\nsecond", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cells, "run", noisy)
    rc = main(["cells"])
    err = capsys.readouterr().err
    # every warning is one line (others, e.g. from compiling, may come first)
    assert rc == 0 and "kernrnn cells: warning: first second\n" in err
    assert all(line.startswith("kernrnn cells: warning: ") for line in err.splitlines()), err
