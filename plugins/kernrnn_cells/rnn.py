"""Elman RNN: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu."""

import numpy as np

from kernrnn.cell import Cell, hookimpl, relu, tanh


def tanh_forward(xw, hu, prev):
    h = tanh(xw[0] + hu[0])
    return (h,), (h,)


def tanh_backward(saved, prev, dstate):
    h = saved[0]
    da = dstate[0] * (1 - h * h)
    return (da,), (da,), (0,)


def tanh_reference(xw, hu, prev):
    return (np.tanh(xw[0] + hu[0]),)


def relu_forward(xw, hu, prev):
    h = relu(xw[0] + hu[0])
    return (h,), (h,)


def relu_backward(saved, prev, dstate):
    da = dstate[0] if saved[0] > 0 else 0 * dstate[0]
    return (da,), (da,), (0,)


def relu_reference(xw, hu, prev):
    return (np.maximum(xw[0] + hu[0], 0.0),)


RNN_TANH = Cell(
    "rnn", gates="a", forward=tanh_forward, backward=tanh_backward,
    reference=tanh_reference, description="Elman RNN, tanh",
)
RNN_RELU = Cell(
    "rnn_relu", gates="a", forward=relu_forward, backward=relu_backward,
    reference=relu_reference, description="Elman RNN, relu",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(RNN_TANH)
    registry.add(RNN_RELU)
