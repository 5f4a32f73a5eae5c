"""Tasks and data readers: parsing, bad input, the synthetic tasks' definitions."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernrnn.train.data import (
    AddingTask,
    CharLMTask,
    CopyTask,
    ForecastTask,
    load_sunspots,
    make_task,
    read_csv_series,
    task_from_config,
)


def test_embedded_sunspots():
    values, years, col, sha = load_sunspots()
    assert values.shape == (309,) and col == "SUNACTIVITY"
    assert years[0] == "1700" and years[-1] == "2008"
    assert values[0] == 5.0 and values[-1] == 2.9 and values.min() >= 0
    assert sha == "f67889b1d9002cd5227f0e0ef54e35b419cdd85a31279adef6f73fb41e5c0a9b"


def test_csv_header_column_selection_and_labels():
    text = "# comment\nday,a,b\n1,1.5,10\n2,2.5,20\n\n3,3.5,30\n"
    v, labels, col = read_csv_series(text)
    assert v.tolist() == [10, 20, 30] and labels == ["1", "2", "3"] and col == "b"
    v, _, col = read_csv_series(text, "a")
    assert v.tolist() == [1.5, 2.5, 3.5] and col == "a"
    v, labels, _ = read_csv_series(text, "0")
    assert v.tolist() == [1, 2, 3] and labels is None
    v, labels, col = read_csv_series("1\n2\n3\n")
    assert v.tolist() == [1, 2, 3] and labels is None and col == "column 0"


@pytest.mark.parametrize("text,column,match", [
    ("", None, "no data rows"),
    ("\n\n", None, "no data rows"),
    ("a,b\n", None, "header line but no data rows"),
    ("a,b\n1,2\n3\n", None, "line 3: expected 2 comma-separated fields"),
    ("a,b\n1,2\n3,x\n", None, r"line 3, column 1: 'x' is not a number"),
    ("a,b\n1,2\n3,\n", None, "line 3, column 1: '' is not a number"),
    ("a,b\n1,2\n3,nan\n", None, "line 3, column 1: 'nan' is not finite"),
    ("a,b\n1,2\n", "c", r"no column named 'c'; columns are \['a', 'b'\]"),
    ("1,2\n", "c", "no header line"),
    ("1,2\n", "5", r"column index must lie in \[0, 2\)"),
])
def test_malformed_csv(text, column, match):
    with pytest.raises(ValueError, match=match):
        read_csv_series(text, column)


def test_csv_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_task(data=str(tmp_path / "missing.csv"))
    f = tmp_path / "short.csv"
    f.write_text("v\n1\n2\n3\n")
    with pytest.raises(ValueError, match="too few"):
        make_task(data=str(f))
    f.write_text("v\n" + "5\n" * 20)
    with pytest.raises(ValueError, match="constant"):
        make_task(data=str(f))
    f.write_bytes(b"v\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        make_task(data=str(f))
    with pytest.raises(ValueError, match="is a directory"):
        make_task(data=str(tmp_path) + "/")


@given(st.integers(10, 60), st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_forecast_windows(n, W, seed):
    values = np.random.default_rng(seed).normal(size=n).cumsum() + 10
    task = ForecastTask(values, seq_len=W)
    d = task.epoch(np.random.default_rng(0), 4, dtype=np.float64)
    assert d.size == task.n_train - 1 and d.lengths.max() <= W and d.lengths.min() == 1
    z = task.z
    # the epoch is a permutation of the windows ending at every training point
    order = np.random.default_rng(0).permutation(d.size)
    for i in range(d.size):
        e = order[i] + 1  # inputs z[a:e], targets z[a+1:e+1], a = max(0, e - W)
        a = max(0, e - W)
        L = d.lengths[i]
        assert L == e - a
        np.testing.assert_array_equal(d.x[:L, i, 0], z[a:e])
        np.testing.assert_array_equal(d.y[:L, i, 0], z[a + 1:e + 1])
        assert not d.x[L:, i].any() and not d.y[L:, i].any()
    assert (z[:task.n_train] * task.std + task.mean == pytest.approx(values[:task.n_train]))
    # held-out forecast of the persistence model's kind: perfect outputs give RMSE 0
    ev = task.eval_data(np.float64)
    out = np.zeros((W, ev.size, 1))
    out[ev.lengths - 1, np.arange(ev.size), 0] = z[task.n_train:]
    m = task.evaluate(out)
    assert m["model"] == pytest.approx(0, abs=1e-9)
    naive = values[task.n_train - 1:-1]
    assert m["baseline"] == pytest.approx(np.sqrt(np.mean((naive - values[task.n_train:]) ** 2)))


def test_charlm_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        make_task(data=str(f))
    f.write_text("hello")
    with pytest.raises(ValueError, match="too short for windows of seq_len=100"):
        make_task(data=str(f))
    f.write_text("a" * 500)
    with pytest.raises(ValueError, match="at least 2"):
        make_task(data=str(f))
    f.write_bytes(b"\xff\xfe\xfa" * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        make_task(data=str(f))
    with pytest.raises(ValueError, match="needs a text file"):
        make_task("charlm")


def test_charlm_windows_and_unigram():
    text = "abcab" * 200
    task = CharLMTask(text, seq_len=7)
    d = task.epoch(np.random.default_rng(0), 8)
    np.testing.assert_array_equal(d.x[1:], d.y[:-1])  # targets are inputs shifted
    assert (d.x.max(), d.x.min()) == (2, 0) and task.decode(task.encode("cab")) == "cab"
    ev = task.eval_data()
    assert ev.lengths.sum() == task.n_test  # every held-out character predicted once
    # a model that outputs the unigram log-probabilities scores the baseline exactly
    logits = np.broadcast_to(np.log(task.unigram), ev.x.shape + (3,))
    m = task.evaluate(logits)
    assert m["model"] == pytest.approx(m["baseline"]) and m["metric"] == "bits/char"


@given(st.integers(2, 30), st.booleans(), st.integers(0, 2**32 - 1))
def test_adding_problem_definition(T, vary, seed):
    task = AddingTask(T, steps_per_epoch=2, vary_lengths=vary)
    d = task.sample(np.random.default_rng(seed), 16, np.float64)
    for i in range(16):
        L = d.lengths[i]
        marks = np.flatnonzero(d.x[:, i, 1])
        assert len(marks) == 2 and marks[0] < L // 2 <= marks[1] < L
        assert d.y[i, 0] == pytest.approx(d.x[marks, i, 0].sum())
        assert not d.x[L:, i].any()
        assert (L == T) or vary
    ev = task.evaluate(np.ones((task.test_size, 1), np.float32))
    assert ev["model"] == ev["baseline"] == pytest.approx(1 / 6, abs=0.02)


def test_copy_task_definition():
    task = CopyTask(5, steps_per_epoch=1)
    d = task.sample(np.random.default_rng(0), 3)
    T = 5 + 20
    assert d.x.shape == (T, 3)
    np.testing.assert_array_equal(d.y[-10:], d.x[:10])
    assert (d.x[14] == 9).all() and not d.y[:-10].any()
    ev = task.eval_data()
    perfect = np.full(ev.y.shape + (9,), -30.0)
    np.put_along_axis(perfect, ev.y[..., None].astype(np.int64), 30.0, -1)
    m = task.evaluate(perfect)
    assert m["copy_accuracy"] == 1.0 and m["model"] < 1e-10
    assert m["baseline"] == pytest.approx(10 * math.log(8) / T)


def test_epochs_are_reproducible_from_the_generator_state():
    task = AddingTask(10, steps_per_epoch=3)
    r1 = np.random.default_rng(5)
    state = r1.bit_generator.state
    a = task.epoch(r1, 4)
    r2 = np.random.default_rng(99)
    r2.bit_generator.state = state
    b = task.epoch(r2, 4)
    np.testing.assert_array_equal(a.x, b.x)
    assert r1.bit_generator.state == r2.bit_generator.state


def test_make_task_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("sort")
    with pytest.raises(ValueError, match="synthetic and takes no --data"):
        make_task("adding", data="x.csv")
    with pytest.raises(ValueError, match="--column applies"):
        make_task("adding", column="a")
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        make_task("adding", seq_len=1)
    with pytest.raises(ValueError, match="--vary-lengths"):
        make_task("copy", vary_lengths=True)
    with pytest.raises(ValueError, match="unknown task"):
        task_from_config({"task": "sort"})


def test_changed_data_file_is_detected(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("v\n" + "\n".join(str(i % 7) for i in range(40)))
    cfg = make_task(data=str(f)).config()
    assert task_from_config(cfg).config() == cfg
    f.write_text("v\n" + "\n".join(str(i % 5) for i in range(40)))
    with pytest.raises(ValueError, match="has changed since the checkpoint"):
        task_from_config(cfg)
