"""Who runs the CPU kernels: the thread pool, BLAS's threads and the thread split.

The time loops run on plain Python threads calling ``nogil`` kernels (no
Numba threading layer, so no OpenMP pool spinning next to BLAS's or
PyTorch's), while BLAS is held to one thread (:func:`blas_single_thread`);
the big GEMMs outside the time loops get every BLAS thread.  With one chunk
(one thread, or a batch of one) the loop runs in the caller with BLAS left as
it is.  Every launch goes through :func:`launch`.

Small batches are weight-bound rather than FMA-bound: with one or two rows
per thread a fused forward runs the input projection of all steps first, and
for B <= 4 the threads split either the rows or the hidden units
(:func:`thread_parts`), whichever the recent calls measured faster
(:class:`SplitChooser`), in the forward and in BPTT.  The weight-gradient
GEMMs of long batches run on the kernel threads too (one-thread BLAS each,
:func:`threaded_matmul`), so no BLAS worker is left spinning on the cores the
next forward needs.  The thresholds are in :mod:`~kernrnn.backends.cpu.tuning`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numba.np.ufunc.parallel as _numba_parallel
import numpy as np

from kernrnn.backends.cpu import microkernel as mk
from kernrnn.backends.cpu import timing, tuning
from kernrnn.backends.cpu.build import precompile
from kernrnn.backends.cpu.kernel_args import FORWARD, FUSED_FORWARD, INPUT_PROJECTION
from kernrnn.backends.cpu.workspace import workspace

__all__ = ["n_threads", "blas_single_thread", "n_chunks", "run_chunks", "Part", "thread_parts",
           "SplitChooser", "run_fused", "launch", "launch_timed", "threaded_matmul"]


_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas = None


def _blas_libs():
    """threadpoolctl's handles on the loaded BLAS libraries (found once).

    SciPy's BLAS (the one Numba's ``np.dot`` calls) is imported first so it is
    among them even before any kernel has run.
    """
    global _blas
    if _blas is None:
        import scipy.linalg.cython_blas  # noqa: F401
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


@contextlib.contextmanager
def blas_single_thread():
    """Hold every BLAS to one thread (restored afterwards).

    The limit is process-wide: layers called from several Python threads at
    once still compute correctly, but may run BLAS multi-threaded inside the
    loops (oversubscribed) while another call restores the limit.
    """
    timing.mark("BLAS held to one thread")
    libs = _blas_libs()
    before = [lib.num_threads for lib in libs]
    changed = [lib for lib, n in zip(libs, before, strict=True) if n != 1]
    for lib in changed:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        timing.mark("BLAS restore")
        for lib, n in zip(libs, before, strict=True):
            if n != 1:
                lib.set_num_threads(n)
        timing.mark("BLAS restored")


def n_threads() -> int:
    """Threads the CPU kernels use: Numba's setting (``NUMBA_NUM_THREADS``,
    ``numba.set_num_threads``).

    Read without launching Numba's threading layer when nothing launched it
    yet: kernrnn runs no parallel Numba code, and Numba's default OpenMP
    layer, once started before PyTorch is loaded, makes PyTorch's own OpenMP
    operations 10-30x slower in the same process (measured: an eager CIFG
    training loop, B=16, H=256, 62 ms -> 1.5 s).
    """
    if not getattr(_numba_parallel, "_is_initialized", True):
        return numba.config.NUMBA_NUM_THREADS
    return numba.get_num_threads()


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kernrnn-cpu")
            _pool_size = n
        return _pool


def n_chunks(batch: int) -> int:
    """Batch chunks of the row split: one per thread, of at least
    :data:`~kernrnn.backends.cpu.tuning.MIN_ROWS_PER_CHUNK` rows."""
    return max(1, min(batch // tuning.MIN_ROWS_PER_CHUNK, n_threads()))


def run_chunks(kernel, args: dict, batch: int, spec=FORWARD) -> None:
    """A plain forward kernel over batch chunks, one per thread.

    ``args``: its arguments by name (``spec``:
    :data:`~kernrnn.backends.cpu.kernel_args.FORWARD`, or ``FORWARD_STAGED``), but for
    each thread's rows ``b0``, ``b1``.
    """
    nchunk = n_chunks(batch)
    launch([[(kernel, spec.pack(args, b0=c * batch // nchunk,
                                b1=(c + 1) * batch // nchunk))]
            for c in range(nchunk)])


class Part(NamedTuple):
    """One thread's share of a kernel on packed weights (the kernels' last arguments)."""

    nthr: int  # threads that meet at the step barrier: 1 under the row split
    tid: int  # this thread's index among them
    b0: int  # its batch rows b0:b1
    b1: int
    jb0: int  # its unit blocks jb0:jb1
    jb1: int


class SplitChooser:
    """The faster thread split per problem shape, from the calls' own wall times.

    Each shape first runs twice with each split, the first time not counted
    (it pays one-off costs: starting a pool thread, the other core's cold
    caches; measured 2.8 against 1.1 ms for the unit split's first LSTM
    forward at B = 1); then the split with the lower recent time (an
    exponential average per split) runs, and after
    ``probe_every`` calls the other one is tried again, so a change of load
    (another process taking a core stalls the unit split's barrier) is
    noticed.  A probe that loses doubles the wait before the next one (up
    to ``max_probe_every``), so a split that keeps losing costs less and
    less; when the load slows the split in use, its own average rises past
    the other's time and the choice changes without a probe.
    """

    def __init__(self, probe_every: int = 8, max_probe_every: int = 1024,
                 weight: float = 0.5):
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.weight = weight
        # key -> [calls until the next probe, interval, {split: s}, splits run once]
        self._stats: dict = {}

    def _entry(self, key) -> list:
        return self._stats.setdefault(key, [self.probe_every, self.probe_every, {}, set()])

    def choose(self, key) -> str:
        entry = self._entry(key)
        times = entry[2]
        for split in ("rows", "units"):
            if split not in times:
                return split
        best = min(times, key=times.get)
        entry[0] -= 1
        if entry[0] <= 0:
            return "units" if best == "rows" else "rows"
        return best

    def record(self, key, split: str, seconds: float) -> None:
        entry = self._entry(key)
        if split not in entry[3]:  # a split's first call: not counted
            entry[3].add(split)
            return
        times = entry[2]
        old = times.get(split)
        if entry[0] <= 0:  # a probe: its time replaces the stale one; back off if it lost
            lost = seconds > min(v for k, v in times.items() if k != split)
            entry[1] = min(2 * entry[1], self.max_probe_every) if lost else self.probe_every
            entry[0] = entry[1]
            old = None
        times[split] = seconds if old is None else old + self.weight * (seconds - old)


_split_chooser = SplitChooser()

def thread_parts(kernel, shape, batch: int, n_blocks: int):
    """How a kernel on packed weights splits its work: ``(key, parts)``.

    ``parts``: one :class:`Part` per thread, either batch chunks of all unit
    blocks (``nthr == 1``) or unit blocks of all rows (see
    :data:`~kernrnn.backends.cpu.tuning.SPLIT`).  ``key`` is the split
    chooser's key for this problem when it chose (:func:`launch_timed`
    records the call's time under it), else None.
    """
    nthr = min(n_threads(), n_blocks)
    split = tuning.SPLIT
    key = None
    if split == "auto":
        split = "rows"
        if nthr > 1 and batch <= tuning.UNIT_SPLIT_MAX_BATCH:
            key = (id(kernel), shape, n_blocks, nthr)
            split = _split_chooser.choose(key)
    if split == "units" and nthr > 1:
        return key, [Part(nthr, c, 0, batch, c * n_blocks // nthr, (c + 1) * n_blocks // nthr)
                     for c in range(nthr)]
    nchunk = n_chunks(batch)
    return key, [Part(1, 0, c * batch // nchunk, (c + 1) * batch // nchunk, 0, n_blocks)
                 for c in range(nchunk)]


def _split_name(parts) -> str:
    return "units" if parts[0].nthr > 1 else "rows"


def run_fused(kernel, args: dict, batch: int, n_blocks: int, project, prepare=None) -> None:
    """A fused forward kernel over the threads, split by rows or by unit blocks.

    ``args``: its arguments by name
    (:data:`~kernrnn.backends.cpu.kernel_args.FUSED_FORWARD`), but for the
    per-thread ones set here (``XWc``, ``flags``, the :class:`Part`, ``pre``).
    ``project`` is the ``input_projection`` shared by the cells of this gate count, run
    first (same split) when ``pre``; ``prepare(parts)``, when given, the calls each
    thread makes before anything else (one per thread: packing the panels).
    """
    X, Wxp = args["X"], args["Wxp"]
    key, parts = thread_parts(kernel, X.shape, batch, n_blocks)
    flags = np.zeros(parts[0].nthr * mk.FLAG_STRIDE, dtype=np.int64)
    pre = max(part.b1 - part.b0 for part in parts) <= tuning.PRE_PROJECTION_MAX_ROWS
    dummy = np.empty((1, 1), dtype=X.dtype)
    xw = {}  # one projection buffer per row range: unit-split threads share theirs
    if pre:
        for part in parts:
            rows = (part.b0, part.b1)
            if rows not in xw:
                xw[rows] = workspace.take(
                    (X.shape[0] * (part.b1 - part.b0), Wxp.shape[0] * Wxp.shape[2]), X.dtype)
    forwards = [FUSED_FORWARD.pack(args, XWc=xw.get((part.b0, part.b1), dummy), flags=flags,
                                   pre=pre, **part._asdict())
                for part in parts]
    precompile(kernel, forwards[0])
    projections = [INPUT_PROJECTION.pack({"X": X, "Wxp": Wxp}, XWc=xw[part.b0, part.b1],
                                         b0=part.b0, b1=part.b1, jb0=part.jb0, jb1=part.jb1)
                   for part in parts] if pre else []
    if projections:
        precompile(project, projections[0])
    # One task per thread: its part of the projection (its own unit blocks or
    # rows, so no thread waits for another's), then its part of the forward.
    work = [[(kernel, fwd)] for fwd in forwards]
    for calls, proj_args in zip(work, projections):
        calls.insert(0, (project, proj_args))
    if prepare is not None:
        for calls, call in zip(work, prepare(parts), strict=True):
            calls.insert(0, call)
    launch_timed(work, key, parts)
    workspace.give(*xw.values())


def launch_timed(work, key, parts) -> None:
    """:func:`launch`, the time recorded for the split chooser when it chose (``key``)."""
    t0 = time.perf_counter()
    try:
        launch(work)
    finally:
        if key is not None:
            _split_chooser.record(key, _split_name(parts), time.perf_counter() - t0)


def _run_calls(calls, who: str) -> None:
    """One thread's calls, in order (``who``: ``caller`` or ``pool``, for the timing hook)."""
    record = timing.recorder()
    if record is None:
        for fn, fn_args in calls:
            fn(*fn_args)
        return
    for fn, fn_args in calls:
        name = getattr(fn, "__name__", "kernel")
        record(f"{who} {name} start")
        fn(*fn_args)
        record(f"{who} {name} end")


def launch(work) -> None:
    """Each thread's ``[(kernel, args), ...]`` in order: the first list in the caller, the
    others on the pool (one wake-up per thread and call: 0.1-0.3 ms each at B = 1)."""
    if len(work) == 1:
        _run_calls(work[0], "caller")
        return
    # No BLAS runs inside, but holding it to one thread parks its workers,
    # which otherwise spin on the cores the kernel threads need.
    with blas_single_thread():
        pool = _executor(len(work) - 1)
        futures = [pool.submit(_run_calls, calls, "pool") for calls in work[1:]]
        try:
            _run_calls(work[0], "caller")
        finally:
            for f in futures:
                f.result()


@timing.timed("GEMM (kernel threads)")
def threaded_matmul(a, b):
    """``a @ b`` with the output's rows split over the kernel threads, each on one-thread BLAS.

    No BLAS worker is woken, so none is left spinning after the call.
    """
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    nchunk = min(n_threads(), max(1, a.shape[0] // 64))
    bounds = [(c * a.shape[0] // nchunk, (c + 1) * a.shape[0] // nchunk) for c in range(nchunk)]

    def part(r0, r1):
        np.matmul(a[r0:r1], b, out=out[r0:r1])

    with blas_single_thread():
        if nchunk == 1:
            part(*bounds[0])
            return out
        pool = _executor(nchunk - 1)
        futures = [pool.submit(part, *bd) for bd in bounds[1:]]
        try:
            part(*bounds[0])
        finally:
            for f in futures:
                f.result()
    return out
