"""``kernrnn train/predict/generate`` end to end with tiny runs, and their errors."""

import json
import os

import numpy as np
import pytest

from kernrnn.cli import main
from kernrnn.train import load_checkpoint

TINY = ["--hidden", "4", "--no-progress", "--threads", "1"]


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_default_task_tiny_run(tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc, out, err = _run(capsys, "train", "--epochs", "2", "--out", str(out_dir), *TINY)
    assert rc == 0, err
    assert "held-out RMSE: model" in out and "vs last-value forecast" in out
    assert "embedded yearly sunspot numbers" in err
    assert {"checkpoint.npz", "loss.png", "metrics.json"} <= set(os.listdir(out_dir))
    with open(out_dir / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["metrics"]["baseline_name"] == "last-value forecast"
    ck = load_checkpoint(out_dir / "checkpoint.npz")
    assert ck.meta["model"]["cell"] == "lstm" and ck.meta["position"]["epoch"] == 2

    rc, out, err = _run(capsys, "predict", str(out_dir / "checkpoint.npz"), "--steps", "3",
                        "--evaluate")
    assert rc == 0, err
    assert "2009\t" in out and "2011\t" in out and "held-out RMSE" in out
    rc, out, _ = _run(capsys, "predict", str(out_dir / "checkpoint.npz"), "--json")
    assert len(json.loads(out)["forecast"]) == 10
    # forecast another series with the checkpoint's standardisation
    other = tmp_path / "other.csv"
    other.write_text("year,n\n" + "\n".join(f"{1900 + i},{50 + 40 * np.sin(i / 2):.2f}"
                                             for i in range(40)))
    rc, out, err = _run(capsys, "predict", str(out_dir / "checkpoint.npz"), "--data",
                        str(other), "--steps", "2")
    assert rc == 0, err
    assert "1940\t" in out and "1941\t" in out


def test_resume_from_cli_matches_uninterrupted_run(tmp_path, capsys):
    common = ["--task", "adding", "--seq-len", "8", "--steps-per-epoch", "3", "--epochs", "3",
              "--cell", "gru", *TINY, "--no-plot"]
    assert _run(capsys, "train", *common, "--out", str(tmp_path / "a"))[0] == 0
    rc, out, err = _run(capsys, "train", *common, "--out", str(tmp_path / "b"),
                        "--stop-after", "4")
    assert rc == 0 and "continue with: kernrnn train --resume" in err
    ckpt = str(tmp_path / "b" / "checkpoint.npz")
    assert load_checkpoint(ckpt).meta["position"]["global_step"] == 4
    rc, out, err = _run(capsys, "train", "--resume", ckpt, "--no-progress", "--no-plot")
    assert rc == 0, err
    a = load_checkpoint(tmp_path / "a" / "checkpoint.npz").arrays["history/loss"]
    b = load_checkpoint(ckpt).arrays["history/loss"]
    assert len(a) == 9 and np.array_equal(a, b)
    # a resumed run keeps its settings
    rc, _, err = _run(capsys, "train", "--resume", ckpt, "--cell", "lstm", "--no-progress")
    assert rc == 2 and "--cell 'lstm' differs from the checkpoint's 'gru'" in err
    # and can be extended
    rc, _, err = _run(capsys, "train", "--resume", ckpt, "--epochs", "4", "--no-progress",
                      "--no-plot")
    assert rc == 0, err
    assert load_checkpoint(ckpt).meta["position"]["global_step"] == 12


def test_lstm_with_projections_trains_and_resumes(tmp_path, capsys):
    common = ["--task", "adding", "--seq-len", "6", "--steps-per-epoch", "2", "--epochs", "2",
              "--proj", "2", *TINY, "--no-plot"]
    rc, _, err = _run(capsys, "train", *common, "--out", str(tmp_path), "--stop-after", "2")
    assert rc == 0, err
    ckpt = str(tmp_path / "checkpoint.npz")
    ck = load_checkpoint(ckpt)
    assert ck.meta["model"]["proj_size"] == 2
    assert ck.group("param")["rnn.weight_hr_l0"].shape == (2, 4)
    assert ck.group("param")["head.weight"].shape == (1, 2)  # the head reads the projected h
    rc, _, err = _run(capsys, "train", "--resume", ckpt, "--proj", "3", "--no-progress")
    assert rc == 2 and "--proj 3 differs from the checkpoint's 2" in err
    rc, _, err = _run(capsys, "train", "--resume", ckpt, "--no-progress", "--no-plot")
    assert rc == 0, err
    assert load_checkpoint(ckpt).meta["position"]["global_step"] == 4


def test_same_seed_same_losses_from_cli(tmp_path, capsys):
    losses = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        rc, _, err = _run(capsys, "train", "--epochs", "1", "--seed", seed, "--out",
                          str(tmp_path / name), "--no-plot", *TINY)
        assert rc == 0, err
        losses.append(load_checkpoint(tmp_path / name / "checkpoint.npz").arrays["history/loss"])
    assert np.array_equal(losses[0], losses[1]) and not np.array_equal(losses[0], losses[2])


def test_charlm_train_generate_predict(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 40)
    out_dir = tmp_path / "lm"
    rc, out, err = _run(capsys, "train", "--data", str(text), "--seq-len", "16", "--epochs", "2",
                        "--batch-size", "8", "--tbptt", "5", "--out", str(out_dir), "--no-plot",
                        *TINY)
    assert rc == 0, err
    assert "bits/char" in out and "unigram model" in out
    ck = str(out_dir / "checkpoint.npz")
    rc, out, err = _run(capsys, "generate", ck, "--prime", "the ", "--length", "30")
    assert rc == 0, err
    assert out.startswith("the ") and len(out.rstrip("\n")) == 34
    assert set(out.rstrip("\n")) <= set("the cat sat on mat.")
    rc, _, err = _run(capsys, "generate", ck, "--prime", "QQ")
    assert rc == 2 and "not in the model's vocabulary" in err
    rc, out, err = _run(capsys, "predict", ck)
    assert rc == 0 and "bits/char" in out


def test_copy_task_runs(tmp_path, capsys):
    rc, out, err = _run(capsys, "train", "--task", "copy", "--seq-len", "3", "--epochs", "1",
                        "--steps-per-epoch", "2", "--out", str(tmp_path), "--no-plot", *TINY)
    assert rc == 0, err
    assert "recalled-symbol accuracy" in out


def test_csv_data(tmp_path, capsys):
    f = tmp_path / "s.csv"
    f.write_text("t,v\n" + "\n".join(f"{i},{np.sin(i / 3):.4f}" for i in range(50)))
    rc, out, err = _run(capsys, "train", "--data", str(f), "--epochs", "1", "--batch-size", "4",
                        "--out", str(tmp_path / "o"), "--no-plot", *TINY)
    assert rc == 0, err
    assert "RMSE" in out


@pytest.mark.parametrize("argv,match", [
    (["--cell", "nope"], "--cell must be a registered cell"),
    (["--hidden", "0"], "--hidden must be >= 1"),
    (["--layers", "-2"], "--layers must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--tbptt", "-1"], "--tbptt must be >= 0"),
    (["--batch-size", "100000"], "exceeds the"),
    (["--lr", "-1"], "lr must be"),
    (["--clip", "-1"], "--clip must be >= 0"),
    (["--device", "tpu"], "device must be 'cpu' or 'cuda'"),
    (["--embedding", "4"], "--embedding applies to token tasks"),
    (["--momentum", "0.5"], "--momentum applies to --optimizer sgd"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--proj", "32"], "--proj must be smaller than --hidden"),
    (["--proj", "-1"], "--proj must be >= 0"),
    (["--cell", "gru", "--proj", "4"], "proj_size needs a state besides h"),
    (["--task", "charlm"], "needs a text file"),
    (["--data", "/nonexistent/x.csv"], "does not exist"),
])
def test_bad_options(tmp_path, capsys, argv, match):
    rc, _, err = _run(capsys, "train", "--out", str(tmp_path), "--no-progress", *argv)
    assert rc == 2
    assert match in err
    assert "Traceback" not in err


def test_bad_files(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("a,b\n1,2\n3,oops\n")
    rc, _, err = _run(capsys, "train", "--data", str(csv), "--out", str(tmp_path), *TINY)
    assert rc == 2 and "line 3, column 1: 'oops' is not a number" in err
    empty = tmp_path / "e.txt"
    empty.write_text("")
    rc, _, err = _run(capsys, "train", "--data", str(empty), "--out", str(tmp_path), *TINY)
    assert rc == 2 and "is empty" in err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi there")
    rc, _, err = _run(capsys, "train", "--data", str(tiny), "--out", str(tmp_path), *TINY)
    assert rc == 2 and "too short" in err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    for cmd in (["train", "--resume", str(junk)], ["predict", str(junk)],
                ["generate", str(junk)]):
        rc, _, err = _run(capsys, *cmd)
        assert rc == 2 and "not a valid kernrnn checkpoint" in err


def test_generate_needs_a_language_model(tmp_path, capsys):
    rc, _, _ = _run(capsys, "train", "--epochs", "1", "--out", str(tmp_path), "--no-plot", *TINY)
    assert rc == 0
    rc, _, err = _run(capsys, "generate", str(tmp_path / "checkpoint.npz"))
    assert rc == 2 and "needs a character-LM checkpoint" in err
