"""Cells contributed by a test plugin, used by the CUDA tests.

``test_mgu``: the minimal gated unit (Zhou et al. 2016) with the reset applied after the
recurrent matmul, as in the GRU: two gates, one state, a helper function with
its own literals (so retyping of helpers is exercised in the PTX check).
``test_linear``: a linear recurrence that saves nothing for backward (the
empty-saved-tuple corner of the generated kernels).

Registered through the public hook, exactly as a third-party plugin would.
"""

import functools
import os

import numpy as np

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def _blend(a, b, w):
    return (1.0 - w) * a + w * b


def forward(xw, hu, prev):
    f = sigmoid(xw[0] + hu[0])
    n = tanh(xw[1] + f * hu[1])
    return (_blend(prev[0], n, f),), (f, n, hu[1])


def backward(saved, prev, dstate):
    f, n, hun = saved
    dh = dstate[0]
    dan = dh * f * (1 - n * n)
    daf = (dh * (n - prev[0]) + dan * hun) * f * (1 - f)
    return (daf, dan), (daf, dan * f), (dh * (1 - f),)


def reference(xw, hu, prev):
    f = 1.0 / (1.0 + np.exp(-(xw[0] + hu[0])))
    n = np.tanh(xw[1] + f * hu[1])
    return ((1.0 - f) * prev[0] + f * n,)


MGU = Cell("test_mgu", gates="fn", forward=forward, backward=backward, reference=reference,
           description="minimal gated unit (test plugin)")


def linear_forward(xw, hu, prev):
    return (0.5 * (xw[0] + hu[0]),), ()


def linear_backward(saved, prev, dstate):
    d = 0.5 * dstate[0]
    return (d,), (d,), (0.0,)


def linear_reference(xw, hu, prev):
    return (0.5 * (xw[0] + hu[0]),)


LINEAR = Cell("test_linear", gates=1, forward=linear_forward, backward=linear_backward,
              reference=linear_reference, description="linear recurrence, nothing saved (test)")


class TestCellsPlugin:
    """The plugin object (pluggy accepts any object with hook implementations)."""

    __test__ = False  # not a pytest test class

    @hookimpl
    def kernrnn_register_cells(self, registry):
        registry.add(MGU)
        registry.add(LINEAR)


def registry_with_test_cells():
    """A fresh registry: the shipped cells plus this plugin's."""
    from kernrnn.plugins import load_registry

    return load_registry(autoload=False, plugins=[TestCellsPlugin()])


@functools.cache
def nvvm_available() -> bool:
    """Whether ``cuda.compile_ptx`` works here (NVVM from numba-cuda's cu12/cu13 wheels);
    asked once per process (each PTX test file asks at collection)."""
    from numba import cuda

    try:
        cuda.compile_ptx(lambda a: None, "void(float32[:])", cc=(9, 0))
    except Exception:
        return False
    return True


def nvvm_missing_locally() -> bool:
    """Skip condition for the PTX checks: NVVM missing, outside CI.

    CI installs the ``cudasim`` extra, so there a missing NVVM is a broken
    install: the PTX tests then run and fail instead of skipping silently.
    """
    return not os.environ.get("CI") and not nvvm_available()
