"""Checkpoints: every member validated before use, clear errors, no leftovers of killed saves.

Malformed files are made for real (forged ``.npy`` headers, foreign members,
pickles, edited metadata), and a real process is killed in the middle of a save.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy_format

from kernrnn.train import Adam, AddingTask, SequenceModel, Trainer, load_checkpoint, save_checkpoint
from kernrnn.train.checkpoint import remove_stale_temporaries

META = {"format": "kernrnn-checkpoint", "format_version": 1}


def _npy(arr=None, *, header=None, payload=None) -> bytes:
    """A .npy member: a real array, or a forged header dict with an arbitrary payload."""
    buf = io.BytesIO()
    if header is None:
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()
    npy_format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def _archive(path: Path, members: dict[str, bytes], meta=META) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        if meta is not None:
            zf.writestr("__meta__.npy", _npy(np.frombuffer(json.dumps(meta).encode(), np.uint8)))
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


def _refused(path, *fragments):
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {str(path)!r}"), msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_member_that_is_not_an_npy_array(tmp_path):
    _refused(_archive(tmp_path / "c.npz", {"notes.txt": b"hello"}), "'notes.txt'", ".npy")
    _refused(_archive(tmp_path / "d.npz", {"x.npy": b"plain bytes, no npy magic"}),
             "'x.npy' is not a .npy array")


DTYPES = ["<f4", "<f8", "<i8", "|u1", "<c16"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(0, 10**12), min_size=0, max_size=4).map(tuple),
       dtype=st.sampled_from(DTYPES), have=st.integers(0, 256))
def test_header_disagreeing_with_its_bytes_is_refused_before_allocating(tmp_path, shape, dtype,
                                                                       have):
    """Any shape, even 10**12 elements per axis, is checked against the bytes actually present."""
    need = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    if need == have:
        return
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    path = _archive(tmp_path / "forged.npz", {"param/w.npy": _npy(header=header,
                                                                 payload=b"\0" * have)})
    _refused(path, "'param/w.npy'", "header describes")  # a MemoryError would fail the test


def test_absurd_stored_size_is_refused(tmp_path):
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**10, 10**10)}
    path = _archive(tmp_path / "huge.npz", {"a.npy": _npy(header=header, payload=b"\0" * 8)})
    _refused(path, "10000000000")


def test_object_member_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    buf = io.BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    path = _archive(tmp_path / "obj.npz", {"x.npy": buf.getvalue()})
    _refused(path, "dtype object")
    assert not marker.exists()
    # the same pickle bytes as a whole "npz" are no zip: refused too, never unpickled
    (tmp_path / "raw.npz").write_bytes(pickle.dumps(Payload()))
    _refused(tmp_path / "raw.npz", "not a valid kernrnn checkpoint")
    assert not marker.exists()


def test_fifo_and_directory_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "c.npz"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        load_checkpoint(fifo)


def test_metadata_that_json_cannot_hold_is_named(tmp_path):
    for meta, where in [({"train": {"clip": float("inf")}}, "metadata.train.clip is inf"),
                        ({"hist": [1.0, float("nan")]}, "metadata.hist[1] is nan"),
                        ({"model": {1: "a"}}, "metadata.model has a key 1"),
                        ({"x": np.int64(3)}, "metadata.x is a int64")]:
        with pytest.raises(ValueError, match="cannot store the metadata") as info:
            save_checkpoint(tmp_path / "m.npz", meta, {})
        assert where in str(info.value)
    assert not list(tmp_path.iterdir())
    # a file name that is not UTF-8 (surrogate-escaped by Python) round-trips
    save_checkpoint(tmp_path / "m.npz", {"data": {"source": "/d/caf\udce9.csv"}}, {})
    assert load_checkpoint(tmp_path / "m.npz").meta["data"]["source"] == "/d/caf\udce9.csv"


# -- against a real training checkpoint -------------------------------------------------


def _trainer(opt=None):
    task = AddingTask(6, steps_per_epoch=2, test_size=8)
    model = SequenceModel("rnn", input_size=task.input_size, hidden_size=3,
                          output_size=task.output_size, head=task.head, seed=0)
    return Trainer(model, task, opt or Adam(lr=0.01), batch_size=4, seed=0)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tr = _trainer()
    tr.fit(1)
    return tr.save(tmp_path_factory.mktemp("ck") / "good.npz")


def _edited(good, tmp_path, edit_meta=None, edit_arrays=None):
    ck = load_checkpoint(good)
    meta = {k: v for k, v in ck.meta.items() if k not in ("format", "format_version")}
    arrays = dict(ck.arrays)
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    return load_checkpoint(save_checkpoint(tmp_path / "edited.npz", meta, arrays))


SECTION_KEYS = [("model", None), ("optimizer", None), ("position", None),
                ("optimizer", "step"), ("optimizer", "name"), ("position", "global_step"),
                ("position", "rng_state")]


@pytest.mark.parametrize("section,key", SECTION_KEYS)
def test_missing_metadata_is_named_with_the_file(good, tmp_path, section, key):
    def drop(meta):
        if key is None:
            del meta[section]
        else:
            del meta[section][key]

    ck = _edited(good, tmp_path, drop)
    with pytest.raises(ValueError) as info:
        _trainer().restore(ck)
    msg = str(info.value)
    assert str(tmp_path / "edited.npz") in msg and repr(key or section) in msg


def test_parameter_of_wrong_dtype_or_shape_names_the_file(good, tmp_path):
    def to64(arrays):
        arrays["param/head.bias"] = arrays["param/head.bias"].astype(np.float64)

    ck = _edited(good, tmp_path, edit_arrays=to64)
    with pytest.raises(ValueError, match="edited.npz.*head.bias.*float32"):
        _trainer().restore(ck)

    def history2d(arrays):
        arrays["history/loss"] = arrays["history/loss"].reshape(1, -1)

    with pytest.raises(ValueError, match=r"history/loss must be a float array of \[n\]"):
        _trainer().restore(_edited(good, tmp_path, edit_arrays=history2d))


@pytest.mark.parametrize("drop", ["all", "one"])
def test_missing_optimizer_state_is_an_error(good, tmp_path, drop):
    def strip(arrays):
        keys = [k for k in arrays if k.startswith("optim/")]
        for k in keys if drop == "all" else keys[:1]:
            del arrays[k]

    ck = _edited(good, tmp_path, edit_arrays=strip)
    tr = _trainer()
    with pytest.raises(ValueError, match="optimizer state lacks .* running averages at zero"):
        tr.restore(ck)


def test_plain_sgd_has_no_state_to_miss(tmp_path):
    from kernrnn.train import make_optimizer

    tr = _trainer(make_optimizer("sgd", lr=0.01))
    tr.fit(1)
    ck = load_checkpoint(tr.save(tmp_path / "sgd.npz"))
    assert not ck.group("optim")
    _trainer(make_optimizer("sgd", lr=0.01)).restore(ck)


# -- saves killed midway -------------------------------------------------------------

KILLED_SAVE = """
import os, sys, time
import numpy as np
from kernrnn.train import save_checkpoint

def stall(fd):
    print("writing", flush=True)
    time.sleep(600)

os.fsync = stall  # the temporary file is complete but not yet renamed
save_checkpoint(sys.argv[1], {"step": 1}, {"w": np.ones(1000)})
"""


def _start_save(path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _temporaries(d: Path):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_temporaries_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    target = tmp_path / "c.npz"
    left = []
    for _ in range(3):
        proc = _start_save(target)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left.append(_temporaries(tmp_path))
    # each killed save leaves its file; each later save removes those before it
    assert [len(names) for names in left] == [1, 1, 1] and len(set(map(tuple, left))) == 3
    save_checkpoint(target, {"step": 2}, {"w": np.zeros(3)})
    assert _temporaries(tmp_path) == []
    assert load_checkpoint(target).meta["step"] == 2


def test_a_running_save_keeps_its_temporary(tmp_path):
    target = tmp_path / "c.npz"
    proc = _start_save(target)
    try:
        (running,) = _temporaries(tmp_path)
        assert remove_stale_temporaries(target) == []
        save_checkpoint(target, {"step": 2}, {"w": np.zeros(3)})
        assert _temporaries(tmp_path) == [running]
        # another checkpoint's temporaries are not touched either
        save_checkpoint(tmp_path / "other.npz", {}, {})
        assert _temporaries(tmp_path) == [running]
    finally:
        proc.kill()
        proc.wait()
    assert remove_stale_temporaries(target) == [str(tmp_path / running)]
