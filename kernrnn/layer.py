"""The recurrent layer: PyTorch's ``nn.RNN``/``nn.LSTM``/``nn.GRU`` contract for any cell.

Parameters use PyTorch's names and layouts (``weight_ih_l{k}``,
``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, suffix ``_reverse``), so
a model moves between kernrnn and PyTorch without conversion; a cell's per-unit
parameters and normalisation gains follow as ``{name}_l{k}``.  There is no
autograd: :meth:`RNN.backward` runs BPTT for the last forward call.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from kernrnn import _checks
from kernrnn.backends import check_device, get_backend
from kernrnn.backends import resets as _resets
from kernrnn.backends.cpu import tiers
from kernrnn.errors import CellError, describe_source
from kernrnn.functional import (
    direction_shapes,
    effective_params,
    stack_states,
    stored_weight_grad,
    unstack_states,
)
from kernrnn.plugins import resolve_cell
from kernrnn.regularization import Regularization, RegularizationCall, call_seed
from kernrnn.scalar import check_cell_compiles

__all__ = ["RNN"]

class RNN:
    """A stack of recurrent layers of one cell type.

    ``y, hn = layer(x, h0=None, lengths=None)`` with ``x`` ``[T, B, I]``
    (time-major) gives ``y`` ``[T, B, D*H]`` and ``hn`` ``[num_layers*D, B, H]``
    (a tuple ``(h, c)`` for cells with more than one state, like the LSTM).
    ``dx, dh0 = layer.backward(dy, dhn=None)`` then accumulates the parameter
    gradients into :attr:`grads` (keys as :meth:`state_dict`).

    PyTorch's layer options: ``batch_first=True`` takes and gives ``x``/``y``
    (and ``dy``/``dx``) as ``[B, T, ...]`` (states stay ``[L*D, B, H]``);
    ``dropout=p`` zeroes each output of every layer but the last with
    probability p in training mode (inverted: kept values scaled by 1/(1-p)),
    with masks drawn from ``seed`` and a call counter and reused by backward;
    ``bias=False`` drops the ``bias_*`` parameters (they act as zeros);
    ``proj_size=P`` (``0 < P < hidden_size``, the LSTM and cells like it, see
    :meth:`~kernrnn.cell.Cell.check_projection`) makes an LSTMP as PyTorch's:
    each step's ``h`` is ``W_hr (o * tanh c)`` with ``weight_hr_l{k}`` ``[P, H]``,
    computed inside the time loop, so ``y`` is ``[T, B, D*P]``, ``h`` states
    ``[L*D, B, P]`` (``c`` stays ``[L*D, B, H]``) and ``weight_hh_l{k}`` is
    ``[G*H, P]``.

    **Resets** (reinforcement learning's episode starts): ``layer(x, h0,
    lengths, resets=mask)`` with a bool ``mask`` ``[T, B]`` (``[B, T]`` with
    ``batch_first``), True where step t of row b starts a new episode.  The
    state entering a flagged step is that row's ``h0`` (zeros when none is
    given), in every layer of the stack, and :meth:`backward` sends the
    gradient reaching it to ``dh0``: none crosses a reset.  A flag separates
    step t-1 from step t, so the reverse direction of a bidirectional layer
    restarts from ``h0`` when it enters step t-1 coming from step t.  Flags
    at step 0 and at padded steps (``t >= lengths[b]``) change nothing.  The
    backends run once per stretch between steps where some row resets
    (:mod:`kernrnn.backends.resets`), which costs one backend call per
    stretch (measured in the docs, "Resets"); zoneout in training is refused
    with resets.

    ``cell`` is a registered name (``"rnn"``, ``"lstm"``, ``"gru"``, plugins)
    or a :class:`~kernrnn.cell.Cell`; ``nonlinearity="relu"`` selects the
    relu Elman RNN (``"rnn_relu"``).

    **Hyperparameters.**  A cell's hyperparameters (:class:`~kernrnn.cell.Hyper`)
    are set per layer as keywords, ``RNN("antisymmetric", 8, 16, eps=0.1)``, or
    in a dict, ``cell_args={"eps": 0.1}`` (the same; for names read from
    configuration); the others keep their defaults.  :attr:`cell_args` holds
    every value.  They reach the kernels as data, so layers with other values
    share the compiled kernels.  :meth:`state_dict` carries them in its
    ``_metadata`` (PyTorch's place for such data: ``sd._metadata[""]["cell_args"]``)
    and :meth:`load_state_dict` restores them from there; a state dict without
    them leaves the layer's values as they are.  An unknown name or a value of
    the wrong type is a :class:`~kernrnn.cell.CellError`.

    **A parametrised recurrent weight** (a cell's
    :class:`~kernrnn.cell.RecurrentWeight`): :attr:`params` and :attr:`grads` hold
    the stored ``weight_hh_l{k}`` and its gradient; each call computes the
    effective weight once per layer direction before the time loop and chains
    the gradient back after BPTT.

    **Changing** ``x`` **after forward.**  In training mode forward keeps its
    own copy of ``x`` for backward (the weight gradient needs it), so changing
    the caller's array in place before backward cannot corrupt the gradients:
    they are those of the input forward saw.  The copy costs one memcpy and
    ``x``'s size in memory; measured at T=100, B=64, I=H=256 (LSTM, float32,
    CPU) 0.16 ms against 760 ms for forward and backward, and 6.5 MB next to
    the activations backward keeps anyway.  A checksum (crc32, 1.5 ms per
    pass, twice) would only detect the change, and needs a host copy on GPUs.

    **Threads.**  Each thread has its own forward context: ``backward`` runs
    BPTT for the last training-mode forward *of the calling thread*, so two
    threads may train one layer at once (their gradients add up in
    :attr:`grads`, as two sequential calls would).  A thread's ``backward``
    without a forward of its own raises ``ValueError``.  Calls on one layer
    take turns (a lock): the kernels use every core already, and the
    parameters :meth:`forward_with` swaps in are never seen by another call.
    """

    def __init__(self, cell="lstm", input_size=None, hidden_size=None, num_layers=1,
                 bidirectional=False, dtype=np.float32, device="cpu", nonlinearity=None,
                 seed=None, bias=True, batch_first=False, dropout=0.0, recurrent_dropout=0.0,
                 input_dropout=0.0, zoneout=0.0, proj_size=0, cell_args=None, **hyper):
        if nonlinearity is not None:
            if cell != "rnn":
                raise ValueError(f"nonlinearity applies to cell 'rnn' only, got cell {cell!r}")
            if nonlinearity not in ("tanh", "relu"):
                raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
            cell = "rnn" if nonlinearity == "tanh" else "rnn_relu"
        self.cell = resolve_cell(cell)
        if input_size is None or hidden_size is None:
            raise TypeError(f"RNN() needs input_size and hidden_size (ints >= 1), got "
                            f"input_size={input_size!r}, hidden_size={hidden_size!r}")
        self.input_size = _checks.positive_int(input_size, "input_size")
        self.hidden_size = _checks.positive_int(hidden_size, "hidden_size")
        self.num_layers = _checks.positive_int(num_layers, "num_layers")
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}")
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.bias = _checks.check_bool(bias, "bias")
        self.batch_first = _checks.check_bool(batch_first, "batch_first")
        self.dropout = _checks.check_dropout(dropout)
        #: Recurrent regularisation inside the kernels (see :mod:`kernrnn.regularization`).
        self.regularization = Regularization.build(self.cell, recurrent_dropout, input_dropout,
                                                   zoneout)
        # dropout masks: generator seeded by (dropout_seed, dropout_calls); the counter is
        # public so a checkpoint can store it and a resumed run draws the same masks
        self.dropout_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
        self.dropout_calls = 0
        self._dropout_key = None  # set by forward_with for one call
        self._masks_override = None  # set by forward_with for one call
        # one call at a time: forward_with swaps its parameters in, backward adds to grads
        self._lock = threading.Lock()
        self._local = threading.local()  # each thread's pending forward context (_ctx)
        self.dtype = _checks.as_dtype(dtype)
        self.cell.check_hidden_size(self.hidden_size)
        self.proj_size = self._check_proj_size(proj_size)
        #: Every hyperparameter of the cell by name, with its value (see the class docstring).
        self.cell_args = _cell_args(self.cell, cell_args, hyper)
        self._check_raw_input()
        self.device = check_device(device)
        if not tiers.defers_compile_check(self.cell, self.device):
            check_cell_compiles(self.cell, self.dtype)  # a plugin's broken math is named here
        self._backend = get_backend(self.device)
        self.training = True
        rng = np.random.default_rng(seed)
        params = {}
        for name, shape in self.param_shapes().items():
            kind = name[:name.rindex("_l")]
            params[name] = self.cell.init_params(rng, kind, shape, self.hidden_size).astype(self.dtype)
        self.params = {k: self._backend.asarray(v) for k, v in params.items()}
        self.grads = {k: self._backend.xp.zeros_like(v) for k, v in self.params.items()}

    # -- parameters --------------------------------------------------------

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of all parameters, in PyTorch's order.

        Per layer and direction, the cell's own list
        (:meth:`kernrnn.cell.Cell.param_shapes`) with the suffix ``_l{layer}``
        (and ``_reverse``): PyTorch's four, then per-unit parameters and
        normalisation gains.
        """
        shapes = {}
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                sfx = _suffix(layer, d)
                for kind, shape in self._kind_shapes(layer).items():
                    shapes[f"{kind}{sfx}"] = shape
        return shapes if self.bias else _without_biases(shapes)

    @property
    def output_size(self) -> int:
        """Units of ``h`` per direction: ``proj_size`` if set, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    def _kind_shapes(self, layer: int) -> dict:
        """One direction's parameter shapes by the cell's names (plus ``weight_hr``)."""
        in_size = self.input_size if layer == 0 else self.output_size * self.num_directions
        return direction_shapes(self.cell, in_size, self.hidden_size, self.proj_size)

    def _direction_params(self, layer: int, d: int) -> dict:
        """The parameters of one layer and direction, by the cell's names (no suffix)."""
        sfx = _suffix(layer, d)
        return {kind: self._param(f"{kind}{sfx}", shape)
                for kind, shape in self._kind_shapes(layer).items()}

    def state_dict(self) -> dict:
        """The parameters by PyTorch name (the layer's own arrays, not copies).

        For a cell with hyperparameters a dict with PyTorch's ``_metadata``
        attribute, ``{"": {"cell_args": {name: value}}}``.
        """
        if not self.cell.hyper:
            return dict(self.params)
        return StateDict(self.params, metadata={"": {"cell_args": dict(self.cell_args)}})

    def load_state_dict(self, state_dict) -> None:
        """Copy parameters in; missing, extra or mis-shaped keys are errors."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        shapes = self.param_shapes()
        missing = [k for k in shapes if k not in state_dict]
        extra = [k for k in state_dict if k not in shapes]
        if not self.cell.has_recurrent and any(k.startswith(("weight_hh", "bias_hh"))
                                               for k in extra):
            raise CellError(
                f"cell {self.cell.name!r}{describe_source(self.cell)} has no recurrent matrix "
                f"(recurrent='none'): its state dict has no weight_hh/bias_hh, got "
                f"{[k for k in extra if k.startswith(('weight_hh', 'bias_hh'))]}"
            )
        if missing or extra:
            raise ValueError(
                f"state_dict does not match this {self!r}: missing keys {missing}, "
                f"unexpected keys {extra}"
            )
        cell_args = _metadata_cell_args(state_dict)
        if cell_args is not None:
            cell_args = self.cell.hyper_values(cell_args)  # checked before anything changes
        new = {}
        for name, shape in shapes.items():
            value = state_dict[name]
            if hasattr(value, "detach"):  # torch tensors
                value = value.detach().cpu().numpy() if self.device == "cpu" else value.detach()
            _checks.check_array(value, f"state_dict[{name!r}]", shape, self.dtype, finite=True)
            new[name] = self._backend.xp.array(self._backend.asarray(value), copy=True)
        self.params = new
        if cell_args is not None:
            self.cell_args = cell_args
        self.zero_grad()

    def zero_grad(self) -> None:
        """Reset :attr:`grads` to zeros (backward adds to them)."""
        self.grads = {k: self._backend.xp.zeros_like(v) for k, v in self.params.items()}

    def train(self, mode: bool = True) -> "RNN":
        """Training mode: forward saves what backward needs."""
        self.training = bool(mode)
        return self

    def eval(self) -> "RNN":
        """Inference mode: forward saves nothing (faster, less memory)."""
        return self.train(False)

    def to(self, device: str) -> "RNN":
        """Move parameters and gradients to ``device`` (``"cpu"`` or ``"cuda"``)."""
        device = check_device(device)
        if device == self.device:
            return self
        backend = get_backend(device)

        def move(a):
            host = _checks.to_host(a)
            return backend.from_host(host) if device == "cuda" else host

        self.params = {k: move(v) for k, v in self.params.items()}
        self.grads = {k: move(v) for k, v in self.grads.items()}
        self.device, self._backend = device, backend
        self._local = threading.local()  # every thread's pending context was on the old device
        return self

    @property
    def _ctx(self):
        """The calling thread's last training-mode forward (None: none pending).

        Per thread, so another thread's forward never replaces it.
        """
        return getattr(self._local, "ctx", None)

    @_ctx.setter
    def _ctx(self, value):
        self._local.ctx = value

    def __repr__(self) -> str:
        return (f"RNN({self.cell.name!r}, input_size={self.input_size}, "
                f"hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, dtype={self.dtype.name}, "
                f"device={self.device!r}" + _options_repr(self) + ")")

    # -- forward / backward ------------------------------------------------

    def __call__(self, x, h0=None, lengths=None, resets=None):
        return self.forward(x, h0, lengths, resets)

    def forward(self, x, h0=None, lengths=None, resets=None):
        """Run all layers; see the class docstring for shapes and ``resets``."""
        with self._lock:
            return self._forward(x, h0, lengths, resets)

    def _forward(self, x, h0, lengths, resets=None):
        be, xp = self._backend, self._backend.xp
        D, L, H, S = self.num_directions, self.num_layers, self.hidden_size, self.cell.n_state
        O = self.output_size
        x = self._time_major(x)
        _checks.check_array(x, "x", (None, None, self.input_size), self.dtype, finite=True)
        x = be.asarray(x)
        if self.training:
            x = xp.array(x, copy=True)  # backward's x, safe from in-place changes by the caller
        T, B, _ = x.shape
        h0 = self._check_state(h0, B, "h0")
        lens = _checks.check_lengths(lengths, B, T)
        rplan = _resets.plan(be, self._check_resets(resets, T, B), lens)
        dev_lens = be.lengths(lens) if rplan is None else None
        hn = xp.empty((S, L * D, B, H), dtype=self.dtype)
        ctxs = []
        hyper = {"hyper": self.cell.hyper_vector(self.cell_args)} if self.cell.hyper else {}
        key = self._call_key()
        masks = self._dropout_masks((T, B, D * O), key)
        inp = x
        for layer in range(L):
            out = xp.empty((T, B, D * O), dtype=self.dtype)
            for d in range(D):
                idx = layer * D + d
                init = h0[:, idx] if h0 is not None else xp.zeros((S, B, H), dtype=self.dtype)
                params, stored = effective_params(self.cell, self._direction_params(layer, d),
                                                  xp, self.cell_args)
                args = (self.cell, inp, params, init)
                kw = dict(y=out[:, :, d * O:(d + 1) * O],
                          **self._regularization_call(key, layer, d), **hyper)
                if rplan is None:
                    _, hn[:, idx], ctx = be.forward(*args, dev_lens, bool(d), self.training, **kw)
                else:  # cut at the resets (kernrnn.backends.resets)
                    _, hn[:, idx], ctx = _resets.forward(be, rplan, *args, bool(d),
                                                         self.training, **kw)
                if ctx is not None:
                    ctx.stored_weight_hh = stored
                ctxs.append(ctx)
            inp = out if layer == L - 1 or masks is None else out * masks[layer]
        self._ctx = (ctxs, T, B, masks) if self.training else None
        return self._time_major(inp), self._pack_state(hn)

    def backward(self, dy, dhn=None):
        """BPTT for the calling thread's last forward call; returns ``(dx, dh0)``.

        Parameter gradients are added to :attr:`grads` (call :meth:`zero_grad`
        to reset).  ``dhn`` has the structure of ``hn`` (None: zeros).
        """
        with self._lock:
            ctx = self._ctx
            if ctx is None:
                raise ValueError(
                    f"backward() needs a forward() call in training mode first, in this thread "
                    f"({threading.current_thread().name!r}): none since the last backward, or "
                    f"the layer is in eval mode (each thread's backward pairs with its own "
                    f"forward)"
                )
            dx, dh0 = self._backward(ctx, dy, dhn, self.grads)
            self._ctx = None
            for c in ctx[0]:  # the forward's buffers go back to the backend
                _resets.release(self._backend, c)
        return dx, dh0

    def _backward(self, ctx, dy, dhn, grads):
        """BPTT for one forward context; adds the parameter gradients to ``grads``."""
        ctxs, T, B, masks = ctx
        be, xp = self._backend, self._backend.xp
        D, L, H, S = self.num_directions, self.num_layers, self.hidden_size, self.cell.n_state
        O = self.output_size
        want = (B, T, D * O) if self.batch_first else (T, B, D * O)
        _checks.check_array(dy, "dy", want, self.dtype, finite=True)
        dy = self._time_major(dy)
        dy = be.asarray(dy)
        dhn = self._check_state(dhn, B, "dhn")
        dh0 = xp.zeros((S, L * D, B, H), dtype=self.dtype)
        for layer in reversed(range(L)):
            dx = None
            for d in range(D):
                idx = layer * D + d
                sfx = _suffix(layer, d)
                dhn_d = dhn[:, idx] if dhn is not None else xp.zeros((S, B, H), dtype=self.dtype)
                dxd, dh0[:, idx], g = _resets.backward(be, ctxs[idx], dy[:, :, d * O:(d + 1) * O],
                                                       dhn_d)
                stored_weight_grad(self.cell, ctxs[idx], g, xp)
                dx = dxd if dx is None else dx + dxd
                for kind, value in g.items():
                    if f"{kind}{sfx}" in grads:  # bias=False: no bias gradients
                        grads[f"{kind}{sfx}"] += value
            dy = dx if layer == 0 or masks is None else dx * masks[layer - 1]
        return self._time_major(dx), self._pack_state(dh0)

    # -- explicit-parameter calls (for autograd adapters such as kernrnn.torch) --

    def forward_with(self, params, x, h0=None, lengths=None, *, training=True,
                     dropout_seed=None, masks=None, resets=None):
        """:meth:`forward` with ``params`` (a dict like :attr:`params`, e.g. views
        of another framework's tensors) in place of the layer's own.

        Returns ``(y, hn, ctx)``; ``ctx`` (opaque, None unless ``training``) is
        what :meth:`backward_with` needs.  The layer's parameters, gradients and
        last-call state are left as they were, so any number of calls may be
        pending.  ``dropout_seed`` (an int) chooses the dropout masks of this
        call instead of the layer's counter.  ``masks`` (default: ``training``)
        chooses the regularisation's mode apart from saving for backward: an
        autograd adapter in evaluation mode still needs the context.
        """
        with self._lock:
            saved = self.params, self.training, self._ctx
            self.params, self.training = params, bool(training)
            self._dropout_key = None if dropout_seed is None else (int(dropout_seed),)
            self._masks_override = None if masks is None else bool(masks)
            try:
                y, hn = self._forward(x, h0, lengths, resets)
                return y, hn, self._ctx
            finally:
                self.params, self.training, self._ctx = saved
                self._dropout_key = None
                self._masks_override = None

    def backward_with(self, ctx, dy, dhn=None):
        """BPTT for a :meth:`forward_with` call; returns ``(dx, dh0, grads)``
        with fresh ``grads`` (keys as :meth:`state_dict`), :attr:`grads` untouched."""
        if ctx is None:
            raise ValueError("backward_with() needs the ctx of a forward_with() call made "
                             "with training=True, got None")
        grads = {k: self._backend.xp.zeros(s, dtype=self.dtype)
                 for k, s in self.param_shapes().items()}
        with self._lock:  # the context may be used again: its buffers are not released
            dx, dh0 = self._backward(ctx, dy, dhn, grads)
        return dx, dh0, grads

    # -- layer options (bias, batch_first, dropout) ------------------------

    def _param(self, name, shape):
        """A parameter by name; with ``bias=False`` the biases are zeros of ``shape``."""
        if name in self.params or self.bias or not name.startswith("bias_"):
            return self.params[name]
        return self._backend.xp.zeros(shape, dtype=self.dtype)

    def _time_major(self, a):
        """Swap batch and time of a ``batch_first`` array (a view; identity otherwise)."""
        return a.swapaxes(0, 1) if self.batch_first and getattr(a, "ndim", 0) >= 2 else a

    def _call_key(self):
        """The random key of one training call, or None when the call draws no mask.

        ``(dropout_seed, dropout_calls)``, the counter advanced once per call
        (or the seed given to :meth:`forward_with`): between-layer dropout and
        the kernels' regularisation masks of the call both derive from it.
        """
        reg = self.regularization
        stochastic = (self.dropout > 0.0 and self.num_layers > 1) or reg.recurrent_dropout \
            or reg.input_dropout or reg.zoneout
        if not self._masks_mode() or not stochastic:
            return None
        key = self._dropout_key
        if key is None:
            key = (self.dropout_seed, self.dropout_calls)
            self.dropout_calls += 1
        return key

    def mask_seed(self, call: int | None = None) -> int:
        """The 64-bit seed of the regularisation masks of training call number ``call``.

        Default: the next call.  With it, :func:`kernrnn.testing.reference_rnn`
        regenerates exactly the masks the kernels use.
        """
        call = self.dropout_calls if call is None else int(call)
        return call_seed(self.dropout_seed, call)

    def _masks_mode(self) -> bool:
        """Whether this call draws masks (training) or applies the evaluation rule."""
        return self.training if self._masks_override is None else self._masks_override

    def _regularization_call(self, key, layer: int, direction: int) -> dict:
        """``{"reg": RegularizationCall}`` for the backend, or ``{}`` without regularisation."""
        reg = self.regularization
        mode = self._masks_mode()
        if not reg.active or (not mode and not reg.zoneout):
            return {}
        seed = call_seed(key[0], key[-1] if len(key) > 1 else 0) if key is not None else 0
        return {"reg": RegularizationCall(reg, seed, layer, direction, mode)}

    def _dropout_masks(self, shape, key):
        """The L-1 inverted-dropout masks of one training call (None: no dropout)."""
        if key is None or self.dropout == 0.0 or self.num_layers == 1:
            return None
        rng = np.random.default_rng(key)
        keep = 1.0 - self.dropout
        masks = []
        for _ in range(self.num_layers - 1):
            m = (rng.random(shape) < keep).astype(self.dtype)
            if keep > 0:
                m /= self.dtype.type(keep)
            masks.append(self._backend.asarray(m))
        return masks

    def _check_resets(self, resets, T: int, B: int):
        """The reset mask as a host bool ``[T, B]`` array (``[B, T]`` given with
        ``batch_first``), or None; refused with zoneout in training."""
        layout = "[B, T]" if self.batch_first else "[T, B]"
        rs = _checks.check_resets(resets, (B, T) if self.batch_first else (T, B), layout)
        if rs is None:
            return None
        if self.regularization.zoneout and self._masks_mode():
            raise ValueError(
                f"resets do not combine with zoneout in training, got zoneout="
                f"{self.regularization.zoneout}: its masks are drawn per step index, which "
                f"the chunks cut at the resets would restart; use recurrent_dropout or "
                f"input_dropout, or evaluation mode")
        return rs.T if self.batch_first else rs

    # -- state helpers -----------------------------------------------------

    def _pack_state(self, st):
        """PyTorch-style ``h`` or ``(h, c)`` from ``[S, L*D, B, H]`` (a projected h is the
        first P columns of ``st[0]``)."""
        parts = unstack_states(st, self.cell, self.proj_size)
        return parts[0] if self.cell.n_state == 1 else parts

    def _check_state(self, state, B, name):
        """[S, L*D, B, H] from PyTorch-style ``h`` or ``(h, c)``; None stays None.

        With ``proj_size`` the ``h`` given is ``[L*D, B, P]``: it fills the first
        P columns of the stacked ``h`` (the rest zeros).
        """
        if state is None:
            return None
        S, H = self.cell.n_state, self.hidden_size
        LD = self.num_layers * self.num_directions
        if S == 1:
            parts = (state,)
        else:
            if not isinstance(state, (tuple, list)) or len(state) != S:
                raise TypeError(
                    f"{name} must be a tuple {self.cell.state} of {S} arrays [{LD}, {B}, {H}] "
                    f"for cell {self.cell.name!r}, got {type(state).__name__}"
                )
            parts = tuple(state)
        labels = [name if S == 1 else f"{name} ({sname})" for sname in self.cell.state]
        return stack_states(self._backend, parts, self.cell, (LD,), B, H, self.proj_size,
                            self.dtype, labels)

    def _check_raw_input(self) -> None:
        """A cell with ``raw_input`` reads x_t element-wise: every layer needs as many inputs
        as units.  Layers above the first read the D*H outputs of the layer below (D*P with
        a projection), so a bidirectional (or projected) stack has raw input only in its
        first layer: such a stack is refused, naming the layer."""
        if not self.cell.raw_input:
            return
        D, O, H = self.num_directions, self.output_size, self.hidden_size
        self.cell.check_input_size(self.input_size, H, " (input_size of layer 0)")
        if self.num_layers > 1 and D * O != H:
            why = "bidirectional" if D == 2 else "proj_size"
            self.cell.check_input_size(
                D * O, H, f" at layer 1, which reads the {D}*{O} outputs of layer 0: a "
                f"{why} stack gives the layers above the first {D * O} inputs, so this cell "
                f"runs there with num_layers=1 (stack such layers yourself, with a projection "
                f"to {H} units between them)")

    def _check_proj_size(self, proj_size) -> int:
        """PyTorch's rules for ``proj_size``, and a cell whose step allows it."""
        if isinstance(proj_size, bool) or not isinstance(proj_size, (int, np.integer)) \
                or proj_size < 0:
            raise ValueError(f"proj_size should be a non-negative integer, got {proj_size!r}")
        proj_size = int(proj_size)
        if proj_size == 0:
            return 0
        if proj_size >= self.hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got "
                             f"proj_size={proj_size}, hidden_size={self.hidden_size}")
        self.cell.check_projection()
        reg = self.regularization
        if reg.recurrent_dropout or reg.zoneout:
            raise ValueError(f"proj_size does not combine with recurrent_dropout or zoneout "
                             f"(they act on the unprojected state), got "
                             f"recurrent_dropout={reg.recurrent_dropout}, zoneout={reg.zoneout}")
        return proj_size


def _suffix(layer: int, direction: int) -> str:
    """``_l{layer}`` plus ``_reverse`` for the backward direction (PyTorch's names)."""
    return f"_l{layer}" + ("_reverse" if direction else "")


def _options_repr(layer) -> str:
    """The PyTorch layer options that differ from their defaults."""
    reg = layer.regularization
    opts = [("bias", layer.bias, True), ("batch_first", layer.batch_first, False),
            ("dropout", layer.dropout, 0.0), ("recurrent_dropout", reg.recurrent_dropout, 0.0),
            ("input_dropout", reg.input_dropout, 0.0), ("zoneout", reg.zoneout, ()),
            ("proj_size", layer.proj_size, 0)]
    opts += [(h.name, layer.cell_args[h.name], h.default) for h in layer.cell.hyper]
    return "".join(f", {k}={v!r}" for k, v, default in opts if v != default)


class StateDict(dict):
    """A state dict with PyTorch's ``_metadata`` attribute (data that is not a tensor,
    such as a cell's hyperparameters, by module prefix)."""

    def __init__(self, *args, metadata=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._metadata = dict(metadata or {})


def _metadata_cell_args(state_dict):
    """The hyperparameters a state dict carries in ``_metadata[""]["cell_args"]``, or None."""
    meta = getattr(state_dict, "_metadata", None)
    top = meta.get("", None) if isinstance(meta, dict) else None
    args = top.get("cell_args") if isinstance(top, dict) else None
    return args if isinstance(args, dict) else None


def _cell_args(cell, cell_args, keywords: dict) -> dict:
    """Every hyperparameter of ``cell``: ``cell_args`` and the keywords (the same thing in
    two spellings; a name given both ways is an error), checked, defaults for the rest."""
    if cell_args is not None and not isinstance(cell_args, Mapping):
        raise TypeError(f"cell_args must be a dict of hyperparameters of cell {cell.name!r}, "
                        f"got {type(cell_args).__name__} {cell_args!r}")
    given = dict(cell_args or {})
    both = sorted(set(given) & set(keywords))
    if both:
        raise ValueError(f"hyperparameter{'s' * (len(both) > 1)} {both} given both in "
                         f"cell_args and as keyword{'s' * (len(both) > 1)}")
    given.update(keywords)
    return cell.hyper_values(given)


def _without_biases(shapes: dict) -> dict:
    """``bias=False`` as in PyTorch: every ``bias_*`` parameter is left out."""
    return {k: v for k, v in shapes.items() if not k.startswith("bias_")}

