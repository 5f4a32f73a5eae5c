"""The time loop's per-step GEMMs: cuBLAS called directly (:mod:`._cublas`), which
works while a stream captures a CUDA graph, with ``cupy.matmul`` as the fallback."""

from __future__ import annotations

import warnings

import numpy as np

from kernrnn.backends.cuda import _cublas
from kernrnn.backends.cuda.arrays import SIMULATOR, cupy, xp

__all__ = ["step_gemm", "raw_step_gemm", "raw_gemm_ok"]

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
            raise _cublas.CublasError(f"cublas{'S' if dtype == np.float32 else 'D'}gemm_v2 failed "
                              f"with status {status} (C[{M}, {N}], K={K})")

    return f


def _check_raw_gemm(dtype) -> bool:
    """One small comparison of the direct cuBLAS call with cupy.matmul (synchronises once)."""
    try:
        blas = _current_blas()
        if blas is None:
            warnings.warn(f"kernrnn: direct cuBLAS calls unavailable "
                          f"({_cublas.unavailable_reason()}); using cupy.matmul per step (and no CUDA graphs)", RuntimeWarning,
                          stacklevel=3)
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
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"kernrnn: direct cuBLAS GEMM failed ({type(exc).__name__}: {exc}); "
                      f"using cupy.matmul per step", RuntimeWarning, stacklevel=3)
        return False
    if not ok:
        warnings.warn("kernrnn: direct cuBLAS GEMM disagreed with cupy.matmul; using cupy.matmul "
                      "per step", RuntimeWarning, stacklevel=3)
    return ok

