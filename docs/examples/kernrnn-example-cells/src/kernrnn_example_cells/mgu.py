"""Minimal gated unit (MGU), with a hand-written backward.

Zhou et al. (2016, "Minimal gated unit for recurrent neural networks") keep a
single gate.  kernrnn computes ``W_hh h_{t-1}`` for all gates in one GEMM
before the cell's element-wise step, so, as in cuDNN's GRU, the gate scales
the candidate's recurrent pre-activation instead of ``h_{t-1}``::

    f = sigmoid(xw_f + hu_f)
    n = tanh(xw_n + f * hu_n)
    h' = (1 - f) * h + f * n

The forward alone would do, as for the CIFG.  This module shows the override
(the tutorial's advanced section): given ``backward=``, the cell runs this
gradient instead of the derived one, and ``forward`` also returns the values
the backward needs.  ``kernrnn.testing.check_cell`` compares it with the
derived backward.
"""

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    """One (batch, unit) element: new state (h,) and the values backward needs."""
    f = sigmoid(xw[0] + hu[0])
    n = tanh(xw[1] + f * hu[1])
    h = (1 - f) * prev[0] + f * n
    return (h,), (f, n, hu[1])


def backward(saved, prev, dstate):
    """Gradients of the gate pre-activations and the element-wise part of d(prev)."""
    f, n, hun = saved
    dh = dstate[0]
    dan = dh * f * (1 - n * n)                         # candidate pre-activation
    daf = (dh * (n - prev[0]) + dan * hun) * f * (1 - f)
    # hu_n enters the candidate multiplied by f; everything else is a plain sum.
    return (daf, dan), (daf, dan * f), (dh * (1 - f),)


MGU = Cell(
    "example_mgu",
    gates="fn",
    forward=forward,
    backward=backward,
    description="minimal gated unit, gate after the recurrent product (f, n)",
)


@hookimpl
def kernrnn_register_cells(registry):
    """Register the MGU cell."""
    registry.add(MGU)
