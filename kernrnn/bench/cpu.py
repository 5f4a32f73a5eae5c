"""CPU benchmark: kernrnn against PyTorch, side by side in one process.

Absolute times on a shared or throttled machine are noise; ratios measured in
the same process with interleaved repetitions are not (both sides see the same
load).  So every repetition times kernrnn, PyTorch and one float32 GEMM of a
large square back to back, in alternating order, and the report gives medians,
the kernrnn/PyTorch ratio and the fraction of the GEMM rate seen in the same
run.  PyTorch is optional: without it only kernrnn's times are reported.

FLOPs counted (the GEMMs only, as cuDNN's and DeepBench's figures do):
forward ``2*T*B*G*H*(I+H)``, training step three times that (forward, the
recurrent and input gradient GEMMs, the weight gradient GEMMs).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["SIZES", "SMALL_BATCH_SIZES", "CELLS", "TORCH_CELLS", "LOOP_CELLS", "Case",
           "run_cases", "run_loop_cases", "measure_startup", "gemm_rate", "format_table",
           "markdown_report", "set_threads", "flops", "plot_ratios"]

CELLS = ("rnn", "lstm", "gru")
TORCH_CELLS = ("rnn", "lstm", "gru")  # cells with a PyTorch nn.* anchor
SIZES = ((32, 100, 64, 128), (64, 100, 256, 256), (64, 100, 512, 512))  # (B, T, I, H)
SMALL_BATCH_SIZES = tuple((B, 100, 256, 256) for B in (1, 8, 16, 32))
MODES = ("forward", "train")
GEMM_N = 1024  # square GEMM used as the machine's float32 peak
# Seconds to wait after every timed call and reference GEMM.  Thread pools
# keep spinning after a call, on the cores the next timed call needs:
# NumPy's OpenBLAS for about 0.1 s (a CIFG training forward, B=32, H=256:
# 33 ms right after the GEMM, 21 ms 0.1 s later), PyTorch's OpenMP workers
# for some milliseconds (LSTM forward 32,100,64,128: kernrnn 8.1 ms right
# after a PyTorch call, 4.4 ms with no PyTorch call before it); kernrnn's
# pool threads block instead.  The wait times each side without the other's
# (or the instrument's) leftover threads; 0 gives rounds 1 and 2's method.
SETTLE_S = 0.15


@dataclass
class Case:
    """Timings (seconds, one per repetition) of one cell, size and mode."""

    cell: str
    B: int
    T: int
    I: int
    H: int
    mode: str
    gflop: float
    kernrnn: list = field(default_factory=list)
    torch: list = field(default_factory=list)
    gemm: list = field(default_factory=list)  # GFLOP/s of the reference GEMM, same reps
    anchor: str = "nn"  # what the torch times are: PyTorch's nn.* module or a loop

    @property
    def kern_s(self) -> float:
        return statistics.median(self.kernrnn)

    @property
    def torch_s(self) -> float | None:
        return statistics.median(self.torch) if self.torch else None

    @property
    def ratio(self) -> float | None:
        return self.kern_s / self.torch_s if self.torch else None

    @property
    def peak(self) -> float:
        return statistics.median(self.gemm)

    def gflops(self, seconds: float) -> float:
        return self.gflop / seconds


def flops(cell: str, B: int, T: int, I: int, H: int, mode: str) -> float:
    """GEMM FLOPs of one forward (``mode="forward"``) or training step."""
    from kernrnn.plugins import resolve_cell

    c = resolve_cell(cell)
    G, Gr = c.n_gates, c.n_recurrent_gates
    dh = H // c.n_heads if c.has_recurrent else 0
    fwd = 2.0 * T * B * H * (G * I + Gr * dh)  # input GEMM + recurrent (per-head) products
    return fwd if mode == "forward" else 3.0 * fwd


_limiter = None  # keeps threadpoolctl's global limit alive


def set_threads(n: int, torch=None) -> None:
    """Give every thread pool in the process ``n`` threads.

    Numba's parallel layer, the BLAS libraries (NumPy's and SciPy's, the one
    Numba's ``np.dot`` calls) and PyTorch's intra-op pool.
    """
    global _limiter
    import numba
    import numba.np.ufunc.parallel as numba_parallel
    import scipy.linalg.cython_blas  # noqa: F401  (load the BLAS Numba calls, so it is limited too)
    from threadpoolctl import threadpool_limits

    if not getattr(numba_parallel, "_is_initialized", True):
        # kernrnn runs no parallel Numba code; the OpenMP layer, started before
        # PyTorch is imported, would slow PyTorch's ops 10-30x (see cpu.n_threads)
        numba.config.THREADING_LAYER = "workqueue"
    numba.set_num_threads(n)
    _limiter = threadpool_limits(limits=n)
    if torch is not None:
        torch.set_num_threads(n)


_GEMM_OPERANDS: dict = {}


def gemm_rate(n: int = GEMM_N, dtype=np.float32, repeats: int = 3,
              clock=time.perf_counter) -> float:
    """GFLOP/s of one ``[n, n] @ [n, n]`` product, best of ``repeats``."""
    key = (n, np.dtype(dtype).str)
    if key not in _GEMM_OPERANDS:
        rng = np.random.default_rng(0)
        _GEMM_OPERANDS[key] = tuple(rng.standard_normal((n, n)).astype(dtype) for _ in range(3))
    a, b, c = _GEMM_OPERANDS[key]
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        np.matmul(a, b, out=c)
        best = min(best, clock() - t0)
    return 2.0 * n**3 / best / 1e9


def _kernrnn_step(cell, B, T, I, H, mode, seed=0):
    """A ready-to-time kernrnn closure and its parameters (for PyTorch)."""
    import kernrnn

    rng = np.random.default_rng(seed)
    layer = kernrnn.RNN(cell, I, H, dtype=np.float32, seed=seed)
    x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)
    dy = rng.uniform(-1, 1, (T, B, H)).astype(np.float32)
    if mode == "forward":
        layer.eval()

        def step():
            layer(x)
    else:
        layer.train()

        def step():
            layer(x)
            layer.backward(dy)
    return step, layer.state_dict(), x, dy


def _torch_step(torch, cell, state_dict, x, dy, mode):
    classes = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
    T, B, I = x.shape
    H = dy.shape[2]
    m = classes[cell](I, H)
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    xt = torch.from_numpy(x.copy())
    dyt = torch.from_numpy(dy.copy())
    if mode == "forward":
        m.eval()

        def step():
            with torch.no_grad():
                m(xt)
    else:
        m.train()
        xt.requires_grad_(True)

        def step():
            m.zero_grad(set_to_none=True)
            xt.grad = None
            y, _ = m(xt)
            y.backward(dyt)
    return step


def _torch_cifg_step(torch, W_hh, b_hh, xw_t, h, c):
    """One CIFG step (``kernrnn_example_cells.cifg``'s math) in PyTorch ops."""
    f, g, o = (xw_t + h @ W_hh.T + b_hh).chunk(3, 1)
    f = torch.sigmoid(f)
    c = f * c + (1 - f) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


# Cells timed against the same math written as a PyTorch loop with autograd
# (what a researcher writes without kernrnn): name -> step(torch, W_hh, b_hh, xw_t, *state).
LOOP_CELLS = {"cifg": _torch_cifg_step}


def _torch_loop_step(torch, cell, state_dict, x, dy, compiled):
    """A training step of ``cell`` as a Python loop over PyTorch ops (optionally compiled).

    The input projection is one GEMM for all steps (as kernrnn does); each
    step is ``LOOP_CELLS[cell]``, through ``torch.compile`` when ``compiled``.
    """
    T, B, _ = x.shape
    H = dy.shape[2]
    p = {k.rsplit("_l0", 1)[0]: torch.from_numpy(np.array(v)).requires_grad_(True)
         for k, v in state_dict.items()}
    xt, dyt = torch.from_numpy(x.copy()), torch.from_numpy(dy.copy())
    n_state = 2 if cell in ("cifg",) else 1
    step_fn = LOOP_CELLS[cell]
    if compiled:
        step_fn = torch.compile(step_fn, dynamic=False)

    def step():
        for v in p.values():
            v.grad = None
        xw = (xt.reshape(T * B, -1) @ p["weight_ih"].T + p["bias_ih"]).reshape(T, B, -1)
        state = [torch.zeros(B, H) for _ in range(n_state)]
        ys = []
        for t in range(T):
            state = step_fn(torch, p["weight_hh"], p["bias_hh"], xw[t], *state)
            ys.append(state[0])
        torch.stack(ys).backward(dyt)
    return step


def run_loop_cases(cells=("cifg",), sizes=SIZES, repeats=10, warmup=2, threads=2,
                   progress=None, clock="wall") -> list[Case]:
    """Training steps of kernrnn plugins against the same cells as PyTorch loops.

    Two cases per cell and size, sharing kernrnn's timings: against the eager
    loop (``anchor="torch loop"``) and against the ``torch.compile``'d step
    (``anchor="torch.compile loop"``).  Needs PyTorch (and the cell's plugin).
    """
    import torch

    tick = CLOCKS[clock]
    set_threads(threads, torch)
    cases = []
    for cell in cells:
        if cell not in LOOP_CELLS:
            raise ValueError(f"no PyTorch loop for cell {cell!r}; known: {', '.join(LOOP_CELLS)}")
        for (B, T, I, H) in sizes:
            # compile afresh per size: TorchDynamo stops compiling a function after 8
            # recompilations (two per size here) and runs it eagerly from then on
            torch._dynamo.reset()
            gf = flops(cell, B, T, I, H, "train") / 1e9
            eager = Case(cell, B, T, I, H, "train", gf, anchor="torch loop")
            comp = Case(cell, B, T, I, H, "train", gf, anchor="torch.compile loop")
            kstep, sd, x, dy = _kernrnn_step(cell, B, T, I, H, "train")
            steps = [(kstep, None), (_torch_loop_step(torch, cell, sd, x, dy, False), eager),
                     (_torch_loop_step(torch, cell, sd, x, dy, True), comp)]
            for _ in range(warmup):
                for fn, _c in steps:
                    fn()
            for rep in range(repeats):
                for fn, c in (steps if rep % 2 == 0 else steps[::-1]):
                    dt = _time(fn, tick)
                    if c is None:
                        eager.kernrnn.append(dt)
                        comp.kernrnn.append(dt)
                    else:
                        c.torch.append(dt)
                rate = gemm_rate(repeats=1, clock=tick)
                _settle()
                eager.gemm.append(rate)
                comp.gemm.append(rate)
            for c in (eager, comp):
                cases.append(c)
                if progress:
                    progress(c)
    return cases


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(fn, clock=time.perf_counter) -> float:
    """Seconds of one call of ``fn``, then :data:`SETTLE_S` of pause."""
    t0 = clock()
    fn()
    dt = clock() - t0
    _settle()
    return dt


def _settle() -> None:
    """Wait :data:`SETTLE_S` seconds, busy: a sleeping process lets the (virtual) CPU go
    idle, and the next call then starts slow (kernrnn LSTM B=8 forward, H=256: 9.7 ms
    after a 0.15 s sleep, 5.7 ms after 0.15 s of busy waiting)."""
    end = time.perf_counter() + SETTLE_S
    while time.perf_counter() < end:
        pass


def run_cases(cells=CELLS, sizes=SIZES, modes=MODES, repeats=10, warmup=2, threads=2,
              use_torch=True, progress=None, clock="wall") -> list[Case]:
    """Time every (cell, size, mode); PyTorch too when importable and wanted.

    ``clock="cpu"`` times the process's CPU seconds instead of wall seconds:
    with ``threads=1`` that is each side's per-core cost, little disturbed by
    other processes on a shared machine (with several threads it would also
    count time spent spinning in thread pools).
    """
    tick = CLOCKS[clock]
    torch = None
    if use_torch and any(c in TORCH_CELLS for c in cells):
        try:
            import torch  # noqa: F811
        except ImportError:
            torch = None
    set_threads(threads, torch)
    cases = []
    for cell in cells:
        for (B, T, I, H) in sizes:
            for mode in modes:
                case = Case(cell, B, T, I, H, mode, flops(cell, B, T, I, H, mode) / 1e9)
                kstep, sd, x, dy = _kernrnn_step(cell, B, T, I, H, mode)
                tstep = _torch_step(torch, cell, sd, x, dy, mode) \
                    if (torch is not None and cell in TORCH_CELLS) else None
                for _ in range(warmup):
                    kstep()
                    if tstep:
                        tstep()
                for rep in range(repeats):
                    # Alternate who goes first so neither always runs on a
                    # cache warmed (or a core heated) by the other.
                    order = (kstep, tstep) if rep % 2 == 0 else (tstep, kstep)
                    for fn in order:
                        if fn is None:
                            continue
                        dt = _time(fn, tick)
                        (case.kernrnn if fn is kstep else case.torch).append(dt)
                    case.gemm.append(gemm_rate(repeats=1, clock=tick))
                    _settle()
                cases.append(case)
                if progress:
                    progress(case)
    return cases


# -- start-up -----------------------------------------------------------------

_STARTUP_SCRIPT = """
import numpy as np, kernrnn
B, T, I, H = {B}, {T}, {I}, {H}
layer = kernrnn.RNN({cell!r}, I, H, dtype=np.float32, seed=0)
x = np.ones((T, B, I), np.float32)
y, _ = layer(x)
layer.backward(np.ones_like(y))
"""


def measure_startup(cell="lstm", size=SIZES[0], warm_runs=3, threads=2) -> dict:
    """Seconds from starting a fresh interpreter to its first finished training step.

    Cold: an empty kernel cache (``KERNRNN_CACHE_DIR`` and ``NUMBA_CACHE_DIR``
    pointing at a new directory), so every kernel compiles.  Warm: the same
    directories again, so the kernels load from Numba's on-disk cache.
    """
    B, T, I, H = size
    script = _STARTUP_SCRIPT.format(B=B, T=T, I=I, H=H, cell=cell)
    tmp = tempfile.mkdtemp(prefix="kernrnn-bench-cache-")
    env = dict(os.environ, KERNRNN_CACHE_DIR=os.path.join(tmp, "kernels"),
               NUMBA_CACHE_DIR=os.path.join(tmp, "numba"),
               NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))

    def once() -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", script], env=env, check=True)
        return time.perf_counter() - t0

    try:
        t_empty = statistics.median(
            _time(lambda: subprocess.run([sys.executable, "-c", "pass"], env=env, check=True))
            for _ in range(3)
        )
        cold = once()
        warm = [once() for _ in range(warm_runs)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cell": cell, "size": list(size), "cold_s": cold, "warm_s": statistics.median(warm),
            "warm_runs": warm, "python_start_s": t_empty}


# -- reports ------------------------------------------------------------------


def machine() -> str:
    """The CPU model name (as ``lscpu`` prints it) and the usable core count."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def versions() -> dict:
    import numba
    import scipy

    out = {"python": platform.python_version(), "numpy": np.__version__,
           "scipy": scipy.__version__, "numba": numba.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = "not installed"
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = sorted({f"{i['internal_api']} {i.get('version')} "
                              f"({i.get('architecture')})"
                              for i in threadpool_info() if i["user_api"] == "blas"})
    except Exception:  # pragma: no cover - informative only
        pass
    return out


def _rows(cases):
    rows = []
    for c in cases:
        k = c.kern_s
        t = c.torch_s
        rows.append({
            "cell": c.cell, "B,T,I,H": f"{c.B},{c.T},{c.I},{c.H}", "mode": c.mode,
            "torch is": c.anchor if t is not None else "-",
            "kernrnn ms": f"{k * 1e3:.2f}",
            "torch ms": "-" if t is None else f"{t * 1e3:.2f}",
            "ratio": "-" if t is None else f"{k / t:.2f}",
            "kernrnn GFLOP/s": f"{c.gflops(k):.0f}",
            "torch GFLOP/s": "-" if t is None else f"{c.gflops(t):.0f}",
            "kernrnn % peak": f"{100 * c.gflops(k) / c.peak:.0f}",
            "torch % peak": "-" if t is None else f"{100 * c.gflops(t) / c.peak:.0f}",
            "peak GFLOP/s": f"{c.peak:.0f}",
        })
    return rows


def format_table(cases, markdown=False) -> str:
    rows = _rows(cases)
    if not rows:
        return ""
    keys = list(rows[0])
    if markdown:
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
        return "\n".join(lines)
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines = ["  ".join(k.rjust(widths[k]) for k in keys)]
    lines += ["  ".join(r[k].rjust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def format_startup(s: dict) -> str:
    return (f"start-up to the first finished training step ({s['cell']}, B,T,I,H = "
            f"{','.join(map(str, s['size']))}): cold cache {s['cold_s']:.2f} s, warm cache "
            f"{s['warm_s']:.2f} s (median of {len(s['warm_runs'])}; an empty Python "
            f"process takes {s['python_start_s']:.2f} s)")


def markdown_report(cases, startup=None, command="", threads=2, repeats=0, note="",
                    clock="wall") -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    v = versions()
    parts = [
        "# kernrnn CPU benchmark", "",
        f"- date: {now}",
        f"- machine: {machine()}; {threads} threads for every pool",
        f"- command: `{command}`",
        "- software: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- float32; {clock}-clock medians of {repeats} interleaved repetitions; "
        "ratio = kernrnn / PyTorch "
        "time (lower is better); % peak = achieved GFLOP/s over a "
        f"{GEMM_N}x{GEMM_N} float32 GEMM timed in the same repetitions; a {SETTLE_S:g} s "
        "pause after every timed call and GEMM (no thread pool still spinning)",
    ]
    if note:
        parts += [f"- note: {note}"]
    parts += ["", format_table(cases, markdown=True), ""]
    if startup:
        parts += [format_startup(startup), ""]
    return "\n".join(parts)


def to_json(cases, startup=None) -> str:
    return json.dumps({"cases": [asdict(c) for c in cases], "startup": startup}, indent=1)


def plot_ratios(cases, path, title="kernrnn / PyTorch time (lower is better)") -> list:
    """Bar chart of the kernrnn/PyTorch time ratios, one bar per case and mode.

    A dashed line marks parity (1.0).  Needs matplotlib (the ``train`` extra).
    Returns the bars drawn as ``(label, mode, ratio)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [c for c in cases if c.torch]
    if not timed:
        raise ValueError("--plot needs PyTorch timings (install torch, drop --no-torch)")

    def label(c):
        return f"{c.cell}\n{c.B},{c.T},{c.I},{c.H}"

    labels = list(dict.fromkeys(label(c) for c in timed))  # in run order
    modes = [m for m in MODES if any(c.mode == m for c in timed)]
    width = 0.8 / len(modes)
    drawn = []
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 3.6))
    for k, mode in enumerate(modes):
        xs, ys = [], []
        for i, name in enumerate(labels):
            for c in timed:
                if c.mode == mode and label(c) == name:
                    xs.append(i + (k - (len(modes) - 1) / 2) * width)
                    ys.append(c.ratio)
                    drawn.append((name, mode, c.ratio))
        bars = ax.bar(xs, ys, width, label=mode)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("time ratio kernrnn / PyTorch")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
