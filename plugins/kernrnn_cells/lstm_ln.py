"""Layer-normalised LSTM, as haste's ``LayerNormLSTM`` defines it (Ba et al. 2016).

Layer norm over the whole row of ``W x`` and of ``R h`` (all 4H values, gain
``norm_ih_weight`` / ``norm_hh_weight``, the layer's biases after them), and
over the cell state before the output tanh (gain and bias ``norm_c_*``)::

    v  = LN(W x) * g_x + b_ih + LN(R h) * g_h + b_hh
    i, f, o = sigmoid(v_i), sigmoid(v_f), sigmoid(v_o);  g = tanh(v_g)
    c' = f * c + i * g
    h' = o * tanh(LN(c') * g_c + b_c)

The step has two stages around the normalisation of c' (``normalize=("c",)``).
Gate order (i, f, g, o) as in PyTorch's LSTM (haste stores i, g, f, o).
"""

import numpy as np

from kernrnn.cell import Cell, Norm, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    i = sigmoid(xw[0] + hu[0])
    f = sigmoid(xw[1] + hu[1])
    g = tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3])
    c = f * prev[1] + i * g
    return (c,), (i, f, g, o, c)


def forward2(zn, mid, prev):
    t = tanh(zn[0])
    return (mid[3] * t, mid[4]), (t,)


def backward2(saved, zn, mid, prev, dstate):
    t = saved[0]
    o = mid[3]
    return (dstate[0] * o * (1 - t * t),), (0, 0, 0, dstate[0] * t, dstate[1]), (0, 0)


def backward(mid, prev, dz, dmid):
    i, f, g, o, c = mid
    dc = dmid[4] + dz[0]
    d = (dc * g * i * (1 - i), dc * prev[1] * f * (1 - f), dc * i * (1 - g * g),
         dmid[3] * o * (1 - o))
    return d, d, (0, dc * f)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(xw, hu, prev, norm):
    i, f, o = _sig(xw[0] + hu[0]), _sig(xw[1] + hu[1]), _sig(xw[3] + hu[3])
    c = f * prev[1] + i * np.tanh(xw[2] + hu[2])
    return (o * np.tanh(norm("c", c)), c)


LSTM_LN = Cell(
    "lstm_ln", gates="ifgo", state=("h", "c"), forward=forward, backward=backward,
    forward2=forward2, backward2=backward2, reference=reference,
    input_norm=Norm("layer", over="row"), recurrent_norm=Norm("layer", over="row"),
    normalize=("c",),
    description="LayerNorm LSTM: LN on W x, R h and c (haste's LayerNormLSTM)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(LSTM_LN)
