"""kernrnn.numba_inline: the cheaper inlining gives the same PTX as numba-cuda's own.

CUDA kernels inline kernrnn's registered math functions; the module keeps their
canonical IR and copies it with one memo per inline.  These tests compile the
same kernels both ways and compare the PTX (Numba's mangled names aside), for
a kernel that inlines one function at several sites and after the kept IR has
already been inlined elsewhere, which is where a kept IR changed by an inline
would show.
"""

import re

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="the PTX comparison needs numba-cuda")

from cuda_test_cells import nvvm_missing_locally  # noqa: E402

from kernrnn import numba_inline  # noqa: E402
from kernrnn.backends import cuda as cb  # noqa: E402
from kernrnn.backends.codegen import math_namespace  # noqa: E402
from kernrnn.plugins import load_registry  # noqa: E402
from kernrnn.scalar import compile_scalar  # noqa: E402
from kernrnn.scalar_math import sigmoid, tanh  # noqa: E402

if cb.SIMULATOR:
    pytest.skip("compile_ptx needs the real CUDA target", allow_module_level=True)
pytestmark = [
    pytest.mark.skipif(nvvm_missing_locally(),
                       reason="NVVM not found: install numba-cuda[cu12] or [cu13]"),
    pytest.mark.skipif(not numba_inline.enabled(), reason="KERNRNN_FAST_INLINE=0: not hooked")]

REGISTRY = load_registry(autoload=False)


def _branchy(x):
    """Branches (blocks to copy) and nested helpers (nested inlines)."""
    y = tanh(x) if x > 0 else 2 * sigmoid(x) - 1
    return -y if y < -0.5 else y + 0.25 * x


def _ptx(kernel, sig) -> str:
    ptx, _ = cuda.compile_ptx(kernel, sig, cc=(9, 0))
    return re.sub(r"_ZN\S+", "SYM", ptx)  # mangled names hold Numba's unique ids


def _helper_kernel(f):
    def kernel(x, out):
        i = cuda.grid(1)
        if i < x.shape[0]:
            out[i] = f(x[i]) + f(out[i]) * f(x[i] + out[i])  # three sites

    return kernel


def _lstm_kernel(cell_forward):
    def kernel(x, out):
        i = cuda.grid(1)
        if i < x.shape[0]:
            v = x[i]
            r = cell_forward((v, v, v, v), (out[i], v, out[i], v), (v, out[i]))
            out[i] = r[0][0] + r[0][1]

    return kernel


def test_the_cuda_inliner_is_hooked():
    from numba.cuda.core import inline_closurecall as ic

    assert isinstance(ic.copy, numba_inline._InlinerCopy)
    assert getattr(ic.InlineWorker.run_untyped_passes, "__wrapped__", None) is not None


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_same_ptx_as_numba_cudas_inliner(dtype):
    f = compile_scalar(_branchy, dtype)
    sig = f"void({np.dtype(dtype).name}[::1], {np.dtype(dtype).name}[::1])"
    fast_first = _ptx(_helper_kernel(f), sig)
    fast_again = _ptx(_helper_kernel(f), sig)  # from the kept IR, inlined once already
    assert f.py_func in numba_inline._ir_cache  # the kept IR was used
    with numba_inline.numba_inliner():
        numbas = _ptx(_helper_kernel(f), sig)
    assert ".visible .entry" in numbas and ("fma.rn" in numbas or "mul" in numbas)
    assert fast_first == numbas
    assert fast_again == numbas


def test_a_cells_math_inlines_to_the_same_ptx():
    """The LSTM's float32 step: its sigmoid and tanh variants have many blocks each."""
    cell_forward = math_namespace(REGISTRY.get("lstm"), np.float32)["cell_forward"]
    sig = "void(float32[::1], float32[::1])"
    fast = [_ptx(_lstm_kernel(cell_forward), sig) for _ in range(2)]
    with numba_inline.numba_inliner():
        numbas = _ptx(_lstm_kernel(cell_forward), sig)
    assert fast == [numbas, numbas]


def test_a_users_own_inline_functions_keep_numba_cudas_inliner():
    """Only kernrnn's registered functions are kept and copied the cheaper way."""
    import numba

    @numba.njit(inline="always")
    def users(x):
        return x * 2 if x > 1 else x

    ptx = _ptx(_helper_kernel(users), "void(float64[::1], float64[::1])")
    assert ".visible .entry" in ptx
    assert users.py_func not in numba_inline._ir_cache
    assert users.py_func not in numba_inline._registered
    assert compile_scalar(_branchy, np.float64).py_func in numba_inline._registered
