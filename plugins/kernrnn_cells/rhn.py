"""Recurrent highway network, RHN (Zilly et al. 2017), recurrence depth L = 3.

Each time step runs L highway layers; only the first sees the input.  With
``s_0 = s^(t-1)_L`` and the carry gate coupled to the transform gate (c = 1 - t)::

    h_l = tanh(W_H x [l = 1] + R_Hl s_(l-1) + b_Hl)
    t_l = sigmoid(W_T x [l = 1] + R_Tl s_(l-1) + b_Tl)
    s_l = h_l * t_l + s_(l-1) * (1 - t_l),    output and state s^(t) = s_L

Layer 1's products are ``weight_ih`` (``[W_H; W_T]``, gates h, t) and ``weight_hh``
(``[R_H1; R_T1]``); each later layer is a recurrent product between stages of the
step: ``matmul("s1", s1)`` gives layer 2 its ``R_H2 s_1 + b_H2`` and ``R_T2 s_1 +
b_T2`` (``weight_hs1 [2H, H]``, ``bias_hs1 [2H]``), ``matmul("s2", s2)`` layer 3's.
Transform biases start at -2 (the paper's setting: carry at first).  Another
depth is the same forward with one ``matmul`` line and one ``_layer`` call per
layer, and one ``Product`` more.
"""

import math

from kernrnn.cell import Cell, Product, hookimpl, sigmoid, tanh


def _layer(h, t, s):
    """One highway layer on its pre-activations: s' = tanh(h) T + s (1 - T)."""
    t = sigmoid(t)
    return tanh(h) * t + s * (1.0 - t)


def forward(xw, hu, prev, matmul):
    s1 = _layer(xw[0] + hu[0], xw[1] + hu[1], prev[0])
    r2 = matmul("s1", s1)
    s2 = _layer(r2[0], r2[1], s1)
    r3 = matmul("s2", s2)
    return (_layer(r3[0], r3[1], s2),)


def init(rng, name, shape, hidden_size):
    """PyTorch's uniform init; transform biases -2 (b_T of every layer, once per layer)."""
    bound = 1.0 / math.sqrt(hidden_size)
    w = rng.uniform(-bound, bound, shape)
    if name.startswith("bias_"):
        w[hidden_size:] = 0.0 if name == "bias_hh" else -2.0
    return w


RHN = Cell(
    "rhn", gates="ht", forward=forward, init=init,
    products=(Product("s1", gates="ht"), Product("s2", gates="ht")),
    description="recurrent highway network, depth 3, coupled carry (Zilly et al. 2017)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(RHN)
