"""kernrnn.numba_inline: the cheaper inlining compiles the same machine code as Numba's own.

The kernels inline kernrnn's registered math functions; the module keeps their
canonical IR and copies it with one memo per inline.  These tests compile the
same kernels both ways and compare the assembly (symbol names and Numba's
unique ids aside), for a kernel that inlines one function at several sites and
after the kept IR has already been inlined elsewhere, which is where a kept IR
changed by an inline would show.
"""

import re

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernrnn import numba_inline
from kernrnn.backends.codegen import math_namespace
from kernrnn.plugins import load_registry
from kernrnn.scalar import compile_scalar
from kernrnn.scalar_math import sigmoid, tanh

REGISTRY = load_registry(autoload=False)


def _branchy(x):
    """Branches (blocks to copy) and nested helpers (nested inlines)."""
    y = tanh(x) if x > 0 else 2 * sigmoid(x) - 1
    return -y if y < -0.5 else y + 0.25 * x


def _asm(dispatcher, sig) -> str:
    dispatcher.compile(sig)
    text = dispatcher.inspect_asm(sig)
    text = re.sub(r"_ZN\S+", "SYM", text)  # mangled names hold Numba's unique ids
    return re.sub(r"\.size\s+\"\.const\.missing Environment[^\n]*", "", text)


def _helper_kernel(f):
    def kernel(x, out):
        for i in range(x.shape[0]):
            out[i] = f(x[i]) + f(out[i]) * f(x[i] + out[i])  # three sites

    return numba.njit(kernel)


def _lstm_kernel(cell_forward):
    def kernel(x, out):
        for i in range(x.shape[0]):
            v = x[i]
            r = cell_forward((v, v, v, v), (out[i], v, out[i], v), (v, out[i]))
            out[i] = r[0][0] + r[0][1]

    return numba.njit(kernel)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_same_machine_code_as_numbas_inliner(dtype):
    f = compile_scalar(_branchy, dtype)
    sig = (numba.from_dtype(dtype)[::1], numba.from_dtype(dtype)[::1])
    fast_first = _asm(_helper_kernel(f), sig)
    fast_again = _asm(_helper_kernel(f), sig)  # from the kept IR, inlined once already
    with numba_inline.numba_inliner():
        numbas = _asm(_helper_kernel(f), sig)
    assert "vfmadd" in numbas or "mul" in numbas  # real code, not an empty function
    assert fast_first == numbas
    assert fast_again == numbas


def test_a_cells_math_inlines_to_the_same_machine_code():
    """The LSTM's float32 step: its sigmoid and tanh variants have many blocks each."""
    cell_forward = math_namespace(REGISTRY.get("lstm"), np.float32)["cell_forward"]
    sig = (numba.float32[::1], numba.float32[::1])
    fast = [_asm(_lstm_kernel(cell_forward), sig) for _ in range(2)]
    with numba_inline.numba_inliner():
        numbas = _asm(_lstm_kernel(cell_forward), sig)
    assert fast == [numbas, numbas]


def test_a_users_own_inline_functions_keep_numbas_inliner():
    """Only kernrnn's registered functions are kept and copied the cheaper way."""

    @numba.njit(inline="always")
    def users(x):
        return x * 2 if x > 1 else x

    @numba.njit
    def caller(x):
        return users(x) + users(x + 1)

    assert caller(3.0) == 14.0
    assert users.py_func not in numba_inline._ir_cache
    assert users.py_func not in numba_inline._registered
    assert compile_scalar(_branchy, np.float64).py_func in numba_inline._registered


@given(st.lists(st.tuples(st.floats(-6, 6), st.floats(-6, 6)), min_size=1, max_size=20))
def test_inlined_results_equal_the_python_function(pairs):
    """What the kernel computes through the inlined helper, against plain Python."""
    kernel = _KERNEL64
    x = np.array([a for a, _ in pairs])
    out = np.array([b for _, b in pairs])
    want = np.array([_branchy(a) + _branchy(b) * _branchy(a + b) for a, b in zip(x, out)])
    kernel(x, out)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


_KERNEL64 = _helper_kernel(compile_scalar(_branchy, np.float64))
