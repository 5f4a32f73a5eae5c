"""DistributedDataParallel with kernrnn.torch modules: 2 CPU processes on gloo."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

WORKER = Path(__file__).with_name("torch_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, tmp_path):
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_processes_give_the_single_process_gradients(tmp_path):
    port = _free_port()
    ref = _run([0, 1, 0, tmp_path / "single.npz"], tmp_path)
    ranks = [_run([r, 2, port, tmp_path / f"rank{r}.npz"], tmp_path) for r in range(2)]
    for name, p in zip(["single process", "rank 0", "rank 1"], [ref, *ranks]):
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in [ref, *ranks]:
                q.kill()
            pytest.fail(f"the DDP worker ({name}) did not finish within 300 s")
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n" + out.decode()[-3000:]
    want = np.load(tmp_path / "single.npz")
    for r in range(2):
        got = np.load(tmp_path / f"rank{r}.npz")
        assert sorted(got.files) == sorted(want.files)
        assert any(n.startswith("lstm.weight_hh") for n in got.files)
        for name in want.files:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12,
                                       err_msg=name)
