"""A cell plugin used by the tests: shipped as a test-only distribution.

Minimal gated unit in the cuDNN style: f = sigmoid(.), n = tanh(xw_n + f*hu_n),
h' = (1-f)*h + f*n.
"""

import numpy as np

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    f = sigmoid(xw[0] + hu[0])
    n = tanh(xw[1] + f * hu[1])
    return ((1 - f) * prev[0] + f * n,), (f, n, hu[1])


def backward(saved, prev, dstate):
    f, n, hun = saved
    dh = dstate[0]
    dan = dh * f * (1 - n * n)
    daf = (dh * (n - prev[0]) + dan * hun) * f * (1 - f)
    return (daf, dan), (daf, dan * f), (dh * (1 - f),)


def reference(xw, hu, prev):
    f = 1 / (1 + np.exp(-(xw[0] + hu[0])))
    n = np.tanh(xw[1] + f * hu[1])
    return ((1 - f) * prev[0] + f * n,)


MGU = Cell("test_mgu", gates="fn", forward=forward, backward=backward, reference=reference,
           description="minimal gated unit (test plugin)")


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(MGU)
