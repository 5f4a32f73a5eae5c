"""PTX compile check: every cell's CUDA kernels compile for sm_90, without a GPU.

``cuda.compile_ptx`` runs NVVM from the numba-cuda[cu12]/[cu13] wheels, so this
catches what the simulator cannot (types, unsupported calls, tuple indexing).
float32 kernels must hold no float64 instruction: a Python literal promoted to
float64 would make the GPU run at a fraction of its float32 speed.
"""

import re

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="the PTX check needs numba-cuda (extra 'cudasim')")

from cuda_test_cells import nvvm_missing_locally, registry_with_test_cells  # noqa: E402

from kernrnn.backends import cuda as cb  # noqa: E402

if cb.SIMULATOR:
    pytest.skip("compile_ptx needs the real CUDA target, not the simulator",
                allow_module_level=True)

REGISTRY = registry_with_test_cells()
F64 = re.compile(r"\.f64\b")


pytestmark = pytest.mark.skipif(nvvm_missing_locally(),
                                reason="NVVM not found: install numba-cuda[cu12] or [cu13]")


# float32 for every cell (where a leaked float64 would cost most); float64 for the
# cells of the first contract and one cell per form of the second (CI time: each
# compile_ptx of a cell's kernels takes seconds).
FLOAT64_CELLS = {"rnn", "lstm", "gru", "lstm_peephole", "slstm", "lstm_ln", "mingru", "indrnn"}
CASES = [(name, np.float32) for name in REGISTRY.names()] + [
    (name, np.float64) for name in REGISTRY.names()
    if name in FLOAT64_CELLS or name.startswith("test_")]


@pytest.mark.parametrize("cell_name, dtype", CASES,
                         ids=[f"{n}-{np.dtype(d).name}" for n, d in CASES])
def test_kernels_compile_to_ptx(cell_name, dtype):
    cell = REGISTRY.get(cell_name)
    kernels = cb.get_kernels(cell, dtype)
    sigs = cb.ptx_signatures(cell, dtype)
    assert any(n.endswith("forward_train_py") or n.startswith("step_stage2_train") for n in sigs)
    assert any("backward" in n for n in sigs)
    for name, sig in sigs.items():
        ptx, _ = cuda.compile_ptx(getattr(kernels, name), sig, cc=(9, 0))
        assert ".visible .entry" in ptx, f"{cell_name} {name}: no kernel entry in the PTX"
        assert ".target sm_90" in ptx
        if np.dtype(dtype) == np.float32:
            hits = [line.strip() for line in ptx.splitlines() if F64.search(line)]
            assert not hits, (f"cell {cell_name!r} kernel {name} float32 PTX holds {len(hits)} "
                              f"float64 instructions, e.g. {hits[:3]}")
        else:
            # float64 kernels really compute in float64 (no accidental float32 path)
            assert F64.search(ptx), f"{cell_name} {name}: float64 PTX has no .f64 instruction"


def test_contiguous_output_signature_also_compiles():
    """Y and dY may also arrive C-contiguous (functional API); that variant compiles too."""
    cell = REGISTRY.get("lstm")
    k = cb.get_kernels(cell, np.float32)
    for name, sig in cb.ptx_signatures(cell, np.float32, y_layout="C").items():
        ptx, _ = cuda.compile_ptx(getattr(k, name), sig, cc=(9, 0))
        assert not F64.search(ptx)


@pytest.mark.parametrize("cell_name", ["lstm_ln", "test_lstm_rms"])
def test_row_statistics_reduce_over_a_block(cell_name):
    """The norm kernels run one block per row: a shared-memory reduction between barriers
    (not one thread walking its row), in float32 without float64 instructions."""
    from zoo_test_cells import LSTM_RMS

    cell = LSTM_RMS if cell_name == "test_lstm_rms" else REGISTRY.get(cell_name)
    k = cb.get_kernels(cell, np.float32)
    names = [n for n in cb.ptx_signatures(cell, np.float32) if n.startswith("norm_")]
    assert sorted(names) == ["norm_hu_backward_py", "norm_hu_py", "norm_z_backward_py",
                             "norm_z_py"]
    for name in names:
        ptx, _ = cuda.compile_ptx(getattr(k, name), cb.ptx_signatures(cell, np.float32)[name],
                                  cc=(9, 0))
        assert "bar.sync" in ptx and ".shared" in ptx, f"{cell_name} {name}: no block reduction"
        assert not F64.search(ptx), f"{cell_name} {name}: float64 in float32 PTX"
