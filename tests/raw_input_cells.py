"""Test-only cells that read the raw input x_t (``raw_input=True``), one per kernel road the
zoo's ``sru`` (no recurrent matrix, per-unit parameters) does not take.

``raw_highway``: a dense recurrence (the GEMM-per-step loops; the CPU's packed path
declines it) with a highway onto x_t.  ``raw_ln``: a two-stage step (``norm("c", c)``)
with an RMS input norm, reading x in both stages and taking ``norm`` before ``x``
(trailing arguments are bound by name, in any order).  ``raw_linear``: linear in the
state, so the CUDA backend runs it as a parallel scan for T > 16.
"""

from kernrnn.cell import Cell, Norm, sigmoid, tanh


def highway_step(xw, hu, prev, x):
    g = tanh(xw[0] + hu[0])
    t = sigmoid(xw[1] + hu[1])
    return (t * g + (1 - t) * x,)


def ln_step(xw, hu, prev, norm, x):
    f = sigmoid(xw[0] + hu[0] + x)
    c = f * prev[1] + (1 - f) * tanh(xw[1] + hu[1])
    cn = norm("c", c)
    return (tanh(cn) * x + cn, c)


def linear_step(xw, prev, x):
    z = sigmoid(xw[0])
    return ((1 - z) * prev[0] + z * x,)


HIGHWAY = Cell("raw_highway", gates="gt", forward=highway_step, raw_input=True)
LN = Cell("raw_ln", gates="fg", forward=ln_step, state=("h", "c"), normalize=("c",),
          input_norm=Norm("rms"), raw_input=True)
LINEAR = Cell("raw_linear", gates="z", forward=linear_step, recurrent="none", linear=True,
              raw_input=True)
CELLS = (HIGHWAY, LN, LINEAR)
