"""CUDA backend behaviour that needs neither a GPU nor the simulator."""

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="needs numba-cuda (extra 'cudasim')")

import kernrnn  # noqa: E402
from kernrnn.backends import cuda as cb  # noqa: E402


def _gpu_usable() -> bool:
    try:
        cb.require()
    except cb.CudaUnavailableError:
        return False
    return True


@pytest.mark.skipif(cb.SIMULATOR or _gpu_usable(), reason="a GPU (or the simulator) is usable here")
def test_device_cuda_without_gpu_says_what_is_missing():
    with pytest.raises(cb.CudaUnavailableError) as info:
        kernrnn.RNN("lstm", input_size=3, hidden_size=4, device="cuda")
    msg = str(info.value)
    assert "kernrnn[cuda12]" in msg and "kernrnn[cuda13]" in msg
    assert "CuPy" in msg or "GPU" in msg or "numba-cuda" in msg


def test_path_choice(monkeypatch):
    from kernrnn.plugins import get_registry

    lstm = get_registry().get("lstm")
    monkeypatch.delenv(cb.PATH_ENV, raising=False)
    cb.set_path(None)
    assert cb.get_path() == "auto"
    assert cb._resolve_path("gemm", lstm, np.float32, 4, 8, True) == "gemm"
    monkeypatch.setenv(cb.PATH_ENV, "gemm")
    assert cb.get_path() == "gemm"
    monkeypatch.setenv(cb.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="KERNRNN_CUDA_PATH"):
        cb.get_path()
    with pytest.raises(ValueError, match="path must be one of"):
        cb.set_path("fastest")
    try:
        cb.set_path("gemm")
        assert cb.get_path() == "gemm"  # set_path wins over the environment
    finally:
        cb.set_path(None)


def test_persistent_path_needs_its_module(monkeypatch):
    from kernrnn.plugins import get_registry

    monkeypatch.setattr(cb, "_persistent_module", lambda: None)
    lstm = get_registry().get("lstm")
    with pytest.raises(ValueError, match="cuda_persistent"):
        cb._resolve_path("persistent", lstm, np.float32, 4, 8, True)
    assert cb._resolve_path("auto", lstm, np.float32, 4, 8, True) == "gemm"


def test_auto_path_asks_the_persistent_module(monkeypatch):
    from kernrnn.plugins import get_registry

    class Fake:
        @staticmethod
        def supports(cell, dtype, B, H, training):
            return B <= 16

    monkeypatch.setattr(cb, "_persistent_module", lambda: Fake)
    lstm = get_registry().get("lstm")
    assert cb._resolve_path("auto", lstm, np.float32, 8, 64, True) == "persistent"
    assert cb._resolve_path("auto", lstm, np.float32, 64, 64, True) == "gemm"
