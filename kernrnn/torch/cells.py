"""One step of a recurrent cell as an ``nn.Module``: drop-in ``LSTMCell``/``GRUCell``/``RNNCell``
and ``RecurrentCell`` for any registered cell.

A step is the layer's op with T = 1 (``kernrnn::rnn_forward`` and, for autograd,
``kernrnn::rnn_backward``): the same fused kernels, one call per step.  Code that
loops over time in Python (decoders, generators, agents) calls a cell per step,
so the Python work around the op is kept to attribute reads and shape checks.

The drop-ins subclass ``torch.nn.RNNCellBase`` (as ``nn.LSTMCell`` does): the
constructor, parameters (``weight_ih``, ``weight_hh``, ``bias_ih``,
``bias_hh``), initialisation (the same draws from torch's RNG), ``state_dict``
and ``repr`` are PyTorch's own.  Calls kernrnn cannot run fall back to
PyTorch's implementation (see :func:`kernrnn.torch.modules.unsupported`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.nn.modules import rnn as _torch_rnn

from kernrnn.torch import _ops
from kernrnn.torch.modules import _DTYPES, _CellArgsState, run_or_fall_back

__all__ = ["LSTMCell", "GRUCell", "RNNCell", "RecurrentCell"]

_BIASED = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_NO_SEED = torch.zeros((), dtype=torch.int64)  # cells draw no masks


class _CellForward:
    """PyTorch's cell ``forward`` contract, computed by the kernrnn ops with T = 1.

    A subclass provides ``_kernrnn_cell`` (the cell's name), ``_n_state``,
    ``_param_names`` (in the native layer's order), ``_spec()`` and
    ``_torch_forward`` (None: no PyTorch implementation to fall back to).
    """

    _torch_forward = None

    def forward(self, input, hx=None):
        """``h'`` (a Tensor) for one-state cells, else the tuple of new states
        (``(h', c')`` for the LSTM); ``input`` ``[B, I]`` or unbatched ``[I]``,
        ``hx`` alike (None: zeros)."""
        params = [getattr(self, n) for n in self._param_names]  # parametrisations run
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a Tensor, got "
                            f"{type(input).__name__}")
        return run_or_fall_back(self, input, input, hx, params, self._step)

    def _step(self, input, hx, params):
        name = type(self).__name__
        S = self._n_state
        dim = input.dim()
        if dim not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {dim}D instead")
        parts = _state_parts(name, hx, S)
        batched = dim == 2
        x = input if batched else input.unsqueeze(0)
        B = x.shape[0]
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected "
                               f"{self.input_size}")
        for p, n in zip(params, self._param_names):
            if p.dtype != x.dtype:
                raise ValueError(f"{name}: input dtype ({x.dtype}) does not match the dtype of "
                                 f"parameter {n} ({p.dtype})")
            if p.device != x.device:
                raise RuntimeError(f"Input and parameter tensors are not at the same device, "
                                   f"found input tensor at {x.device} and parameter tensor {n} "
                                   f"at {p.device}")
        hx3 = []
        if parts is not None:
            for k, h in enumerate(parts):
                label = "" if S == 1 else f"[{k}]"
                if h.dim() != dim:
                    raise RuntimeError(f"{name}: Expected hidden{label} to be "
                                       f"{'2D' if batched else '1D'} like the input, got "
                                       f"{h.dim()}D")
                h2 = h if batched else h.unsqueeze(0)
                if h2.shape[0] != B:
                    raise RuntimeError(f"Input batch size {B} doesn't match hidden{label} batch "
                                       f"size {h2.shape[0]}")
                if h2.shape[1] != self.hidden_size:
                    raise RuntimeError(f"hidden{label} has inconsistent hidden_size: got "
                                       f"{h2.shape[1]}, expected {self.hidden_size}")
                if h.dtype != x.dtype or h.device != x.device:
                    raise ValueError(f"{name}: hx dtype and device ({h.dtype}, {h.device}) "
                                     f"must match the input's ({x.dtype}, {x.device})")
                hx3.append(h2.unsqueeze(0))
        save = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
            or any(h.requires_grad for h in hx3))
        _, hn, _ = _ops.rnn_forward(self._spec(), x.unsqueeze(0), hx3, None, params, _NO_SEED,
                                    save)
        out = [h[0] if batched else h[0, 0] for h in hn]
        return out[0] if S == 1 else tuple(out)


def _cell_spec(cell: str, input_size: int, hidden_size: int, bias: bool,
               cell_args: str = "") -> str:
    """The op's layer configuration for one step of ``cell`` (a one-layer layer);
    ``cell_args``: its hyperparameters (:func:`kernrnn.torch._ops.format_cell_args`)."""
    if torch.compiler.is_compiling():  # traced once: formatting, not a cache, in the graph
        return _ops.make_spec(cell, input_size, hidden_size, 1, False, bias, 0.0,
                              cell_args=cell_args)
    return _cached_spec(cell, input_size, hidden_size, bias, cell_args)


@lru_cache(maxsize=256)
def _cached_spec(cell: str, input_size: int, hidden_size: int, bias: bool,
                 cell_args: str = "") -> str:
    return _ops.make_spec(cell, input_size, hidden_size, 1, False, bias, 0.0,
                          cell_args=cell_args)


def _state_parts(name, hx, S):
    """``hx`` as a tuple of S tensors (None stays None), with PyTorch's rank checks."""
    if hx is None:
        return None
    if S == 1:
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
        if hx.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        return (hx,)
    if not isinstance(hx, (tuple, list)) or len(hx) != S or not all(
            isinstance(h, torch.Tensor) for h in hx):
        raise TypeError(f"{name}: hx must be a tuple of {S} Tensors (one per state), got "
                        f"{type(hx).__name__}"
                        + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
    for k, h in enumerate(hx):
        if h.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hx[{k}] to be 1D or 2D, got {h.dim()}D instead")
    return tuple(hx)


# -- drop-ins ---------------------------------------------------------------------


class _CellDropIn(_CellForward, _torch_rnn.RNNCellBase):
    """``nn.RNNCellBase`` with kernrnn's forward."""

    _torch_class = None  # PyTorch's class of the same contract

    @property
    def _param_names(self):
        return _BIASED if self.bias else _BIASED[:2]

    def _spec(self) -> str:
        return _cell_spec(self._kernrnn_cell, self.input_size, self.hidden_size, self.bias)

    def _torch_forward(self, input, hx=None):
        """PyTorch's own forward of this class (for calls kernrnn cannot run)."""
        return self._torch_class.forward(self, input, hx)


class LSTMCell(_CellDropIn):
    """Drop-in for ``torch.nn.LSTMCell``: ``h', c' = cell(input, (h, c))``."""

    _torch_class = _torch_rnn.LSTMCell
    _kernrnn_cell = "lstm"
    _n_state = 2

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device,
                         dtype=dtype)


class GRUCell(_CellDropIn):
    """Drop-in for ``torch.nn.GRUCell``: ``h' = cell(input, h)``."""

    _torch_class = _torch_rnn.GRUCell
    _kernrnn_cell = "gru"
    _n_state = 1

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device,
                         dtype=dtype)


class RNNCell(_CellDropIn):
    """Drop-in for ``torch.nn.RNNCell`` (``nonlinearity`` ``"tanh"`` or ``"relu"``)."""

    _torch_class = _torch_rnn.RNNCell
    _n_state = 1

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None,
                 dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity!r} (select 'tanh' or "
                             f"'relu')")
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device,
                         dtype=dtype)
        self.nonlinearity = nonlinearity

    @property
    def _kernrnn_cell(self) -> str:
        return "rnn" if self.nonlinearity == "tanh" else "rnn_relu"


# -- any cell ---------------------------------------------------------------------------


class RecurrentCell(_CellArgsState, _CellForward, nn.Module):
    """One step of any registered kernrnn cell, with ``nn.LSTMCell``'s interface.

    ``RecurrentCell("gru", 16, 32)`` behaves as ``nn.GRUCell(16, 32)``; a plugin
    cell works the same.  The parameters are the native layer's for one layer
    without the ``_l0`` suffix (``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh``, then the cell's own kinds), initialised by the cell's own
    initialisers, seeded from torch's RNG.  ``hx`` and the result are a Tensor
    for one-state cells, else a tuple of the states in the cell's order.  The
    cell's hyperparameters are keywords or ``cell_args={...}``, kept in
    ``cell_args`` and the state dict's ``_metadata``, as for
    :class:`kernrnn.torch.Recurrent`.
    """

    def __init__(self, cell, input_size, hidden_size, bias=True, device=None, dtype=None,
                 cell_args=None, **hyper):
        super().__init__()
        from kernrnn.layer import _cell_args
        from kernrnn.torch.modules import _check_options

        _check_options(input_size, hidden_size, 1, bias, False, 0.0, False)
        self._cell_object = None if isinstance(cell, str) else cell
        self.cell = _ops.register_cell(cell)
        self.cell_args = _cell_args(_ops._cell(self.cell), cell_args, hyper)
        self._state_names = tuple(_ops._cell(self.cell).state)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"kernrnn.torch.RecurrentCell: dtype must be torch.float32 or "
                            f"torch.float64, got {dtype}")
        layer = self._native_layer(dtype)
        # one layer, one direction: "weight_ih_l0" -> "weight_ih" (the native order kept)
        self._param_names = tuple(n.removesuffix("_l0") for n in layer.param_shapes())
        for n, a in zip(self._param_names, layer.params.values()):
            self.register_parameter(n, nn.Parameter(torch.from_numpy(a).to(device)))

    def _native_layer(self, dtype):
        """A one-layer native layer of this cell, initialised from torch's RNG."""
        from kernrnn.layer import RNN as NativeRNN

        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return NativeRNN(_ops._cell(self.cell), self.input_size, self.hidden_size,
                         bias=self.bias, seed=seed,
                         dtype=np.dtype(str(dtype).removeprefix("torch.")),
                         cell_args=self.cell_args)

    def reset_parameters(self) -> None:
        """Draw new values with the cell's initialisers (seeded from torch's RNG)."""
        layer = self._native_layer(getattr(self, self._param_names[0]).dtype)
        with torch.no_grad():
            for n, a in zip(self._param_names, layer.params.values()):
                getattr(self, n).copy_(torch.from_numpy(a))

    @property
    def _kernrnn_cell(self) -> str:
        return self.cell

    @property
    def _n_state(self) -> int:
        return len(self._state_names)

    def _spec(self) -> str:
        return _cell_spec(self.cell, self.input_size, self.hidden_size, self.bias,
                          self._cell_args_spec)

    def extra_repr(self) -> str:
        """The cell and sizes (and ``bias=False``, and hyperparameters not at their defaults)."""
        s = f"{self.cell!r}, {self.input_size}, {self.hidden_size}"
        return s + (", bias=False" if not self.bias else "") + self._cell_args_repr()

    def __setstate__(self, state):
        super().__setstate__(state)
        if self._cell_object is not None:  # an unregistered Cell: make it known again
            _ops.register_cell(self._cell_object)
