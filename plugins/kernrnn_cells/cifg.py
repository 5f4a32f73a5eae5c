"""CIFG: LSTM with a coupled input and forget gate (Greff et al. 2017, "LSTM: A Search Space Odyssey").

The input gate is tied to the forget gate, ``i = 1 - f``: what the cell forgets
it replaces with new content, with three gate blocks instead of four::

    f  = sigmoid(xw_f + hu_f)
    g  = tanh(xw_g + hu_g)
    o  = sigmoid(xw_o + hu_o)
    c' = f * c + (1 - f) * g
    h' = o * tanh(c')

No peepholes (as TensorFlow's ``CoupledInputForgetGateLSTMCell`` by default).
The tutorial's example package has the same math under the name
``example_cifg``.
"""

import numpy as np

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    f = sigmoid(xw[0] + hu[0])
    g = tanh(xw[1] + hu[1])
    o = sigmoid(xw[2] + hu[2])
    c = f * prev[1] + (1 - f) * g
    tc = tanh(c)
    return (o * tc, c), (f, g, o, tc)


def backward(saved, prev, dstate):
    f, g, o, tc = saved
    dc = dstate[1] + dstate[0] * o * (1 - tc * tc)
    d = (dc * (prev[1] - g) * f * (1 - f), dc * (1 - f) * (1 - g * g),
         dstate[0] * tc * o * (1 - o))
    return d, d, (0, dc * f)


def reference(xw, hu, prev):
    f = 1.0 / (1.0 + np.exp(-(xw[0] + hu[0])))
    o = 1.0 / (1.0 + np.exp(-(xw[2] + hu[2])))
    c = f * prev[1] + (1.0 - f) * np.tanh(xw[1] + hu[1])
    return (o * np.tanh(c), c)


CIFG = Cell(
    "cifg", gates="fgo", state=("h", "c"), forward=forward, backward=backward,
    reference=reference, description="LSTM with coupled input and forget gate, i = 1 - f",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(CIFG)
