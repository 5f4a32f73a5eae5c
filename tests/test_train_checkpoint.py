"""Checkpoints: round trip, exact resume, reproducibility, corrupt and mismatched files."""

import json
import os
import zipfile

import numpy as np
import pytest

from kernrnn.train import (
    Adam,
    AddingTask,
    SequenceModel,
    Trainer,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
)
from kernrnn.train.data import ForecastTask


def _trainer(task, seed=0, cell="gru", tbptt=0, opt="adam"):
    model = SequenceModel(cell, input_size=task.input_size, hidden_size=4,
                          output_size=task.output_size, head=task.head, seed=seed)
    optimizer = make_optimizer(opt, lr=0.01, **({"momentum": 0.9} if opt == "sgd" else {}))
    return Trainer(model, task, optimizer, batch_size=5, clip=0.5, tbptt=tbptt, seed=seed)


def _adding():
    return AddingTask(12, steps_per_epoch=3, test_size=20, vary_lengths=True)


def _forecast():
    values = np.sin(np.arange(60) * 0.4) * 10 + np.arange(60) * 0.1
    return ForecastTask(values, seq_len=6)


def test_save_load_round_trip(tmp_path):
    tr = _trainer(_adding())
    tr.fit(1)
    path = tr.save(tmp_path / "c.npz")
    ck = load_checkpoint(path)
    assert ck.meta["format"] == "kernrnn-checkpoint" and ck.meta["model"]["cell"] == "gru"
    for k, v in tr.model.params.items():
        np.testing.assert_array_equal(ck.group("param")[k], v)
    tr2 = _trainer(_adding(), seed=7)
    tr2.restore(ck)
    for k, v in tr.model.params.items():
        np.testing.assert_array_equal(tr2.model.params[k], v)
    assert tr2.optimizer.step_count == tr.optimizer.step_count
    assert tr2.losses == tr.losses and tr2.global_step == tr.global_step == 3
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("make_task,stop,tbptt,opt", [
    (_adding, 4, 0, "adam"),      # mid-epoch, fresh random data each epoch
    (_adding, 3, 5, "sgd"),       # at an epoch boundary, truncated BPTT, momentum
    (_forecast, 13, 0, "adam"),   # shuffled fixed windows
])
def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, make_task, stop, tbptt, opt):
    full = _trainer(make_task(), tbptt=tbptt, opt=opt)
    full.fit(3)
    part = _trainer(make_task(), tbptt=tbptt, opt=opt)
    assert part.fit(3, stop_after=stop) == "stopped"
    part.save(tmp_path / "c.npz")
    resumed = _trainer(make_task(), seed=123, tbptt=tbptt, opt=opt)  # other init: restored over
    resumed.restore(load_checkpoint(tmp_path / "c.npz"))
    resumed.fit(3)
    assert resumed.losses == full.losses  # exactly, not approximately
    assert resumed.eval_history == full.eval_history
    for k, v in full.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[k], v)


def test_same_seed_same_losses_other_seed_other_losses():
    runs = []
    for seed in (3, 3, 4):
        tr = _trainer(_adding(), seed=seed)
        tr.fit(2)
        runs.append(tr.losses)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def _good(tmp_path):
    tr = _trainer(_adding())
    tr.fit(1)
    return tr.save(tmp_path / "good.npz")


def test_truncated_and_corrupt_files(tmp_path):
    good = _good(tmp_path)
    data = open(good, "rb").read()
    cases = {
        "truncated": data[: len(data) // 2],
        "tiny": data[:10],
        "empty": b"",
        "garbage": os.urandom(2000),
    }
    # flip bytes inside the stored arrays: the zip CRC catches it
    flipped = bytearray(data)
    mid = len(data) // 3
    flipped[mid:mid + 8] = bytes(b ^ 0xFF for b in flipped[mid:mid + 8])
    cases["flipped"] = bytes(flipped)
    for name, blob in cases.items():
        p = tmp_path / f"{name}.npz"
        p.write_bytes(blob)
        with pytest.raises(ValueError, match="not a valid kernrnn checkpoint"):
            load_checkpoint(p)


def test_foreign_and_malformed_archives(tmp_path):
    p = tmp_path / "plain.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(ValueError, match="no '__meta__' member"):
        load_checkpoint(p)
    p = tmp_path / "obj.npz"
    np.savez(p, __meta__=np.frombuffer(b"{}", np.uint8), x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a valid kernrnn checkpoint"):
        load_checkpoint(p)
    p = tmp_path / "badjson.npz"
    np.savez(p, __meta__=np.frombuffer(b"{not json", np.uint8))
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(p)
    p = tmp_path / "version.npz"
    meta = {"format": "kernrnn-checkpoint", "format_version": 99}
    np.savez(p, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(p)
    p = tmp_path / "a.npy"
    np.save(p, np.zeros(3))
    with pytest.raises(ValueError, match="bare .npy"):
        load_checkpoint(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_checkpoint_from_another_model(tmp_path):
    ck = load_checkpoint(_good(tmp_path))
    other = Trainer(SequenceModel("lstm", input_size=2, hidden_size=4, head="last"), _adding(),
                    Adam(lr=0.01), batch_size=5)
    with pytest.raises(ValueError, match="checkpoint is from another model: cell 'gru'"):
        other.restore(ck)
    bigger = Trainer(SequenceModel("gru", input_size=2, hidden_size=6, head="last"), _adding(),
                     Adam(lr=0.01), batch_size=5)
    with pytest.raises(ValueError, match="hidden_size 4 .checkpoint. vs 6"):
        bigger.restore(ck)
    # metadata claiming the right model but arrays of another one
    meta = dict(ck.meta)
    arrays = dict(ck.arrays)
    arrays["param/head.weight"] = np.zeros((1, 9), np.float32)
    save_checkpoint(tmp_path / "forged.npz", meta, arrays)
    tr = _trainer(_adding())
    with pytest.raises(ValueError, match=r"parameter 'head.weight' must have shape \[1, 4\]"):
        tr.restore(load_checkpoint(tmp_path / "forged.npz"))


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    good = _good(tmp_path)
    before = open(good, "rb").read()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(good, {"x": 1}, {"a": np.zeros(2)})
    assert open(good, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["good.npz"]
    assert zipfile.is_zipfile(good)


def test_save_rejects_object_arrays_and_reserved_names(tmp_path):
    with pytest.raises(TypeError, match="dtype object"):
        save_checkpoint(tmp_path / "x.npz", {}, {"a": np.array([None], dtype=object)})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.npz", {}, {"__meta__": np.zeros(1)})
