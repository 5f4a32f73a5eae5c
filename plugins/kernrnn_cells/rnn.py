"""Elman RNN: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu."""

from kernrnn.cell import Cell, hookimpl, relu, tanh


def tanh_forward(xw, hu, prev):
    return (tanh(xw[0] + hu[0]),)


def relu_forward(xw, hu, prev):
    return (relu(xw[0] + hu[0]),)


RNN_TANH = Cell("rnn", gates="a", forward=tanh_forward, description="Elman RNN, tanh")
RNN_RELU = Cell("rnn_relu", gates="a", forward=relu_forward, description="Elman RNN, relu")


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(RNN_TANH)
    registry.add(RNN_RELU)
