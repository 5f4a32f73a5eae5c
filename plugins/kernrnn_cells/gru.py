"""GRU in the cuDNN/PyTorch convention (gate order r, z, n).

r = sigmoid(.), z = sigmoid(.), n = tanh(xw_n + r * hu_n) with the reset gate
applied after the recurrent matmul (hu_n includes b_hn), h' = (1-z)*n + z*h.
"""

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    r = sigmoid(xw[0] + hu[0])
    z = sigmoid(xw[1] + hu[1])
    n = tanh(xw[2] + r * hu[2])
    return ((1 - z) * n + z * prev[0],)


GRU = Cell(
    "gru", gates="rzn", forward=forward,
    description="gated recurrent unit, cuDNN convention (r, z, n)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(GRU)
