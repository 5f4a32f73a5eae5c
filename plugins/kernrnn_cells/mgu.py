"""MGU, the minimal gated unit (Zhou et al. 2016, "Minimal gated unit for recurrent neural networks").

The paper's single gate f plays the GRU's reset and update gates::

    f  = sigmoid(W_f x_t + U_f h_{t-1} + b_f)
    h~ = tanh(W_h x_t + U_h (f * h_{t-1}) + b_h)
    h' = (1 - f) * h_{t-1} + f * h~

``U_h (f * h)`` needs f before the recurrent product, but kernrnn computes
``W_hh h_{t-1}`` for all gates in one GEMM before the step.  So, as cuDNN's
GRU does with its reset gate, f scales the candidate's recurrent
pre-activation instead: ``h~ = tanh(xw_n + f * hu_n)`` (``hu_n`` includes
``b_hn``).  The tutorial's example package has this same cell as
``example_mgu``.
"""

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    f = sigmoid(xw[0] + hu[0])
    n = tanh(xw[1] + f * hu[1])
    return ((1 - f) * prev[0] + f * n,)


MGU = Cell(
    "mgu", gates="fn", forward=forward,
    description="minimal gated unit, gate after the recurrent product (Zhou et al. 2016)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(MGU)
