"""Test-only cells for contract features no zoo cell combines.

``test_heads_norm``: a GRU whose reset gate sees the input only
(``recurrent_gates="zn"``), with a block-diagonal recurrence of 2 heads, RMS
norm per gate block on ``W x`` and layer norm per gate block on ``R h``:

    r = sigmoid(xw_r),  z = sigmoid(xw_z + hu_z),  n = tanh(xw_n + r * hu_n)
    h' = (1 - z) n + z h

``test_lstm_rms``: the zoo's ``lstm_ln`` math with RMS norm everywhere (over
the row of ``W x``, per gate block of ``R h`` and, mid-step, of c) and 2 heads.
"""

import dataclasses

import numpy as np
from kernrnn_cells.lstm_ln import LSTM_LN

from kernrnn.cell import Cell, Norm, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    r = sigmoid(xw[0])
    z = sigmoid(xw[1] + hu[1])
    n = tanh(xw[2] + r * hu[2])
    return ((1 - z) * n + z * prev[0],), (r, z, n, hu[2])


def backward(saved, prev, dstate):
    r, z, n, hun = saved
    dh = dstate[0]
    dan = dh * (1 - z) * (1 - n * n)
    daz = dh * (prev[0] - n) * z * (1 - z)
    dar = dan * hun * r * (1 - r)
    return (dar, daz, dan), (0, daz, dan * r), (dh * z,)


def reference(xw, hu, prev):
    r = 1.0 / (1.0 + np.exp(-xw[0]))
    z = 1.0 / (1.0 + np.exp(-(xw[1] + hu[1])))
    n = np.tanh(xw[2] + r * hu[2])
    return ((1.0 - z) * n + z * prev[0],)


HEADS_NORM = Cell(
    "test_heads_norm", gates="rzn", forward=forward, backward=backward, reference=reference,
    recurrent="heads", heads=2, recurrent_gates="zn", input_norm="rms",
    recurrent_norm=Norm("layer", over="gate"),
    description="GRU, input-only reset gate, 2 heads, RMS/layer norm (test)",
)

LSTM_RMS = dataclasses.replace(
    LSTM_LN, name="test_lstm_rms", recurrent="heads", heads=2, normalize_kind="rms",
    input_norm=Norm("rms", over="row"), recurrent_norm=Norm("rms", over="gate"),
    description="lstm_ln with RMS norms and 2 heads (test)",
)

CELLS = (HEADS_NORM, LSTM_RMS)


@hookimpl
def kernrnn_register_cells(registry):
    for cell in CELLS:
        registry.add(cell)
