"""The shipped cells as they were written before kernrnn derived backwards: hand-written
forward (returning ``(new_state, saved)``), backward (and the LayerNorm LSTM's two stages)
and NumPy reference, each cell's declaration otherwise that of the registered cell.

The oracle of tests/test_cell_derived.py (the derived gradients equal these to 1e-12) and
the "hand-written" side of benchmarks/derived.py.  :func:`hand_written` builds the cells.
"""

import dataclasses
import math

import numpy as np

from kernrnn.cell import relu, sigmoid, tanh


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# -- cifg ---------------------------------------------------------------------------------


def cifg_forward(xw, hu, prev):
    f = sigmoid(xw[0] + hu[0])
    g = tanh(xw[1] + hu[1])
    o = sigmoid(xw[2] + hu[2])
    c = f * prev[1] + (1 - f) * g
    tc = tanh(c)
    return (o * tc, c), (f, g, o, tc)


def cifg_backward(saved, prev, dstate):
    f, g, o, tc = saved
    dc = dstate[1] + dstate[0] * o * (1 - tc * tc)
    d = (dc * (prev[1] - g) * f * (1 - f), dc * (1 - f) * (1 - g * g),
         dstate[0] * tc * o * (1 - o))
    return d, d, (0, dc * f)


def cifg_reference(xw, hu, prev):
    f = 1.0 / (1.0 + np.exp(-(xw[0] + hu[0])))
    o = 1.0 / (1.0 + np.exp(-(xw[2] + hu[2])))
    c = f * prev[1] + (1.0 - f) * np.tanh(xw[1] + hu[1])
    return (o * np.tanh(c), c)


# -- gru ----------------------------------------------------------------------------------


def gru_forward(xw, hu, prev):
    r = sigmoid(xw[0] + hu[0])
    z = sigmoid(xw[1] + hu[1])
    n = tanh(xw[2] + r * hu[2])
    h = (1 - z) * n + z * prev[0]
    return (h,), (r, z, n, hu[2])


def gru_backward(saved, prev, dstate):
    r, z, n, hun = saved
    dh = dstate[0]
    dan = dh * (1 - z) * (1 - n * n)
    daz = dh * (prev[0] - n) * z * (1 - z)
    dar = dan * hun * r * (1 - r)
    return (dar, daz, dan), (dar, daz, dan * r), (dh * z,)


def gru_reference(xw, hu, prev):
    r = 1.0 / (1.0 + np.exp(-(xw[0] + hu[0])))
    z = 1.0 / (1.0 + np.exp(-(xw[1] + hu[1])))
    n = np.tanh(xw[2] + r * hu[2])
    return ((1.0 - z) * n + z * prev[0],)


# -- gru_ln -------------------------------------------------------------------------------


def gru_ln_forward(xw, hu, prev):
    r = sigmoid(xw[0] + hu[0])
    z = sigmoid(xw[1] + hu[1])
    n = tanh(xw[2] + r * hu[2])
    return ((1 - z) * n + z * prev[0],), (r, z, n, hu[2])


def gru_ln_backward(saved, prev, dstate):
    r, z, n, hun = saved
    dh = dstate[0]
    dan = dh * (1 - z) * (1 - n * n)
    daz = dh * (prev[0] - n) * z * (1 - z)
    dar = dan * hun * r * (1 - r)
    return (dar, daz, dan), (dar, daz, dan * r), (dh * z,)


def gru_ln_reference(xw, hu, prev):
    r = 1.0 / (1.0 + np.exp(-(xw[0] + hu[0])))
    z = 1.0 / (1.0 + np.exp(-(xw[1] + hu[1])))
    n = np.tanh(xw[2] + r * hu[2])
    return ((1.0 - z) * n + z * prev[0],)


# -- indrnn -------------------------------------------------------------------------------


def indrnn_forward(xw, prev, u):
    a = xw[0] + u[0] * prev[0]
    return (relu(a),), (a,)


def indrnn_backward(saved, prev, dstate, u):
    da = dstate[0] if saved[0] > 0 else 0 * dstate[0]
    return (da,), (da * u[0],), (da * prev[0],)


def indrnn_reference(xw, prev, u):
    return (np.maximum(xw[0] + u[0] * prev[0], 0.0),)


# -- janet --------------------------------------------------------------------------------


def janet_forward(xw, hu, prev):
    s = xw[0] + hu[0]
    f = sigmoid(s)
    k = sigmoid(s - 1.0)  # beta = 1, a literal: it takes the kernel's precision
    cand = tanh(xw[1] + hu[1])
    return (f * prev[0] + (1 - k) * cand,), (f, k, cand)


def janet_backward(saved, prev, dstate):
    f, k, cand = saved
    dc = dstate[0]
    d = (dc * (prev[0] * f * (1 - f) - cand * k * (1 - k)), dc * (1 - k) * (1 - cand * cand))
    return d, d, (dc * f,)


def janet_reference(xw, hu, prev):
    s = xw[0] + hu[0]
    f, k = 1.0 / (1.0 + np.exp(-s)), 1.0 / (1.0 + np.exp(-(s - 1.0)))
    return (f * prev[0] + (1.0 - k) * np.tanh(xw[1] + hu[1]),)


# -- lstm ---------------------------------------------------------------------------------


def lstm_forward(xw, hu, prev):
    i = sigmoid(xw[0] + hu[0])
    f = sigmoid(xw[1] + hu[1])
    g = tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3])
    c = f * prev[1] + i * g
    tc = tanh(c)
    return (o * tc, c), (i, f, g, o, tc)


def lstm_backward(saved, prev, dstate):
    i, f, g, o, tc = saved
    dc = dstate[1] + dstate[0] * o * (1 - tc * tc)
    di = dc * g * i * (1 - i)
    df = dc * prev[1] * f * (1 - f)
    dg = dc * i * (1 - g * g)
    do = dstate[0] * tc * o * (1 - o)
    d = (di, df, dg, do)
    return d, d, (0, dc * f)


def lstm_reference(xw, hu, prev):
    i = _sig(xw[0] + hu[0])
    f = _sig(xw[1] + hu[1])
    g = np.tanh(xw[2] + hu[2])
    o = _sig(xw[3] + hu[3])
    c = f * prev[1] + i * g
    return (o * np.tanh(c), c)


# -- lstm_ln ------------------------------------------------------------------------------


def lstm_ln_forward(xw, hu, prev):
    i = sigmoid(xw[0] + hu[0])
    f = sigmoid(xw[1] + hu[1])
    g = tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3])
    c = f * prev[1] + i * g
    return (c,), (i, f, g, o, c)


def lstm_ln_forward2(zn, mid, prev):
    t = tanh(zn[0])
    return (mid[3] * t, mid[4]), (t,)


def lstm_ln_backward2(saved, zn, mid, prev, dstate):
    t = saved[0]
    o = mid[3]
    return (dstate[0] * o * (1 - t * t),), (0, 0, 0, dstate[0] * t, dstate[1]), (0, 0)


def lstm_ln_backward(mid, prev, dz, dmid):
    i, f, g, o, c = mid
    dc = dmid[4] + dz[0]
    d = (dc * g * i * (1 - i), dc * prev[1] * f * (1 - f), dc * i * (1 - g * g),
         dmid[3] * o * (1 - o))
    return d, d, (0, dc * f)


def lstm_ln_reference(xw, hu, prev, norm):
    i, f, o = _sig(xw[0] + hu[0]), _sig(xw[1] + hu[1]), _sig(xw[3] + hu[3])
    c = f * prev[1] + i * np.tanh(xw[2] + hu[2])
    return (o * np.tanh(norm("c", c)), c)


# -- lstm_peephole ------------------------------------------------------------------------


def lstm_peephole_forward(xw, hu, prev, peep):
    c0 = prev[1]
    i = sigmoid(xw[0] + hu[0] + peep[0] * c0)
    f = sigmoid(xw[1] + hu[1] + peep[1] * c0)
    g = tanh(xw[2] + hu[2])
    c = f * c0 + i * g
    o = sigmoid(xw[3] + hu[3] + peep[2] * c)
    tc = tanh(c)
    return (o * tc, c), (i, f, g, o, c, tc)


def lstm_peephole_backward(saved, prev, dstate, peep):
    i, f, g, o, c, tc = saved
    c0 = prev[1]
    do = dstate[0] * tc * o * (1 - o)
    dc = dstate[1] + dstate[0] * o * (1 - tc * tc) + do * peep[2]
    di = dc * g * i * (1 - i)
    df = dc * c0 * f * (1 - f)
    dg = dc * i * (1 - g * g)
    d = (di, df, dg, do)
    dc0 = dc * f + di * peep[0] + df * peep[1]
    return d, d, (0, dc0), (di * c0, df * c0, do * c)


def lstm_peephole_reference(xw, hu, prev, peep):
    c0 = prev[1]
    i = _sig(xw[0] + hu[0] + peep[0] * c0)
    f = _sig(xw[1] + hu[1] + peep[1] * c0)
    c = f * c0 + i * np.tanh(xw[2] + hu[2])
    o = _sig(xw[3] + hu[3] + peep[2] * c)
    return (o * np.tanh(c), c)


# -- mgu ----------------------------------------------------------------------------------


def mgu_forward(xw, hu, prev):
    f = sigmoid(xw[0] + hu[0])
    n = tanh(xw[1] + f * hu[1])
    return ((1 - f) * prev[0] + f * n,), (f, n, hu[1])


def mgu_backward(saved, prev, dstate):
    f, n, hun = saved
    dh = dstate[0]
    dan = dh * f * (1 - n * n)
    daf = (dh * (n - prev[0]) + dan * hun) * f * (1 - f)
    return (daf, dan), (daf, dan * f), (dh * (1 - f),)


def mgu_reference(xw, hu, prev):
    f = 1.0 / (1.0 + np.exp(-(xw[0] + hu[0])))
    n = np.tanh(xw[1] + f * hu[1])
    return ((1.0 - f) * prev[0] + f * n,)


# -- mingru -------------------------------------------------------------------------------


def mingru_forward(xw, prev):
    z = sigmoid(xw[0])
    return ((1 - z) * prev[0] + z * xw[1],), (z, xw[1])


def mingru_backward(saved, prev, dstate):
    z, candidate = saved
    dh = dstate[0]
    return (dh * (candidate - prev[0]) * z * (1 - z), dh * z), (dh * (1 - z),)


def mingru_reference(xw, prev):
    z = 1.0 / (1.0 + np.exp(-xw[0]))
    return ((1.0 - z) * prev[0] + z * xw[1],)


# -- minlstm ------------------------------------------------------------------------------


def minlstm_forward(xw, prev):
    f = sigmoid(xw[0])
    i = sigmoid(xw[1])
    s = f + i
    return ((f * prev[0] + i * xw[2]) / s,), (f, i, xw[2])


def minlstm_backward(saved, prev, dstate):
    f, i, cand = saved
    dh = dstate[0]
    s = f + i
    q = dh * (prev[0] - cand) / (s * s)  # dh'/df = i (h - h~) / s^2, dh'/di = -f (h - h~) / s^2
    return (q * i * f * (1 - f), -q * f * i * (1 - i), dh * i / s), (dh * f / s,)


def minlstm_reference(xw, prev):
    f = 1.0 / (1.0 + np.exp(-xw[0]))
    i = 1.0 / (1.0 + np.exp(-xw[1]))
    return ((f * prev[0] + i * xw[2]) / (f + i),)


# -- rnn ----------------------------------------------------------------------------------


def rnn_tanh_forward(xw, hu, prev):
    h = tanh(xw[0] + hu[0])
    return (h,), (h,)


def rnn_tanh_backward(saved, prev, dstate):
    h = saved[0]
    da = dstate[0] * (1 - h * h)
    return (da,), (da,), (0,)


def rnn_tanh_reference(xw, hu, prev):
    return (np.tanh(xw[0] + hu[0]),)


def rnn_relu_forward(xw, hu, prev):
    h = relu(xw[0] + hu[0])
    return (h,), (h,)


def rnn_relu_backward(saved, prev, dstate):
    da = dstate[0] if saved[0] > 0 else 0 * dstate[0]
    return (da,), (da,), (0,)


def rnn_relu_reference(xw, hu, prev):
    return (np.maximum(xw[0] + hu[0], 0.0),)


# -- slstm --------------------------------------------------------------------------------


def slstm_forward(xw, hu, prev):
    it = xw[0] + hu[0]
    a = xw[1] + hu[1] + prev[3]
    z = tanh(xw[2] + hu[2])
    o = sigmoid(xw[3] + hu[3])
    m = a if a >= it else it
    i = math.exp(it - m)
    f = math.exp(a - m)
    c = f * prev[1] + i * z
    n = f * prev[2] + i
    return (o * c / n, c, n, m), (i, f, z, o, c, n, 1 if a >= it else 0)


def slstm_backward(saved, prev, dstate):
    i, f, z, o, c, n, sel = saved
    dh = dstate[0]
    dc = dstate[1] + dh * o / n
    dn = dstate[2] - dh * o * c / (n * n)
    di = dc * z + dn  # d/d(i): i = exp(i~ - m)
    df = dc * prev[1] + dn * prev[2]
    dm = dstate[3] - di * i - df * f
    da = df * f + dm * sel
    dit = di * i + dm * (1 - sel)
    d = (dit, da, dc * i * (1 - z * z), dh * c / n * o * (1 - o))
    return d, d, (0, dc * f, dn * f, da)


def slstm_reference(xw, hu, prev):
    it, a = xw[0] + hu[0], xw[1] + hu[1] + prev[3]
    m = np.maximum(a, it)
    i, f = np.exp(it - m), np.exp(a - m)
    c = f * prev[1] + i * np.tanh(xw[2] + hu[2])
    n = f * prev[2] + i
    o = 1.0 / (1.0 + np.exp(-(xw[3] + hu[3])))
    return (o * c / n, c, n, m)


# -- sru ----------------------------------------------------------------------------------
# raw_input: the forward takes x_t last, as a 1-tuple; backward returns its gradient last


def sru_forward(xw, prev, v, x):
    f = sigmoid(xw[1] + v[0] * prev[1])
    r = sigmoid(xw[2] + v[1] * prev[1])
    c = f * prev[1] + (1 - f) * xw[0]
    return (r * c + (1 - r) * x[0], c), (f, r, c - x[0], xw[0])


def sru_backward(saved, prev, dstate, v):
    f, r, cx, w = saved
    dh = dstate[0]
    dc = dstate[1] + dh * r
    ar = dh * cx * r * (1 - r)
    af = dc * (prev[1] - w) * f * (1 - f)
    return ((dc * (1 - f), af, ar), (0.0, dc * f + af * v[0] + ar * v[1]),
            (af * prev[1], ar * prev[1]), (dh * (1 - r),))


def sru_reference(xw, prev, v, x):
    f = _sig(xw[1] + v[0] * prev[1])
    r = _sig(xw[2] + v[1] * prev[1])
    c = f * prev[1] + (1.0 - f) * xw[0]
    return (r * c + (1.0 - r) * x, c)
# -- antisymmetric and cornn: at their default hyperparameters ---------------------------
# (a hand-written backward takes no hyperparameters: these oracles fix the defaults, and the
# tests call the derived math with the registered cell's default values)

ANTISYMMETRIC_EPS = 0.01


def antisymmetric_forward(xw, hu, prev):
    a = tanh(xw[0] + hu[0])
    return (prev[0] + ANTISYMMETRIC_EPS * a,), (a,)


def antisymmetric_backward(saved, prev, dstate):
    (a,) = saved
    d = (dstate[0] * ANTISYMMETRIC_EPS * (1 - a * a),)
    return d, d, (dstate[0],)


def antisymmetric_reference(xw, hu, prev):
    return (prev[0] + ANTISYMMETRIC_EPS * np.tanh(xw[0] + hu[0]),)


CORNN_DT, CORNN_GAMMA, CORNN_EPSILON = 0.042, 2.7, 4.7


def cornn_forward(xw, hu, prev):
    a = tanh(xw[0] + hu[0])
    z = prev[1] + CORNN_DT * (a - CORNN_GAMMA * prev[0] - CORNN_EPSILON * prev[1])
    return (prev[0] + CORNN_DT * z, z), (a,)


def cornn_backward(saved, prev, dstate):
    (a,) = saved
    dz = dstate[1] + CORNN_DT * dstate[0]
    d = (dz * CORNN_DT * (1 - a * a),)
    return d, d, (dstate[0] - dz * CORNN_DT * CORNN_GAMMA, dz * (1 - CORNN_DT * CORNN_EPSILON))


def cornn_reference(xw, hu, prev):
    z = prev[1] + CORNN_DT * (np.tanh(xw[0] + hu[0]) - CORNN_GAMMA * prev[0]
                              - CORNN_EPSILON * prev[1])
    return (prev[0] + CORNN_DT * z, z)


# -- ugrnn --------------------------------------------------------------------------------


def ugrnn_forward(xw, hu, prev):
    c = tanh(xw[0] + hu[0])
    g = sigmoid(xw[1] + hu[1])
    return (g * prev[0] + (1 - g) * c,), (c, g)


def ugrnn_backward(saved, prev, dstate):
    c, g = saved
    dh = dstate[0]
    d = (dh * (1 - g) * (1 - c * c), dh * (prev[0] - c) * g * (1 - g))
    return d, d, (dh * g,)


def ugrnn_reference(xw, hu, prev):
    c = np.tanh(xw[0] + hu[0])
    g = 1.0 / (1.0 + np.exp(-(xw[1] + hu[1])))
    return (g * prev[0] + (1.0 - g) * c,)


MATH = {
    "antisymmetric": dict(forward=antisymmetric_forward, backward=antisymmetric_backward,
                          reference=antisymmetric_reference, hyper=(), recurrent_weight=None),
    "cornn": dict(forward=cornn_forward, backward=cornn_backward, reference=cornn_reference,
                  hyper=()),
    "cifg": dict(forward=cifg_forward, backward=cifg_backward, reference=cifg_reference),
    "gru": dict(forward=gru_forward, backward=gru_backward, reference=gru_reference),
    "gru_ln": dict(forward=gru_ln_forward, backward=gru_ln_backward, reference=gru_ln_reference),
    "indrnn": dict(forward=indrnn_forward, backward=indrnn_backward, reference=indrnn_reference),
    "janet": dict(forward=janet_forward, backward=janet_backward, reference=janet_reference),
    "lstm": dict(forward=lstm_forward, backward=lstm_backward, reference=lstm_reference),
    "lstm_ln": dict(forward=lstm_ln_forward, backward=lstm_ln_backward,
                    reference=lstm_ln_reference, forward2=lstm_ln_forward2,
                    backward2=lstm_ln_backward2),
    "lstm_peephole": dict(forward=lstm_peephole_forward, backward=lstm_peephole_backward,
                          reference=lstm_peephole_reference),
    "mgu": dict(forward=mgu_forward, backward=mgu_backward, reference=mgu_reference),
    "mingru": dict(forward=mingru_forward, backward=mingru_backward, reference=mingru_reference),
    "minlstm": dict(forward=minlstm_forward, backward=minlstm_backward,
                    reference=minlstm_reference),
    "rnn": dict(forward=rnn_tanh_forward, backward=rnn_tanh_backward, reference=rnn_tanh_reference),
    "rnn_relu": dict(forward=rnn_relu_forward, backward=rnn_relu_backward,
                     reference=rnn_relu_reference),
    "slstm": dict(forward=slstm_forward, backward=slstm_backward, reference=slstm_reference),
    "sru": dict(forward=sru_forward, backward=sru_backward, reference=sru_reference),
    "ugrnn": dict(forward=ugrnn_forward, backward=ugrnn_backward, reference=ugrnn_reference),
}


def hand_written(name: str, registry=None):
    """The registered cell ``name`` with its hand-written math (a cell of the same name,
    not registered)."""
    from kernrnn.plugins import get_registry

    cell = (registry or get_registry()).get(name)
    return dataclasses.replace(cell, **MATH[name])
