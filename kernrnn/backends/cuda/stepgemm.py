"""The time loop's per-step GEMMs: cuBLAS called directly (:mod:`._cublas`), which
works while a stream captures a CUDA graph, with ``cupy.matmul`` as the fallback."""

from __future__ import annotations

import warnings

import numpy as np

from kernrnn.backends.cuda import _cublas
from kernrnn.backends.cuda.arrays import SIMULATOR, cupy, xp

__all__ = ["step_gemm", "raw_step_gemm", "batched_step_gemm", "raw_batched_step_gemm",
           "raw_gemm_ok"]

raw_gemm_ok: dict = {}  # dtype -> direct cuBLAS call checked against cupy.matmul


def step_gemm(A_stack, Bm, C, trans_b: bool, c_stack: bool = False):
    """``f(i)``: ``C = A_stack[i] @ (Bm.T if trans_b else Bm)`` for the time loop
    (``C[i] = ...`` with ``c_stack``, ``C`` then a stack like ``A_stack``).

    On a GPU this calls cuBLAS's ``sgemm``/``dgemm`` directly
    (:mod:`kernrnn.backends.cuda._cublas`: a handle bound to the current
    stream, pointers computed once), which also works while the stream is
    capturing a CUDA graph; ``cupy.matmul`` costs tens of microseconds of
    Python per call, more than a small step's GEMM itself, and cannot be
    captured.  The direct call is checked once per process and dtype against
    ``cupy.matmul`` and falls back to it on any mismatch or error.
    """
    def fallback(i):
        xp.matmul(A_stack[i], Bm.T if trans_b else Bm, out=C[i] if c_stack else C)

    if SIMULATOR or not (A_stack.flags.c_contiguous and Bm.flags.c_contiguous
                         and C.flags.c_contiguous):
        return fallback
    dtype = np.dtype(C.dtype)
    if dtype not in raw_gemm_ok:
        raw_gemm_ok[dtype] = _check_raw_gemm(dtype)
    blas = _current_blas() if raw_gemm_ok[dtype] else None
    if blas is None:
        return fallback
    return raw_step_gemm(blas, A_stack, Bm, C, trans_b, c_stack)


def _current_blas():
    return _cublas.for_stream(cupy.cuda.get_current_stream().ptr)


def raw_step_gemm(blas, A_stack, Bm, C, trans_b, c_stack=False):
    """Row-major ``C = A @ op(B)`` is column-major ``C^T = op(B)^T @ A^T``, hence the
    swapped operands; ``alpha``/``beta`` are host values (cuBLAS's default pointer
    mode), which a graph capture records by value."""
    dtype = np.dtype(C.dtype)
    gemm = blas.sgemm if dtype == np.float32 else blas.dgemm
    handle = blas.handle
    M, K = A_stack.shape[1], A_stack.shape[2]
    N = C.shape[-1]
    consts = np.array([1, 0], dtype=dtype)  # alpha, beta
    alpha, beta = consts.ctypes.data, consts.ctypes.data + dtype.itemsize
    base, step = A_stack.data.ptr, M * K * dtype.itemsize
    b_ptr, c_ptr = Bm.data.ptr, C.data.ptr
    c_step = M * N * dtype.itemsize if c_stack else 0
    op_n, op_t = 0, 1  # CUBLAS_OP_N, CUBLAS_OP_T
    op_b = op_t if trans_b else op_n
    ldb = Bm.shape[1]
    keep = (A_stack, Bm, C, consts, blas)  # the closure keeps buffers and workspace alive

    def f(i, _keep=keep):
        status = gemm(handle, op_b, op_n, N, M, K, alpha, b_ptr, ldb,
                      base + i * step, K, beta, c_ptr + i * c_step, N)
        if status:
            raise _cublas.CublasError(f"cublas{'S' if dtype == np.float32 else 'D'}gemm_v2 "
                                      f"failed with status {status} (C[{M}, {N}], K={K})")

    return f


def batched_step_gemm(A_stack, W3, C_stack, trans_b: bool):
    """``f(i, j)``: ``C_stack[j, h] = A_stack[i, h] @ (W3[h].T if trans_b else W3[h])`` for
    every head ``h`` in one call: the per-head products of ``heads`` cells (and of a
    dense cell whose product goes to a time slot of ``HU``).

    ``A_stack [I, NH, M, K]`` and ``C_stack [J, NH, M, N]`` may be strided views
    with contiguous rows (a head's slice of ``h``, a time slice of ``dHU``);
    ``W3 [NH, ., .]`` is C-contiguous.  On a GPU one
    ``cublas{S,D}gemmStridedBatched`` call per step, which a graph can capture
    (``cupy.matmul`` cannot); else, or where the strides do not fit, ``xp.matmul``.
    """
    op = W3.transpose(0, 2, 1) if trans_b else W3

    def fallback(i, j):
        xp.matmul(A_stack[i], op, out=C_stack[j])

    if SIMULATOR or _batch_strides(A_stack) is None or _batch_strides(C_stack) is None \
            or not W3.flags.c_contiguous:
        return fallback
    dtype = np.dtype(C_stack.dtype)
    if dtype not in raw_gemm_ok:
        raw_gemm_ok[dtype] = _check_raw_gemm(dtype)
    blas = _current_blas() if raw_gemm_ok[dtype] else None
    if blas is None:
        return fallback
    return raw_batched_step_gemm(blas, A_stack, W3, C_stack, trans_b)


def _batch_strides(a):
    """``(step, head stride, leading dimension)`` of a ``[., NH, rows, cols]`` view in
    elements, or None where its rows are not contiguous or a stride is not whole."""
    item = a.dtype.itemsize
    if a.ndim != 4 or (a.shape[3] > 1 and a.strides[3] != item) \
            or any(s % item or s < 0 for s in a.strides):
        return None
    return a.strides[0] // item, a.strides[1] // item, a.strides[2] // item


def raw_batched_step_gemm(blas, A_stack, W3, C_stack, trans_b):
    """:func:`batched_step_gemm` on cuBLAS: the column-major swap of
    :func:`raw_step_gemm`, one product per head, strides in elements."""
    dtype = np.dtype(C_stack.dtype)
    gemm = blas.sgemm_batched if dtype == np.float32 else blas.dgemm_batched
    handle = blas.handle
    NH, M, K = A_stack.shape[1], A_stack.shape[2], A_stack.shape[3]
    N = C_stack.shape[3]
    a_step, a_head, lda = _batch_strides(A_stack)
    c_step, c_head, ldc = _batch_strides(C_stack)
    consts = np.array([1, 0], dtype=dtype)  # alpha, beta
    alpha, beta = consts.ctypes.data, consts.ctypes.data + dtype.itemsize
    item = dtype.itemsize
    a_base, c_base, b_ptr = A_stack.data.ptr, C_stack.data.ptr, W3.data.ptr
    op_b = 1 if trans_b else 0  # CUBLAS_OP_T, CUBLAS_OP_N
    ldb, b_head = W3.shape[2], W3.shape[1] * W3.shape[2]
    keep = (A_stack, W3, C_stack, consts, blas)  # the closure keeps buffers and workspace alive

    def f(i, j, _keep=keep):
        status = gemm(handle, op_b, 0, N, M, K, alpha, b_ptr, ldb, b_head,
                      a_base + i * a_step * item, lda, a_head, beta,
                      c_base + j * c_step * item, ldc, c_head, NH)
        if status:
            raise _cublas.CublasError(
                f"cublas{'S' if dtype == np.float32 else 'D'}gemmStridedBatched failed with "
                f"status {status} ({NH} x C[{M}, {N}], K={K})")

    return f


def _check_raw_gemm(dtype) -> bool:
    """One small comparison of the direct cuBLAS call with cupy.matmul (synchronises once)."""
    try:
        blas = _current_blas()
        if blas is None:
            warnings.warn(f"kernrnn: direct cuBLAS calls unavailable "
                          f"({_cublas.unavailable_reason()}); using cupy.matmul per step (and "
                          f"no CUDA graphs)", RuntimeWarning, stacklevel=3)
            return False
        rs = cupy.random.RandomState(0)
        A = rs.uniform(-1, 1, (3, 5, 7)).astype(dtype)
        ok = True
        for trans_b, shape in ((True, (6, 7)), (False, (7, 6))):
            Bm = rs.uniform(-1, 1, shape).astype(dtype)
            C = cupy.empty((5, 6), dtype=dtype)
            raw_step_gemm(blas, A, Bm, C, trans_b)(2)
            want = A[2] @ (Bm.T if trans_b else Bm)
            ok = ok and bool(cupy.allclose(C, want, rtol=1e-4, atol=1e-5))
            # per head, from strided views, as the heads product runs
            W3 = rs.uniform(-1, 1, (2,) + shape).astype(dtype)
            A4 = rs.uniform(-1, 1, (3, 5, 2, 7)).astype(dtype).transpose(0, 2, 1, 3)
            C4 = cupy.zeros((2, 2, 5, 6), dtype=dtype)
            raw_batched_step_gemm(blas, A4, W3, C4, trans_b)(2, 1)
            want = cupy.matmul(A4[2], W3.transpose(0, 2, 1) if trans_b else W3)
            ok = ok and bool(cupy.allclose(C4[1], want, rtol=1e-4, atol=1e-5))
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"kernrnn: direct cuBLAS GEMM failed ({type(exc).__name__}: {exc}); "
                      f"using cupy.matmul per step", RuntimeWarning, stacklevel=3)
        return False
    if not ok:
        warnings.warn("kernrnn: direct cuBLAS GEMM disagreed with cupy.matmul; using cupy.matmul "
                      "per step", RuntimeWarning, stacklevel=3)
    return ok

