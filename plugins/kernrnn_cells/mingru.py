"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?").

The gates see only the input, so the step is linear in the state and time can
run as a parallel scan (``linear=True``)::

    z_t  = sigmoid(W_z x_t + b_z)
    h~_t = W_h x_t + b_h
    h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t

No recurrent matrix (``recurrent="none"``): the layer has ``weight_ih`` and
``bias_ih`` only.
"""

from kernrnn.cell import Cell, hookimpl, sigmoid


def forward(xw, prev):
    z = sigmoid(xw[0])
    return ((1 - z) * prev[0] + z * xw[1],)


MINGRU = Cell(
    "mingru", gates="zh", forward=forward, recurrent="none", linear=True,
    description="minGRU: gates from the input only, h = (1-z) h + z h~ (Feng et al. 2024)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(MINGRU)
