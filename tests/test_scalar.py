"""The precision-preserving compilation of cell math."""

import functools
import math

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernrnn.scalar import ScalarCompileError, compile_scalar, python_scalar, retype_source
from kernrnn.scalar_math import sigmoid


def poly(x):
    return 1 - 0.5 * x + x ** 2 - 3 * math.tanh(x)


def uses_helper(a, b, c):
    return (poly(a[0]) + 2,), (b[0],)


@functools.cache
def _compiled(fn, dtype):
    """``fn`` compiled for ``dtype`` behind one driver: one compile per (function, dtype),
    not one per hypothesis example."""
    g = compile_scalar(fn, dtype)
    if fn.__code__.co_argcount == 1:
        return numba.njit(lambda u: g(u))
    return numba.njit(lambda u, v: g(u, v))


def test_literals_are_wrapped_but_indices_and_exponents_are_not():
    src = retype_source(uses_helper)
    assert "a[0]" in src and "b[0]" in src and "__kernrnn_cast(2.0)" in src
    src = retype_source(poly)
    assert "x ** 2" in src and "__kernrnn_cast(0.5)" in src


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_result_keeps_precision(dtype):
    f = compile_scalar(uses_helper, dtype)

    @numba.njit
    def drive(v):
        return f((v,), (v,), (v,))

    drive(dtype(0.5))
    rtype = drive.nopython_signatures[0].return_type
    name = np.dtype(dtype).name
    assert str(rtype) == f"UniTuple(UniTuple({name} x 1) x 2)"


@given(st.floats(-5, 5))
def test_float64_result_equals_python(x):
    assert _compiled(poly, np.float64)(x) == pytest.approx(poly(x), rel=1e-14, abs=1e-14)


def gated(a, b):
    return sigmoid(a) * poly(b) + 0.25


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(a=st.floats(-8, 8), b=st.floats(-3, 3))
def test_python_variant_is_the_same_math_left_uncompiled(dtype, a, b):
    """What the CUDA simulator runs: the retyped math and its helpers (the float32 variant of
    ``sigmoid`` included), none of them a Numba dispatcher, equal to the compiled math."""
    f = python_scalar(gated, dtype)
    assert not hasattr(f, "py_func") and not hasattr(f.__globals__["poly"], "py_func")
    assert f.__globals__["sigmoid"].__name__ == ("_sigmoid_float32" if dtype is np.float32
                                                 else "sigmoid")
    x, y = dtype(a), dtype(b)
    # float32: the Python form rounds each math.* result once where the compiled one rounds
    # every operation, so they differ by a few float32 ulps of values up to about 15
    tol = 1e-5 if dtype is np.float32 else 1e-14
    assert f(x, y) == pytest.approx(_compiled(gated, dtype)(x, y), rel=tol, abs=tol)



def test_lambda_is_rejected_with_reason():
    with pytest.raises(ScalarCompileError, match="defined with 'def'.*not a lambda"):
        compile_scalar(lambda x: x + 1, np.float32)


def test_decorated_function_is_rejected():
    with pytest.raises(ScalarCompileError, match="expected a plain Python function"):
        compile_scalar(numba.njit(poly), np.float32)
