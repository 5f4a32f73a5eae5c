"""The prepared device check, without a device: phase selection, timeouts, budget,
logs, the no-GPU path, skip logic and the table (with made-up numbers, here only)."""

import os
import sys
import time
from pathlib import Path

import pytest

from benchmarks import devicecheck as dc


def test_default_phases_fit_the_budget_and_list(capsys):
    defaults = [p for p in dc.PHASES.values() if p.default]
    assert [p.name for p in defaults] == ["env", "gemm", "persistent", "layer", "bench"]
    assert sum(p.timeout for p in defaults) <= dc.BUDGET <= 7.5 * 60
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
    assert "| gemm | timeout |" in (out / "summary.md").read_text()
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
