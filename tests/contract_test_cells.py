"""Test-only cells for the contract's round-3 features (recurrence on several states,
stages with recurrent products), in combinations the zoo's ``cornn`` and ``rhn`` lack.

``test_lstm_ch``: an LSTM whose gates i, f, o read ``W_hh [c; h]`` (``recurrent_states=
("c", "h")``, the cell state first; the candidate g sees the input only), with a
layer norm over the row of recurrent products::

    i, f, o = sigmoid(xw + hu),  g = tanh(xw_g),  c' = f c + i g,  h' = o tanh(c')

``test_c_only``: a one-gate cell whose product reads the second state only
(``recurrent_states=("c",)``)::

    a = tanh(xw + hu),  h' = a,  c' = 0.5 c + a

Staged cells (``products``):

``test_mlstm``: the multiplicative LSTM (Krause et al. 2016): ``m = (W_mx x) (W_mh h)``, then
every gate reads ``W_*x x + W_*m m``, the second term a recurrent product on ``m``::

    m = xw_m hu_m;  r = matmul("m", m);  i, f, o = sigmoid(xw + r);  u = xw_u + r_u
    c' = f c + i u,  h' = o tanh(c')

``test_staged_mix``: 2 heads, a 2-block per-unit parameter, two products at the first
boundary, one at the second, values of stage 1 read in stage 3 and a product's result read
two stages on::

    a = tanh(xw_a + hu_a),  b = sigmoid(xw_b + u_0 h);  pa, pb = matmul(a), matmul(b)
    c = tanh(pa_0 + pb_1) b;  pc = matmul(c);  h' = a tanh(pc_0 + u_1) + (1 - b) h + pb_0 / 2

``test_hc_staged``: a product after a first stage whose recurrence reads ``[h; c]``::

    a = tanh(xw_0 + hu_0);  r = matmul("a", a);  c' = c / 2 + sigmoid(r) a;  h' = tanh(c' + xw_1)

``test_rhn2``: the recurrent highway network of depth 2 (the zoo's ``rhn`` has depth 3).
"""

from kernrnn.cell import Cell, Norm, Param, Product, sigmoid, tanh


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


def mlstm(xw, hu, prev, matmul):
    m = xw[0] * hu[0]
    r = matmul("m", m)
    i = sigmoid(xw[1] + r[0])
    f = sigmoid(xw[2] + r[1])
    o = sigmoid(xw[3] + r[2])
    c = f * prev[1] + i * (xw[4] + r[3])
    return (o * tanh(c), c)


MLSTM = Cell("test_mlstm", gates="mifou", state=("h", "c"), forward=mlstm, recurrent_gates="m",
             products=(Product("m", gates="ifou"),),
             description="multiplicative LSTM, W_hm m a product between stages (test)")


def staged_mix(xw, hu, prev, u, matmul):
    a = tanh(xw[0] + hu[0])
    b = sigmoid(xw[1] + u[0] * prev[0])
    pa = matmul("a", a)
    pb = matmul("b", b)
    c = tanh(pa[0] + pb[1]) * b
    pc = matmul("c", c)
    return (a * tanh(pc[0] + u[1]) + (1.0 - b) * prev[0] + 0.5 * pb[0],)


STAGED_MIX = Cell("test_staged_mix", gates="ab", forward=staged_mix, recurrent="heads", heads=2,
                  recurrent_gates="a", params=(Param("u", init=0.5, blocks=2),),
                  products=(Product("a"), Product("b", gates=2), Product("c")),
                  description="3 stages, 3 products, heads, a per-unit parameter (test)")


def hc_staged(xw, hu, prev, matmul):
    a = tanh(xw[0] + hu[0])
    r = matmul("a", a)
    c = 0.5 * prev[1] + sigmoid(r[0]) * a
    return (tanh(c + xw[1]), c)


HC_STAGED = Cell("test_hc_staged", gates=2, state=("h", "c"), forward=hc_staged,
                 recurrent_states=("h", "c"), products=(Product("a"),),
                 description="a product after a recurrence on [h; c] (test)")


def _highway(h, t, s):
    t = sigmoid(t)
    return tanh(h) * t + s * (1.0 - t)


def rhn2(xw, hu, prev, matmul):
    s1 = _highway(xw[0] + hu[0], xw[1] + hu[1], prev[0])
    r = matmul("s1", s1)
    return (_highway(r[0], r[1], s1),)


RHN2 = Cell("test_rhn2", gates="ht", forward=rhn2, products=(Product("s1", gates="ht"),),
            description="recurrent highway network, depth 2 (test)")

STAGED_CELLS = (MLSTM, STAGED_MIX, HC_STAGED, RHN2)
CONTRACT_CELLS = MULTISTATE_CELLS + STAGED_CELLS
