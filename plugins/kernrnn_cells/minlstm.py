"""minLSTM (Feng et al. 2024, "Were RNNs All We Needed?").

Forget and input gates from the input alone, normalised to sum to one, and a
candidate that is a plain projection of the input::

    f  = sigmoid(W_f x_t + b_f),  i = sigmoid(W_i x_t + b_i),  h~ = W_h x_t + b_h
    f' = f / (f + i),  i' = i / (f + i)
    h_t = f' * h_{t-1} + i' * h~

Linear in the state (``linear=True``), no recurrent matrix
(``recurrent="none"``).  This is the paper's sequential form; its log-space
parallel form additionally passes h~ through a positive g(.), which we leave out.
"""

import numpy as np

from kernrnn.cell import Cell, hookimpl, sigmoid


def forward(xw, prev):
    f = sigmoid(xw[0])
    i = sigmoid(xw[1])
    s = f + i
    return ((f * prev[0] + i * xw[2]) / s,), (f, i, xw[2])


def backward(saved, prev, dstate):
    f, i, cand = saved
    dh = dstate[0]
    s = f + i
    q = dh * (prev[0] - cand) / (s * s)  # dh'/df = i (h - h~) / s^2, dh'/di = -f (h - h~) / s^2
    return (q * i * f * (1 - f), -q * f * i * (1 - i), dh * i / s), (dh * f / s,)


def reference(xw, prev):
    f = 1.0 / (1.0 + np.exp(-xw[0]))
    i = 1.0 / (1.0 + np.exp(-xw[1]))
    return ((f * prev[0] + i * xw[2]) / (f + i),)


MINLSTM = Cell(
    "minlstm", gates="fih", forward=forward, backward=backward, reference=reference,
    recurrent="none", linear=True,
    description="minLSTM: normalised f, i from the input only (Feng et al. 2024)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(MINLSTM)
