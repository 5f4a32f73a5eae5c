"""LSTM with peephole connections (Gers & Schmidhuber 2000).

The gates also look at the cell state, through learnable per-unit weights
(``peephole_l{k}``: three blocks of H, for i, f and o)::

    i  = sigmoid(xw_i + hu_i + p_i * c_{t-1})
    f  = sigmoid(xw_f + hu_f + p_f * c_{t-1})
    g  = tanh(xw_g + hu_g)
    c' = f * c_{t-1} + i * g
    o  = sigmoid(xw_o + hu_o + p_o * c')
    h' = o * tanh(c')

Gate order (i, f, g, o) as in PyTorch's LSTM; peepholes start at zero, so an
untrained peephole LSTM is a plain LSTM.
"""

from kernrnn.cell import Cell, Param, hookimpl, sigmoid, tanh


def forward(xw, hu, prev, peep):
    c0 = prev[1]
    i = sigmoid(xw[0] + hu[0] + peep[0] * c0)
    f = sigmoid(xw[1] + hu[1] + peep[1] * c0)
    c = f * c0 + i * tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3] + peep[2] * c)
    return (o * tanh(c), c)


LSTM_PEEPHOLE = Cell(
    "lstm_peephole", gates="ifgo", state=("h", "c"), forward=forward,
    params=(Param("peephole", init=0.0, blocks=3, description="p_i, p_f, p_o"),),
    description="LSTM with learnable peephole connections (Gers & Schmidhuber 2000)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(LSTM_PEEPHOLE)
