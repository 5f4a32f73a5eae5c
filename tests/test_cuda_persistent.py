"""Persistent recurrence kernels: planning, PTX compile check, simulator run.

* The launch plan and the automatic choice (``supported``) for given device
  properties, with hypothesis-drawn sizes.
* ``cuda.compile_ptx`` for sm_90 of every registered cell's persistent
  kernels (forward train/infer, backward), float32 and float64, with no GPU:
  float32 PTX must hold no ``.f64`` instruction, the grid barrier must be
  there; where ``ptxas`` is installed (numba-cuda[cu12] brings it), no
  register spills and the register count leaves the grid co-resident.
* ``tests/cudasim_persistent`` run under the CUDA simulator in a subprocess
  (``NUMBA_ENABLE_CUDASIM`` must be set before ``numba.cuda`` is imported,
  and this process needs the real target for the PTX check).
"""

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

cuda = pytest.importorskip("numba.cuda", reason="needs numba-cuda (extra 'cudasim')")

from kernrnn.backends.cuda import persistent as cp  # noqa: E402
from kernrnn.plugins import load_registry  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "plugin_fixtures"))
import mgu_cells  # noqa: E402
from cuda_test_cells import nvvm_missing_locally  # noqa: E402

REGISTRY = load_registry(autoload=False, plugins=[mgu_cells])
# the persistent kernel runs the cells of the first contract (see Cell.plain)
PLAIN = [n for n in REGISTRY.names() if REGISTRY.get(n).plain]
H100 = cp.DeviceProps(sm_count=132, smem_per_block_optin=227 * 1024, name="H100 (nominal)")
F64 = re.compile(r"\.f64\b")


# -- plan and automatic choice ----------------------------------------------------------


@given(B=st.integers(1, 80), H=st.integers(1, 1500), blocks=st.integers(1, 200),
       threads=st.sampled_from([32, 64, 128, 256]),
       cell_name=st.sampled_from(PLAIN),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_plan_covers_every_unit_once(B, H, blocks, threads, cell_name, dtype):
    cell = REGISTRY.get(cell_name)
    p = cp.plan(cell, B, H, dtype, blocks, threads)
    assert p.blocks <= blocks
    assert p.NB in cp.NB_CHOICES and cp._nb_fits(cell.n_gates, p.NB, np.dtype(dtype).itemsize)
    assert p.blocks * p.U >= H > (p.blocks - 1) * p.U  # every block has >= 1 unit
    for nslot in (p.nslot_fwd, p.nslot_bwd):
        assert threads % nslot == 0 and nslot & (nslot - 1) == 0
    isz, G = np.dtype(dtype).itemsize, cell.n_gates
    assert p.smem_fwd >= G * p.U * H * isz and p.smem_bwd >= p.U * G * H * isz


def test_supported_on_h100_sizes():
    lstm, gru = REGISTRY.get("lstm"), REGISTRY.get("gru")
    for H in (256, 512, 1024):
        for B in (1, 4, 16, 64):
            assert cp.supported(lstm, B, H, np.float32, H100)
            assert cp.supported(gru, B, H, np.float32, H100)
    assert not cp.supported(lstm, 4, 2048, np.float32, H100)  # W_hh slice over the limit
    assert not cp.supported(lstm, 128, 256, np.float32, H100)  # batch beyond MAX_BATCH
    assert not cp.supported(lstm, 4, 256, np.float16, H100)
    small = cp.DeviceProps(sm_count=8, smem_per_block_optin=48 * 1024)
    assert not cp.supported(lstm, 4, 1024, np.float32, small)


def test_register_tile_counts_float64_twice():
    """ptxas (sm_90): the fp64 LSTM forward with NB = 8 spills 80 bytes; the plan
    keeps fp64 accumulators within the same 32 registers as fp32."""
    lstm, rnn = REGISTRY.get("lstm"), REGISTRY.get("rnn")
    assert cp.plan(lstm, 64, 256, np.float32, 132).NB == 8
    assert cp.plan(lstm, 64, 256, np.float64, 132).NB == 4
    assert cp.plan(rnn, 64, 256, np.float64, 132).NB == 8  # one gate: 16 registers


def test_auto_is_off_until_measured():
    """The persistent kernel has never run on a GPU: the automatic choice stays off."""
    assert cp.AUTO is False
    assert not cp.supports(REGISTRY.get("lstm"), np.float32, 4, 256, True)


@pytest.mark.skipif(cp._simulator(), reason="the simulator has no disk cache")
def test_persistent_kernels_use_the_disk_cache():
    """Each process would otherwise recompile and relink every variant (numba-cuda caches
    cooperative kernels).  Loading from the cache in a second process needs a GPU
    (tests/test_gpu.py); here: the dispatchers have a real cache, not Numba's NullCache."""
    k = cp.get_kernels(REGISTRY.get("rnn"), np.float32, 1)
    for d in (k.forward_train, k.forward_infer, k.backward):
        assert d._cache.cache_path is not None, d


def test_bad_overrides_name_the_argument():
    cell = REGISTRY.get("rnn")
    with pytest.raises(ValueError, match="threads"):
        cp.plan(cell, 1, 4, np.float32, blocks=2, threads=24)
    with pytest.raises(ValueError, match="blocks"):
        cp.plan(cell, 1, 4, np.float32, blocks=0)
    with pytest.raises(ValueError, match="nb"):
        cp.plan(cell, 1, 4, np.float32, blocks=1, nb=3)


# -- PTX compile check ------------------------------------------------------------------


def _ptxas():
    """The ptxas that ships beside the NVVM numba-cuda uses, else the wheel's, else PATH's.

    PTX from an NVVM newer than ptxas is refused ("Unsupported .version 9.5; current
    version is '9.0'"), so a system ptxas older than the NVVM wheel must not win."""
    try:
        from numba.cuda.cuda_paths import get_cuda_paths

        nvvm = get_cuda_paths()["nvvm"].info
    except Exception:
        nvvm = None
    if nvvm:
        for parent in list(Path(nvvm).resolve().parents)[:4]:  # lib64, nvvm, toolkit root
            cand = parent / "bin" / "ptxas"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        cand = Path(base) / "cuda_nvcc" / "bin" / "ptxas"
        if cand.exists():
            return str(cand)
    return shutil.which("ptxas")


ptx_check = pytest.mark.skipif(
    cp._simulator() or nvvm_missing_locally(),
    reason="compile_ptx needs NVVM (numba-cuda[cu12] or [cu13]) and the real CUDA target")


def _ptxas_report(ptx: str):
    """(registers, spill bytes, stack bytes) from ptxas -v, or None without ptxas."""
    exe = _ptxas()
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(ptx)
        proc = subprocess.run([exe, "-arch=sm_90", "-v", "-c", "-o", os.devnull, str(path)],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    regs = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill", proc.stderr))
    stack = int(re.search(r"(\d+) bytes stack frame", proc.stderr).group(1))
    return regs, spills, stack


@functools.cache
def _ptx(cell_name: str, dtype: np.dtype, nb: int, which: str) -> str:
    """sm_90 PTX of one persistent kernel, compiled once per process (two tests read the
    fp32 LSTM's)."""
    k = cp.get_kernels(REGISTRY.get(cell_name), dtype, nb)
    fwd, bwd = cp.ptx_signatures(dtype)
    sig = bwd if which == "backward" else fwd
    return cuda.compile_ptx(getattr(k, which).py_func, sig, cc=(9, 0))[0]


@ptx_check
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("cell_name", PLAIN)
def test_persistent_kernels_compile_to_ptx(cell_name, dtype):
    cell = REGISTRY.get(cell_name)
    kernels = [("forward_train", 4), ("backward", 4)]
    if dtype == np.float32:
        kernels.append(("forward_infer", 4))
    nb = cp._nb_for(cp.MAX_BATCH, cell.n_gates, np.dtype(dtype).itemsize)
    if nb != 4:  # the largest tile the plan picks for this dtype: most registers
        kernels += [("forward_train", nb), ("backward", nb)]
    for which, nbk in kernels:
        ptx = _ptx(cell_name, np.dtype(dtype), nbk, which)
        label = which if nbk == 4 else f"{which} nb={nbk}"
        where = f"{cell_name} {label} {np.dtype(dtype)}"
        assert "cudaCGSynchronize" in ptx, f"{where}: no grid barrier in the PTX"
        assert ".extern .shared" in ptx, f"{where}: no dynamic shared memory"
        if dtype == np.float32:
            n = len(F64.findall(ptx))
            assert n == 0, f"{where}: {n} float64 instructions in float32 PTX"
        rep = _ptxas_report(ptx)
        if rep is not None:
            regs, spills, stack = rep
            print(f"{where}: {regs} registers, {spills} bytes spilled, {stack} bytes stack")
            assert spills == 0, f"{where}: {spills} bytes of register spills"
            # one block of THREADS per SM must fit the 64K-register file
            assert regs * cp.THREADS <= 65536, f"{where}: {regs} registers per thread"


def _k_loop(ptx: str):
    """The instructions of the reduction's inner loop: the PTX block that branches back to
    itself and holds FMAs and shared-memory loads."""
    blocks, name = {}, None
    for line in ptx.splitlines():
        line = line.strip()
        m = re.match(r"^(\$L__BB\d+_\d+):", line)
        if m:
            name = m.group(1)
            blocks[name] = []
        elif name and line and not line.startswith("//") and line not in "{}":
            blocks[name].append(line)
    loops = [ins for label, ins in blocks.items()
             if any(re.search(rf"bra(\.uni)?\s+{re.escape(label)};", i) for i in ins)
             and any(i.startswith("fma.rn") for i in ins) and any("ld.shared" in i for i in ins)]
    assert len(loops) == 1, f"expected one k-loop, found {len(loops)}"
    return loops[0]


@ptx_check
@pytest.mark.parametrize("which, limit", [("forward_train", 1.2), ("backward", 2.5)])
def test_inner_loop_index_math_is_cheap(which, limit):
    """The k-loop steps unsigned offsets from hoisted row bases: no negative-index fix-up
    (shr.s64 of a signed index) and at most ``limit`` integer or control instructions
    per FMA in the PTX (fp32 LSTM, NB = 4; before: 2.8 forward, 6.7 backward)."""
    loop = _k_loop(_ptx("lstm", np.dtype(np.float32), 4, which))
    fma = sum(i.startswith("fma.rn") for i in loop)
    other = sum(not (i.startswith("fma.rn") or i.startswith("ld.")) for i in loop)
    assert not [i for i in loop if i.startswith("shr.s64")], "\n".join(loop)
    assert other <= limit * fma, f"{which}: {other} integer instructions for {fma} FMAs:\n" \
        + "\n".join(loop)


# -- simulator, in a subprocess -----------------------------------------------------------


@pytest.mark.cudasim
def test_persistent_kernels_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    cmd = [sys.executable, "-m", "pytest", str(HERE / "cudasim_persistent"), "-q",
           "-p", "no:cacheprovider", "--rootdir", str(HERE.parent), "-x"]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=1200)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"simulator tests failed:\n{report}"
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, report


# -- real GPU ---------------------------------------------------------------------------


def _gpu_available() -> bool:
    if cp._simulator() or importlib.util.find_spec("cupy") is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="needs a CUDA GPU and CuPy")
def test_gpu_selfcheck(capsys):
    """Several-block persistent launches with the real grid barrier vs the CPU kernels."""
    from benchmarks import persistent as bench_persistent

    ok = bench_persistent.gpu_selfcheck()
    report = capsys.readouterr().out
    assert ok, report


def test_main_rejects_unknown_task(capsys):
    from benchmarks import persistent as bench_persistent

    with pytest.raises(SystemExit) as exc:
        bench_persistent.main(["nope"])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err


class _FakeDriver:
    def __init__(self):
        self.calls = []

    def cuKernelSetAttribute(self, attr, value, handle, dev):  # noqa: N802 - the driver's name
        self.calls.append(("kernel", value, dev))

    def cuFuncSetAttribute(self, handle, attr, value):  # noqa: N802
        self.calls.append(("function", value))


def _fake_kernel(handle, static=0, local=0, device=0, coop=132):
    attrs = type("A", (), {"shared": static, "local": local})()
    dev = type("D", (), {"id": device, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 227 * 1024})()
    func = type("F", (), {"handle": handle, "device": dev, "attrs": attrs, "name": "k"})()

    class Kernel:
        _codelibrary = type("L", (), {"get_cufunc": staticmethod(lambda: func)})()

        def max_cooperative_grid_blocks(self, threads, smem):
            return coop if smem <= 200_000 else 0

    kernel = Kernel()

    class Dispatcher:
        def typeof_pyval(self, a):
            return type(a)

        def compile(self, argtypes):
            return kernel

    return Dispatcher()


@pytest.fixture
def fake_driver(monkeypatch):
    from numba.cuda.cudadrv import driver as drv

    fake = _FakeDriver()
    monkeypatch.setattr(drv, "driver", fake)
    monkeypatch.setattr(cp, "_smem_optin", {})
    monkeypatch.setattr(cp, "_coop_limit", {})
    monkeypatch.setattr(cp, "_local_mem_warned", set())
    return fake


def _handles():
    from cuda.bindings import driver as binding

    return {"CUkernel (numba-cuda >= 0.23)": (binding.CUkernel(0), "kernel"),
            "CUfunction (numba-cuda 0.20-0.22)": (binding.CUfunction(0), "function")}


@pytest.mark.parametrize("which", list(_handles()))
def test_prepare_opts_in_shared_memory_monotonically(fake_driver, which):
    """The launch preparation, with the driver faked (no GPU here), for both handle types."""
    handle, kind = _handles()[which]
    d = _fake_kernel(handle)
    cp._prepare(d, (1,), 256, 40_000, 132)  # under 48 KiB: no opt-in
    cp._prepare(d, (1,), 256, 150_000, 132)
    cp._prepare(d, (1,), 256, 100_000, 132)  # smaller: keeps 150 KB
    cp._prepare(d, (1,), 256, 150_000, 132)
    assert [c[:2] for c in fake_driver.calls] == [(kind, 150_000)]
    with pytest.raises(ValueError, match="resident"):
        cp._prepare(d, (1,), 256, 180_000, 133)
    with pytest.raises(ValueError, match="resident"):
        cp._prepare(d, (1,), 256, 210_000, 1)
    assert [c[1] for c in fake_driver.calls] == [150_000, 180_000, 210_000]


def test_prepare_counts_static_shared_memory(fake_driver):
    from cuda.bindings import driver as binding

    handle = binding.CUkernel(0)
    cp._prepare(_fake_kernel(handle, static=4096), (1,), 256, 40_000, 1)  # 44 KB in all
    assert fake_driver.calls == []
    cp._prepare(_fake_kernel(handle, static=16384), (1,), 256, 40_000, 1)  # 56 KB in all
    assert fake_driver.calls == [("kernel", 40_000, 0)]
    with pytest.raises(ValueError, match="static shared memory"):
        cp._prepare(_fake_kernel(handle, static=16384), (1,), 256, 227 * 1024, 1)


def test_prepare_keys_its_caches_by_device(fake_driver):
    from cuda.bindings import driver as binding

    handle = binding.CUkernel(0)
    cp._prepare(_fake_kernel(handle, device=0), (1,), 256, 100_000, 1)
    cp._prepare(_fake_kernel(handle, device=1), (1,), 256, 100_000, 1)
    assert fake_driver.calls == [("kernel", 100_000, 0), ("kernel", 100_000, 1)]
    # the co-residency limit is the second device's own
    with pytest.raises(ValueError, match="at most 8"):
        cp._prepare(_fake_kernel(handle, device=2, coop=8), (1,), 256, 1_000, 9)


def test_prepare_refuses_a_handle_it_cannot_configure(fake_driver):
    with pytest.raises(ValueError, match="numba-cuda >= 0.23"):
        cp._prepare(_fake_kernel(object()), (1,), 256, 100_000, 1)
    cp._prepare(_fake_kernel(object()), (1,), 256, 40_000, 1)  # no opt-in needed: fine


def test_prepare_warns_once_about_local_memory(fake_driver):
    from cuda.bindings import driver as binding

    d = _fake_kernel(binding.CUkernel(0), local=80)
    with pytest.warns(RuntimeWarning, match="80 bytes of local memory"):
        cp._prepare(d, (1,), 256, 1_000, 1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cp._prepare(d, (1,), 256, 1_000, 1)
