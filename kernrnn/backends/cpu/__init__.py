"""CPU backend: Numba kernels for one layer and one direction.

Per layer and direction:

* forward: ``XW = x @ W_ih.T`` for all steps in one BLAS GEMM (NumPy, every
  core), then the whole time loop runs compiled.  Batch rows are independent
  for the entire sequence, so the batch is cut into one chunk per thread and
  each thread runs *all* T steps of its chunk: its rows of the recurrent GEMM
  ``h_{t-1} @ W_hh.T`` (single-threaded BLAS from inside Numba) and the cell's
  fused pointwise step, with both biases added there.  No synchronisation per
  step: the threads meet once per call.
* backward: the same split for BPTT (pointwise backward, bias-gradient sums,
  ``dh_{t-1} = dHU_t @ W_hh`` per chunk), then the weight gradients and ``dx``
  as large GEMMs over all T*B rows (multi-threaded BLAS again).

Who owns the cores: the chunks run on plain Python threads calling ``nogil``
kernels (no Numba threading layer, so no OpenMP pool spinning next to BLAS's
or PyTorch's), while BLAS is held to one thread; the big GEMMs outside the
time loops get every BLAS thread.  With one chunk (one thread, or a batch of
one) the loop runs in the caller with BLAS left as it is.
The BLAS limit is process-wide: layers called from several Python threads
at once still compute correctly, but may run BLAS multi-threaded inside the
loops (oversubscribed) while another call restores the limit.

Array layouts (time-major): ``States[s, t', b, j]`` holds the state at time
boundary t' (``States[:, 0]`` is h0 for the forward direction,
``States[:, T]`` for the reverse one); ``Saved[k, t, b, j]`` the values the
cell saved for backward; gate g of unit j is column ``g*H + j`` of ``XW``,
``HU``, ``dXW``, ``dHU`` (PyTorch's row order of ``W_ih``), so the pointwise
loop over j reads G contiguous streams and vectorises.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np

from kernrnn.backends import input_and_weight_gradients
from kernrnn.backends.codegen import backward_body, cell_fingerprint, forward_body, load_module
from kernrnn.scalar import compile_scalar

__all__ = ["CpuKernels", "get_kernels", "ForwardContext", "forward", "backward", "xp"]

xp = np  # the array module of this backend


def asarray(a) -> np.ndarray:
    """A C-contiguous NumPy array (no dtype change: callers checked it)."""
    return np.ascontiguousarray(a)


def lengths(lens: np.ndarray) -> np.ndarray:
    return lens


# -- generated kernels ----------------------------------------------------------


def _forward_source(G: int, S: int, K: int, train: bool) -> str:
    body = forward_body(
        G, S, K,
        xw=lambda g: f"XW[t, b, {g} * H + j] + b_ih[{g} * H + j]",
        hu=lambda g: f"HU[b, {g} * H + j] + b_hh[{g} * H + j]",
        prev=lambda s: f"States[{s}, p, b, j]",
        new=lambda s: f"States[{s}, n, b, j]",
        saved=(lambda k: f"Saved[{k}, t, b, j]") if train else None,
        y="Y[t, b, j]",
        indent=20,
    )
    carry = "\n".join(
        f"                    States[{s}, n, b, j] = States[{s}, p, b, j]" for s in range(S)
    )
    name = "forward_train" if train else "forward_infer"
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
def {name}(XW, b_ih, W_hhT, b_hh, States, Saved, Y, lengths, reverse, HU, b0, b1):
    """All T steps for batch rows b0:b1 (HU: scratch rows b0:b1)."""
    T = XW.shape[0]
    H = States.shape[3]
    for step in range(T):
        if reverse:
            t = T - 1 - step
            p = t + 1
            n = t
        else:
            t = step
            p = t
            n = t + 1
        np.dot(States[0, p, b0:b1], W_hhT, HU[b0:b1])
        for b in range(b0, b1):
            if t < lengths[b]:
                for j in range(H):
{body}
            else:
                for j in range(H):
{carry}
                    Y[t, b, j] = 0
'''


def _backward_source(G: int, S: int, K: int, same: bool) -> str:
    """BPTT over all steps for batch rows b0:b1.

    ``dS`` holds the element-wise part of the state gradients; the recurrent
    part ``dH = dHU_t @ W_hh`` of the previous step is added when it is read
    (saves a pass).  ``same``: the cell returns the same values for dxw and
    dhu (LSTM, Elman), so only dXW is written and used for both.
    """
    dstate0 = "dS[0, b, j] + dY[t, b, j] + dH[b, j]"
    body = backward_body(
        G, S, K,
        saved=lambda k: f"Saved[{k}, t, b, j]",
        prev=lambda s: f"States[{s}, p, b, j]",
        dstate=lambda s: dstate0 if s == 0 else f"dS[{s}, b, j]",
        dxw=lambda g: f"dxw{g}[j]",
        dhu=lambda g: f"dhu{g}_" if same else f"dhu{g}[j]",
        dprev=lambda s: f"dS[{s}, b, j]",
        indent=20,
    )
    # Bias gradients: summed per row after the element loop, from the row just
    # written (hot in cache); inside the loop the G strided updates of one
    # array would stop LLVM from vectorising it.
    sums = ("                for k in range(GH):\n"
            "                    db_ih[k] += dXW[t, b, k]")
    if not same:
        sums += "\n                    db_hh[k] += dHU[t, b, k]"
    # One view per gate: a store to dXW[t, b, g*H + j] carries Numba's
    # negative-index select (g*H + j is not known to be >= 0), which LLVM
    # cannot analyse for overlap between the G stores; dxw_g[j] it can.
    views = "\n".join(
        f"                dxw{g} = dXW[t, b, {g} * H:{g + 1} * H]" for g in range(G)
    )
    if not same:
        views += "\n" + "\n".join(
            f"                dhu{g} = dHU[t, b, {g} * H:{g + 1} * H]" for g in range(G)
        )
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
def backward_loop(dY, dS, W_hh, States, Saved, lengths, reverse, dXW, dHU, dH, db_ih, db_hh,
                  b0, b1):
    T = dY.shape[0]
    H = dS.shape[2]
    GH = dXW.shape[2]
    for b in range(b0, b1):
        for j in range(H):
            dH[b, j] = 0
    for step in range(T):
        if reverse:
            t = step
            p = t + 1
        else:
            t = T - 1 - step
            p = t
        for b in range(b0, b1):
            if t < lengths[b]:
{views}
                for j in range(H):
{body}
{sums}
            else:
                for j in range(H):
                    dS[0, b, j] += dH[b, j]
                for k in range(GH):
                    dXW[t, b, k] = 0
                    dHU[t, b, k] = 0
        np.dot(dHU[t, b0:b1], W_hh, dH[b0:b1])
    for b in range(b0, b1):
        for j in range(H):
            dS[0, b, j] += dH[b, j]
'''


def same_input_and_recurrent_grads(cell) -> bool:
    """True when the cell's backward returns one expression for dxw and dhu.

    Read from the source (``return d, d, ...``): then the gradients of the input
    and recurrent pre-activations are equal by construction and the kernel
    stores them once.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cell.backward)))
    except (OSError, TypeError, SyntaxError):
        return False
    fdef = tree.body[0]
    returns = [n for n in ast.walk(fdef) if isinstance(n, ast.Return)]
    if len(returns) != 1 or not isinstance(returns[0].value, ast.Tuple):
        return False
    elts = returns[0].value.elts
    return len(elts) == 3 and ast.dump(elts[0]) == ast.dump(elts[1])


@dataclass(frozen=True)
class CpuKernels:
    """The compiled kernels of one cell in one precision."""

    forward_train: object
    forward_infer: object
    backward_loop: object
    same_grads: bool


_VECTORIZER_CHECKS = 1000
_vectorizer_configured = False


def _allow_alias_checks() -> None:
    """Let LLVM vectorise loops that touch many arrays.

    The pointwise loops read and write a dozen arrays that Numba cannot mark
    as non-aliasing, so LLVM guards the vector loop with runtime overlap
    checks; past its default budget (128) it keeps the loop scalar.  This
    raises the process-wide budget (an LLVM option; it only allows more
    checks, nothing changes for loops that vectorised already).  Together
    with ``error_model="numpy"`` (no ZeroDivisionError branch per division)
    the loops compile to AVX2/AVX-512 code; see ``dispatcher.inspect_asm()``.
    """
    global _vectorizer_configured
    if not _vectorizer_configured:
        import llvmlite.binding as llvm

        llvm.set_option("kernrnn", f"-vectorize-memory-check-threshold={_VECTORIZER_CHECKS}")
        _vectorizer_configured = True


@lru_cache(maxsize=None)
def get_kernels(cell, dtype) -> CpuKernels:
    """Build (or load from Numba's cache) the CPU kernels of ``cell``."""
    _allow_alias_checks()
    dtype = np.dtype(dtype)
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    same = same_input_and_recurrent_grads(cell)
    source = "import numba\nimport numpy as np\n" + "\n".join(
        [_forward_source(G, S, K, True), _forward_source(G, S, K, False),
         _backward_source(G, S, K, same)]
    )
    source = (f"# kernrnn CPU kernels: cell {cell.name!r}, {dtype}, "
              f"math {cell_fingerprint(cell)}\n" + source)
    namespace = {
        "cell_forward": compile_scalar(cell.forward, dtype),
        "cell_backward": compile_scalar(cell.backward, dtype),
    }
    module = load_module(source, f"cpu_{cell.name}_{dtype.name}", namespace)
    return CpuKernels(module.forward_train, module.forward_infer, module.backward_loop, same)


# -- thread ownership -----------------------------------------------------------

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
def _blas_single_thread():
    """Hold every BLAS to one thread (restored afterwards)."""
    libs = _blas_libs()
    before = [lib.num_threads for lib in libs]
    changed = [lib for lib, n in zip(libs, before, strict=True) if n != 1]
    for lib in changed:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before, strict=True):
            if n != 1:
                lib.set_num_threads(n)


def n_threads() -> int:
    """Threads the CPU kernels use: Numba's setting (``NUMBA_NUM_THREADS``,
    ``numba.set_num_threads``)."""
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


# Fewest batch rows per thread worth a chunk of their own; below it the time
# loop runs in the caller and BLAS keeps its threads for the per-step GEMM.
MIN_ROWS_PER_CHUNK = 1


def _n_chunks(batch: int) -> int:
    return max(1, min(batch // MIN_ROWS_PER_CHUNK, n_threads()))


def _run_chunks(kernel, args, batch: int, per_chunk=None) -> None:
    """``kernel(*args, *per_chunk[c], b0, b1)`` over batch chunks, one per thread.

    ``per_chunk`` (one tuple per chunk, e.g. a private bias-gradient row) keeps
    threads from writing to the same memory; None gives every chunk nothing.
    """
    nchunk = _n_chunks(batch)
    extra = per_chunk if per_chunk is not None else [()] * nchunk
    bounds = [(c * batch // nchunk, (c + 1) * batch // nchunk) for c in range(nchunk)]
    if nchunk == 1:
        kernel(*args, *extra[0], *bounds[0])
        return
    with _blas_single_thread():
        pool = _executor(nchunk - 1)
        futures = [pool.submit(kernel, *args, *extra[c], *bounds[c]) for c in range(1, nchunk)]
        try:
            kernel(*args, *extra[0], *bounds[0])
        finally:
            for f in futures:
                f.result()


# -- host side --------------------------------------------------------------------


@dataclass
class ForwardContext:
    """What backward needs from one forward call (one layer, one direction)."""

    cell: object
    x: np.ndarray
    W_ih: np.ndarray
    W_hh: np.ndarray
    States: np.ndarray
    Saved: np.ndarray
    lengths: np.ndarray
    reverse: bool
    device: str = "cpu"


def forward(cell, x, W_ih, W_hh, b_ih, b_hh, h0, lengths, reverse, training, y=None):
    """Run one layer in one direction; arguments are already validated.

    ``h0`` is ``[S, B, H]``, ``lengths`` int64 ``[B]``; ``y`` an optional
    ``[T, B, H]`` (possibly strided) view to write the output into.
    Returns ``(y, hn, ctx)``; ``ctx`` is None unless ``training``.
    """
    T, B, _ = x.shape
    H = W_hh.shape[1]
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    k = get_kernels(cell, x.dtype)
    XW = (x.reshape(T * B, x.shape[2]) @ W_ih.T).reshape(T, B, G * H)
    States = np.empty((S, T + 1, B, H), dtype=x.dtype)
    States[:, T if reverse else 0] = h0
    Saved = np.empty((K if training else 0, T, B, H), dtype=x.dtype)
    if y is None:
        y = np.empty((T, B, H), dtype=x.dtype)
    HU = np.empty((B, G * H), dtype=x.dtype)
    W_hhT = np.ascontiguousarray(W_hh.T)
    kernel = k.forward_train if training else k.forward_infer
    if T > 0:
        _run_chunks(kernel, (XW, b_ih, W_hhT, b_hh, States, Saved, y, lengths, reverse, HU), B)
    hn = States[:, 0 if reverse else T].copy()
    ctx = ForwardContext(cell, x, W_ih, W_hh, States, Saved, lengths, reverse) if training else None
    return y, hn, ctx


def backward(ctx: ForwardContext, dy, dhn):
    """BPTT for one forward call.  Returns ``(dx, dh0, grads)``.

    ``dy`` is ``[T, B, H]`` (may be a strided view), ``dhn`` ``[S, B, H]``.
    """
    x, W_hh = ctx.x, ctx.W_hh
    T, B, _ = x.shape
    H = W_hh.shape[1]
    GH = W_hh.shape[0]
    k = get_kernels(ctx.cell, x.dtype)
    dS = np.array(dhn, dtype=x.dtype, copy=True)
    dXW = np.empty((T, B, GH), dtype=x.dtype)
    dHU = dXW if k.same_grads else np.empty((T, B, GH), dtype=x.dtype)
    dH = np.empty((B, H), dtype=x.dtype)
    nchunk = _n_chunks(B)
    db_ih = np.zeros((nchunk, GH), dtype=x.dtype)
    db_hh = db_ih if k.same_grads else np.zeros((nchunk, GH), dtype=x.dtype)
    if T > 0:
        # one bias-gradient row per chunk: no two threads add to one row
        _run_chunks(k.backward_loop,
                    (dy, dS, W_hh, ctx.States, ctx.Saved, ctx.lengths, ctx.reverse, dXW, dHU, dH),
                    B, per_chunk=[(db_ih[c], db_hh[c]) for c in range(nchunk)])
    dx, dW_ih, dW_hh = input_and_weight_gradients(ctx, dXW, dHU)
    bias_ih = db_ih.sum(axis=0)
    grads = {
        "weight_ih": dW_ih,
        "weight_hh": dW_hh,
        "bias_ih": bias_ih,
        "bias_hh": bias_ih.copy() if k.same_grads else db_hh.sum(axis=0),
    }
    return dx, dS, grads
