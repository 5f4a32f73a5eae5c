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

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    f = sigmoid(xw[0] + hu[0])
    g = tanh(xw[1] + hu[1])
    o = sigmoid(xw[2] + hu[2])
    c = f * prev[1] + (1 - f) * g
    return (o * tanh(c), c)


CIFG = Cell(
    "cifg", gates="fgo", state=("h", "c"), forward=forward,
    description="LSTM with coupled input and forget gate, i = 1 - f",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(CIFG)
