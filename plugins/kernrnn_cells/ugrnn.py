"""UGRNN, the update-gate RNN (Collins et al. 2017, "Capacity and trainability in recurrent neural networks").

One gate interpolates between the previous state and a tanh candidate::

    c  = tanh(xw_c + hu_c)
    g  = sigmoid(xw_g + hu_g)
    h' = g * h + (1 - g) * c

A GRU without the reset gate, or an Elman RNN with a learnt leak per unit and
step.
"""

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    c = tanh(xw[0] + hu[0])
    g = sigmoid(xw[1] + hu[1])
    return (g * prev[0] + (1 - g) * c,)


UGRNN = Cell(
    "ugrnn", gates="cg", forward=forward,
    description="update-gate RNN, h = g h + (1-g) tanh(.) (Collins et al. 2017)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(UGRNN)
