"""SRU (Lei et al. 2018, "Simple Recurrent Units for Highly Parallelizable Recurrence").

Every matrix product reads the input only; the recurrence is element-wise
(per-unit vectors v_f, v_r on c_{t-1}) and the output is a highway onto the
raw input x_t itself::

    f_t = sigmoid(W_f x_t + v_f * c_{t-1} + b_f)
    r_t = sigmoid(W_r x_t + v_r * c_{t-1} + b_r)
    c_t = f_t * c_{t-1} + (1 - f_t) * (W x_t)
    h_t = r_t * c_t + (1 - r_t) * x_t

So there is no recurrent matrix (``recurrent="none"``), the step reads x_t
element-wise (``raw_input=True``: ``input_size == hidden_size``) and the state
is (h, c) (h_{t-1} is not read).  ``weight_ih`` stacks W, W_f, W_r (gates
``w``, ``f``, ``r``); ``v_l{k}`` holds v_f, v_r.  ``bias_ih``'s first block is a
bias on W x_t the paper does not have: it starts at zero.
"""

import math

from kernrnn.cell import Cell, Param, hookimpl, sigmoid


def forward(xw, prev, v, x):
    c_prev = prev[1]
    f = sigmoid(xw[1] + v[0] * c_prev)
    r = sigmoid(xw[2] + v[1] * c_prev)
    c = f * c_prev + (1 - f) * xw[0]
    return (r * c + (1 - r) * x, c)


def _uniform(rng, shape, hidden_size):
    bound = 1.0 / math.sqrt(hidden_size)
    return rng.uniform(-bound, bound, shape)


def _init(rng, name, shape, hidden_size):
    """PyTorch's default, except the bias of W x_t, zero (the paper's step has none)."""
    out = _uniform(rng, shape, hidden_size)
    if name == "bias_ih":
        out[:hidden_size] = 0.0
    return out


SRU = Cell(
    "sru", gates="wfr", forward=forward, state=("h", "c"), recurrent="none", raw_input=True,
    params=(Param("v", init=_uniform, blocks=2, description="v_f, v_r: c_(t-1) into f, r"),),
    init=_init,
    description="SRU: element-wise recurrence on c, highway on the raw input (Lei et al. 2018)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(SRU)
