"""IndRNN (Li et al. 2018, "Independently Recurrent Neural Network").

Each unit sees only its own past, through a learnable per-unit weight u::

    h_t = relu(W x_t + b + u * h_{t-1})

So there is no recurrent matrix (``recurrent="none"``): the diagonal
recurrence is the per-unit parameter ``u`` (``u_l{k}`` in the state dict),
initialised uniform in [0, 1] as in the paper.
"""

from kernrnn.cell import Cell, Param, hookimpl, relu


def forward(xw, prev, u):
    return (relu(xw[0] + u[0] * prev[0]),)


def _init_u(rng, shape, hidden_size):
    return rng.uniform(0.0, 1.0, shape)


INDRNN = Cell(
    "indrnn", gates="a", forward=forward, recurrent="none",
    params=(Param("u", init=_init_u, description="recurrent weight per unit"),),
    description="IndRNN, relu, learnable diagonal recurrence u (Li et al. 2018)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(INDRNN)
