"""LSTM, PyTorch/cuDNN gate order (i, f, g, o).

i, f, o = sigmoid(.), g = tanh(.), c' = f*c + i*g, h' = o*tanh(c').
"""

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    i = sigmoid(xw[0] + hu[0])
    f = sigmoid(xw[1] + hu[1])
    g = tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3])
    c = f * prev[1] + i * g
    return (o * tanh(c), c)


LSTM = Cell(
    "lstm", gates="ifgo", state=("h", "c"), forward=forward,
    description="long short-term memory (i, f, g, o)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(LSTM)
