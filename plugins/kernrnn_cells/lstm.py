"""LSTM, PyTorch/cuDNN gate order (i, f, g, o).

i, f, o = sigmoid(.), g = tanh(.), c' = f*c + i*g, h' = o*tanh(c').
"""

import numpy as np

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    i = sigmoid(xw[0] + hu[0])
    f = sigmoid(xw[1] + hu[1])
    g = tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3])
    c = f * prev[1] + i * g
    tc = tanh(c)
    return (o * tc, c), (i, f, g, o, tc)


def backward(saved, prev, dstate):
    i, f, g, o, tc = saved
    dc = dstate[1] + dstate[0] * o * (1 - tc * tc)
    di = dc * g * i * (1 - i)
    df = dc * prev[1] * f * (1 - f)
    dg = dc * i * (1 - g * g)
    do = dstate[0] * tc * o * (1 - o)
    d = (di, df, dg, do)
    return d, d, (0, dc * f)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(xw, hu, prev):
    i = _sig(xw[0] + hu[0])
    f = _sig(xw[1] + hu[1])
    g = np.tanh(xw[2] + hu[2])
    o = _sig(xw[3] + hu[3])
    c = f * prev[1] + i * g
    return (o * np.tanh(c), c)


LSTM = Cell(
    "lstm", gates="ifgo", state=("h", "c"), forward=forward, backward=backward,
    reference=reference, description="long short-term memory (i, f, g, o)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(LSTM)
