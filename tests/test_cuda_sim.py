"""Runs tests/cudasim/ under Numba's CUDA simulator, in a few subprocesses.

``NUMBA_ENABLE_CUDASIM`` is read when ``numba.cuda`` is first imported, and
the rest of this suite needs the real CUDA target (the PTX compile check), so
the simulator tests get their own interpreter.  A plain ``pytest`` from the
repository root runs them; failures show the subprocess's report.  The files go in
three runs of similar length, which pytest-xdist spreads over its workers
(tests/conftest.py makes each run its own work unit under ``--dist loadfile``); a
process costs seconds to start, so the small files share one.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba.cuda", reason="the CUDA simulator needs numba-cuda (extra 'cudasim')")

HERE = Path(__file__).resolve().parent
SIM_FILES = sorted(p.name for p in (HERE / "cudasim").glob("test_*.py"))
#: The longest files (about half and a quarter of the time) run alone; every other file,
#: a new one too, runs in the third process.
ALONE = (("test_sim_cuda.py",), ("test_sim_contract.py", "test_sim_derive.py"))
RUNS = {"+".join(f[len("test_sim_"):-3] for f in run): run for run in ALONE}
RUNS["others"] = tuple(f for f in SIM_FILES if all(f not in run for run in ALONE))


def test_every_simulator_file_runs_once():
    assert sorted(f for run in RUNS.values() for f in run) == SIM_FILES
    assert len(SIM_FILES) >= 11  # a glob that finds nothing would check nothing


@pytest.mark.cudasim
@pytest.mark.parametrize("name", list(RUNS))  # the longest first
def test_cuda_backend_under_simulator(name):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("KERNRNN_CUDA_PATH", None)
    files = [str(HERE / "cudasim" / f) for f in RUNS[name]]
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
           "--rootdir", str(HERE.parent), "-x"]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=1200)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"simulator tests of {name} failed:\n{report}"
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, report
