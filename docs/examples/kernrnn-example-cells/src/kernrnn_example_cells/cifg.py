"""LSTM with a coupled input and forget gate (CIFG).

The input gate is tied to the forget gate, ``i = 1 - f``: whatever the cell
forgets it replaces with new content.  Greff et al. (2017, "LSTM: A Search
Space Odyssey") found this variant about as good as the full LSTM with a
quarter fewer parameters.  Gate blocks, in the order of the weight rows::

    f = sigmoid(xw_f + hu_f)          forget gate (the input gate is 1 - f)
    g = tanh(xw_g + hu_g)             candidate
    o = sigmoid(xw_o + hu_o)          output gate
    c' = f * c + (1 - f) * g
    h' = o * tanh(c')

``xw`` holds ``W_ih x_t + b_ih`` and ``hu`` holds ``W_hh h_{t-1} + b_hh``,
split into the three gate blocks; kernrnn computes both with GEMMs.
"""

import numpy as np

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    """One (batch, unit) element: new state (h, c) and the values backward needs."""
    f = sigmoid(xw[0] + hu[0])
    g = tanh(xw[1] + hu[1])
    o = sigmoid(xw[2] + hu[2])
    c = f * prev[1] + (1 - f) * g
    tc = tanh(c)
    return (o * tc, c), (f, g, o, tc)


def backward(saved, prev, dstate):
    """Gradients of the gate pre-activations and the element-wise part of d(prev)."""
    f, g, o, tc = saved
    dh, dc_next = dstate
    dc = dc_next + dh * o * (1 - tc * tc)   # through h' = o * tanh(c')
    df = dc * (prev[1] - g) * f * (1 - f)   # dc'/df = c - g
    dg = dc * (1 - f) * (1 - g * g)
    do = dh * tc * o * (1 - o)
    d = (df, dg, do)
    # Input and recurrent pre-activations enter as a sum, so their gradients
    # are equal.  d(prev h) is all recurrent (kernrnn adds dhu @ W_hh itself);
    # d(prev c) flows through the forget gate.
    return d, d, (0, dc * f)


def reference(xw, hu, prev):
    """Float64 NumPy version of ``forward`` on whole [B, H] arrays (for the tests)."""
    f = 1 / (1 + np.exp(-(xw[0] + hu[0])))
    g = np.tanh(xw[1] + hu[1])
    o = 1 / (1 + np.exp(-(xw[2] + hu[2])))
    c = f * prev[1] + (1 - f) * g
    return (o * np.tanh(c), c)


CIFG = Cell(
    "example_cifg",
    gates="fgo",
    state=("h", "c"),
    forward=forward,
    backward=backward,
    reference=reference,
    description="LSTM with coupled input and forget gate (f, g, o)",
)


@hookimpl
def kernrnn_register_cells(registry):
    """Register the CIFG cell (called by kernrnn when it builds its registry)."""
    registry.add(CIFG)
