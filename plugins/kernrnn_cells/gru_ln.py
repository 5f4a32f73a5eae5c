"""Layer-normalised GRU, as haste's ``LayerNormGRU`` defines it (Ba et al. 2016).

Layer norm over the whole row of ``W x`` and of ``R h`` (all 3H values, gains
``norm_ih_weight`` / ``norm_hh_weight``), the layer's biases added after it;
then the GRU step with the reset gate after the recurrent product::

    a = LN(W x) * g_x + b_ih,   u = LN(R h) * g_h + b_hh
    r = sigmoid(a_r + u_r),  z = sigmoid(a_z + u_z)
    n = tanh(a_n + r * u_n)
    h' = (1 - z) * n + z * h

No norm on h itself (haste has none).  Gate order (r, z, n) as in PyTorch's
GRU (haste stores z, r, n).
"""

from kernrnn.cell import Cell, Norm, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    r = sigmoid(xw[0] + hu[0])
    z = sigmoid(xw[1] + hu[1])
    n = tanh(xw[2] + r * hu[2])
    return ((1 - z) * n + z * prev[0],)


GRU_LN = Cell(
    "gru_ln", gates="rzn", forward=forward,
    input_norm=Norm("layer", over="row"), recurrent_norm=Norm("layer", over="row"),
    description="LayerNorm GRU: LN on W x and R h (haste's LayerNormGRU)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(GRU_LN)
