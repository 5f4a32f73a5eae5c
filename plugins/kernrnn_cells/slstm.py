"""sLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory").

Exponential input and forget gates, a normaliser state n and a stabiliser
state m that keeps the exponentials in range; block-diagonal recurrence of
``heads`` heads (``recurrent="heads"``, the xLSTM / FlashRNN layout)::

    i~, f~ = xw_i + hu_i, xw_f + hu_f          (log-space gate pre-activations)
    z = tanh(xw_z + hu_z),  o = sigmoid(xw_o + hu_o)
    m' = max(f~ + m, i~)
    i = exp(i~ - m'),  f = exp(f~ + m - m')
    c' = f c + i z,  n' = f n + i,  h' = o c' / n'

State (h, c, n, m).  The gradient is exact, through the max as well (the
stabiliser cancels in h, not in c and n).  Initial states for tests keep n > 0,
where the cell is defined.
"""

import math

from kernrnn.cell import Cell, hookimpl, sigmoid, tanh


def forward(xw, hu, prev):
    it = xw[0] + hu[0]
    a = xw[1] + hu[1] + prev[3]
    z = tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3])
    m = a if a >= it else it
    i = math.exp(it - m)
    f = math.exp(a - m)
    c = f * prev[1] + i * z
    n = f * prev[2] + i
    return (o * c / n, c, n, m)


def _states(rng, shape):
    return (rng.uniform(-1, 1, shape), rng.uniform(-1, 1, shape), rng.uniform(0.5, 2, shape),
            rng.uniform(-1, 1, shape))


SLSTM = Cell(
    "slstm", gates="ifzo", state=("h", "c", "n", "m"), forward=forward, recurrent="heads",
    heads=2, state_sampler=_states,
    description="sLSTM: exponential gating, normaliser and stabiliser, 2 heads (xLSTM)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(SLSTM)
