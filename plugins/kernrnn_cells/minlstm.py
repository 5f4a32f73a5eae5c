"""minLSTM (Feng et al. 2024, "Were RNNs All We Needed?").

Forget and input gates from the input alone, normalised to sum to one, and a
candidate that is a plain projection of the input::

    f  = sigmoid(W_f x_t + b_f),  i = sigmoid(W_i x_t + b_i),  h~ = W_h x_t + b_h
    f' = f / (f + i),  i' = i / (f + i)
    h_t = f' * h_{t-1} + i' * h~

Linear in the state (``linear=True``), no recurrent matrix
(``recurrent="none"``).  This is the paper's sequential form; its log-space
parallel form additionally passes h~ through a positive g(.), which we leave out.
"""

from kernrnn.cell import Cell, hookimpl, sigmoid


def forward(xw, prev):
    f = sigmoid(xw[0])
    i = sigmoid(xw[1])
    return ((f * prev[0] + i * xw[2]) / (f + i),)


MINLSTM = Cell(
    "minlstm", gates="fih", forward=forward, recurrent="none", linear=True,
    description="minLSTM: normalised f, i from the input only (Feng et al. 2024)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(MINLSTM)
