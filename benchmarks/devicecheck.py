"""The prepared check of kernrnn on a real GPU: ``python -m benchmarks.devicecheck``.

One command (``scripts/gpu-check.sh`` runs it from a checkout) of at most
about seven minutes.  Each phase runs in its own process with its own
timeout, so a crash or a hang shows up as that phase's failure and the later
phases still run; any phase can be rerun alone (``... devicecheck persistent``).
Logs go to ``$OUT/devicecheck/`` when ``OUT`` is set (else
``./devicecheck-logs``, or ``--out``): one log per phase, ``summary.md`` and
``summary.json``, and the benchmark table ``gpu-<gpu>.md`` ready to commit
under ``docs/benchmarks/`` (and to list on the Benchmarks page, ``docs/benchmarks.md``).

Phases (default order; ``--list`` shows the timeouts):

``env``         versions, device properties, whether libcudadevrt and cuBLAS are found
``gemm``        the gpu-marked tests with ``KERNRNN_CUDA_PATH=gemm``, in parallel shards
``persistent``  the persistent kernel: one launch equals the stepwise launches bit for
                bit and the CPU, the >48 KiB shared-memory opt-in at LSTM H=1024,
                registers / local memory / co-resident blocks of every compiled kernel,
                an oversubscribed grid refused (never hung)
``layer``       the default path through ``kernrnn.RNN`` (and CUDA graphs), and
                ``kernrnn.torch`` with CUDA tensors where that module exists
``bench``       times against cuDNN (float32, IEEE, CUDA events, medians) for the GEMM
                path, the GEMM path with graphs and the persistent path
``persistent-tests`` (not in the default set) the gpu-marked tests on the persistent path

Exit status: 0 when every phase passed, 1 when one failed or timed out, 2
when there is no usable GPU (the GPU phases are then skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PHASES", "Phase", "main", "format_table", "target_lines", "BENCH_CASES"]

OK, FAILED, NO_GPU, SKIPPED = 0, 1, 2, 3
DEADLINE_ENV = "KERNRNN_DEVICECHECK_DEADLINE"  # epoch seconds the current phase must end by


@dataclass(frozen=True)
class Phase:
    name: str
    timeout: float  # seconds
    doc: str
    default: bool = True


PHASES = {p.name: p for p in (
    Phase("env", 30, "versions, device properties, libcudadevrt and cuBLAS found"),
    Phase("gemm", 120, "gpu-marked tests with KERNRNN_CUDA_PATH=gemm"),
    Phase("persistent", 110, "persistent kernel on the real grid barrier"),
    Phase("layer", 40, "default path through kernrnn.RNN, graphs, kernrnn.torch"),
    Phase("bench", 120, "times against cuDNN for each path"),
    Phase("persistent-tests", 150, "gpu-marked tests with KERNRNN_CUDA_PATH=persistent",
          default=False),
)}
BUDGET = 420  # seconds for the default phases together (the sum of their timeouts)

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]  # the source checkout: benchmarks/, kernrnn/, plugins/, tests/


def _in_checkout() -> bool:
    return (REPO / "tests" / "test_gpu.py").exists() and (REPO / "plugins").is_dir()


# -- the runner --------------------------------------------------------------------------


def _default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "devicecheck" if out else Path("devicecheck-logs")


def child_env(out: Path) -> tuple[dict, list[str]]:
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


def run(names, out: Path, budget: float = BUDGET, scale: float = 1.0) -> int:
    """Run the phases ``names`` in order, each in its own process; returns the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    env, notes = child_env(out)
    for note in notes:
        print(f"note: {note}", flush=True)
    started = time.monotonic()
    results, no_gpu = [], False
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
                            log=log.name if log.exists() else None))
        print(f"[{name}] {status} ({secs:.0f} s)", flush=True)
        if status not in ("ok", "skipped") and log.exists():
            print(_tail(log), flush=True)
    _write_summary(out, results, notes)
    if any(r["status"] in ("failed", "timeout") for r in results):
        return FAILED
    return NO_GPU if no_gpu else OK


def _write_summary(out: Path, results, notes) -> None:
    (out / "summary.json").write_text(json.dumps(dict(results=results, notes=notes), indent=1))
    lines = ["# kernrnn device check", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"`{' '.join(['python -m benchmarks.devicecheck'] + sys.argv[1:])}`", ""]
    lines += [f"note: {n}" for n in notes]
    lines += ["| phase | status | seconds | log |", "|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['status']} | {r['seconds']} | {r['log'] or '-'} |"
              for r in results]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# -- phase helpers (run inside the child processes) --------------------------------------


def _deadline() -> float:
    return float(os.environ.get(DEADLINE_ENV, time.time() + 3600))


def _gpu_or_exit():
    from kernrnn.backends import cuda as cb

    try:
        cb.require()
    except cb.CudaUnavailableError as exc:
        print(f"no usable GPU: {exc}")
        raise SystemExit(NO_GPU) from None
    return cb


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
                 "cuda-pathfinder", "cupy-cuda12x", "cupy-cuda13x", "torch", "scipy",
                 "threadpoolctl", "pluggy", "pytest", "hypothesis"):
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


def phase_env() -> int:
    print("## versions")
    for k, v in versions().items():
        print(f"{k}: {v}")
    print(f"checkout: {_in_checkout()} ({REPO}); kernrnn.torch present: "
          f"{importlib.util.find_spec('kernrnn.torch') is not None}")
    for key in ("KERNRNN_CUDA_PATH", "KERNRNN_CUDA_GRAPHS", "KERNRNN_CACHE_DIR",
                "NUMBA_NUM_THREADS", "CUDA_VISIBLE_DEVICES"):
        print(f"{key}={os.environ.get(key, '')}")
    cb = _gpu_or_exit()
    print("\n## device")
    for k, v in device_properties().items():
        print(f"{k}: {v}")
    from kernrnn.backends.cuda import _cublas
    from kernrnn.backends.cuda import persistent as cp

    found = cp._cudadevrt_found()
    where = "-"
    try:
        from numba.cuda.cudadrv import libs

        where = libs.get_cudalib("cudadevrt", static=True)
    except Exception as exc:  # noqa: BLE001
        where = f"{type(exc).__name__}: {exc}"
    print(f"\nlibcudadevrt found: {found} ({where})")
    print(f"direct cuBLAS: {_cublas.library() is not None} ({_cublas.unavailable_reason()})")
    print(f"CUDA path: {cb.get_path()} (persistent.AUTO = {cp.AUTO}); graphs: "
          f"{cb.graphs_enabled()}")
    return OK if found and _cublas.library() is not None else FAILED


def _pytest(args, env_extra, log: Path):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *args]
    env = dict(os.environ, **env_extra)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def _pytest_shards(path: str, out: Path, shards: int) -> int:
    """The gpu-marked tests on ``path`` in ``shards`` parallel processes, split by cell
    (``KERNRNN_TEST_SHARD``, tests/conftest.py): compilation is their cost."""
    if not _in_checkout():
        print("tests/ not next to the package: nothing to run")
        return SKIPPED
    _gpu_or_exit()
    # the persistent self-check has its own phase; the path comparison and the
    # second-process cache test run with the persistent tests
    skip = "not selfcheck" + (" and not paths_agree and not second_process" if path == "gemm"
                              else "")
    procs = []
    for i in range(shards):
        log = out / f"{path}-tests-shard{i}.log"
        procs.append((log, _pytest(["tests", "-m", "gpu", "-k", skip],
                                   {"KERNRNN_CUDA_PATH": path,
                                    "KERNRNN_TEST_SHARD": f"{i}/{shards}"}, log)))
    status = OK
    for log, proc in procs:
        rc = proc.wait()
        print(f"== {log.name}: exit {rc}\n{_tail(log, 15)}\n", flush=True)
        if rc not in (0, 5):  # 5: nothing collected in this shard
            status = FAILED
    return status


def phase_gemm(out: Path) -> int:
    return _pytest_shards("gemm", out, shards=3)


def phase_persistent_tests(out: Path) -> int:
    return _pytest_shards("persistent", out, shards=3)


# -- persistent kernel ------------------------------------------------------------------

# (T, B, H, I, reverse, lengths): several blocks, odd sizes, masking, one case at H=1024
# (shared memory over 48 KiB), batch tiles NB = 1, 4 and 8.
PERSISTENT_CASES = (
    (7, 3, 200, 5, False, None),
    (5, 5, 300, 3, True, (5, 0, 3, 5, 1)),
    (6, 16, 1024, 8, False, None),
    (4, 1, 33, 2, True, None),
    (3, 64, 256, 4, False, (1, 2, 3) * 21 + (0,)),
)


def _warm_persistent(cell_name: str, dtype: str, nb: int) -> tuple[str, float]:
    """Compile (or load) one persistent module's kernels for strided and contiguous
    outputs, in a worker process, so the checks and the benchmark find them on disk."""
    import cupy

    from kernrnn.backends.cuda import persistent as cp
    from kernrnn.plugins import get_registry

    t0 = time.perf_counter()
    cell = get_registry().get(cell_name)
    dt = np.dtype(dtype)
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    T, B, H = 2, nb, 8
    for strided in (True, False):
        z = lambda *shape: cupy.zeros(shape, dt)  # noqa: E731
        ybuf = z(T, B, 2 * H) if strided else z(T, B, H)
        Y = ybuf[:, :, :H]
        States, lens = z(S, T + 1, B, H), cupy.full(B, T, np.int64)
        for training in (True, False):
            cp.forward_loop(cell, z(T, B, G * H), z(G * H, H), z(G * H), States,
                            z(K if training else 0, T, B, H), Y, lens, False, training, nb=nb)
        cp.backward_loop(cell, Y, z(S, B, H), z(G * H, H), States, z(K, T, B, H), lens, False,
                         z(T, B, G * H), z(T, B, G * H), nb=nb)
    cupy.cuda.Device().synchronize()
    return f"{cell_name} {dt.name} NB={nb}", time.perf_counter() - t0


def warm_persistent(tasks, workers: int | None = None) -> None:
    """Compile persistent modules in parallel processes (spawned: CUDA does not fork)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = workers or max(1, min(len(tasks), (os.cpu_count() or 2) - 1, 12))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_warm_persistent, *t) for t in tasks]
        for f in as_completed(futures):
            what, secs = f.result()
            print(f"compiled {what}: {secs:.1f} s", flush=True)
    print(f"warm-up of {len(tasks)} modules with {workers} processes: "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def _persistent_tasks():
    from kernrnn.backends.cuda import persistent as cp
    from kernrnn.plugins import get_registry

    reg = get_registry()
    tasks = set()
    for name, dtypes in (("lstm", ("float32", "float64")), ("gru", ("float32",))):
        G = reg.get(name).n_gates
        for dt in dtypes:
            for B in sorted({c[1] for c in PERSISTENT_CASES} | {1, 4, 16, 64}):
                tasks.add((name, dt, cp._nb_for(B, G, np.dtype(dt).itemsize)))
    return sorted(tasks)


def kernel_report(file=None) -> list[dict]:
    """Registers, local memory, shared memory and co-resident blocks of every persistent
    kernel launched in this process (one row per launch configuration)."""
    from kernrnn.backends.cuda import persistent as cp

    rows = []
    for (dev, kid, threads, smem), limit in cp._coop_limit.items():
        kernel, label = cp._compiled[(dev, kid)]
        module, name = label.rsplit(".", 1)
        cell = module.replace("kernrnn_gen_persist_", "").rsplit("_", 1)[0]  # cell_dtype_nbN
        rows.append(dict(kernel=f"{cell} {name}", device=dev, regs=kernel.regs_per_thread,
                         local=kernel.local_mem_per_thread, static=kernel.shared_mem_per_block,
                         threads=threads, dynamic=smem, coop_blocks=limit,
                         opt_in=cp._smem_optin.get((dev, kid), 0)))
    rows.sort(key=lambda r: (r["kernel"], r["dynamic"]))
    print("| kernel | regs/thread | local B/thread | static smem | dynamic smem | threads "
          "| co-resident blocks | opted in |", file=file)
    print("|---|---|---|---|---|---|---|---|", file=file)
    for r in rows:
        print(f"| {r['kernel']} | {r['regs']} | {r['local']} | {r['static']} | "
              f"{r['dynamic']} | {r['threads']} | {r['coop_blocks']} | {r['opt_in']} |",
              file=file, flush=True)
    return rows


def phase_persistent(out: Path) -> int:
    _gpu_or_exit()
    import cupy

    from kernrnn.backends.cuda import persistent as cp
    from benchmarks.persistent import gpu_selfcheck
    from kernrnn.plugins import get_registry

    warm_persistent(_persistent_tasks())
    ok = True
    print("\n## one launch == stepwise launches (bit for bit) == CPU", flush=True)
    ok &= gpu_selfcheck(cells=["lstm"], cases=PERSISTENT_CASES, dtypes=(np.float32,))
    ok &= gpu_selfcheck(cells=["lstm"], cases=PERSISTENT_CASES[:2], dtypes=(np.float64,))
    ok &= gpu_selfcheck(cells=["gru"], cases=PERSISTENT_CASES[::2], dtypes=(np.float32,))

    lstm = get_registry().get("lstm")
    props = cp.device_props()
    p = cp.plan(lstm, 16, 1024, np.float32, props.sm_count)
    print(f"\n## LSTM H=1024 B=16 float32 on {props.sm_count} SMs: {p}")
    opted = {k: v for k, v in cp._smem_optin.items() if v > 48 * 1024}
    print(f"needs > 48 KiB: {p.smem > 48 * 1024} ({p.smem} bytes); opted in: {opted}")
    if p.smem > 48 * 1024 and not opted:
        print("FAIL: the H=1024 case ran without a recorded shared-memory opt-in")
        ok = False

    print("\n## compiled persistent kernels")
    rows = kernel_report()
    spills = [r for r in rows if r["local"]]
    if spills:
        print(f"note: {len(spills)} kernel(s) use local memory (spills)")

    print("\n## an oversubscribed grid is refused", flush=True)
    T, B, H = 3, 16, 1024
    f = np.float32
    z = lambda *s: cupy.zeros(s, f)  # noqa: E731
    G, S, K = lstm.n_gates, lstm.n_state, lstm.n_saved
    try:
        cp.forward_loop(lstm, z(T, B, G * H), z(G * H, H), z(G * H), z(S, T + 1, B, H),
                        z(K, T, B, H), z(T, B, H), cupy.full(B, T, np.int64), False, True,
                        blocks=H)
        cupy.cuda.Device().synchronize()
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
    import cupy

    import kernrnn
    from kernrnn.plugins import get_registry

    ok = True
    lstm = get_registry().get("lstm")
    print(f"path setting: {cb.get_path()}; auto picks "
          f"{cb._resolve_path(None, lstm, np.float32, 16, 512, True)} at LSTM B=16 H=512")
    T, B, I, H = 20, 6, 24, 40
    rng = np.random.default_rng(0)
    lens = np.array([20, 17, 9, 20, 1, 12])
    x = rng.uniform(-1, 1, (T, B, I))
    dy = rng.uniform(-1, 1, (T, B, 2 * H))
    for cell in ("lstm", "gru", "rnn"):
        ref = kernrnn.RNN(cell, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
        y_r, _ = ref(x, lengths=lens)
        dx_r, _ = ref.backward(dy)
        for dt, limit in ((np.float64, 1e-10), (np.float32, 2e-3)):
            gpu = kernrnn.RNN(cell, I, H, num_layers=2, bidirectional=True, dtype=dt,
                              device="cuda")
            gpu.load_state_dict({k: cupy.asarray(v.astype(dt)) for k, v in ref.params.items()})
            y, _ = gpu(cupy.asarray(x, dtype=dt), lengths=lens)
            dx, _ = gpu.backward(cupy.asarray(dy, dtype=dt))
            errs = [_rel(cupy.asnumpy(y), y_r), _rel(cupy.asnumpy(dx), dx_r)]
            errs += [_rel(cupy.asnumpy(gpu.grads[k]), ref.grads[k]) for k in ref.grads]
            good = max(errs) <= limit
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'} {cell} {np.dtype(dt).name}: max relative error "
                  f"vs CPU float64 {max(errs):.2e} (limit {limit:.0e})", flush=True)
    ok &= _graphs_check(cb, cupy, kernrnn)
    ok &= _torch_check()
    return OK if ok else FAILED


def _graphs_check(cb, cupy, kernrnn) -> bool:
    layer = kernrnn.RNN("lstm", 12, 24, num_layers=2, device="cuda", dtype=np.float64, seed=4)
    rs = cupy.random.RandomState(0)
    x, dy = rs.uniform(-1, 1, (9, 5, 12)), rs.uniform(-1, 1, (9, 5, 24))

    def run():
        layer.zero_grad()
        y, _ = layer(x)
        dx, _ = layer.backward(dy)
        return [cupy.asnumpy(y), cupy.asnumpy(dx)]

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


def _check_ieee(torch) -> tuple[bool, str]:
    """cuDNN's LSTM and a matmul in float32 against float64: IEEE float32 errs ~1e-6,
    TF32 (10-bit mantissa) ~1e-3."""
    torch.manual_seed(0)
    m = torch.nn.LSTM(512, 512).cuda()
    x = torch.randn(25, 16, 512, device="cuda")
    with torch.no_grad():
        y32, _ = m(x)
        y64, _ = m.double()(x.double())
    a, b = torch.randn(1024, 1024, device="cuda"), torch.randn(1024, 1024, device="cuda")
    mm = _rel((a @ b).cpu(), (a.double() @ b.double()).cpu())
    rnn = _rel(y32.cpu(), y64.cpu())
    ok = rnn < 1e-4 and mm < 1e-4
    return ok, f"LSTM float32 vs float64 {rnn:.1e}, matmul {mm:.1e} ({'IEEE' if ok else 'TF32?'})"


def phase_bench(out: Path, reps: int = 7, warmup: int = 2) -> int:
    cb = _gpu_or_exit()
    import cupy
    import torch

    from kernrnn.backends.cuda import persistent as cp
    from benchmarks import torch_fp32_precision
    from kernrnn.functional import rnn_backward, rnn_forward
    from kernrnn.plugins import get_registry

    precision = torch_fp32_precision(torch, "ieee")
    ieee, ieee_note = _check_ieee(torch)
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
    slug = "".join(c if c.isalnum() else "-" for c in props["name"].lower()).strip("-")
    table_path = out / f"gpu-{slug}.md"
    lstm = get_registry().get("lstm")
    deadline = _deadline() - 10
    rows = []
    for label, B, T, H in BENCH_CASES:
        row = dict(case=label, B=B, T=T, H=H)
        rows.append(row)
        if time.time() > deadline:
            row.update({f"{k}_{w}": "not run (time)" for k in ("cudnn",) + VARIANTS
                        for w in ("fwd", "train")})
            continue
        try:
            _bench_case(row, lstm, B, T, H, torch, cupy, cb, cp, rnn_forward, rnn_backward,
                        reps, warmup)
        except Exception as exc:  # noqa: BLE001 - keep the table going
            print(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
        print(json.dumps(row), flush=True)
        table_path.write_text(format_table(meta, rows))  # partial results survive a kill
        (out / "bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(format_table(meta, rows))
    print(f"written {table_path}")
    return OK if ieee else FAILED


def _bench_case(row, cell, B, T, H, torch, cupy, cb, cp, rnn_forward, rnn_backward, reps, warmup):
    I, G = H, cell.n_gates
    rng = np.random.default_rng(0)
    bound = 1.0 / np.sqrt(H)
    u = lambda lo, hi, shape: cupy.asarray(rng.uniform(lo, hi, shape).astype(np.float32))  # noqa: E731
    w_ih, w_hh = u(-bound, bound, (G * H, I)), u(-bound, bound, (G * H, H))
    b_ih, b_hh = u(-bound, bound, G * H), u(-bound, bound, G * H)
    x, dy = u(-1, 1, (T, B, I)), u(-1, 1, (T, B, H))

    m = torch.nn.LSTM(I, H).cuda()
    with torch.no_grad():
        for name, arr in (("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh), ("bias_ih_l0", b_ih),
                          ("bias_hh_l0", b_hh)):
            getattr(m, name).copy_(torch.as_tensor(arr, device="cuda"))
    tx, tdy = torch.as_tensor(x, device="cuda"), torch.as_tensor(dy, device="cuda")
    txg = tx.clone().requires_grad_(True)

    def torch_fwd():
        with torch.no_grad():
            m(tx)

    def torch_train():
        y, _ = m(txg)
        y.backward(tdy)

    torch.cuda.synchronize()
    row["cudnn_fwd"] = _timed(torch_fwd, _torch_events, reps, warmup)
    row["cudnn_train"] = _timed(torch_train, _torch_events, reps, warmup)
    torch.cuda.synchronize()

    def k_fwd():
        rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, training=False)

    def k_train():
        _, _, ctx = rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, training=True)
        rnn_backward(ctx, dy)

    for variant in VARIANTS:
        path = "persistent" if variant == "persistent" else "gemm"
        if path == "persistent" and not cp.supported(cell, B, H, np.float32):
            row[f"{variant}_fwd"] = row[f"{variant}_train"] = None
            continue
        cb.set_path(path)
        cb.set_graphs(variant == "graphs")
        try:
            for what, fn in (("fwd", k_fwd), ("train", k_train)):
                try:
                    row[f"{variant}_{what}"] = _timed(fn, _cupy_events, reps, warmup)
                except Exception as exc:  # noqa: BLE001
                    row[f"{variant}_{what}"] = f"failed ({type(exc).__name__})"
                    print(f"{row['case']} {variant} {what}: {type(exc).__name__}: {exc}")
        finally:
            cb.set_path(None)
            cb.set_graphs(None)
        cupy.cuda.Device().synchronize()


# -- entry point ---------------------------------------------------------------------------

_CHILDREN = {"env": lambda out: phase_env(), "gemm": phase_gemm, "persistent": phase_persistent,
             "layer": phase_layer, "bench": phase_bench,
             "persistent-tests": phase_persistent_tests}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.devicecheck",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("phases", nargs="*", help=f"phases to run (default: "
                    f"{' '.join(n for n, p in PHASES.items() if p.default)})")
    ap.add_argument("--list", action="store_true", help="list the phases and their timeouts")
    ap.add_argument("--out", type=Path, help="log directory (default $OUT/devicecheck, else "
                    "./devicecheck-logs)")
    ap.add_argument("--budget", type=float, default=BUDGET,
                    help=f"seconds for all phases together (default {BUDGET})")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every phase timeout")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.list:
        for p in PHASES.values():
            print(f"{p.name:18s} {p.timeout:5.0f} s  {p.doc}{'' if p.default else ' (opt-in)'}")
        return 0
    out = args.out or _default_out()
    if args.child:
        out.mkdir(parents=True, exist_ok=True)
        return _CHILDREN[args.child](out)
    names = args.phases or [n for n, p in PHASES.items() if p.default]
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    return run(names, out, budget=args.budget, scale=args.scale)


if __name__ == "__main__":
    sys.exit(main())
