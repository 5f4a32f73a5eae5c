"""GRU in the cuDNN/PyTorch convention (gate order r, z, n).

r = sigmoid(.), z = sigmoid(.), n = tanh(xw_n + r * hu_n) with the reset gate
applied after the recurrent matmul (hu_n includes b_hn), h' = (1-z)*n + z*h.
"""

import numpy as np

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    r = sigmoid(xw[0] + hu[0])
    z = sigmoid(xw[1] + hu[1])
    n = tanh(xw[2] + r * hu[2])
    h = (1 - z) * n + z * prev[0]
    return (h,), (r, z, n, hu[2])


def backward(saved, prev, dstate):
    r, z, n, hun = saved
    dh = dstate[0]
    dan = dh * (1 - z) * (1 - n * n)
    daz = dh * (prev[0] - n) * z * (1 - z)
    dar = dan * hun * r * (1 - r)
    return (dar, daz, dan), (dar, daz, dan * r), (dh * z,)


def reference(xw, hu, prev):
    r = 1.0 / (1.0 + np.exp(-(xw[0] + hu[0])))
    z = 1.0 / (1.0 + np.exp(-(xw[1] + hu[1])))
    n = np.tanh(xw[2] + r * hu[2])
    return ((1.0 - z) * n + z * prev[0],)


GRU = Cell(
    "gru", gates="rzn", forward=forward, backward=backward, reference=reference,
    description="gated recurrent unit, cuDNN convention (r, z, n)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(GRU)
