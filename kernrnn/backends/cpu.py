"""CPU backend: Numba kernels for one layer and one direction.

Per layer and direction:

* forward: ``XW = x @ W_ih.T + b_ih`` for all steps in one BLAS GEMM (NumPy),
  then one compiled call runs the whole time loop.  Each step splits the batch
  into one chunk per thread; a thread computes its rows of the recurrent GEMM
  ``h_{t-1} @ W_hh.T`` (BLAS from inside Numba) and the cell's fused
  pointwise step for those rows.  BLAS is held to one thread meanwhile, so
  Numba's threads own the cores (no oversubscription).
* backward: one compiled call runs BPTT over the time loop (pointwise backward
  then ``dh_{t-1} += dHU_t @ W_hh`` per chunk); the weight gradients are
  large GEMMs over all T*B rows afterwards (multi-threaded BLAS again).

Array layouts (time-major): ``States[s, t', b, j]`` holds the state at time
boundary t' (``States[:, 0]`` is h0 for the forward direction,
``States[:, T]`` for the reverse one); ``Saved[k, t, b, j]`` the values the
cell saved for backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np

from kernrnn.backends.codegen import backward_body, cell_fingerprint, forward_body, load_module
from kernrnn.scalar import compile_scalar

__all__ = ["CpuKernels", "get_kernels", "ForwardContext", "forward", "backward", "xp"]

xp = np  # the array module of this backend


def asarray(a) -> np.ndarray:
    """A C-contiguous NumPy array (no dtype change: callers checked it)."""
    return np.ascontiguousarray(a)


def lengths(lens: np.ndarray) -> np.ndarray:
    return lens


def _forward_source(G: int, S: int, K: int, train: bool) -> str:
    body = forward_body(
        G, S, K,
        xw=lambda g: f"XW[t, b, {g} * H + j]",
        hu=lambda g: f"HU[b, {g} * H + j] + b_hh[{g} * H + j]",
        prev=lambda s: f"States[{s}, p, b, j]",
        new=lambda s: f"States[{s}, n, b, j]",
        saved=(lambda k: f"Saved[{k}, t, b, j]") if train else None,
        y="Y[t, b, j]",
        indent=16,
    )
    carry = "\n".join(
        f"                States[{s}, n, b, j] = States[{s}, p, b, j]" for s in range(S)
    )
    name = "forward_train" if train else "forward_infer"
    # The chunk body lives in its own function: Numba's parfor analysis then
    # sees one call per chunk instead of the cell's inlined math.
    return f'''
@numba.njit(cache=True, nogil=True)
def {name}_chunk(XW, W_hhT, b_hh, States, Saved, Y, lengths, HU, t, p, n, b0, b1):
    H = States.shape[3]
    np.dot(States[0, p, b0:b1], W_hhT, HU[b0:b1])
    for b in range(b0, b1):
        if t < lengths[b]:
            for j in range(H):
{body}
        else:
            for j in range(H):
{carry}
                Y[t, b, j] = 0


@numba.njit(parallel=True, cache=True, nogil=True)
def {name}(XW, W_hhT, b_hh, States, Saved, Y, lengths, reverse, HU, nchunk):
    T = XW.shape[0]
    B = XW.shape[1]
    for step in range(T):
        if reverse:
            t = T - 1 - step
            p = t + 1
            n = t
        else:
            t = step
            p = t
            n = t + 1
        for c in numba.prange(nchunk):
            {name}_chunk(XW, W_hhT, b_hh, States, Saved, Y, lengths, HU, t, p, n,
                         c * B // nchunk, (c + 1) * B // nchunk)
'''


def _backward_source(G: int, S: int, K: int) -> str:
    body = backward_body(
        G, S, K,
        saved=lambda k: f"Saved[{k}, t, b, j]",
        prev=lambda s: f"States[{s}, p, b, j]",
        dstate=lambda s: f"dS[0, b, j] + dY[t, b, j]" if s == 0 else f"dS[{s}, b, j]",
        dxw=lambda g: f"dXW[t, b, {g} * H + j]",
        dhu=lambda g: f"dHU[t, b, {g} * H + j]",
        dprev=lambda s: f"dS[{s}, b, j]",
        indent=16,
    )
    return f'''
@numba.njit(cache=True, nogil=True)
def backward_chunk(dY, dS, W_hh, States, Saved, lengths, dXW, dHU, dHtmp, t, p, b0, b1):
    H = dS.shape[2]
    for b in range(b0, b1):
        if t < lengths[b]:
            for j in range(H):
{body}
        else:
            dXW[t, b, :] = 0
            dHU[t, b, :] = 0
    np.dot(dHU[t, b0:b1], W_hh, dHtmp[b0:b1])
    for b in range(b0, b1):
        for j in range(H):
            dS[0, b, j] += dHtmp[b, j]


@numba.njit(parallel=True, cache=True, nogil=True)
def backward_loop(dY, dS, W_hh, States, Saved, lengths, reverse, dXW, dHU, dHtmp, nchunk):
    T = dY.shape[0]
    B = dY.shape[1]
    for step in range(T):
        if reverse:
            t = step
            p = t + 1
        else:
            t = T - 1 - step
            p = t
        for c in numba.prange(nchunk):
            backward_chunk(dY, dS, W_hh, States, Saved, lengths, dXW, dHU, dHtmp, t, p,
                           c * B // nchunk, (c + 1) * B // nchunk)
'''


@dataclass(frozen=True)
class CpuKernels:
    """The compiled kernels of one cell in one precision."""

    forward_train: object
    forward_infer: object
    backward_loop: object


@lru_cache(maxsize=None)
def get_kernels(cell, dtype) -> CpuKernels:
    """Build (or load from Numba's cache) the CPU kernels of ``cell``."""
    dtype = np.dtype(dtype)
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    source = "import numba\nimport numpy as np\n" + "\n".join(
        [_forward_source(G, S, K, True), _forward_source(G, S, K, False),
         _backward_source(G, S, K)]
    )
    source = f"# kernrnn CPU kernels: cell {cell.name!r}, {dtype}, math {cell_fingerprint(cell)}\n" + source
    namespace = {
        "cell_forward": compile_scalar(cell.forward, dtype),
        "cell_backward": compile_scalar(cell.backward, dtype),
    }
    module = load_module(source, f"cpu_{cell.name}_{dtype.name}", namespace)
    return CpuKernels(module.forward_train, module.forward_infer, module.backward_loop)


# -- thread ownership ---------------------------------------------------------

_controller = None


def _blas_controller():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def _numba_owns_cores(nchunk: int):
    """Hold BLAS to one thread while Numba's threads run the time loop."""
    if nchunk <= 1:
        yield
        return
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


def _n_chunks(batch: int) -> int:
    return max(1, min(batch, numba.get_num_threads()))


# -- host side ----------------------------------------------------------------


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
    XW += b_ih
    States = np.empty((S, T + 1, B, H), dtype=x.dtype)
    States[:, T if reverse else 0] = h0
    Saved = np.empty((K if training else 0, T, B, H), dtype=x.dtype)
    if y is None:
        y = np.empty((T, B, H), dtype=x.dtype)
    HU = np.empty((B, G * H), dtype=x.dtype)
    W_hhT = np.ascontiguousarray(W_hh.T)
    nchunk = _n_chunks(B)
    kernel = k.forward_train if training else k.forward_infer
    if T > 0:
        with _numba_owns_cores(nchunk):
            kernel(XW, W_hhT, b_hh, States, Saved, y, lengths, reverse, HU, nchunk)
    hn = States[:, 0 if reverse else T].copy()
    ctx = ForwardContext(cell, x, W_ih, W_hh, States, Saved, lengths, reverse) if training else None
    return y, hn, ctx


def backward(ctx: ForwardContext, dy, dhn):
    """BPTT for one forward call.  Returns ``(dx, dh0, grads)``.

    ``dy`` is ``[T, B, H]`` (may be a strided view), ``dhn`` ``[S, B, H]``.
    """
    x, W_ih, W_hh = ctx.x, ctx.W_ih, ctx.W_hh
    T, B, I = x.shape
    H = W_hh.shape[1]
    GH = W_hh.shape[0]
    k = get_kernels(ctx.cell, x.dtype)
    dS = np.array(dhn, dtype=x.dtype, copy=True)
    dXW = np.empty((T, B, GH), dtype=x.dtype)
    dHU = np.empty((T, B, GH), dtype=x.dtype)
    dHtmp = np.empty((B, H), dtype=x.dtype)
    nchunk = _n_chunks(B)
    if T > 0:
        with _numba_owns_cores(nchunk):
            k.backward_loop(dy, dS, W_hh, ctx.States, ctx.Saved, ctx.lengths, ctx.reverse,
                            dXW, dHU, dHtmp, nchunk)
    Hprev = ctx.States[0, 1:] if ctx.reverse else ctx.States[0, :T]
    dXW2 = dXW.reshape(T * B, GH)
    dHU2 = dHU.reshape(T * B, GH)
    grads = {
        "weight_ih": dXW2.T @ x.reshape(T * B, I),
        "weight_hh": dHU2.T @ Hprev.reshape(T * B, H),
        "bias_ih": dXW2.sum(axis=0),
        "bias_hh": dHU2.sum(axis=0),
    }
    dx = (dXW2 @ W_ih).reshape(T, B, I)
    return dx, dS, grads
