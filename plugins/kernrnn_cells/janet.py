"""JANET (van der Westhuizen & Lasenby 2018, "The unreasonable effectiveness of the forget gate").

A forget-gate-only LSTM whose output is its cell state; the input is scaled by
a second, shifted view of the same gate::

    s  = xw_f + hu_f
    c~ = tanh(xw_c + hu_c)
    c' = sigmoid(s) * c + (1 - sigmoid(s - beta)) * c~
    h' = c'

So the state is just ``(h,)``.  ``beta`` is the paper's constant (beta = 1,
a hyper-parameter, not learnt): it lets a unit keep its memory (sigmoid(s)
near 1) while still taking in a little input.  Biases are chrono-initialised
as in the paper, b_f = log(U(1, T_max - 1)) (Tallec & Ollivier 2018) with
``T_MAX = 100``, the expected range of dependencies (replace ``init`` for
another one); b_c and the recurrent biases start at 0.
"""

import math

import numpy as np

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh

T_MAX = 100


def forward(xw, hu, prev):
    s = xw[0] + hu[0]
    cand = tanh(xw[1] + hu[1])
    # beta = 1, a literal: it takes the kernel's precision
    return (sigmoid(s) * prev[0] + (1 - sigmoid(s - 1.0)) * cand,)


def init(rng, name, shape, hidden_size):
    if name.startswith("bias"):
        b = np.zeros(shape)
        if name == "bias_ih":
            b[:hidden_size] = np.log(rng.uniform(1.0, T_MAX - 1.0, hidden_size))
        return b
    bound = 1.0 / math.sqrt(hidden_size)
    return rng.uniform(-bound, bound, shape)


JANET = Cell(
    "janet", gates="fc", forward=forward, init=init,
    description="JANET: forget gate only, h = c, beta = 1 (van der Westhuizen & Lasenby 2018)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(JANET)
