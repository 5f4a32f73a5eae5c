"""The prepared check of kernrnn on a real GPU: ``python -m benchmarks.devicecheck``.

One command (``scripts/gpu-check.sh`` runs it from a checkout) of at most
seven minutes (420 s), so that one rerun still fits a 15-minute (900 s)
device loan.  Each phase runs in its own process with its own timeout, so a
crash or a hang shows up as that phase's failure and the later phases still
run; any phase can be rerun alone (``... devicecheck persistent``).  Logs go
to ``$OUT/devicecheck/`` when ``OUT`` is set (else ``./devicecheck-logs``, or
``--out``): one log per phase (and per test shard), ``summary.md`` and
``summary.json``, and the benchmark table ``gpu-<gpu>.md`` ready to commit
under ``docs/benchmarks/`` (and to list on the Benchmarks page, ``docs/benchmarks.md``).

Phases (default order; ``--list`` shows the timeouts):

``env``         versions; NVVM, nvJitLink, ptxas and driver as numba-cuda finds them and
                the PTX ISA that NVVM writes; device properties; a one-line kernel
                compiled and launched; whether libcudadevrt and cuBLAS are found
``warm``        compiles, in a pool of processes, every kernel the later phases use into
                the kernel cache (``KERNRNN_CACHE_DIR``), so that they only load: the CUDA
                modules of one cell per form (``FORM_CELLS``) in float32 and float64,
                plain and regularised, with contiguous and strided outputs (LSTMP and
                the parallel scan included), the persistent modules (each batch tile),
                and the CPU kernels the tests compare with.  A failed compile is
                reported once and the rest goes on.
``gemm``        the gpu-marked tests with ``KERNRNN_CUDA_PATH=gemm``, one process per cell
                of ``FORM_CELLS`` plus one for the tests of no cell, ``--durations=15``
``persistent``  the persistent kernel: one launch equals the stepwise launches bit for
                bit and the float64 NumPy reference (``kernrnn.testing.reference``), the
                >48 KiB shared-memory case (LSTM H=1024), registers / local memory /
                co-resident blocks of the kernels, an oversubscribed grid refused
                (never hung)
``layer``       the default path through ``kernrnn.RNN`` (and CUDA graphs), and
                ``kernrnn.torch`` with CUDA tensors where that module exists
``bench``       times against cuDNN (float32, IEEE, CUDA events, medians) for the GEMM
                path, the GEMM path with graphs and the persistent path
``persistent-tests`` (not in the default set) the gpu-marked tests on the persistent path

The run ends with a budget line: seconds per phase, their sum against the
planned 420 s, and what that leaves of the 900 s device budget.

``--rehearse`` runs the same phases, processes and timeouts with Numba's CUDA
simulator standing in for the GPU (NumPy for CuPy, PyTorch on the CPU for
cuDNN, wall-clock times for CUDA events) on scaled-down shapes; the ``gemm``
shards run the simulator's tests (``tests/cudasim/test_sim_cuda.py``) of the
same cells.  It checks the harness on a machine without a GPU, so that the
first device run tests kernels and not the harness.  Its times are of the
machine it runs on, not of a device.

Exit status: 0 when every phase passed, 1 when one failed or timed out, 2
when there is no usable GPU (the GPU phases are then skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PHASES", "Phase", "main", "run", "format_table", "target_lines", "budget_line",
           "warm", "warm_tasks", "toolchain", "BENCH_CASES", "FORM_CELLS"]

OK, FAILED, NO_GPU, SKIPPED = 0, 1, 2, 3
DEADLINE_ENV = "KERNRNN_DEVICECHECK_DEADLINE"  # epoch seconds the current phase must end by
REHEARSE_ENV = "KERNRNN_DEVICECHECK_REHEARSE"  # "1": the simulator stands in for the GPU


@dataclass(frozen=True)
class Phase:
    name: str
    timeout: float  # seconds
    doc: str
    default: bool = True


PHASES = {p.name: p for p in (
    Phase("env", 30, "versions (NVVM, nvJitLink, driver), device, one kernel compiled and run"),
    Phase("warm", 160, "compile every kernel of the later phases, in a process pool"),
    Phase("gemm", 70, "gpu-marked tests with KERNRNN_CUDA_PATH=gemm, one process per cell"),
    Phase("persistent", 45, "persistent kernel on the real grid barrier vs the reference"),
    Phase("layer", 40, "default path through kernrnn.RNN, graphs, kernrnn.torch"),
    Phase("bench", 75, "times against cuDNN for each path"),
    Phase("persistent-tests", 120, "gpu-marked tests with KERNRNN_CUDA_PATH=persistent",
          default=False),
)}
BUDGET = 420  # seconds for the default phases together (the sum of their timeouts)
DEVICE_BUDGET = 900  # seconds of device time a loan gives (machine start not counted here)

#: One cell per form of the cell contract: dense (LSTM, GRU), heads (sLSTM), a
#: recurrent norm (LSTM-LN), per-unit parameters (peephole LSTM), a linear scan
#: without recurrent matrix (minGRU), a per-unit recurrence (IndRNN).
FORM_CELLS = ("lstm", "gru", "slstm", "lstm_ln", "lstm_peephole", "mingru", "indrnn")
PERSISTENT_TEST_CELLS = ("lstm", "gru")  # the persistent path runs plain dense cells only
LAYER_CELLS = ("lstm", "gru", "rnn")  # the layer phase's cells (and kernrnn.torch's)
#: The simulator's stand-ins for the gemm shards in a rehearsal: cheap, one per cell.
REHEARSAL_TESTS = ("tests/cudasim/test_sim_cuda.py", "-k",
                   "forward_matches_reference or layer_moves_between_devices")

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]  # the source checkout: benchmarks/, kernrnn/, plugins/, tests/


def _in_checkout() -> bool:
    return (REPO / "tests" / "test_gpu.py").exists() and (REPO / "plugins").is_dir()


def rehearsing() -> bool:
    """Whether this phase runs under the simulator (``--rehearse``)."""
    return os.environ.get(REHEARSE_ENV) == "1"


# -- the runner --------------------------------------------------------------------------


def _default_out(rehearse: bool = False) -> Path:
    out = os.environ.get("OUT")
    if out:
        return Path(out) / ("devicecheck-rehearsal" if rehearse else "devicecheck")
    return Path("devicecheck-rehearsal" if rehearse else "devicecheck-logs")


def child_env(out: Path, rehearse: bool = False) -> tuple[dict, list[str]]:
    """The phases' environment, and notes on what was adjusted."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    notes = []
    # The children run ``-m benchmarks.devicecheck``, so the checkout is always on the
    # path; kernrnn and its cells come from it too, uninstalled (the device may lack the deps).
    paths = [str(REPO)] + ([str(REPO / "plugins")] if (REPO / "plugins").is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(
        paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if "KERNRNN_CACHE_DIR" not in env:  # shared by the phases, kept between reruns
        base = REPO if _in_checkout() else out
        env["KERNRNN_CACHE_DIR"] = str(base / ".kcache")
    missing = [m for m in ("scipy", "threadpoolctl") if importlib.util.find_spec(m) is None]
    if missing and "NUMBA_NUM_THREADS" not in env:
        # the multi-threaded CPU reference limits SciPy's BLAS through threadpoolctl
        env["NUMBA_NUM_THREADS"] = "1"
        notes.append(f"{', '.join(missing)} missing: CPU reference single-threaded")
    if rehearse:
        env.update({"NUMBA_ENABLE_CUDASIM": "1", REHEARSE_ENV: "1"})
        notes.append("rehearsal: Numba's CUDA simulator stands in for the GPU, shapes are "
                     "scaled down, timeouts are the device's; times are this machine's")
    else:
        env.pop(REHEARSE_ENV, None)
    return env, notes


def _child_command(name: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.devicecheck", "--child", name, "--out", str(out)]


def _run_child(cmd, env, log_path: Path, timeout: float) -> tuple[str, int | None, float]:
    """(status, return code, seconds); a timeout kills the child's whole process group."""
    t0 = time.monotonic()
    env = dict(env, **{DEADLINE_ENV: f"{time.time() + timeout:.0f}"})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            return "timeout", None, time.monotonic() - t0
    status = {OK: "ok", NO_GPU: "no GPU", SKIPPED: "skipped"}.get(rc, "failed")
    return status, rc, time.monotonic() - t0


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def budget_line(results, planned: float, rehearse: bool = False) -> str:
    """Seconds per phase and in all, against the timeouts and the device budget."""
    spent = sum(r["seconds"] for r in results)
    parts = " + ".join(f"{r['phase']} {r['seconds']:.0f}" for r in results) or "nothing run"
    left = DEVICE_BUDGET - spent
    line = (f"budget: {parts} = {spent:.0f} s (timeouts allow {planned:.0f} s); "
            f"{left:.0f} s of the {DEVICE_BUDGET} s device budget left, "
            f"{'room' if left >= planned else 'no room'} for one rerun of at most "
            f"{planned:.0f} s")
    return line + (" [rehearsal under the simulator: this machine's seconds]" if rehearse
                   else "")


def run(names, out: Path, budget: float = BUDGET, scale: float = 1.0,
        rehearse: bool = False) -> int:
    """Run the phases ``names`` in order, each in its own process; returns the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    env, notes = child_env(out, rehearse)
    for note in notes:
        print(f"note: {note}", flush=True)
    started = time.monotonic()
    results, no_gpu = [], False
    planned = min(budget, sum(PHASES[n].timeout * scale for n in names))
    for i, name in enumerate(names, 1):
        phase = PHASES[name]
        log = out / f"{i:02d}-{name}.log"
        left = budget - (time.monotonic() - started)
        timeout = min(phase.timeout * scale, left)
        if no_gpu and name != "env":
            status, rc, secs = "skipped (no usable GPU)", None, 0.0
        elif timeout < min(phase.timeout * scale, 5):  # too little left to start it
            status, rc, secs = "skipped (time budget spent)", None, 0.0
        else:
            print(f"[{name}] running (timeout {timeout:.0f} s, log {log})", flush=True)
            status, rc, secs = _run_child(_child_command(name, out), env, log, timeout)
            no_gpu = no_gpu or status == "no GPU"
        results.append(dict(phase=name, status=status, rc=rc, seconds=round(secs, 1),
                            timeout=round(timeout, 1), log=log.name if log.exists() else None))
        print(f"[{name}] {status} ({secs:.0f} s)", flush=True)
        if status not in ("ok", "skipped") and log.exists():
            print(_tail(log), flush=True)
    line = budget_line(results, planned, rehearse)
    print(line, flush=True)
    _write_summary(out, results, notes, line)
    if any(r["status"] in ("failed", "timeout") for r in results):
        return FAILED
    return NO_GPU if no_gpu else OK


def _write_summary(out: Path, results, notes, line: str) -> None:
    (out / "summary.json").write_text(json.dumps(dict(results=results, notes=notes,
                                                      budget=line), indent=1))
    lines = ["# kernrnn device check", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"`{' '.join(['python -m benchmarks.devicecheck'] + sys.argv[1:])}`", ""]
    lines += [f"note: {n}" for n in notes]
    lines += ["| phase | status | seconds | timeout | log |", "|---|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['status']} | {r['seconds']} | {r['timeout']} | "
              f"{r['log'] or '-'} |" for r in results]
    lines += ["", line]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# -- phase helpers (run inside the child processes) --------------------------------------


def _deadline() -> float:
    return float(os.environ.get(DEADLINE_ENV, time.time() + 3600))


def _gpu_or_exit():
    """The CUDA backend module, or exit with NO_GPU (under the simulator: always there)."""
    from kernrnn.backends import cuda as cb

    try:
        cb.require()
    except cb.CudaUnavailableError as exc:
        print(f"no usable GPU: {exc}")
        raise SystemExit(NO_GPU) from None
    return cb


def _host(a) -> np.ndarray:
    """A NumPy copy of a device (CuPy) or host array."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def _sync(cb) -> None:
    if cb.xp is not np:
        cb.xp.cuda.Device().synchronize()


def _version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "-"


def versions() -> dict:
    """Versions of what the GPU path runs on (missing ones as '-')."""
    v = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("numba", "numba-cuda", "llvmlite", "cuda-bindings", "cuda-core",
                 "cuda-pathfinder", "nvidia-cuda-nvcc-cu12", "nvidia-nvvm",
                 "nvidia-nvjitlink-cu12", "nvidia-nvjitlink", "cupy-cuda12x", "cupy-cuda13x",
                 "torch", "scipy", "threadpoolctl", "pluggy", "pytest", "hypothesis"):
        v[dist] = _version(dist)
    try:
        import cupy

        rt = cupy.cuda.runtime
        v["cuda runtime"] = rt.runtimeGetVersion()
        v["cuda driver"] = rt.driverGetVersion()
    except Exception as exc:  # noqa: BLE001
        v["cuda runtime"] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        v["torch cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else "-"
    except Exception:  # noqa: BLE001
        pass
    v["nvidia-smi driver"] = _driver_version()
    return v


def _driver_version() -> str:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 else "-"
    except Exception:  # noqa: BLE001
        return "-"


def device_properties() -> dict:
    """What the kernels depend on, from the driver (each one '?' where it cannot be read)."""
    if rehearsing():
        return {"name": "CUDA simulator (rehearsal)", "compute capability": "-"}
    import cupy
    from numba import cuda

    dev = cuda.get_current_device()

    def attr(name, scale=1):
        try:
            return int(getattr(dev, name)) // scale
        except Exception:  # noqa: BLE001 - an attribute this driver/binding lacks
            return "?"

    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    return {"name": name, "compute capability": ".".join(map(str, dev.compute_capability)),
            "SMs": attr("MULTIPROCESSOR_COUNT"),
            "memory GiB": round(cupy.cuda.Device().mem_info[1] / 2**30, 1),
            "shared memory per block (opt-in) KiB": attr("MAX_SHARED_MEMORY_PER_BLOCK_OPTIN",
                                                         1024),
            "shared memory per SM KiB": attr("MAX_SHARED_MEMORY_PER_MULTIPROCESSOR", 1024),
            "registers per SM": attr("MAX_REGISTERS_PER_MULTIPROCESSOR"),
            "cooperative launch": attr("COOPERATIVE_LAUNCH"),
            "clock MHz": attr("CLOCK_RATE", 1000)}


# -- env: the toolchain, and one kernel ------------------------------------------------------


def _one_line_kernel():
    """The env phase's kernel, as a plain function for ``cuda.jit``/``compile_ptx``."""
    from benchmarks._one_kernel import add_one

    return add_one


def ptxas_beside(library: str | None) -> str | None:
    """The ``ptxas`` of the toolkit (or wheel) that ships ``library`` (libnvvm): PTX from
    that NVVM is newer than an older ptxas accepts ("Unsupported .version")."""
    if not library:
        return None
    for parent in list(Path(library).resolve().parents)[:4]:
        cand = parent / "bin" / "ptxas"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def _run_version(exe: str) -> str:
    try:
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}"
    lines = [ln for ln in proc.stdout.splitlines() if "release" in ln or "V1" in ln]
    return lines[-1].strip() if lines else proc.stdout.strip()[-80:]


def _cuda_major_of_ptx_isa(isa: str) -> int | None:
    """CUDA 12.x writes PTX ISA 8.x, CUDA 13.x ISA 9.x."""
    m = re.match(r"(\d+)\.(\d+)", isa or "")
    return int(m.group(1)) + 4 if m else None


def toolchain(cc=None) -> dict:
    """NVVM, nvJitLink, ptxas and the driver as numba-cuda finds them, and the PTX ISA
    version NVVM writes (a one-line kernel compiled to PTX: no GPU needed).  Values it
    cannot read are '-' or the reason; never raises."""
    info: dict = {}
    nvvm_path = None
    try:
        from numba.cuda.cuda_paths import get_cuda_paths

        found = get_cuda_paths()["nvvm"]
        nvvm_path = found.info
        info["NVVM library"] = f"{found.info} (found via {found.by})"
    except Exception as exc:  # noqa: BLE001
        info["NVVM library"] = f"not found ({type(exc).__name__}: {exc})"
    try:
        from numba.cuda.cudadrv import nvvm

        lib = nvvm.NVVM()
        info["NVVM version"] = ".".join(map(str, lib.get_version()))
        info["NVVM IR version"] = ".".join(map(str, lib.get_ir_version()))
    except Exception as exc:  # noqa: BLE001
        info["NVVM version"] = f"unavailable ({type(exc).__name__}: {exc})"
    try:
        from cuda.bindings import nvjitlink

        info["nvJitLink version"] = ".".join(map(str, nvjitlink.version()))
    except Exception as exc:  # noqa: BLE001
        info["nvJitLink version"] = f"unavailable ({type(exc).__name__})"
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        info["nvJitLink library"] = load_nvidia_dynamic_lib("nvJitLink").abs_path
    except Exception as exc:  # noqa: BLE001
        info["nvJitLink library"] = f"not found ({type(exc).__name__})"
    ptxas = ptxas_beside(nvvm_path)
    info["ptxas beside NVVM"] = f"{ptxas} ({_run_version(ptxas)})" if ptxas else "-"
    info["CUDA_HOME"] = os.environ.get("CUDA_HOME", "") or "-"
    try:
        from cuda.bindings import driver

        err, v = driver.cuDriverGetVersion()
        info["driver CUDA version"] = f"{v // 1000}.{v % 1000 // 10}" if int(err) == 0 else "-"
    except Exception as exc:  # noqa: BLE001
        info["driver CUDA version"] = f"- ({type(exc).__name__})"
    try:
        from numba import cuda, types

        cc = tuple(cc) if cc else (9, 0)
        ptx, _ = cuda.compile_ptx(_one_line_kernel(), (types.float32[::1],), cc=cc)
        m = re.search(r"^\s*\.version\s+(\S+)", ptx, re.M)
        info["PTX ISA written"] = f"{m.group(1) if m else '?'} (sm_{cc[0]}{cc[1]})"
    except Exception as exc:  # noqa: BLE001
        info["PTX ISA written"] = f"- ({type(exc).__name__}: {str(exc)[:200]})"
    return info


def toolchain_notes(info: dict) -> list[str]:
    """The version trap: PTX from an NVVM newer than the nvJitLink that links it (numba-cuda
    links through nvJitLink), or than the driver's own JIT."""
    notes = []
    need = _cuda_major_of_ptx_isa(info.get("PTX ISA written", ""))
    if need is None:
        return notes
    for key, what in (("nvJitLink version", "nvJitLink"), ("driver CUDA version", "driver")):
        m = re.match(r"(\d+)\.", str(info.get(key, "")))
        if m and int(m.group(1)) < need:
            notes.append(f"{what} {info[key]} is older than the NVVM that writes PTX ISA "
                         f"{info['PTX ISA written'].split()[0]} (CUDA {need})"
                         + (": linking will fail" if what == "nvJitLink" else
                            ": the PTX loads only through a newer nvJitLink"))
    return notes


def _toolchain_here_or_apart() -> dict:
    """:func:`toolchain` in this process, or (under the simulator, which has no
    compile_ptx) in a child without the simulator."""
    from kernrnn.backends import cuda as cb

    if not cb.SIMULATOR:
        from numba import cuda

        cc = cuda.get_current_device().compute_capability
        return toolchain(cc)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.devicecheck", "--toolchain"],
                          env=env, capture_output=True, text=True, timeout=120)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"toolchain": f"not read (exit {proc.returncode}): {proc.stderr[-500:]}"}


def launch_one_kernel(cb) -> tuple[bool, str]:
    """Compile and launch the one-line kernel on the device; (ok, what happened)."""
    from numba import cuda

    t0 = time.perf_counter()
    try:
        kernel = cuda.jit(_one_line_kernel())
        a = cb.xp.zeros(100, np.float32)
        kernel[2, 64](a)
        _sync(cb)
        got = _host(a)
    except Exception as exc:  # noqa: BLE001 - that is the finding
        return False, f"{type(exc).__name__}: {exc}"
    ok = bool(np.all(got == 1))
    return ok, (f"{'ran' if ok else 'ran, WRONG result'} in {time.perf_counter() - t0:.1f} s "
                f"(compile, link, load, launch)")


def _cudadevrt() -> tuple[bool, str]:
    """Whether numba-cuda finds libcudadevrt.a (the grid barrier links it)."""
    try:
        from numba.cuda.cudadrv import libs

        path = libs.get_cudalib("cudadevrt", static=True)
        libs.check_static_lib(path)
        return True, path
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"


def _cublas_status() -> tuple[bool, str]:
    """Whether the CUDA backend's direct cuBLAS binding loads."""
    try:
        from kernrnn.backends.cuda import _cublas

        return _cublas.library() is not None, _cublas.unavailable_reason()
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"


def phase_env(out: Path) -> int:
    print("## versions")
    for k, v in versions().items():
        print(f"{k}: {v}")
    print(f"checkout: {_in_checkout()} ({REPO}); kernrnn.torch present: "
          f"{importlib.util.find_spec('kernrnn.torch') is not None}")
    for key in ("KERNRNN_CUDA_PATH", "KERNRNN_CUDA_GRAPHS", "KERNRNN_CACHE_DIR", "CUDA_HOME",
                "NUMBA_NUM_THREADS", "NUMBA_ENABLE_CUDASIM", "CUDA_VISIBLE_DEVICES"):
        print(f"{key}={os.environ.get(key, '')}")
    cb = _gpu_or_exit()
    print("\n## device")
    for k, v in device_properties().items():
        print(f"{k}: {v}")
    print("\n## toolchain (what numba-cuda compiles and links with)", flush=True)
    info = _toolchain_here_or_apart()
    for k, v in info.items():
        print(f"{k}: {v}")
    for note in toolchain_notes(info):
        print(f"warning: {note}")
    print("\n## one kernel", flush=True)
    ran, what = launch_one_kernel(cb)
    print(f"one-line kernel: {what}")
    devrt, where = _cudadevrt()
    blas, why = _cublas_status()
    print(f"libcudadevrt found: {devrt} ({where})")
    print(f"direct cuBLAS: {blas} ({why})")
    from kernrnn.backends.cuda import persistent as cp

    print(f"CUDA path: {cb.get_path()} (persistent.AUTO = {cp.AUTO}); graphs: "
          f"{cb.graphs_enabled()}")
    if rehearsing():  # the simulator links nothing: libraries are informational there
        return OK if ran else FAILED
    return OK if ran and devrt and blas else FAILED


# -- warm: compile everything once, in parallel ----------------------------------------------

# (T, B, H, I, reverse, lengths): several blocks, odd sizes, masking, one case at H=1024
# (shared memory over 48 KiB), batch tiles NB = 1, 4 and 8.
PERSISTENT_CASES = (
    (7, 3, 200, 5, False, None),
    (5, 5, 300, 3, True, (5, 0, 3, 5, 1)),
    (6, 16, 1024, 8, False, None),
    (4, 1, 33, 2, True, None),
    (3, 64, 256, 4, False, (1, 2, 3) * 21 + (0,)),
)
#: The rehearsal's: batch tiles NB = 4 and 1, masking, both directions, on one block
#: (the simulator's grid barrier spans one block).
REHEARSAL_PERSISTENT_CASES = (
    (3, 3, 5, 2, True, (3, 0, 2)),
    (2, 1, 4, 2, False, None),
)


def _persistent_checks():
    """(cell, dtype, cases) of the persistent phase."""
    cases = REHEARSAL_PERSISTENT_CASES if rehearsing() else PERSISTENT_CASES
    return (("lstm", "float32", cases), ("lstm", "float64", cases[:2]),
            ("gru", "float32", cases[::2]))


def _bench_batches() -> tuple:
    return tuple(sorted({B for _, B, _, _ in _bench_cases()}))


def warm_tasks() -> list[tuple]:
    """Every module the later phases compile, as ``(kind, cell, dtype, variant)``.

    ``cuda``: the GEMM path's module (variant: regularised), through layers of
    every layout the tests use; ``persistent``: one persistent module (variant:
    the batch tile NB); ``cpu``: the CPU kernels the tests and the layer phase
    compare with (float64).  The rehearsal leaves out CPU kernels its phases
    do not use (each costs minutes of a small machine's compile time).
    """
    from kernrnn.backends.cuda import persistent as cp
    from kernrnn.plugins import get_registry

    reg = get_registry()
    cells = list(dict.fromkeys(FORM_CELLS + LAYER_CELLS))
    # CPU kernels first: the tests of every shard and the layer phase need them
    tasks = [("cpu", name, "float64", False) for name in (LAYER_CELLS if rehearsing() else cells)]
    nbs = set()
    for name, dt, cases in _persistent_checks():
        for _, B, H, *_ in cases:
            nbs.add((name, dt, cp.plan(reg.get(name), B, H, dt, 1).NB))
    for B in _bench_batches():
        if B <= cp.MAX_BATCH:
            nbs.add(("lstm", "float32", cp.plan(reg.get("lstm"), B, 256, "float32", 1).NB))
    tasks += [("persistent", *t) for t in sorted(nbs)]
    for dt in ("float32", "float64"):
        for name in cells:
            for regularised in ((False, True) if name in FORM_CELLS else (False,)):
                tasks.append(("cuda", name, dt, regularised))
    return tasks


def _task_label(task) -> str:
    kind, cell, dtype, variant = task
    if kind == "persistent":
        return f"persistent {cell} {dtype} NB={variant}"
    return f"{kind} {cell} {dtype}{' regularised' if variant else ''}"


def _warm_layers(cell_name: str, dtype: str, regularised: bool, device: str) -> None:
    """Forward (training and inference) and backward through tiny layers of each layout
    the tests run: one direction (contiguous output), two layers both ways with
    lengths (strided output), LSTMP for the LSTM, the parallel scan (T > its chunk)."""
    import kernrnn
    from kernrnn.plugins import get_registry

    cell = get_registry().get(cell_name)
    put = (lambda a: a)  # noqa: E731
    if device == "cuda":
        from kernrnn.backends import cuda as cb
        from kernrnn.backends.cuda.kernels import SCAN_CHUNK

        cb.set_path("gemm")
        put = cb.from_host
    else:
        SCAN_CHUNK = 0
    heads = cell.heads if cell.recurrent == "heads" else 1
    H, I = 2 * heads if heads > 1 else 4, 3
    kw = {}
    if regularised:  # as check_cell's regularised example
        kw = dict(recurrent_dropout=0.3 if cell.has_recurrent else 0.0, input_dropout=0.2,
                  zoneout=0.25)
    layouts = [(3, 2, 1, False, None, 0), (3, 3, 2, True, [3, 1, 2], 0)]  # T B L bi lens proj
    if cell_name == "lstm" and not regularised:  # LSTMP takes no recurrent dropout/zoneout
        layouts.append((3, 2, 1, True, None, 2))
    if getattr(cell, "linear", False) and SCAN_CHUNK and not regularised:
        layouts.append((SCAN_CHUNK + 1, 2, 1, False, None, 0))
    rng = np.random.default_rng(0)
    for T, B, L, bi, lens, proj in layouts:
        layer = kernrnn.RNN(cell, I, H, num_layers=L, bidirectional=bi, dtype=np.dtype(dtype),
                            device=device, seed=0, proj_size=proj, **kw)
        x = put(rng.uniform(-1, 1, (T, B, I)).astype(dtype))
        y, _ = layer(x, None, lens)
        layer.backward(put(np.ones(y.shape, dtype)))
        layer.eval()
        layer(x, None, lens)
    if device == "cuda":
        _sync(cb)


def _warm_persistent(cell_name: str, dtype: str, nb: int) -> None:
    """The persistent module's kernels for strided and contiguous outputs, training and
    inference, and the backward."""
    from kernrnn.backends import cuda as cb
    from kernrnn.backends.cuda import persistent as cp
    from kernrnn.plugins import get_registry

    xp = cb.xp
    cell = get_registry().get(cell_name)
    dt = np.dtype(dtype)
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    T, B, H = 2, nb, 8
    blocks = 1 if cb.SIMULATOR else None  # the simulator's grid barrier spans one block

    def z(*shape):
        return xp.zeros(shape, dt)

    for strided in (True, False):
        ybuf = z(T, B, 2 * H) if strided else z(T, B, H)
        Y = ybuf[:, :, :H]
        States, lens = z(S, T + 1, B, H), xp.full(B, T, np.int64)
        for training in (True, False):
            cp.forward_loop(cell, z(T, B, G * H), z(G * H, H), z(G * H), States,
                            z(K if training else 0, T, B, H), Y, lens, False, training, nb=nb,
                            blocks=blocks)
        cp.backward_loop(cell, Y, z(S, B, H), z(G * H, H), States, z(K, T, B, H), lens, False,
                         z(T, B, G * H), z(T, B, G * H), nb=nb, blocks=blocks)
    _sync(cb)


def _warm_task(task) -> tuple[str, float, str | None]:
    """Compile (or load) one module in a pool worker: (label, seconds, error or None)."""
    t0 = time.perf_counter()
    kind, cell, dtype, variant = task
    try:
        if kind == "persistent":
            _warm_persistent(cell, dtype, variant)
        else:
            _warm_layers(cell, dtype, variant, kind)
    except Exception as exc:  # noqa: BLE001 - reported once by the caller, the rest goes on
        where = traceback.format_exc().strip().splitlines()[-6:-1]
        return (_task_label(task), time.perf_counter() - t0,
                f"{type(exc).__name__}: {str(exc)[:500]} | " + " | ".join(w.strip() for w in where))
    return _task_label(task), time.perf_counter() - t0, None


def _pool_round(tasks, workers, deadline, runner, isolate):
    """Run ``runner(task)`` for every task in spawned processes (CUDA does not fork).

    ``isolate``: each task in a pool of its own (so a worker that dies names its
    task), at most ``workers`` at a time; else one shared pool.  Returns
    ``(results {task: (label, seconds, error)}, died [tasks whose worker died],
    unfinished [tasks cut off by the deadline])``."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    queue, running, results, died = list(tasks), {}, {}, []
    shared = None if isolate else ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        while queue or running:
            while queue and (shared is not None or len(running) < workers):
                task = queue.pop(0)
                pool = shared or ProcessPoolExecutor(1, mp_context=ctx)
                running[pool.submit(runner, task)] = (task, None if shared else pool)
            left = deadline - time.time()
            if left <= 0:
                break
            finished, _ = wait(list(running), timeout=left, return_when=FIRST_COMPLETED)
            for fut in finished:
                task, own = running.pop(fut)
                if own is not None:
                    own.shutdown(wait=False)
                try:
                    results[task] = label, secs, error = fut.result()
                except BrokenProcessPool:
                    died.append(task)
                    continue
                except Exception as exc:  # noqa: BLE001 - the runner itself raised
                    results[task] = label, secs, error = (_task_label(task), 0.0,
                                                          f"{type(exc).__name__}: {exc}")
                if error:
                    print(f"FAILED {label} ({secs:.1f} s): {error}", flush=True)
                else:
                    print(f"compiled {label}: {secs:.1f} s", flush=True)
    finally:
        unfinished = queue + [task for task, _ in running.values()]
        pools = {own for _, own in running.values() if own is not None} | {shared} - {None}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        if unfinished:  # the deadline: stop the workers still compiling
            for child in mp.active_children():
                child.kill()
    return results, died, unfinished


def warm(tasks, workers: int | None = None, deadline: float | None = None,
         runner=None) -> dict:
    """Run every warm-up task in a process pool until ``deadline`` (epoch seconds).

    A task that fails is reported once (its error) and the others go on; when a
    worker process dies (a crash in a compiler), the pool breaks, and the tasks
    not yet done run again, each in its own process, so the crash names its
    task.  Returns ``{"results": {task: (label, s, error)}, "failed": [labels],
    "unfinished": [labels]}``.
    """
    runner = runner or _warm_task
    workers = workers or max(1, min(len(tasks), max(2, (os.cpu_count() or 2) - 1), 15))
    deadline = deadline if deadline is not None else _deadline() - 5
    t0 = time.perf_counter()
    results, died, unfinished = _pool_round(tasks, workers, deadline, runner, isolate=False)
    if died:
        print(f"a worker process died; the {len(died)} tasks it left undone run again, each "
              f"in its own process", flush=True)
        again, died, cut = _pool_round(died, workers, deadline, runner, isolate=True)
        results.update(again)
        unfinished += cut
        for task in died:
            results[task] = (_task_label(task), 0.0, "its worker process died")
            print(f"FAILED {_task_label(task)}: its worker process died", flush=True)
    failed = [r[0] for t, r in results.items() if r[2]]
    left = [_task_label(t) for t in unfinished]
    print(f"warm-up: {len(tasks)} tasks with {workers} processes in "
          f"{time.perf_counter() - t0:.1f} s: {len(results) - len(failed)} compiled, "
          f"{len(failed)} failed, {len(left)} not finished by the deadline"
          + (f" ({', '.join(left)})" if left else ""), flush=True)
    return {"results": results, "failed": failed, "unfinished": left}


def phase_warm(out: Path) -> int:
    _gpu_or_exit()
    tasks = warm_tasks()
    print(f"## compiling {len(tasks)} modules into {os.environ.get('KERNRNN_CACHE_DIR', '-')}"
          f"{' (simulator: CUDA runs as Python, only the CPU kernels compile)' if rehearsing() else ''}",
          flush=True)
    summary = warm(tasks)
    return OK if not summary["failed"] and not summary["unfinished"] else FAILED


# -- gemm: the gpu-marked tests, one process per cell ---------------------------------------


def _pytest(args, env_extra, log: Path):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *args]
    env = dict(os.environ, **env_extra)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def shard_commands(path: str, cells) -> list[tuple[str, list[str], dict]]:
    """(key, pytest arguments, environment) of each shard: one per cell of ``cells``
    (``KERNRNN_TEST_CELLS``, tests/conftest.py) and one (``none``) for the tests that
    take no cell.  Compilation was the warm phase's; each shard loads its own cells."""
    if rehearsing():
        target = list(REHEARSAL_TESTS)
    else:
        # the persistent self-check has its own phase; the path comparison and the
        # second-process cache test run with the persistent tests
        skip = "not selfcheck" + (" and not paths_agree and not second_process"
                                  if path == "gemm" else "")
        target = ["tests", "-m", "gpu", "-k", skip]
    return [(key, [*target, "--durations=15"],
             {"KERNRNN_CUDA_PATH": path, "KERNRNN_TEST_CELLS": key})
            for key in (*cells, "none")]


def _pytest_shards(path: str, out: Path, cells) -> int:
    """The gpu-marked tests on ``path``, every shard at once; each shard's result as it ends."""
    if not _in_checkout():
        print("tests/ not next to the package: nothing to run")
        return SKIPPED
    _gpu_or_exit()
    procs = {}
    for key, args, env in shard_commands(path, cells):
        log = out / f"{path}-tests-{key}.log"
        print(f"shard {key}: pytest {' '.join(args)} ({log.name})", flush=True)
        procs[key] = (log, _pytest(args, env, log), time.monotonic())
    status = OK
    while procs:
        for key, (log, proc, t0) in list(procs.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del procs[key]
            print(f"== shard {key}: exit {rc} after {time.monotonic() - t0:.0f} s\n"
                  f"{_tail(log, 25)}\n", flush=True)
            if rc not in (0, 5):  # 5: nothing collected in this shard
                status = FAILED
        time.sleep(0.2)
    return status


def phase_gemm(out: Path) -> int:
    return _pytest_shards("gemm", out, FORM_CELLS)


def phase_persistent_tests(out: Path) -> int:
    return _pytest_shards("persistent", out, PERSISTENT_TEST_CELLS)


# -- persistent kernel ------------------------------------------------------------------


def kernel_report(checks, file=None) -> list[dict]:
    """Registers, local memory (spills), static shared memory and co-resident blocks of the
    persistent kernels this process compiled, at each checked case's launch plan."""
    from kernrnn.backends.cuda import persistent as cp
    from kernrnn.plugins import get_registry

    props = cp.device_props()
    rows, seen = [], set()
    for name, dt, cases in checks:
        cell = get_registry().get(name)
        for _, B, H, *_ in cases:
            if not cp.supported(cell, B, H, dt, props):
                continue
            p = cp.plan(cell, B, H, dt, props.sm_count)
            k = cp.get_kernels(cell, np.dtype(dt), p.NB)  # the key forward_loop uses
            for label, disp, smem in (("forward_train", k.forward_train, p.smem_fwd),
                                      ("backward", k.backward, p.smem_bwd)):
                for sig, kernel in getattr(disp, "overloads", {}).items():
                    key = (name, dt, p.NB, label, str(sig), smem)
                    if key in seen:
                        continue
                    seen.add(key)
                    strided = ", A)" in str(sig)  # a strided y view (layout A)
                    rows.append(dict(
                        kernel=f"{name} {dt} NB={p.NB} {label}{' (strided y)' if strided else ''}",
                        H=H, B=B, regs=kernel.regs_per_thread, local=kernel.local_mem_per_thread,
                        static=kernel.shared_mem_per_block, dynamic=smem, threads=p.threads,
                        blocks=p.blocks,
                        coop_blocks=kernel.max_cooperative_grid_blocks(p.threads, smem)))
    print("| kernel | H | B | regs/thread | local B/thread | static smem | dynamic smem | threads "
          "| blocks | co-resident blocks |", file=file)
    print("|---|---|---|---|---|---|---|---|---|---|", file=file)
    for r in rows:
        print(f"| {r['kernel']} | {r['H']} | {r['B']} | {r['regs']} | {r['local']} | "
              f"{r['static']} | {r['dynamic']} | {r['threads']} | {r['blocks']} | "
              f"{r['coop_blocks']} |", file=file, flush=True)
    return rows


def phase_persistent(out: Path) -> int:
    cb = _gpu_or_exit()
    from benchmarks.persistent import gpu_selfcheck
    from kernrnn.backends.cuda import persistent as cp
    from kernrnn.plugins import get_registry

    sim = cb.SIMULATOR
    blocks = 1 if sim else None  # the simulator runs blocks one after another
    checks = _persistent_checks()
    ok = True
    print("## one launch == stepwise launches (bit for bit) == float64 reference", flush=True)
    for name, dt, cases in checks:
        ok &= gpu_selfcheck(cells=[name], cases=cases, dtypes=(np.dtype(dt).type,),
                            blocks=blocks)

    lstm = get_registry().get("lstm")
    if sim:
        print("\n## shared memory over 48 KiB: not on the simulator (no opt-in there)")
    else:
        props = cp.device_props()
        p = cp.plan(lstm, 16, 1024, np.float32, props.sm_count)
        print(f"\n## LSTM H=1024 B=16 float32 on {props.sm_count} SMs: {p}")
        print(f"needs the > 48 KiB opt-in: {p.smem > 48 * 1024} ({p.smem} bytes); it ran in "
              f"the self-check above (case H=1024), which fails without the opt-in")
        print("\n## compiled persistent kernels")
        rows = kernel_report(checks)
        spills = [r for r in rows if r["local"]]
        if spills:
            print(f"note: {len(spills)} kernel(s) use local memory (spills)")
        short = [r for r in rows if r["coop_blocks"] < r["blocks"]]
        if short:
            print(f"FAIL: {len(short)} launch plan(s) need more blocks than can be co-resident")
            ok = False

    print("\n## an oversubscribed grid is refused", flush=True)
    T, B, H = (3, 2, 8) if sim else (3, 16, 1024)
    xp, f = cb.xp, np.float32

    def z(*s):
        return xp.zeros(s, f)

    G, S, K = lstm.n_gates, lstm.n_state, lstm.n_saved
    try:
        cp.forward_loop(lstm, z(T, B, G * H), z(G * H, H), z(G * H), z(S, T + 1, B, H),
                        z(K, T, B, H), z(T, B, H), xp.full(B, T, np.int64), False, True,
                        blocks=H, stepwise=False)
        _sync(cb)
        print(f"FAIL: a grid of {H} blocks was launched")
        ok = False
    except ValueError as exc:
        print(f"refused: {exc}")
    return OK if ok else FAILED


# -- the default path through the layer API ------------------------------------------------


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)) if b.size else 0.0


def phase_layer(out: Path) -> int:
    cb = _gpu_or_exit()
    import kernrnn
    from kernrnn.backends.cuda import persistent as cp
    from kernrnn.plugins import get_registry

    ok = True
    lstm = get_registry().get("lstm")
    auto = "persistent" if cp.supports(lstm, np.float32, 16, 512, True) else "gemm"
    print(f"path setting: {cb.get_path()}; auto picks {auto} at LSTM B=16 H=512")
    T, B, I, H = (5, 3, 4, 6) if rehearsing() else (20, 6, 24, 40)
    rng = np.random.default_rng(0)
    lens = np.array([5, 2, 1] if rehearsing() else [20, 17, 9, 20, 1, 12])
    x = rng.uniform(-1, 1, (T, B, I))
    dy = rng.uniform(-1, 1, (T, B, 2 * H))
    for cell in LAYER_CELLS:
        ref = kernrnn.RNN(cell, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
        y_r, _ = ref(x, lengths=lens)
        dx_r, _ = ref.backward(dy)
        for dt, limit in ((np.float64, 1e-10), (np.float32, 2e-3)):
            gpu = kernrnn.RNN(cell, I, H, num_layers=2, bidirectional=True, dtype=dt,
                              device="cuda")
            gpu.load_state_dict({k: cb.from_host(v.astype(dt)) for k, v in ref.params.items()})
            y, _ = gpu(cb.from_host(x.astype(dt)), lengths=lens)
            dx, _ = gpu.backward(cb.from_host(dy.astype(dt)))
            errs = [_rel(_host(y), y_r), _rel(_host(dx), dx_r)]
            errs += [_rel(_host(gpu.grads[k]), ref.grads[k]) for k in ref.grads]
            good = max(errs) <= limit
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'} {cell} {np.dtype(dt).name}: max relative error "
                  f"vs CPU float64 {max(errs):.2e} (limit {limit:.0e})", flush=True)
    ok &= _graphs_check(cb, kernrnn)
    ok &= _torch_check()
    return OK if ok else FAILED


def _graphs_check(cb, kernrnn) -> bool:
    """Eager runs, then graphs on: captures and replays, the same results.  Under the
    simulator graphs are off whatever the setting, so only the results are compared."""
    layer = kernrnn.RNN("lstm", 12, 24, num_layers=2, device="cuda", dtype=np.float64, seed=4)
    rng = np.random.default_rng(0)
    x = cb.from_host(rng.uniform(-1, 1, (9, 5, 12)))
    dy = cb.from_host(rng.uniform(-1, 1, (9, 5, 24)))

    def run():
        layer.zero_grad()
        y, _ = layer(x)
        dx, _ = layer.backward(dy)
        return [_host(y), _host(dx)]

    cb.set_path("gemm")
    try:
        cb.set_graphs(False)
        want = run()
        cb.set_graphs(True)
        before = dict(cb.graph_stats)
        got = [run() for _ in range(3)][-1]
    finally:
        cb.set_graphs(None)
        cb.set_path(None)
    stats = {k: cb.graph_stats[k] - before[k] for k in before}
    err = max(_rel(a, b) for a, b in zip(got, want))
    if cb.SIMULATOR:
        good = err < 1e-12 and not stats["captured"]
        print(f"{'ok  ' if good else 'FAIL'} CUDA graphs: none under the simulator {stats}, "
              f"eager again vs eager {err:.1e}")
        return good
    good = stats["captured"] > 0 and stats["replayed"] > 0 and not stats["capture_failed"] \
        and err < 1e-12
    print(f"{'ok  ' if good else 'FAIL'} CUDA graphs: {stats}, replay vs eager {err:.1e}")
    return good


def kernrnn_torch_available() -> bool:
    """Whether this checkout has ``kernrnn.torch`` (being built separately)."""
    try:
        return importlib.util.find_spec("kernrnn.torch") is not None
    except (ImportError, ValueError):
        return False


def _torch_check() -> bool:
    if importlib.util.find_spec("torch") is None:
        print("skipped: PyTorch is not installed")
        return True
    import torch

    if not torch.cuda.is_available():
        print("skipped: PyTorch has no CUDA")
        return True
    if not kernrnn_torch_available():
        print("skipped: kernrnn.torch is not in this checkout")
        return True
    import kernrnn.torch as kt

    ok = True
    for name in ("LSTM", "GRU", "RNN"):
        try:
            torch.manual_seed(0)
            ref = getattr(torch.nn, name)(10, 16, num_layers=2, bidirectional=True).cuda().double()
            mod = getattr(kt, name)(10, 16, num_layers=2, bidirectional=True, device="cuda",
                                    dtype=torch.float64)
            mod.load_state_dict(ref.state_dict())
            x = torch.randn(7, 3, 10, device="cuda", dtype=torch.float64, requires_grad=True)
            x2 = x.detach().clone().requires_grad_(True)
            y, _ = mod(x)
            y_r, _ = ref(x2)
            g = torch.randn_like(y)
            y.backward(g)
            y_r.backward(g)
            errs = [_rel(y.detach().cpu(), y_r.detach().cpu()),
                    _rel(x.grad.cpu(), x2.grad.cpu())]
            errs += [_rel(p.grad.cpu(), q.grad.cpu())
                     for p, q in zip(mod.parameters(), ref.parameters())]
            good = max(errs) < 1e-9
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"FAIL kernrnn.torch.{name}: {type(exc).__name__}: {exc}")
            ok = False
            continue
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} kernrnn.torch.{name} on CUDA tensors vs "
              f"torch.nn.{name} (float64): max relative error {max(errs):.1e}")
    return ok


# -- timings against cuDNN ---------------------------------------------------------------

# (label, B, T, H): the grid, DeepBench's LSTM inference/training sizes and
# FlashRNN's published size.  I = H throughout, one layer, one direction, float32.
BENCH_CASES = tuple(
    [(f"T=100 H={H} B={B}", B, 100, H) for H in (256, 512, 1024) for B in (1, 4, 16, 64)]
    + [("DeepBench 512/16/25", 16, 25, 512), ("DeepBench 1024/128/25", 128, 25, 1024),
       ("FlashRNN B=16 T=1024 H=768", 16, 1024, 768)]
)
#: The rehearsal's (under the simulator every thread is a Python thread).
REHEARSAL_BENCH_CASES = (("T=4 H=8 B=2", 2, 4, 8), ("T=3 H=6 B=3", 3, 3, 6))
VARIANTS = ("gemm", "graphs", "persistent")  # kernrnn's paths (graphs: GEMM path replayed)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return f"{v:.3f}"


def _ratio(v, ref) -> str:
    if not isinstance(v, (int, float)) or not isinstance(ref, (int, float)) or not ref:
        return ""
    return f" ({v / ref:.2f}x)"


def format_table(meta: dict, rows: list[dict]) -> str:
    """The benchmark as Markdown: versions, the command, and one row per case with
    median ms and kernrnn / cuDNN ratios (below 1: kernrnn faster) per path."""
    lines = [f"# kernrnn vs cuDNN on {meta.get('gpu', '?')}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "gpu"]
    lines += ["", "LSTM, float32, I = H, one layer, one direction; median ms of CUDA-event "
              "times after warm-up, same process; in brackets kernrnn / cuDNN.  "
              "`graphs`: the GEMM path replayed as a CUDA graph (`KERNRNN_CUDA_GRAPHS=1`); "
              "`n/a`: the path does not take this size.", ""]
    for what in ("fwd", "train"):
        title = "Forward (inference)" if what == "fwd" else \
            "Training step (forward + backward, dx included)"
        lines += [f"## {title}", "",
                  "| case | cuDNN | " + " | ".join(f"kernrnn {v}" for v in VARIANTS) + " |",
                  "|---|---|" + "---|" * len(VARIANTS)]
        for r in rows:
            ref = r.get(f"cudnn_{what}")
            cells = [_fmt(r.get(f"{v}_{what}")) + _ratio(r.get(f"{v}_{what}"), ref)
                     for v in VARIANTS]
            lines.append(f"| {r['case']} | {_fmt(ref)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Targets", ""] + [f"- {t}" for t in target_lines(rows)]
    return "\n".join(lines) + "\n"


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's speed targets, evaluated on the measured rows (nothing is assumed)."""

    def ratio(r, v, what):
        a, b = r.get(f"{v}_{what}"), r.get(f"cudnn_{what}")
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0
        return a / b if ok else None

    out = []
    grid = [r for r in rows if r.get("T") == 100 and r.get("B", 99) <= 16 and r.get("H", 0) <= 1024]
    for what in ("fwd", "train"):
        got = [(r["case"], ratio(r, "persistent", what)) for r in grid]
        measured = [(c, x) for c, x in got if x is not None]
        met = [c for c, x in measured if x <= 0.5]
        out.append(f"persistent <= 0.5x cuDNN at B <= 16, H <= 1024 ({what}): met in "
                   f"{len(met)} of {len(measured)} measured cases"
                   + (f" (worst {max(x for _, x in measured):.2f}x)" if measured else ""))
    for r in rows:
        if r.get("T") == 100 and r.get("B") == 64 and r.get("H") == 512:
            for what in ("fwd", "train"):
                x = ratio(r, "gemm", what)
                verdict = "not measured" if x is None else \
                    f"{x:.2f}x: {'met' if x <= 1.0 else 'not met'}"
                out.append(f"default path (auto = GEMM) <= 1.0x at B=64, H=512 ({what}): {verdict}")
    return out


def _bench_cases():
    return REHEARSAL_BENCH_CASES if rehearsing() else BENCH_CASES


def _timed(fn, sync_events, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop, elapsed = sync_events()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(elapsed(start, stop))
    return float(statistics.median(times))


def _cupy_events():
    import cupy

    return cupy.cuda.Event(), cupy.cuda.Event(), cupy.cuda.get_elapsed_time


def _torch_events():
    import torch

    return (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
            lambda a, b: a.elapsed_time(b))


class _WallEvent:
    """The rehearsal's stand-in for a CUDA event: host wall-clock time (ms apart)."""

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def _wall_events():
    return _WallEvent(), _WallEvent(), lambda a, b: (b.t - a.t) * 1e3


def _check_ieee(torch, device: str = "cuda") -> tuple[bool, str]:
    """cuDNN's LSTM and a matmul in float32 against float64: IEEE float32 errs ~1e-6,
    TF32 (10-bit mantissa) ~1e-3."""
    torch.manual_seed(0)
    n = 64 if device == "cpu" else 512
    m = torch.nn.LSTM(n, n).to(device)
    x = torch.randn(25, 16, n, device=device)
    with torch.no_grad():
        y32, _ = m(x)
        y64, _ = m.double()(x.double())
    a, b = (torch.randn(4 * n, 4 * n, device=device) for _ in range(2))
    mm = _rel((a @ b).cpu(), (a.double() @ b.double()).cpu())
    rnn = _rel(y32.cpu(), y64.cpu())
    ok = rnn < 1e-4 and mm < 1e-4
    return ok, f"LSTM float32 vs float64 {rnn:.1e}, matmul {mm:.1e} ({'IEEE' if ok else 'TF32?'})"


class _Bench:
    """What a case needs: the array module, the PyTorch device and how to time on each
    side; under the simulator NumPy, the CPU and wall-clock times stand in."""

    def __init__(self, cb, torch):
        from kernrnn.backends.cuda import persistent as cp

        self.cb, self.torch, self.cp, self.sim = cb, torch, cp, cb.SIMULATOR
        self.device = "cpu" if self.sim else "cuda"
        self.events = _wall_events if self.sim else _cupy_events
        self.torch_events = _wall_events if self.sim else _torch_events
        self.props = cp.DeviceProps(sm_count=1, smem_per_block_optin=227 * 1024,
                                    name="simulator") if self.sim else None

    def sync(self):
        _sync(self.cb)
        if not self.sim:
            self.torch.cuda.synchronize()


def phase_bench(out: Path, reps: int = 7, warmup: int = 2) -> int:
    cb = _gpu_or_exit()
    import torch

    from benchmarks import torch_fp32_precision
    from kernrnn import functional
    from kernrnn.plugins import get_registry

    bench = _Bench(cb, torch)
    if bench.sim:
        reps, warmup = 3, 1
    precision = torch_fp32_precision(torch, "ieee")
    ieee, ieee_note = _check_ieee(torch, bench.device)
    v = versions()
    props = device_properties()
    meta = {"gpu": props["name"], "driver": v.get("nvidia-smi driver"),
            "CUDA runtime": v.get("cuda runtime"), "CuPy": v.get("cupy-cuda13x") if
            v.get("cupy-cuda13x") != "-" else v.get("cupy-cuda12x"),
            "numba-cuda": v.get("numba-cuda"), "PyTorch": f"{torch.__version__} (cuDNN "
            f"{v.get('cudnn')})", "fp32 precision": f"{precision}; check: {ieee_note}",
            "command": "python -m benchmarks.devicecheck bench",
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "repeats": f"median of {reps} after {warmup} warm-up runs"}
    if bench.sim:
        meta["note"] = ("rehearsal: the CUDA simulator and PyTorch on the CPU, wall-clock "
                        "times; not a measurement of anything")
    slug = re.sub(r"[^a-z0-9]+", "-", props["name"].lower()).strip("-")
    table_path = out / f"gpu-{slug}.md"
    lstm = get_registry().get("lstm")
    deadline = _deadline() - 10
    rows = []
    real_device_of = functional.device_of
    if bench.sim:  # NumPy arrays stand for device arrays: send them to the CUDA backend
        functional.device_of = lambda a: "cuda"
    try:
        for label, B, T, H in _bench_cases():
            row = dict(case=label, B=B, T=T, H=H)
            rows.append(row)
            if time.time() > deadline:
                row.update({f"{k}_{w}": "not run (time)" for k in ("cudnn",) + VARIANTS
                            for w in ("fwd", "train")})
                continue
            try:
                _bench_case(row, lstm, B, T, H, bench, functional, reps, warmup)
            except Exception as exc:  # noqa: BLE001 - keep the table going
                print(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
            print(json.dumps(row), flush=True)
            table_path.write_text(format_table(meta, rows))  # partial results survive a kill
            (out / "bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    finally:
        functional.device_of = real_device_of
    print(format_table(meta, rows))
    print(f"written {table_path}")
    return OK if ieee else FAILED


def _bench_case(row, cell, B, T, H, bench, functional, reps, warmup):
    torch, cb, cp, dev = bench.torch, bench.cb, bench.cp, bench.device
    I, G = H, cell.n_gates
    rng = np.random.default_rng(0)
    bound = 1.0 / np.sqrt(H)
    host = {}

    def u(name, lo, hi, shape):
        host[name] = rng.uniform(lo, hi, shape).astype(np.float32)
        return cb.from_host(host[name])

    w_ih, w_hh = u("w_ih", -bound, bound, (G * H, I)), u("w_hh", -bound, bound, (G * H, H))
    b_ih, b_hh = u("b_ih", -bound, bound, G * H), u("b_hh", -bound, bound, G * H)
    x, dy = u("x", -1, 1, (T, B, I)), u("dy", -1, 1, (T, B, H))

    m = torch.nn.LSTM(I, H).to(dev)
    with torch.no_grad():
        for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"),
                          ("bias_ih_l0", "b_ih"), ("bias_hh_l0", "b_hh")):
            getattr(m, name).copy_(torch.as_tensor(host[key], device=dev))
    tx, tdy = torch.as_tensor(host["x"], device=dev), torch.as_tensor(host["dy"], device=dev)
    txg = tx.clone().requires_grad_(True)

    def torch_fwd():
        with torch.no_grad():
            m(tx)

    def torch_train():
        y, _ = m(txg)
        y.backward(tdy)

    bench.sync()
    row["cudnn_fwd"] = _timed(torch_fwd, bench.torch_events, reps, warmup)
    row["cudnn_train"] = _timed(torch_train, bench.torch_events, reps, warmup)
    bench.sync()

    def k_fwd():
        functional.rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, training=False)

    def k_train():
        _, _, ctx = functional.rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, training=True)
        functional.rnn_backward(ctx, dy)

    for variant in VARIANTS:
        path = "persistent" if variant == "persistent" else "gemm"
        if path == "persistent" and not cp.supported(cell, B, H, np.float32, bench.props):
            row[f"{variant}_fwd"] = row[f"{variant}_train"] = None
            continue
        cb.set_path(path)
        cb.set_graphs(variant == "graphs")
        try:
            for what, fn in (("fwd", k_fwd), ("train", k_train)):
                try:
                    row[f"{variant}_{what}"] = _timed(fn, bench.events, reps, warmup)
                except Exception as exc:  # noqa: BLE001
                    row[f"{variant}_{what}"] = f"failed ({type(exc).__name__})"
                    print(f"{row['case']} {variant} {what}: {type(exc).__name__}: {exc}")
        finally:
            cb.set_path(None)
            cb.set_graphs(None)
        bench.sync()


# -- entry point ---------------------------------------------------------------------------

_CHILDREN = {"env": phase_env, "warm": phase_warm, "gemm": phase_gemm,
             "persistent": phase_persistent, "layer": phase_layer, "bench": phase_bench,
             "persistent-tests": phase_persistent_tests}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.devicecheck",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("phases", nargs="*", help=f"phases to run (default: "
                    f"{' '.join(n for n, p in PHASES.items() if p.default)})")
    ap.add_argument("--list", action="store_true", help="list the phases and their timeouts")
    ap.add_argument("--out", type=Path, help="log directory (default $OUT/devicecheck, else "
                    "./devicecheck-logs; with --rehearse ...-rehearsal)")
    ap.add_argument("--budget", type=float, default=BUDGET,
                    help=f"seconds for all phases together (default {BUDGET})")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every phase timeout")
    ap.add_argument("--rehearse", action="store_true",
                    help="run the phases with Numba's CUDA simulator standing in for the GPU "
                    "(scaled-down shapes, the same timeouts): a check of the harness")
    ap.add_argument("--toolchain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.list:
        for p in PHASES.values():
            print(f"{p.name:18s} {p.timeout:5.0f} s  {p.doc}{'' if p.default else ' (opt-in)'}")
        print(f"default phases together: {sum(p.timeout for p in PHASES.values() if p.default):.0f}"
              f" s (budget {BUDGET} s of the device's {DEVICE_BUDGET} s)")
        return 0
    if args.toolchain:  # for the rehearsal's env phase: PTX needs the real CUDA target
        print(json.dumps(toolchain()))
        return 0
    out = args.out or _default_out(args.rehearse)
    if args.child:
        out.mkdir(parents=True, exist_ok=True)
        return _CHILDREN[args.child](out)
    names = args.phases or [n for n, p in PHASES.items() if p.default]
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    return run(names, out, budget=args.budget, scale=args.scale, rehearse=args.rehearse)


if __name__ == "__main__":
    sys.exit(main())
