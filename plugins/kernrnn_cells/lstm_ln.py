"""Layer-normalised LSTM, as haste's ``LayerNormLSTM`` defines it (Ba et al. 2016).

Layer norm over the whole row of ``W x`` and of ``R h`` (all 4H values, gain
``norm_ih_weight`` / ``norm_hh_weight``, the layer's biases after them), and
over the cell state before the output tanh (gain and bias ``norm_c_*``)::

    v  = LN(W x) * g_x + b_ih + LN(R h) * g_h + b_hh
    i, f, o = sigmoid(v_i), sigmoid(v_f), sigmoid(v_o);  g = tanh(v_g)
    c' = f * c + i * g
    h' = o * tanh(LN(c') * g_c + b_c)

The forward calls ``norm("c", c)`` (``normalize=("c",)``); kernrnn splits the step
there into two stages around the normalisation of c' over the hidden units.
Gate order (i, f, g, o) as in PyTorch's LSTM (haste stores i, g, f, o).
"""

from kernrnn.cell import Cell, Norm, hookimpl, sigmoid, tanh


def forward(xw, hu, prev, norm):
    i = sigmoid(xw[0] + hu[0])
    f = sigmoid(xw[1] + hu[1])
    g = tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3])
    c = f * prev[1] + i * g
    return (o * tanh(norm("c", c)), c)


LSTM_LN = Cell(
    "lstm_ln", gates="ifgo", state=("h", "c"), forward=forward, normalize=("c",),
    input_norm=Norm("layer", over="row"), recurrent_norm=Norm("layer", over="row"),
    description="LayerNorm LSTM: LN on W x, R h and c (haste's LayerNormLSTM)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(LSTM_LN)
