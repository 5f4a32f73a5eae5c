"""IndRNN (Li et al. 2018, "Independently Recurrent Neural Network").

Each unit sees only its own past, through a learnable per-unit weight u::

    h_t = relu(W x_t + b + u * h_{t-1})

So there is no recurrent matrix (``recurrent="none"``): the diagonal
recurrence is the per-unit parameter ``u`` (``u_l{k}`` in the state dict),
initialised uniform in [0, 1] as in the paper.
"""

import numpy as np

from kernrnn.cell import Cell, Param, hookimpl, relu


def forward(xw, prev, u):
    a = xw[0] + u[0] * prev[0]
    return (relu(a),), (a,)


def backward(saved, prev, dstate, u):
    da = dstate[0] if saved[0] > 0 else 0 * dstate[0]
    return (da,), (da * u[0],), (da * prev[0],)


def reference(xw, prev, u):
    return (np.maximum(xw[0] + u[0] * prev[0], 0.0),)


def _init_u(rng, shape, hidden_size):
    return rng.uniform(0.0, 1.0, shape)


INDRNN = Cell(
    "indrnn", gates="a", forward=forward, backward=backward, reference=reference,
    recurrent="none", params=(Param("u", init=_init_u, description="recurrent weight per unit"),),
    description="IndRNN, relu, learnable diagonal recurrence u (Li et al. 2018)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(INDRNN)
