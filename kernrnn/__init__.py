"""kernrnn: recurrent neural networks with fused Numba kernels for any cell.

Cells (Elman RNN, LSTM, GRU and your own) are pluggy plugins written once as
per-element math; the core builds CPU and CUDA kernels and BPTT from them.
"""

from kernrnn import numba_gc
from kernrnn.cell import Cell, CellError, hookimpl, relu, sigmoid, tanh
from kernrnn.functional import rnn_backward, rnn_forward
from kernrnn.layer import RNN
from kernrnn.plugins import PluginError, get_registry, register_plugin
from kernrnn.tiering import warmup

numba_gc.install()  # Numba compiles with the garbage collector paused (numba_gc says why)

__all__ = [
    "RNN",
    "Cell",
    "CellError",
    "PluginError",
    "hookimpl",
    "sigmoid",
    "tanh",
    "relu",
    "rnn_forward",
    "rnn_backward",
    "get_registry",
    "register_plugin",
    "cells",
    "warmup",
]

try:
    from importlib.metadata import version as _version

    __version__ = _version("kernrnn")
except Exception:  # not installed (source checkout on sys.path)
    __version__ = "0.0.0+unknown"


def cells() -> list[str]:
    """Names of the registered cells."""
    return get_registry().names()
