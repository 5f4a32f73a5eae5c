"""``nn.Module`` front ends: drop-in ``LSTM``/``GRU``/``RNN`` and ``Recurrent`` for any cell.

The drop-ins subclass ``torch.nn.RNNBase`` (as ``nn.LSTM`` does), so the
constructor checks, attributes, parameter names, initialisation (the same draws
from torch's RNG), ``state_dict``, ``repr`` and pickling are PyTorch's own.
They are deliberately *not* subclasses of ``nn.LSTM``/``nn.GRU``/``nn.RNN``:
TorchDynamo refuses to trace those classes.  Only ``forward`` differs: it
calls the kernrnn ops of ``kernrnn.torch._ops``.

:class:`Recurrent` takes its parameter names and shapes from the native layer
(:meth:`kernrnn.layer.RNN.param_shapes`), so a cell with other parameters than the
four PyTorch kinds needs no change here.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from types import MappingProxyType

import numpy as np
import torch
from torch import nn
from torch.autograd import forward_ad as _forward_ad
from torch.nn.modules import rnn as _torch_rnn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from kernrnn.torch import _ops

__all__ = ["LSTM", "GRU", "RNN", "Recurrent", "FallbackWarning", "unsupported"]

_DTYPES = (torch.float32, torch.float64)

# PyTorch's own classes, looked up where they are defined and never through
# ``torch.nn``: once a script sets ``torch.nn.LSTM = kernrnn.torch.LSTM`` (or calls
# ``patch()``), ``nn.LSTM.check_forward_args`` would be this module's method
# calling itself.
_TorchLSTM = _torch_rnn.LSTM
_TorchRNNBase = _torch_rnn.RNNBase


# -- calls kernrnn cannot run: PyTorch's implementation instead ---------------------


class FallbackWarning(UserWarning):
    """A drop-in ran PyTorch's own implementation for a call kernrnn cannot run.

    Shown once per module class and reason.  ``warnings.simplefilter("error",
    FallbackWarning)`` turns every such fallback into an error instead.
    """


_warned: set = set()


def _warn_fallback(name: str, reason: str) -> None:
    if (name, reason) in _warned:
        return
    _warned.add((name, reason))
    warnings.warn(f"kernrnn.torch.{name}: {reason}; running PyTorch's implementation instead "
                  f"(shown once)", FallbackWarning, stacklevel=4)


_cuda_checked: list = []  # [None] or [why kernrnn's CUDA backend cannot run], once known


def _cuda_problem():
    """None when kernrnn's CUDA backend runs here, else why not (checked once)."""
    if not _cuda_checked:
        from kernrnn.backends import get_backend

        try:
            get_backend("cuda")
            _cuda_checked.append(None)
        except Exception as exc:  # noqa: BLE001 - CudaUnavailableError or a broken install
            _cuda_checked.append(f"CUDA tensors need kernrnn's CUDA backend ({exc})")
    return _cuda_checked[0]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # PyTorch < 2.4: no device argument
        return (torch.is_autocast_enabled() if device_type == "cuda"
                else torch.is_autocast_cpu_enabled())


def unsupported(x, params) -> str | None:
    """Why kernrnn cannot run a call on ``x`` with ``params`` (None: it can).

    The configurations: a dtype other than float32/float64 (float16, bfloat16,
    ...); a device other than the CPU, or CUDA without kernrnn's CUDA backend
    (CuPy and numba-cuda); autocast enabled for ``x``'s device (its casting
    rules are PyTorch's); a ``torch.func`` transform (vmap, grad, jvp, ...) or
    forward-mode AD (the ops have no batching rule and no JVP).  An input whose
    dtype or device differs from the parameters' is an error, not a fallback.
    Called on every forward, so the common case (CPU, float32/64) costs a few
    attribute reads.
    """
    if not torch.compiler.is_compiling():
        if torch._C._are_functorch_transforms_active():
            return "torch.func transforms (vmap, grad, jvp, ...) need a batching rule and a JVP"
        if _forward_ad._current_level >= 0:
            return "forward-mode AD needs a JVP"
        if (x.is_cpu or x.is_cuda) and _autocast_on("cpu" if x.is_cpu else "cuda"):
            return f"autocast is enabled for {x.device.type}"
    dt = x.dtype
    if x.is_cpu and dt in _DTYPES:
        return None
    p = params[0]
    if p.dtype != dt or p.device != x.device:
        return None  # input and parameters differ: the usual error says how
    if dt not in _DTYPES:
        return f"no kernels for dtype {dt}"
    if x.is_cuda:
        return _cuda_problem()
    return f"no kernels for device type {x.device.type!r}"


def _non_finite(*tensors) -> bool:
    return any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors)


def run_or_fall_back(module, data, input, hx, params, run, no_fallback=None):
    """``run(input, hx, params)`` on kernrnn's kernels, or ``module._torch_forward`` (PyTorch's
    own forward, with a one-time warning) for a call kernrnn cannot run; ``data`` is the
    input's tensor.  Without a PyTorch forward to fall back to, such a call is an error;
    ``no_fallback`` says why a call has none (an argument PyTorch lacks, like ``resets``)."""
    name = type(module).__name__
    fallback = module._torch_forward if no_fallback is None else None
    reason = unsupported(data, params) if isinstance(data, torch.Tensor) else None
    if reason is not None:
        if fallback is None:
            why = no_fallback or "this module has no PyTorch implementation to fall back to"
            raise RuntimeError(f"kernrnn.torch.{name}: {reason}, and {why}")
        _warn_fallback(name, reason)
        return fallback(input, hx)
    if fallback is None or torch.compiler.is_compiling():
        return run(input, hx, params)
    try:
        return run(input, hx, params)
    except ValueError:
        parts = hx if isinstance(hx, (tuple, list)) else (hx,)
        if not _non_finite(data, *(h for h in parts if isinstance(h, torch.Tensor))):
            raise
        _warn_fallback(name, "kernrnn refuses NaN or infinite inputs")
        return fallback(input, hx)


class _FusedForward:
    """PyTorch's recurrent-layer ``forward`` contract, computed by the kernrnn ops.

    A subclass provides ``_kernrnn_cell`` (the cell's name), ``_n_state``,
    ``_flat_weights_names`` (parameter names in the native layer's order),
    ``check_input`` and ``check_forward_args`` (as ``nn.RNNBase``'s).
    """

    def flatten_parameters(self) -> None:
        """A no-op (kept for code written for cuDNN's ``nn.LSTM``)."""

    #: PyTorch's ``forward`` for calls kernrnn cannot run (None: no fallback, an error).
    _torch_forward = None

    def forward(self, input, hx=None, resets=None):
        """``output, h_n`` (``h_n`` a tuple for cells with several states, as ``nn.LSTM``).

        ``resets`` (kernrnn's, not PyTorch's): a bool tensor ``[T, B]`` (``[B, T]``
        with ``batch_first``, ``[T]`` for an unbatched input; rows in the input's
        order for a ``PackedSequence``), True where step t of row b starts a new
        episode: the state entering it is ``hx``'s row (zeros without ``hx``), and
        no gradient crosses it (see :class:`kernrnn.RNN`).  Such a call never
        falls back to PyTorch, which has no resets.
        """
        data = input.data if isinstance(input, PackedSequence) else input
        params = [getattr(self, n) for n in self._flat_weights_names]  # parametrisations run
        if resets is None:
            return run_or_fall_back(self, data, input, hx, params, self._kernrnn_forward)
        return run_or_fall_back(self, data, input, hx, params,
                                functools.partial(self._kernrnn_forward, resets=resets),
                                no_fallback="PyTorch has no resets to fall back to")

    def _kernrnn_forward(self, input, hx, params, resets=None):
        S = self._n_state
        name = type(self).__name__
        sorted_indices = unsorted_indices = None
        lengths = None
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            is_batched, check_input = True, data
            # padded in the packed (sorted) order; hx follows that order too
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got "
                                f"{type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got "
                                 f"{input.dim()}D instead")
            batch_sizes = None
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            check_input = input
            x = input.transpose(0, 1) if self.batch_first else input
        parts = _state_parts(name, hx, S, is_batched)
        if parts is None:
            self.check_input(check_input, batch_sizes)
        else:
            self.check_forward_args(check_input, parts[0] if S == 1 else parts, batch_sizes)
            if sorted_indices is not None:
                parts = tuple(p.index_select(1, sorted_indices) for p in parts)
        _check_tensors(name, x, parts or (), params, self._flat_weights_names)
        if resets is not None:
            resets = _reset_mask(name, resets, x.shape[0], x.shape[1], self.batch_first,
                                 is_batched, sorted_indices)
        y, hn = self._run(x, parts, lengths, params, resets)
        if isinstance(input, PackedSequence):
            out = PackedSequence(pack_padded_sequence(y, lengths).data, batch_sizes,
                                 sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                hn = [h.index_select(1, unsorted_indices) for h in hn]
        else:
            out = y.transpose(0, 1) if self.batch_first else y
            if not is_batched:
                out = out.squeeze(batch_dim)
                hn = [h.squeeze(1) for h in hn]
        return out, (hn[0] if S == 1 else tuple(hn))

    def _run(self, x, parts, lengths, params, resets=None):
        """The op call: ``x`` time-major, ``parts`` None or S tensors, ``resets`` None or
        bool ``[T, B]``."""
        active = self.training and self.dropout > 0 and self.num_layers > 1
        rd = getattr(self, "recurrent_dropout", 0.0)
        xd = getattr(self, "input_dropout", 0.0)
        zo = tuple(getattr(self, "zoneout", ()) or ())
        if isinstance(getattr(self, "zoneout", ()), (int, float)):
            zo = (float(self.zoneout),) * self._n_state if self.zoneout else ()
        regularised = bool(rd or xd or zo)
        spec = _ops.make_spec(self._kernrnn_cell, self.input_size, self.hidden_size,
                              self.num_layers, self.bidirectional, self.bias,
                              self.dropout if active else 0.0,
                              rd if self.training else 0.0, xd if self.training else 0.0, zo,
                              self.training, getattr(self, "proj_size", 0),
                              getattr(self, "_cell_args_spec", ""))
        if active or (self.training and regularised):
            # masks drawn from torch's RNG: torch.manual_seed reproduces them
            seed = torch.randint(0, 2**62, (), dtype=torch.int64)
        else:
            seed = torch.zeros((), dtype=torch.int64)
        hx = list(parts) if parts is not None else []
        save = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
            or any(h.requires_grad for h in hx))
        if resets is None:
            y, hn, _ = _ops.rnn_forward(spec, x, hx, lengths, params, seed, save)
        else:
            y, hn, _ = _ops.rnn_forward(spec, x, hx, lengths, params, seed, save, resets)
        return y, list(hn)


def _reset_mask(name, resets, T, B, batch_first, is_batched, sorted_indices):
    """The time-major bool ``[T, B]`` mask of a ``resets`` argument given in the input's
    layout (``[B, T]`` with ``batch_first``, ``[T]`` unbatched, the input's batch order)."""
    if not is_batched:
        want, layout = (T,), "[T]"
    elif batch_first:
        want, layout = (B, T), "[B, T]"
    else:
        want, layout = (T, B), "[T, B]"
    expected = f"{layout} = {list(want)}"
    if not isinstance(resets, torch.Tensor):
        raise TypeError(f"{name}: resets must be a bool Tensor {expected} (True where a step "
                        f"starts a new episode), got {type(resets).__name__}")
    if tuple(resets.shape) != want:
        raise ValueError(f"{name}: resets must have shape {expected} (True where a step "
                         f"starts a new episode), got {list(resets.shape)}")
    if resets.dtype != torch.bool:
        raise TypeError(f"{name}: resets must have dtype torch.bool (no silent cast), got "
                        f"{resets.dtype}")
    resets = resets.detach()
    if not is_batched:
        resets = resets.unsqueeze(1)
    elif batch_first:
        resets = resets.transpose(0, 1)
    if sorted_indices is not None:  # the packed (sorted) order the kernels run in
        resets = resets.index_select(1, sorted_indices.to(resets.device))
    return resets.contiguous()


def _state_parts(name, hx, S, is_batched):
    """``hx`` as a tuple of S batched tensors (None stays None), PyTorch's checks."""
    if hx is None:
        return None
    if S == 1:
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
        parts = (hx,)
    else:
        if not isinstance(hx, (tuple, list)) or len(hx) != S or not all(
                isinstance(h, torch.Tensor) for h in hx):
            raise TypeError(f"{name}: hx must be a tuple of {S} Tensors (one per state), got "
                            f"{type(hx).__name__}"
                            + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
        parts = tuple(hx)
    want = 3 if is_batched else 2
    if any(h.dim() != want for h in parts):
        kind = "batched 3-D" if is_batched else "unbatched 2-D"
        dims = ", ".join(f"{h.dim()}-D" for h in parts)
        raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got ({dims}) "
                           f"tensor{'s' if S > 1 else ''}")
    return parts if is_batched else tuple(h.unsqueeze(1) for h in parts)


def _check_tensors(name, x, hx, params, names):
    """Dtypes and devices, in PyTorch's words (no silent casts or copies)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: kernrnn computes in torch.float32 or torch.float64, got "
                        f"input of type {x.dtype}")
    for pname, p in zip(names, params):
        if p.dtype != x.dtype:
            raise ValueError(f"{name}: RNN input dtype ({x.dtype}) does not match the dtype "
                             f"of parameter {pname} ({p.dtype})")
        if p.device != x.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found "
                               f"input tensor at {x.device} and parameter tensor {pname} at "
                               f"{p.device}")
    for h in hx:
        if h.dtype != x.dtype:
            raise ValueError(f"{name}: hx dtype ({h.dtype}) does not match input dtype "
                             f"({x.dtype})")
        if h.device != x.device:
            raise RuntimeError(f"Input and hidden tensors are not at the same device, found "
                               f"input tensor at {x.device} and hidden tensor at {h.device}")


# -- drop-ins ---------------------------------------------------------------------

_CELL_OF_MODE = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn", "RNN_RELU": "rnn_relu"}
_TORCH_CLASS = {"LSTM": _torch_rnn.LSTM, "GRU": _torch_rnn.GRU, "RNN_TANH": _torch_rnn.RNN,
                "RNN_RELU": _torch_rnn.RNN}


class _DropIn(_FusedForward, _TorchRNNBase):
    """``nn.RNNBase`` with kernrnn's forward."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                 device=None, dtype=None):
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device=device, dtype=dtype)

    def _torch_forward(self, input, hx=None):
        """PyTorch's own forward of this class (for calls kernrnn cannot run)."""
        return _TORCH_CLASS[self.mode].forward(self, input, hx)

    @property
    def _kernrnn_cell(self) -> str:
        return _CELL_OF_MODE[self.mode]

    @property
    def _n_state(self) -> int:
        return 2 if self.mode == "LSTM" else 1


class LSTM(_DropIn):
    """Drop-in for ``torch.nn.LSTM`` (same arguments, parameters, inputs, outputs)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, device=device, dtype=dtype)

    def check_forward_args(self, input, hidden, batch_sizes):
        """``nn.LSTM``'s checks of ``input`` and ``(h_0, c_0)`` (its messages)."""
        _TorchLSTM.check_forward_args(self, input, hidden, batch_sizes)

    def get_expected_cell_size(self, input, batch_sizes):
        """The shape ``c_0`` must have (``nn.LSTM``'s)."""
        return _TorchLSTM.get_expected_cell_size(self, input, batch_sizes)

    def permute_hidden(self, hx, permutation):
        """``(h, c)`` reordered along the batch (``nn.LSTM``'s)."""
        return _TorchLSTM.permute_hidden(self, hx, permutation)


class GRU(_DropIn):
    """Drop-in for ``torch.nn.GRU``."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device=device, dtype=dtype)


class RNN(_DropIn):
    """Drop-in for ``torch.nn.RNN`` (Elman; ``nonlinearity`` ``"tanh"`` or ``"relu"``)."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None):
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or "
                             f"'relu'.")
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity


# -- any cell ------------------------------------------------------------------------


class _CellArgsState:
    """A module's hyperparameters (of cell ``self.cell``): ``cell_args``, kept in the
    state dict's ``_metadata[prefix]["cell_args"]`` and restored by ``load_state_dict`` (a
    state dict without them leaves the module's values)."""

    @property
    def cell_args(self):
        """The cell's hyperparameters by name, every one (read-only; assign a dict to
        change them, the defaults for the names it leaves out)."""
        return MappingProxyType(self._cell_args)

    @cell_args.setter
    def cell_args(self, values):
        values = _ops._cell(self.cell).hyper_values(values)  # checked: CellError
        self._cell_args = values
        # the op's configuration, written here once: torch.compile traces a plain string
        self._cell_args_spec = _ops.format_cell_args(values)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        meta = getattr(destination, "_metadata", None)
        if self._cell_args and meta is not None:
            meta.setdefault(prefix[:-1], {})["cell_args"] = dict(self._cell_args)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        given = local_metadata.get("cell_args") if isinstance(local_metadata, dict) else None
        if isinstance(given, dict):
            given = _ops._cell(self.cell).hyper_values(given)  # checked before anything changes
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if isinstance(given, dict):
            self.cell_args = given

    def _cell_args_repr(self) -> str:
        """``, name=value`` for each hyperparameter that differs from its default."""
        return "".join(f", {h.name}={self.cell_args.get(h.name)!r}"
                       for h in _ops._cell(self.cell).hyper
                       if self.cell_args.get(h.name) != h.default)


class Recurrent(_CellArgsState, _FusedForward, nn.Module):
    """A stack of layers of any registered kernrnn cell, with ``nn.LSTM``'s interface.

    ``Recurrent("gru", 16, 32, num_layers=2)`` behaves as ``nn.GRU(16, 32, 2)``;
    a plugin cell works the same.  Parameters are named and shaped as
    :meth:`kernrnn.layer.RNN.param_shapes` says and initialised by the cell's own
    initialisers, seeded from torch's RNG (``torch.manual_seed`` reproduces them).
    ``hx``/``h_n`` are a Tensor for one-state cells, else a tuple of the states.

    The cell's hyperparameters (:class:`kernrnn.cell.Hyper`) are keywords or
    ``cell_args={...}``, as for :class:`kernrnn.RNN`; ``cell_args`` holds every
    value (assign a new dict to change them between calls: the values are data for the
    kernels).
    ``state_dict()`` keeps them in its ``_metadata`` (``sd._metadata[prefix]
    ["cell_args"]``, which ``torch.save`` keeps) and ``load_state_dict`` restores them.
    """

    proj_size = 0  # for nn.RNNBase's shape checks

    def __init__(self, cell, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 recurrent_dropout=0.0, input_dropout=0.0, zoneout=0.0, cell_args=None,
                 **hyper):
        super().__init__()
        _check_options(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                       bidirectional)
        from kernrnn.regularization import Regularization

        reg = Regularization.build(_ops._cell(_ops.register_cell(cell)), recurrent_dropout,
                                   input_dropout, zoneout)
        #: Variational dropout and zoneout inside the kernels (kernrnn.regularization);
        #: on the drop-ins these attributes can be set after construction.
        self.recurrent_dropout, self.input_dropout = reg.recurrent_dropout, reg.input_dropout
        self.zoneout = reg.zoneout
        self._cell_object = None if isinstance(cell, str) else cell
        self.cell = _ops.register_cell(cell)
        self._state_names = tuple(_ops._cell(self.cell).state)  # plain data for torch.compile
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout = float(dropout)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"kernrnn.torch.Recurrent: dtype must be torch.float32 or "
                            f"torch.float64, got {dtype}")
        from kernrnn.layer import _cell_args

        self.cell_args = _cell_args(_ops._cell(self.cell), cell_args, hyper)
        layer = self._native_layer(dtype)
        self._flat_weights_names = list(layer.param_shapes())
        for n, a in layer.params.items():
            self.register_parameter(n, nn.Parameter(torch.from_numpy(a).to(device)))

    def _native_layer(self, dtype):
        """A native layer of this configuration, initialised from torch's RNG."""
        from kernrnn.layer import RNN as NativeRNN

        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return NativeRNN(_ops._cell(self.cell), self.input_size, self.hidden_size,
                         num_layers=self.num_layers, bidirectional=self.bidirectional,
                         dtype=np.dtype(str(dtype).removeprefix("torch.")), bias=self.bias,
                         seed=seed, cell_args=self.cell_args)

    def reset_parameters(self) -> None:
        """Draw new values with the cell's initialisers (seeded from torch's RNG)."""
        layer = self._native_layer(self._flat_weights[0].dtype)
        with torch.no_grad():
            for n, a in layer.params.items():
                getattr(self, n).copy_(torch.from_numpy(a))

    @property
    def _flat_weights(self):
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def _kernrnn_cell(self) -> str:
        return self.cell

    @property
    def _n_state(self) -> int:
        return len(self._state_names)

    def check_input(self, input, batch_sizes):
        """``nn.RNNBase``'s checks of the input's dtype, rank and size (its messages)."""
        _TorchRNNBase.check_input(self, input, batch_sizes)

    def get_expected_hidden_size(self, input, batch_sizes):
        """The shape every state component must have: ``[L*D, B, H]``."""
        return _TorchRNNBase.get_expected_hidden_size(self, input, batch_sizes)

    def check_hidden_size(self, hx, expected_hidden_size, msg="Expected hidden size {}, got {}"):
        """``nn.RNNBase``'s shape check of one state component."""
        _TorchRNNBase.check_hidden_size(self, hx, expected_hidden_size, msg)

    def check_forward_args(self, input, hidden, batch_sizes):
        """PyTorch's checks of ``input`` and of every state component."""
        self.check_input(input, batch_sizes)
        want = self.get_expected_hidden_size(input, batch_sizes)
        parts = hidden if isinstance(hidden, tuple) else (hidden,)
        for sname, h in zip(self._state_names, parts):
            self.check_hidden_size(h, want, f"Expected hidden[{sname}] size {{}}, got {{}}")

    def extra_repr(self) -> str:
        """The cell, sizes and the options that differ from their defaults."""
        s = f"{self.cell!r}, {self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                           ("bidirectional", False)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)!r}"
        return s + self._cell_args_repr()


    def __setstate__(self, state):
        super().__setstate__(state)
        if self._cell_object is not None:  # an unregistered Cell: make it known again
            _ops.register_cell(self._cell_object)


def _check_options(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                   bidirectional):
    """nn.RNNBase's argument checks, in its words."""
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) \
            or not 0 <= dropout <= 1:
        raise ValueError("dropout should be a number in range [0, 1] representing the "
                         f"probability of an element being zeroed, got {dropout!r}")
    for value, arg in ((bias, "bias"), (batch_first, "batch_first"),
                       (bidirectional, "bidirectional")):
        if not isinstance(value, bool):
            raise TypeError(f"{arg} should be of type bool, got: {type(value).__name__}")
    for value, arg in ((input_size, "input_size"), (hidden_size, "hidden_size"),
                       (num_layers, "num_layers")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{arg} must be greater than zero, got {value}")
    if dropout > 0 and num_layers == 1:
        warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                      "non-zero dropout expects num_layers greater than 1, but got "
                      f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
