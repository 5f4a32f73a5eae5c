"""Test-only cells for the contract's round-3 features (recurrence on several states,
stages with recurrent products), in combinations the zoo's ``cornn`` and ``rhn`` lack.

``test_lstm_ch``: an LSTM whose gates i, f, o read ``W_hh [c; h]`` (``recurrent_states=
("c", "h")``, the cell state first; the candidate g sees the input only), with a
layer norm over the row of recurrent products::

    i, f, o = sigmoid(xw + hu),  g = tanh(xw_g),  c' = f c + i g,  h' = o tanh(c')

``test_c_only``: a one-gate cell whose product reads the second state only
(``recurrent_states=("c",)``)::

    a = tanh(xw + hu),  h' = a,  c' = 0.5 c + a
"""

from kernrnn.cell import Cell, Norm, sigmoid, tanh


def lstm_ch(xw, hu, prev):
    i = sigmoid(xw[0] + hu[0])
    f = sigmoid(xw[1] + hu[1])
    g = tanh(xw[2])
    o = sigmoid(xw[3] + hu[3])
    c = f * prev[1] + i * g
    return (o * tanh(c), c)


LSTM_CH = Cell("test_lstm_ch", gates="ifgo", state=("h", "c"), forward=lstm_ch,
               recurrent_states=("c", "h"), recurrent_gates="ifo",
               recurrent_norm=Norm("layer", over="row"),
               description="LSTM, gates read W_hh [c; h], row norm on it (test)")


def c_only(xw, hu, prev):
    a = tanh(xw[0] + hu[0])
    return (a, 0.5 * prev[1] + a)


C_ONLY = Cell("test_c_only", gates=1, state=("h", "c"), forward=c_only,
              recurrent_states=("c",), description="recurrence on c alone (test)")

MULTISTATE_CELLS = (LSTM_CH, C_ONLY)

CONTRACT_CELLS = MULTISTATE_CELLS
