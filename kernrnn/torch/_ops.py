"""The bridge between PyTorch and the native layer: two ``torch.library`` custom ops.

``kernrnn::rnn_forward`` runs a whole stack (every layer, direction, the dropout
between layers) through :meth:`kernrnn.RNN.forward_with`;
``kernrnn::rnn_backward`` runs its BPTT through :meth:`kernrnn.RNN.backward_with`.
The autograd formula of the first is the second, and the second refuses to be
differentiated again, so double backward fails with a clear error.  Both have
fake implementations, so ``torch.compile(fullgraph=True)`` traces through them.

Nothing here knows the parameter kinds of a cell: the layer's
``param_shapes()`` names every parameter, and the op passes the tensors in that
order and returns one gradient per tensor.

The forward context (the native layer's saved states, opaque to PyTorch) rides
on a one-element int64 *handle* tensor whose memory owns it: the context lives
exactly as long as autograd keeps the handle, and is never copied or pickled.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import weakref
from functools import lru_cache

import numpy as np
import torch

from kernrnn.plugins import resolve_cell

__all__ = ["make_spec", "parse_spec", "parse_proj_size", "format_cell_args", "parse_cell_args",
           "spec_cell", "rnn_forward", "rnn_backward", "register_cell"]

# -- which layer --------------------------------------------------------------

#: Cells given to a module as :class:`~kernrnn.cell.Cell` objects without being
#: registered; the ops find them by name.
_LOCAL_CELLS: dict = {}


def register_cell(cell) -> str:
    """The name under which the ops find ``cell`` (a registered name or a Cell)."""
    from kernrnn.cell import Cell
    from kernrnn.plugins import get_registry

    if isinstance(cell, str):
        get_registry().get(cell)  # unknown names fail here, listing the known ones
        return cell
    if not isinstance(cell, Cell):
        raise TypeError(f"cell must be a registered name or a kernrnn.Cell, "
                        f"got {type(cell).__name__} {cell!r}")
    reg = get_registry()
    known = reg.get(cell.name) if cell.name in reg.names() else _LOCAL_CELLS.get(cell.name)
    if known is not None and known is not cell:
        raise ValueError(f"another cell is already known as {cell.name!r}; give this cell "
                         f"another name")
    if known is None:
        _LOCAL_CELLS[cell.name] = cell
    return cell.name


def _cell(name: str):
    return _LOCAL_CELLS[name] if name in _LOCAL_CELLS else resolve_cell(name)


def make_spec(cell: str, input_size, hidden_size, num_layers, bidirectional, bias,
              dropout, recurrent_dropout=0.0, input_dropout=0.0, zoneout=(), masks=False,
              proj_size=0, cell_args="") -> str:
    """The layer configuration as one string, a constant for torch.compile
    (plain formatting, which TorchDynamo traces; cell names have no ``;``).

    ``recurrent_dropout``, ``input_dropout``, ``zoneout`` (a tuple, one rate per
    state) configure the kernels' regularisation; ``masks`` is the module's
    training mode (masks drawn) rather than evaluation (zoneout's expectation);
    ``proj_size`` an LSTMP's projection (0: none); ``cell_args`` the cell's
    hyperparameters as :func:`format_cell_args` writes them ("": the defaults).
    """
    zo = ",".join(str(float(z)) for z in zoneout)
    return (f"{cell};{int(input_size)};{int(hidden_size)};{int(num_layers)};"
            f"{int(bidirectional)};{int(bias)};{float(dropout)};{float(recurrent_dropout)};"
            f"{float(input_dropout)};{zo};{int(bool(masks))};{int(proj_size)};{cell_args}")


def format_cell_args(values: dict) -> str:
    """Hyperparameter values for :func:`make_spec`: ``name=repr(value)`` joined by commas
    (the values are bools, ints and floats, whose ``repr`` reads back exactly)."""
    return ",".join(f"{k}={v!r}" for k, v in values.items())


def parse_cell_args(spec: str) -> dict:
    """The hyperparameters of a :func:`make_spec` string (``{}``: the defaults)."""
    import ast

    text = spec.split(";")[12]
    return {k: ast.literal_eval(v) for k, v in (item.split("=", 1)
                                                 for item in text.split(",") if item)}


def parse_spec(spec: str):
    """``(cell, I, H, L, bidirectional, bias, dropout)`` from :func:`make_spec`."""
    cell, I, H, L, bidir, bias, dropout = spec.split(";")[:7]
    return cell, int(I), int(H), int(L), bidir == "1", bias == "1", float(dropout)


def parse_regularization(spec: str):
    """``(recurrent_dropout, input_dropout, zoneout tuple, masks)`` from :func:`make_spec`."""
    rd, xd, zo, masks = spec.split(";")[7:11]
    return float(rd), float(xd), tuple(float(z) for z in zo.split(",") if z), masks == "1"


def parse_proj_size(spec: str) -> int:
    """``proj_size`` from :func:`make_spec` (0: no projection)."""
    return int(spec.split(";")[11])


def spec_cell(spec: str):
    return _cell(parse_spec(spec)[0])


@lru_cache(maxsize=64)
def _engine(spec: str, dtype: str, device: str):
    """The native layer that computes for ``spec`` (its own parameters are unused)."""
    from kernrnn.layer import RNN

    cell, I, H, L, bidir, bias, dropout = parse_spec(spec)
    rd, xd, zo, _ = parse_regularization(spec)
    return RNN(_cell(cell), input_size=I, hidden_size=H, num_layers=L, bidirectional=bidir,
               dtype=np.dtype(dtype), device=device, bias=bias, dropout=dropout, seed=0,
               recurrent_dropout=rd, input_dropout=xd, zoneout=zo or 0.0,
               proj_size=parse_proj_size(spec), cell_args=parse_cell_args(spec))


_engine_names: dict = {}  # (spec, dtype, device type) -> (engine, its parameter names)


def _engine_and_names(spec: str, t: torch.Tensor):
    """:func:`engine_for` and its ``param_shapes()`` keys, found with one dict lookup (a
    step of a cell module calls this twice per training step)."""
    key = (spec, t.dtype, t.device.type)
    found = _engine_names.get(key)
    if found is None:
        if len(_engine_names) >= 64:
            _engine_names.clear()
        engine = _engine(spec, str(t.dtype).removeprefix("torch."), t.device.type)
        found = _engine_names[key] = (engine, tuple(engine.param_shapes()))
    return found


def engine_for(spec: str, t: torch.Tensor):
    return _engine_and_names(spec, t)[0]


# -- tensors <-> backend arrays, without copies ---------------------------------


def _array(t: torch.Tensor, engine):
    """The backend's view of a tensor: NumPy on the CPU, CuPy (DLPack/CAI) on a GPU."""
    t = t.detach()
    return t.numpy() if t.device.type == "cpu" else engine._backend.asarray(t)


# id(parameter) -> (weakref, data_ptr, shape, strides, dtype, its NumPy view)
_param_views: dict = {}


def _param_array(p: torch.Tensor, engine):
    """:func:`_array` of a parameter, the same NumPy object from call to call while the
    parameter's memory stays where it is.

    The CPU backend reuses the packed panels of an inference forward's weights for
    the same array object (checking the values bit for bit); a fresh view per call
    hit that cache only when the new view happened to reuse a freed address, and
    packed W_ih and W_hh again otherwise (LSTM, H = 256: a third of a step).
    """
    if not p.is_cpu:
        return _array(p, engine)
    key = id(p)
    entry = _param_views.get(key)
    if entry is not None and entry[0]() is p and entry[1] == p.data_ptr() and \
            entry[2] == p.shape and entry[3] == p.stride() and entry[4] == p.dtype:
        return entry[5]
    if len(_param_views) >= 1024:
        _param_views.clear()
    view = _array(p, engine)
    ref = weakref.ref(p, lambda _, key=key: _param_views.pop(key, None))
    _param_views[key] = (ref, p.data_ptr(), p.shape, p.stride(), p.dtype, view)
    return view


def _tensor(a) -> torch.Tensor:
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)


@contextlib.contextmanager
def _on_torch_stream(device: torch.device):
    """Run the CUDA backend (which launches on CuPy's current stream) on torch's current
    stream and device, so the kernels are ordered with the surrounding torch work."""
    if device.type != "cuda":
        yield
        return
    import cupy

    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(stream.device_index), cupy.cuda.ExternalStream(stream.cuda_stream):
        yield


def _states(parts, engine):
    if not parts:
        return None
    arrays = tuple(_array(p, engine) for p in parts)
    return arrays[0] if len(arrays) == 1 else arrays


def _parts(state) -> list:
    """State components as separate tensors (the layer's are views of one array; outputs
    of a custom op must not alias each other, and they are small)."""
    return [_tensor(s).clone() for s in (state if isinstance(state, tuple) else (state,))]


# -- the forward context, owned by a handle tensor --------------------------------


class _Holder(np.ndarray):
    """A one-element int64 array that carries a forward context as an attribute."""


_contexts: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_keys = itertools.count(1)


def _stash(ctx) -> torch.Tensor:
    key = next(_keys)
    holder = np.array([key], dtype=np.int64).view(_Holder)
    holder.ctx = ctx
    _contexts[key] = holder
    return torch.from_numpy(holder)  # the tensor's memory keeps the holder (and ctx) alive


def _unstash(handle: torch.Tensor):
    holder = _contexts.get(int(handle[0])) if handle.numel() == 1 else None
    if holder is None:
        raise RuntimeError(
            "kernrnn: the forward context of this backward call is gone (the handle "
            "tensor was copied or the forward ran without gradients)")
    return holder.ctx


# -- the ops ---------------------------------------------------------------------


# Neither op may be captured into torch's own CUDA graphs (torch.cuda.graph,
# torch.compile(mode="reduce-overhead")): CuPy's cuBLAS wrappers refuse to run while a
# stream captures, and lengths are read on the host.
_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_OP_TAGS = ({"tags": (_UNSAFE,)} if _UNSAFE is not None
            and "tags" in inspect.signature(torch.library.custom_op).parameters else {})


@torch.library.custom_op("kernrnn::rnn_forward", mutates_args=(), **_OP_TAGS)
def rnn_forward(spec: str, x: torch.Tensor, hx: list[torch.Tensor], lengths: torch.Tensor | None,
                params: list[torch.Tensor], seed: torch.Tensor, save: bool,
                resets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``(y [T,B,D*H], hn (S tensors [L*D,B,H]), handle)`` for time-major ``x``
    (``P`` in place of ``H`` for an LSTMP's output and ``h``).

    ``hx`` empty means zeros; ``lengths`` int64 ``[B]`` on the CPU; ``seed`` an
    int64 scalar choosing the dropout masks; ``save`` keeps the context for
    backward (else ``handle`` is empty); ``resets`` an optional bool ``[T, B]``
    (time-major, any device: read on the host, as the lengths) of episode
    starts (see :class:`kernrnn.RNN`).  It comes last, with a default, so the
    schema of calls without it is unchanged.
    """
    engine, names = _engine_and_names(spec, x)
    lens = None if lengths is None else lengths.detach().cpu().numpy()
    rs = None if resets is None else resets.detach().cpu().numpy()
    masks = parse_regularization(spec)[3]
    training = save or engine.dropout > 0 or masks
    with _on_torch_stream(x.device):
        # imported on torch's stream: a copy of a non-contiguous parameter is then ordered
        # before the kernels that read it
        arrays = dict(zip(names, (_param_array(p, engine) for p in params)))
        y, hn, ctx = engine.forward_with(arrays, _array(x, engine), _states(hx, engine), lens,
                                         training=training, dropout_seed=int(seed),
                                         masks=masks, resets=rs)
        y, hn = _tensor(y), _parts(hn)
    handle = _stash(ctx) if save else torch.empty(0, dtype=torch.int64)
    return y, hn, handle


@rnn_forward.register_fake
def _(spec, x, hx, lengths, params, seed, save, resets=None):
    _, _, H, L, bidir, _, _ = parse_spec(spec)
    O = parse_proj_size(spec) or H
    D = 2 if bidir else 1
    T, B = x.shape[0], x.shape[1]
    S = spec_cell(spec).n_state
    return (x.new_empty((T, B, D * O)),
            [x.new_empty((L * D, B, O if s == 0 else H)) for s in range(S)],
            torch.empty(1 if save else 0, dtype=torch.int64))


@torch.library.custom_op("kernrnn::rnn_backward", mutates_args=(), **_OP_TAGS)
def rnn_backward(spec: str, handle: torch.Tensor, dy: torch.Tensor, dhn: list[torch.Tensor],
                 params: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(dx, dh0 (S tensors), one gradient per parameter)`` for one forward call."""
    engine, names = _engine_and_names(spec, dy)
    ctx = _unstash(handle)
    with _on_torch_stream(dy.device):
        dx, dh0, grads = engine.backward_with(ctx, _array(dy, engine), _states(dhn, engine))
        return _tensor(dx), _parts(dh0), [_tensor(grads[k]) for k in names]


@rnn_backward.register_fake
def _(spec, handle, dy, dhn, params):
    I = parse_spec(spec)[1]
    S = spec_cell(spec).n_state
    T, B = dy.shape[0], dy.shape[1]
    return (dy.new_empty((T, B, I)), [dy.new_empty(d.shape) for d in dhn[:S]],
            [p.new_empty(p.shape) for p in params])


def _forward_setup(ctx, inputs, output):
    spec, x, hx, lengths, params, seed, save, _resets = inputs
    y, hn, handle = output
    ctx.spec, ctx.has_hx = spec, len(hx) > 0
    ctx.y_shape, ctx.dtype, ctx.device = y.shape, y.dtype, y.device
    ctx.hn_shapes = [h.shape for h in hn]
    # the context holds views of x and the parameters: their version counters then catch
    # an in-place change between forward and backward, as for any saved tensor
    ctx.save_for_backward(handle, x, *params)


def _forward_grad(ctx, dy, dhn, _dhandle):
    handle, _x, *params = ctx.saved_tensors
    if handle.numel() == 0:
        raise RuntimeError("kernrnn: backward through a forward that saved no context "
                           "(it ran with save=False)")
    def zeros(shape):  # the gradient of an output that was not used
        return torch.zeros(shape, dtype=ctx.dtype, device=ctx.device)

    dy = zeros(ctx.y_shape) if dy is None else dy.contiguous()
    dhn = [zeros(shape) if d is None else d.contiguous() for shape, d in zip(ctx.hn_shapes, dhn)]
    dx, dh0, dparams = rnn_backward(ctx.spec, handle, dy, dhn, list(params))
    grads = (None, dx, (list(dh0) if ctx.has_hx else []), None, list(dparams), None, None, None)
    # one per input as the dispatcher passed them: it leaves out a ``resets`` equal to its
    # default (None), and autograd checks the structure
    return grads[:len(ctx.needs_input_grad)]


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "kernrnn: double backward (create_graph=True, then differentiating the gradients) "
        "is not supported: the BPTT kernels are differentiable once")


torch.library.register_autograd("kernrnn::rnn_forward", _forward_grad,
                                setup_context=_forward_setup)
torch.library.register_autograd("kernrnn::rnn_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
