"""The prepared device check, without a device: phase selection, timeouts, budget,
logs, the no-GPU path, skip logic, the warm-up pool, the shards, the toolchain
probe, the self-check's reference comparison, a small part of the rehearsal under
the simulator, and the table (with made-up numbers, here only)."""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import devicecheck as dc


def test_default_phases_fit_the_budget_and_list(capsys):
    defaults = [p for p in dc.PHASES.values() if p.default]
    assert [p.name for p in defaults] == ["env", "warm", "gemm", "persistent", "layer", "bench"]
    assert sum(p.timeout for p in defaults) <= dc.BUDGET <= 7.5 * 60
    assert 2 * dc.BUDGET <= dc.DEVICE_BUDGET  # one rerun of everything fits the loan
    assert dc.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in dc.PHASES)


def test_unknown_phase_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        dc.main(["gemm", "nope", "--out", "unused"])
    assert info.value.code == 2
    assert "nope" in capsys.readouterr().err


def _fake_children(monkeypatch, tmp_path, scripts, timeouts):
    """Replace each phase's child by a small Python script, with short timeouts."""
    phases = {n: dc.Phase(n, timeouts.get(n, 20), "fake", default=True) for n in scripts}
    monkeypatch.setattr(dc, "PHASES", phases)

    def command(name, out):
        return [sys.executable, "-c", scripts[name]]

    monkeypatch.setattr(dc, "_child_command", command)


def test_a_hung_phase_is_killed_with_its_children_and_later_phases_still_run(monkeypatch,
                                                                             tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; "
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print('hanging', flush=True); "
            "time.sleep(60)")
    scripts = {"env": "print('env ok')", "gemm": hang,
               "persistent": "print('broken'); raise SystemExit(1)", "layer": "print('fine')"}
    _fake_children(monkeypatch, tmp_path, scripts, {"gemm": 2})
    out = tmp_path / "logs"
    t0 = time.monotonic()
    rc = dc.run(list(scripts), out, budget=100)
    assert time.monotonic() - t0 < 30  # nothing waited for the 60 s sleeps
    assert rc == dc.FAILED
    import json

    results = {r["phase"]: r for r in json.loads((out / "summary.json").read_text())["results"]}
    assert [results[n]["status"] for n in scripts] == ["ok", "timeout", "failed", "ok"]
    assert "hanging" in (out / "02-gemm.log").read_text()
    assert "fine" in (out / "04-layer.log").read_text()
    summary = (out / "summary.md").read_text()
    assert "| gemm | timeout |" in summary
    budget = summary.strip().splitlines()[-1]
    assert budget.startswith("budget: env ") and "gemm 2 +" in budget
    assert f"of the {dc.DEVICE_BUDGET} s device budget left" in budget
    pid = int(pidfile.read_text())
    for _ in range(50):  # the process group was killed: the grandchild is gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the hung phase's child process survived the timeout")


def test_phases_can_run_one_by_one_and_the_budget_caps_them(monkeypatch, tmp_path):
    scripts = {"env": "print(1)", "gemm": "import time; time.sleep(30)", "layer": "print(3)"}
    _fake_children(monkeypatch, tmp_path, scripts, {})
    assert dc.run(["layer"], tmp_path / "one") == dc.OK
    assert [p.name for p in (tmp_path / "one").glob("*.log")] == ["01-layer.log"]
    rc = dc.run(list(scripts), tmp_path / "budget", budget=6)
    assert rc == dc.FAILED  # gemm got only the 6 s left and timed out; layer had none left
    import json

    status = [r["status"] for r in
              json.loads((tmp_path / "budget" / "summary.json").read_text())["results"]]
    assert status == ["ok", "timeout", "skipped (time budget spent)"]


def test_without_a_gpu_the_env_phase_says_so_and_the_rest_is_skipped(tmp_path):
    """The real env phase, in its own process: on a machine without a usable GPU."""
    from kernrnn.backends import cuda as cb

    try:
        cb.require()
        pytest.skip("a GPU is usable here")
    except cb.CudaUnavailableError:
        pass
    rc = dc.run(["env", "gemm", "bench"], tmp_path)
    assert rc == dc.NO_GPU
    summary = (tmp_path / "summary.md").read_text()
    assert "| env | no GPU |" in summary
    assert "| gemm | skipped (no usable GPU) |" in summary
    log = (tmp_path / "01-env.log").read_text()
    assert "numba-cuda:" in log and "no usable GPU" in log


def test_child_environment_runs_from_the_checkout_without_installing(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.delenv("KERNRNN_CACHE_DIR", raising=False)
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    env, notes = dc.child_env(tmp_path)
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert str(dc.REPO) in paths and str(dc.REPO / "plugins") in paths
    assert Path(env["KERNRNN_CACHE_DIR"]).name == ".kcache"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scipy" else real(name, *a))
    env, notes = dc.child_env(tmp_path)
    assert env["NUMBA_NUM_THREADS"] == "1" and "scipy" in notes[0]
    assert "NUMBA_ENABLE_CUDASIM" not in env or os.environ.get("NUMBA_ENABLE_CUDASIM")
    env, notes = dc.child_env(tmp_path, rehearse=True)
    assert env["NUMBA_ENABLE_CUDASIM"] == "1" and env[dc.REHEARSE_ENV] == "1"
    assert any("rehearsal" in n for n in notes)


def test_kernrnn_torch_phase_part_skips_when_the_module_is_absent(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "kernrnn.torch" else real(name, *a))
    assert not dc.kernrnn_torch_available()
    torch_present = real("torch") is not None
    if not torch_present:
        assert dc._torch_check() is True
        assert "skipped" in capsys.readouterr().out


def test_bench_cases_cover_the_issue_sizes():
    sizes = {(B, T, H) for _, B, T, H in dc.BENCH_CASES}
    assert {(B, 100, H) for H in (256, 512, 1024) for B in (1, 4, 16, 64)} <= sizes
    assert {(16, 25, 512), (128, 25, 1024), (16, 1024, 768)} <= sizes


def _fake_rows():
    # made-up numbers: they test the formatting and never leave this test
    return [
        dict(case="T=100 H=256 B=1", B=1, T=100, H=256, cudnn_fwd=2.0, gemm_fwd=4.0,
             graphs_fwd=1.0, persistent_fwd=0.5, cudnn_train=5.0, gemm_train=10.0,
             graphs_train=3.0, persistent_train=3.0),
        dict(case="T=100 H=512 B=16", B=16, T=100, H=512, cudnn_fwd=2.0, gemm_fwd=2.0,
             graphs_fwd=None, persistent_fwd=1.5, cudnn_train=4.0, gemm_train="failed (X)",
             graphs_train=None, persistent_train=1.0),
        dict(case="T=100 H=512 B=64", B=64, T=100, H=512, cudnn_fwd=2.0, gemm_fwd=1.8,
             graphs_fwd=1.0, persistent_fwd=None, cudnn_train=4.0, gemm_train=6.0,
             graphs_train=3.0, persistent_train=None),
    ]


def test_table_has_ratios_and_versions():
    meta = {"gpu": "Some GPU", "driver": "1.2", "command": "python -m benchmarks.devicecheck"}
    text = dc.format_table(meta, _fake_rows())
    assert text.startswith("# kernrnn vs cuDNN on Some GPU")
    assert "- driver: 1.2" in text and "devicecheck" in text
    assert "| T=100 H=256 B=1 | 2.000 | 4.000 (2.00x) | 1.000 (0.50x) | 0.500 (0.25x) |" in text
    assert "| T=100 H=512 B=16 | 4.000 | failed (X) | n/a | 1.000 (0.25x) |" in text
    assert text.count("| case | cuDNN |") == 2  # forward and training tables


def test_targets_are_evaluated_on_the_measured_rows_only():
    lines = dc.target_lines(_fake_rows())
    assert "(fwd): met in 1 of 2 measured cases (worst 0.75x)" in lines[0]
    assert "(train): met in 1 of 2 measured cases (worst 0.60x)" in lines[1]
    assert lines[2].endswith("(fwd): 0.90x: met")
    assert lines[3].endswith("(train): 1.50x: not met")
    assert dc.target_lines([]) == [
        "persistent <= 0.5x cuDNN at B <= 16, H <= 1024 (fwd): met in 0 of 0 measured cases",
        "persistent <= 0.5x cuDNN at B <= 16, H <= 1024 (train): met in 0 of 0 measured cases"]


def test_wrapper_script_runs_from_the_checkout():
    import subprocess

    script = dc.REPO / "scripts" / "gpu-check.sh"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(script), "--list"], capture_output=True, text=True,
                          env=env, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "persistent-tests" in proc.stdout


def test_budget_line_counts_each_phase_against_the_device_budget():
    results = [dict(phase="env", seconds=12.4), dict(phase="warm", seconds=150.0),
               dict(phase="gemm", seconds=300.2)]
    line = dc.budget_line(results, 420)
    assert line == ("budget: env 12 + warm 150 + gemm 300 = 463 s (timeouts allow 420 s); "
                    "437 s of the 900 s device budget left, room for one rerun of at most 420 s")
    assert "no room" in dc.budget_line(results + [dict(phase="bench", seconds=100)], 420)
    assert dc.budget_line([], 0, rehearse=True).endswith("this machine's seconds]")


def test_shards_run_one_cell_per_form_and_print_durations(monkeypatch):
    monkeypatch.delenv(dc.REHEARSE_ENV, raising=False)
    shards = dc.shard_commands("gemm", dc.FORM_CELLS)
    assert [key for key, _, _ in shards] == [*dc.FORM_CELLS, "none"]
    for key, args, env in shards:
        assert env == {"KERNRNN_CUDA_PATH": "gemm", "KERNRNN_TEST_CELLS": key}
        assert args[:3] == ["tests", "-m", "gpu"] and "--durations=15" in args
        assert "not selfcheck" in args[args.index("-k") + 1]
    monkeypatch.setenv(dc.REHEARSE_ENV, "1")
    _, args, env = dc.shard_commands("persistent", dc.PERSISTENT_TEST_CELLS)[0]
    assert args[0] == "tests/cudasim/test_sim_cuda.py" and "--durations=15" in args
    assert env["KERNRNN_CUDA_PATH"] == "persistent"


def test_test_selection_by_cell():
    """tests/conftest.py's KERNRNN_TEST_CELLS, on the simulator's tests (collection only)."""
    pytest.importorskip("numba.cuda", reason="the simulator tests need numba-cuda")
    import subprocess

    def collected(cells):
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", KERNRNN_TEST_CELLS=cells)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
             "tests/cudasim/test_sim_cuda.py", "-k", "forward_matches or moves_between"],
            cwd=dc.REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]
        return sorted(ln.split("::")[1] for ln in proc.stdout.splitlines() if "::" in ln)

    assert collected("lstm,none") == ["test_forward_matches_reference[lstm]",
                                      "test_layer_moves_between_devices"]
    assert collected("gru") == ["test_forward_matches_reference[gru]"]


# -- the warm-up pool, with stand-in tasks (spawned workers import this module) ----------


def fake_warm_task(task):
    """ok: compiles; fail: raises; crash: the worker dies; hang: outlives the deadline."""
    what = task[1]
    if what == "fail":
        raise RuntimeError("no such kernel")
    if what == "crash":
        os._exit(3)
    if what == "hang":
        time.sleep(60)
    return dc._task_label(task), 0.1, None


def test_warm_reports_failures_once_and_goes_on(capsys):
    tasks = [("cpu", "ok", "float64", False), ("cpu", "fail", "float64", False),
             ("cuda", "crash", "float32", True), ("persistent", "hang", "float32", 4),
             ("cpu", "ok2", "float64", False)]
    t0 = time.monotonic()
    summary = dc.warm(tasks, workers=2, deadline=time.time() + 12, runner=fake_warm_task)
    assert time.monotonic() - t0 < 30  # the hung task was stopped at the deadline
    out = capsys.readouterr().out
    assert summary["failed"] == ["cpu fail float64", "cuda crash float32 regularised"]
    assert summary["unfinished"] == ["persistent hang float32 NB=4"]
    assert summary["results"][tasks[0]][2] is None and summary["results"][tasks[4]][2] is None
    assert out.count("FAILED cpu fail float64") == 1
    assert out.count("FAILED cuda crash float32 regularised: its worker process died") == 1
    assert "2 failed, 1 not finished by the deadline" in out


def test_warm_tasks_cover_forms_dtypes_regularisation_and_persistent_tiles(monkeypatch):
    pytest.importorskip("numba.cuda", reason="the persistent plan needs numba-cuda")
    monkeypatch.delenv(dc.REHEARSE_ENV, raising=False)
    tasks = dc.warm_tasks()
    assert len(tasks) == len(set(tasks))
    cuda = {(c, d, r) for k, c, d, r in tasks if k == "cuda"}
    assert {(c, d, r) for c in dc.FORM_CELLS for d in ("float32", "float64")
            for r in (False, True)} <= cuda
    assert {c for k, c, _, _ in tasks if k == "cpu"} == set(dc.FORM_CELLS + dc.LAYER_CELLS)
    tiles = {(c, d, nb) for k, c, d, nb in tasks if k == "persistent"}
    assert {("lstm", "float32", nb) for nb in (1, 4, 8)} <= tiles
    assert {("gru", "float32", 4), ("gru", "float32", 8), ("lstm", "float64", 4)} <= tiles


# -- the toolchain probe (P2) -------------------------------------------------------------


def test_ptxas_is_looked_for_beside_the_nvvm_library(tmp_path):
    for root, lib in ((tmp_path / "cuda", "nvvm/lib64/libnvvm.so"),
                      (tmp_path / "wheel" / "cu13", "lib/libnvvm.so.4")):
        (root / lib).parent.mkdir(parents=True)
        (root / lib).write_text("")
        assert dc.ptxas_beside(str(root / lib)) is None
        (root / "bin").mkdir()
        (root / "bin" / "ptxas").write_text("#!/bin/sh\n")
        (root / "bin" / "ptxas").chmod(0o755)
        assert dc.ptxas_beside(str(root / lib)) == str((root / "bin" / "ptxas").resolve())
    assert dc.ptxas_beside(None) is None


def test_toolchain_notes_name_the_ptx_version_trap():
    new = {"PTX ISA written": "9.5 (sm_90)", "nvJitLink version": "12.9",
           "driver CUDA version": "13.0"}
    notes = dc.toolchain_notes(new)
    assert len(notes) == 1 and "nvJitLink 12.9" in notes[0] and "linking will fail" in notes[0]
    old_driver = dict(new, **{"nvJitLink version": "13.5", "driver CUDA version": "12.4"})
    assert "driver 12.4" in dc.toolchain_notes(old_driver)[0]
    same = {"PTX ISA written": "8.8 (sm_90)", "nvJitLink version": "12.9",
            "driver CUDA version": "- (no driver)"}
    assert dc.toolchain_notes(same) == []
    assert dc.toolchain_notes({"PTX ISA written": "- (no NVVM)"}) == []


# -- gpu_selfcheck's comparison with the float64 reference ---------------------------------


def _elman_bptt(p, x, h0, dy, dhn):
    """Forward and backward of a tanh RNN by hand (the gradients the kernels must give)."""
    T = x.shape[0]
    hs = [h0[0]]
    for t in range(T):
        hs.append(np.tanh(x[t] @ p["weight_ih"].T + p["bias_ih"] + hs[-1] @ p["weight_hh"].T
                          + p["bias_hh"]))
    g = {k: np.zeros_like(v) for k, v in p.items()}
    dx, dh = np.zeros_like(x), dhn[0].copy()
    for t in reversed(range(T)):
        da = (dh + dy[t]) * (1 - hs[t + 1] ** 2)
        g["weight_ih"] += da.T @ x[t]
        g["weight_hh"] += da.T @ hs[t]
        g["bias_ih"] += da.sum(0)
        g["bias_hh"] += da.sum(0)
        dx[t] = da @ p["weight_ih"]
        dh = da @ p["weight_hh"]
    return dict(y=np.stack(hs[1:]), hn=hs[-1][None], dx=dx, dh0=dh[None], **g)


def test_selfcheck_compares_gradients_with_the_reference_and_catches_errors():
    pytest.importorskip("numba.cuda", reason="benchmarks.persistent needs numba-cuda")
    from benchmarks.persistent import _reference_errors
    from kernrnn.plugins import get_registry

    cell = get_registry().get("rnn")
    rng = np.random.default_rng(3)
    T, B, I, H = 4, 3, 2, 5
    p = {"weight_ih": rng.uniform(-0.5, 0.5, (H, I)), "weight_hh": rng.uniform(-0.5, 0.5, (H, H)),
         "bias_ih": rng.uniform(-0.5, 0.5, H), "bias_hh": rng.uniform(-0.5, 0.5, H)}
    x, h0 = rng.uniform(-1, 1, (T, B, I)), rng.uniform(-1, 1, (1, B, H))
    dy, dhn = rng.uniform(-1, 1, (T, B, H)), rng.uniform(-1, 1, (1, B, H))
    got = _elman_bptt(p, x, h0, dy, dhn)
    lengths = np.full(B, T)
    for dt in (np.float64, np.float32):
        errs = _reference_errors(cell, x, p, h0, lengths, False, dy, dhn, got, dt,
                                 np.random.default_rng(0))
        assert set(errs) == {"y", "hn", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "x",
                             "h0[0]"}
        assert max(errs.values()) <= 1, errs
    wrong = dict(got, weight_hh=got["weight_hh"] * 1.01)  # 1% off: over float32's 8e-4
    assert _reference_errors(cell, x, p, h0, lengths, False, dy, dhn, wrong, np.float32,
                             np.random.default_rng(0))["weight_hh"] > 1
    wrong = dict(got, y=got["y"] + 1e-3)
    assert _reference_errors(cell, x, p, h0, lengths, False, dy, dhn, wrong, np.float32,
                             np.random.default_rng(0))["y"] > 1


# -- a small part of the rehearsal, end to end under the simulator -------------------------


def test_rehearsal_of_env_and_persistent_under_the_simulator(tmp_path, capsys):
    """The real phase processes, timeouts and logs, with the CUDA simulator standing in:
    the toolchain probe, the one-line kernel, the persistent self-check against the
    float64 reference, the refusal of a grid that cannot be co-resident."""
    pytest.importorskip("numba.cuda", reason="the simulator needs numba-cuda")
    rc = dc.run(["env", "persistent"], tmp_path, rehearse=True)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert rc == dc.OK, capsys.readouterr().out + "\n".join(logs.values())
    env = logs["01-env.log"]
    assert "PTX ISA written: " in env and "one-line kernel: ran" in env
    persistent = logs["02-persistent.log"]
    assert persistent.count("ok   lstm") == 4 and persistent.count("ok   gru") == 1
    assert "FAIL" not in persistent and "refused:" in persistent
    summary = (tmp_path / "summary.md").read_text()
    assert "| env | ok |" in summary and "| persistent | ok |" in summary
    assert summary.strip().splitlines()[-1].endswith("this machine's seconds]")
