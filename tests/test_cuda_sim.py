"""Runs tests/cudasim/ under Numba's CUDA simulator, in a subprocess.

``NUMBA_ENABLE_CUDASIM`` is read when ``numba.cuda`` is first imported, and
the rest of this suite needs the real CUDA target (the PTX compile check), so
the simulator tests get their own interpreter.  A plain ``pytest`` from the
repository root runs them; failures show the subprocess's report.  The run is its own
work unit under ``--dist loadfile`` (tests/conftest.py), and tests/conftest.py keeps the
simulator's block manager from holding the GIL while it polls (about 40 s for all files,
where it took minutes).  The cell math runs there as Python (``kernrnn.scalar.python_scalar``):
about 25 s with a warm kernel cache.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba.cuda", reason="the CUDA simulator needs numba-cuda (extra 'cudasim')")

HERE = Path(__file__).resolve().parent


@pytest.mark.cudasim
def test_cuda_backend_under_simulator():
    assert len(list((HERE / "cudasim").glob("test_*.py"))) >= 11  # files lost would check less
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("KERNRNN_CUDA_PATH", None)
    cmd = [sys.executable, "-m", "pytest", str(HERE / "cudasim"), "-q", "-p", "no:cacheprovider",
           "--rootdir", str(HERE.parent), "-x"]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=1200)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"simulator tests failed:\n{report}"
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, report
