"""A sequence model: optional embedding, stacked recurrent layers, linear head.

``SequenceModel`` chains three pieces, each with an explicit forward and
backward (there is no autograd):

* an embedding ``E [V, E_dim]`` for token input (``vocab_size`` given), or
  real-valued input ``x [T, B, input_size]``;
* a :class:`kernrnn.RNN` stack of any registered cell;
* a linear output layer ``y_t = W_y h_t + b_y``, applied at every step
  (``head="seq"``, sequence-to-sequence) or at each sequence's last valid step
  (``head="last"``, sequence-to-one).

Parameters and gradients are dicts of arrays on the model's device, keyed
``embedding.weight``, ``rnn.<PyTorch layer name>``, ``head.weight``,
``head.bias``.  Arrays are updated in place (optimizers, ``load_state_dict``),
so references to them stay valid.
"""

from __future__ import annotations

import numpy as np

from kernrnn import _checks
from kernrnn._checks import to_host
from kernrnn.layer import RNN
from kernrnn.plugins import resolve_cell

__all__ = ["SequenceModel", "to_host", "training_memory_estimate"]

HEADS = ("seq", "last")


def training_memory_estimate(cell, hidden_size, *, input_size=1, output_size=1, num_layers=1,
                             bidirectional=False, vocab_size=None, embedding_dim=None,
                             batch_size=1, seq_len=1, dtype=np.float32, proj_size=0) -> int:
    """Bytes a training step of such a model needs at the least (no allocation, exact ints).

    Parameters with their gradients and two optimizer moments, plus per layer
    and direction what BPTT keeps for every step: the states, the cell's saved
    values, the gate pre-activations and their gradients, and the output.  The
    real peak is higher; this bound exists to refuse absurd sizes (a typo of
    ``--hidden 10000000000``, a forged checkpoint) with a clear message before
    anything is allocated, instead of a ``MemoryError`` or a machine swapping.
    """
    c = resolve_cell(cell)
    G, S, K = c.n_gates, c.n_state, c.n_saved
    D, H, L = (2 if bidirectional else 1), int(hidden_size), int(num_layers)
    if vocab_size:
        embedding_dim = embedding_dim or min(64, 2 * int(vocab_size))
        first_in, embedding = int(embedding_dim), int(vocab_size) * int(embedding_dim)
    else:
        first_in, embedding = int(input_size), 0
    O = int(proj_size) or H  # units of h: an LSTMP's projection reads H, gives O
    per_layer = G * H * (O + 2) + (O * H if proj_size else 0)
    params = (D * (G * H * first_in + per_layer) + (L - 1) * D * (G * H * D * O + per_layer)
              + embedding + int(output_size) * (D * O + 1))
    activations = L * D * int(seq_len) * int(batch_size) * H * (S + K + 2 * G + 1)
    return np.dtype(dtype).itemsize * (4 * params + activations)


class SequenceModel:
    """Embedding (optional) -> recurrent stack -> linear head.

    A cell that reads its raw input (``raw_input``, such as SRU) needs as many
    input features as units: real-valued input of another size first goes
    through a learned linear projection to ``hidden_size`` features
    (``input.weight``, ``input.bias``), and token input gets ``embedding_dim =
    hidden_size`` by default.

    ``out, hn = model.forward(x, h0=None, lengths=None)``; ``out`` is
    ``[T, B, output_size]`` for ``head="seq"`` and ``[B, output_size]`` for
    ``head="last"``.  ``dh0 = model.backward(dout, dhn=None)`` accumulates into
    :attr:`grads` (``dh0`` has the structure of ``h0``; the input gradient of
    real-valued input is kept in ``last_dx``).

    ``batch_first=True`` takes ``x`` as ``[B, T, ...]`` and gives ``out``
    (``head="seq"``) as ``[B, T, output_size]``, as PyTorch's option;
    ``dropout``, ``bias``, ``proj_size`` (LSTMP) and the kernels' regularisation
    (``recurrent_dropout``, ``input_dropout``, ``zoneout``, see
    :mod:`kernrnn.regularization`) go to the recurrent stack (:class:`kernrnn.RNN`),
    and so do ``cell_args``, the cell's hyperparameters (:class:`kernrnn.cell.Hyper`;
    kept in :meth:`config`, so checkpoints restore them).
    """

    def __init__(self, cell="lstm", input_size=None, hidden_size=32, output_size=1,
                 num_layers=1, vocab_size=None, embedding_dim=None, head="seq",
                 bidirectional=False, nonlinearity=None, dtype=np.float32, device="cpu",
                 seed=None, dropout=0.0, bias=True, batch_first=False, recurrent_dropout=0.0,
                 input_dropout=0.0, zoneout=0.0, proj_size=0, cell_args=None):
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.head = head
        self.output_size = _checks.positive_int(output_size, "output_size")
        if vocab_size is not None:
            if input_size is not None:
                raise ValueError(
                    "give input_size (real-valued input) or vocab_size (token input), not both; "
                    f"got input_size={input_size!r}, vocab_size={vocab_size!r}"
                )
            self.vocab_size = _checks.positive_int(vocab_size, "vocab_size")
            raw = _reads_raw_input(cell, nonlinearity)
            if embedding_dim is None:
                embedding_dim = hidden_size if raw else min(64, 2 * vocab_size)
            self.embedding_dim = _checks.positive_int(embedding_dim, "embedding_dim")
            rnn_in = self.embedding_dim
        else:
            if input_size is None:
                raise TypeError(
                    "SequenceModel needs input_size (real input) or vocab_size (tokens)")
            if embedding_dim is not None:
                raise ValueError("embedding_dim needs vocab_size (token input)")
            self.vocab_size = None
            self.embedding_dim = None
            rnn_in = _checks.positive_int(input_size, "input_size")
        self.input_size = rnn_in if vocab_size is None else None
        # a raw-input cell reads x_t itself: project real input to hidden_size features
        self._projects_input = (vocab_size is None and _reads_raw_input(cell, nonlinearity)
                                and rnn_in != hidden_size)
        if self._projects_input:
            rnn_in = hidden_size
        rng = np.random.default_rng(seed)
        self.rnn = RNN(cell, input_size=rnn_in, hidden_size=hidden_size, num_layers=num_layers,
                       bidirectional=bidirectional, dtype=dtype, device=device,
                       nonlinearity=nonlinearity, seed=int(rng.integers(2**63)),
                       dropout=dropout, bias=bias, recurrent_dropout=recurrent_dropout,
                       input_dropout=input_dropout, zoneout=zoneout, proj_size=proj_size,
                       cell_args=cell_args)
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool, got {batch_first!r}")
        self.batch_first = batch_first
        self.dtype = self.rnn.dtype
        self.device = self.rnn.device
        xp = self.xp
        feat = self.rnn.output_size * self.rnn.num_directions
        own = {}
        if self.vocab_size is not None:
            # PyTorch's nn.Embedding draws N(0, 1).
            own["embedding.weight"] = rng.standard_normal((self.vocab_size, self.embedding_dim))
        if self._projects_input:  # PyTorch's nn.Linear init
            b_in = 1.0 / np.sqrt(self.input_size)
            own["input.weight"] = rng.uniform(-b_in, b_in, (rnn_in, self.input_size))
            own["input.bias"] = rng.uniform(-b_in, b_in, (rnn_in,))
        bound = 1.0 / np.sqrt(feat)  # PyTorch's nn.Linear init
        own["head.weight"] = rng.uniform(-bound, bound, (self.output_size, feat))
        own["head.bias"] = rng.uniform(-bound, bound, (self.output_size,))
        self._own = {k: xp.asarray(v.astype(self.dtype)) for k, v in own.items()}
        self._own_grads = {k: xp.zeros_like(v) for k, v in self._own.items()}
        self._ctx = None
        self.last_dx = None

    # -- configuration -----------------------------------------------------

    @property
    def xp(self):
        """The array module of the model's device (NumPy or CuPy)."""
        return self.rnn._backend.xp

    @property
    def cell(self) -> str:
        return self.rnn.cell.name

    @property
    def hidden_size(self) -> int:
        return self.rnn.hidden_size

    @property
    def num_layers(self) -> int:
        return self.rnn.num_layers

    def config(self) -> dict:
        """Everything needed to rebuild the model (JSON-serialisable)."""
        return {
            "cell": self.cell, "input_size": self.input_size, "hidden_size": self.hidden_size,
            "output_size": self.output_size, "num_layers": self.num_layers,
            "vocab_size": self.vocab_size, "embedding_dim": self.embedding_dim,
            "head": self.head, "bidirectional": self.rnn.bidirectional,
            "dtype": self.dtype.name,
            **self._layer_options(),
        }

    def _layer_options(self) -> dict:
        """PyTorch layer options that differ from their defaults (left out otherwise, so
        the configs of models without them, e.g. in older checkpoints, stay the same)."""
        reg = self.rnn.regularization
        opts = {"dropout": self.rnn.dropout, "bias": self.rnn.bias,
                "batch_first": self.batch_first, "recurrent_dropout": reg.recurrent_dropout,
                "input_dropout": reg.input_dropout, "zoneout": list(reg.zoneout),
                "proj_size": self.rnn.proj_size}
        defaults = {"dropout": 0.0, "bias": True, "batch_first": False,
                    "recurrent_dropout": 0.0, "input_dropout": 0.0, "zoneout": [],
                    "proj_size": 0}
        out = {k: v for k, v in opts.items() if v != defaults[k]}
        if self.rnn.cell.hyper:  # every value, so a checkpoint keeps them if defaults change
            out["cell_args"] = dict(self.rnn.cell_args)
        return out

    @classmethod
    def from_config(cls, config: dict, device="cpu", seed=None) -> SequenceModel:
        cfg = dict(config)
        known = {"cell", "input_size", "hidden_size", "output_size", "num_layers", "vocab_size",
                 "embedding_dim", "head", "bidirectional", "dtype", "dropout", "bias",
                 "batch_first", "recurrent_dropout", "input_dropout", "zoneout", "proj_size",
                 "cell_args"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"model config has unknown keys {unknown}")
        if "zoneout" in cfg:
            cfg["zoneout"] = tuple(cfg["zoneout"])
        return cls(device=device, seed=seed, **cfg)

    def __repr__(self) -> str:
        return "SequenceModel(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"

    # -- parameters --------------------------------------------------------

    @property
    def params(self) -> dict:
        """All parameters by name (the live arrays, not copies)."""
        out = {k: self._own[k] for k in ("embedding.weight", "input.weight", "input.bias")
               if k in self._own}
        out.update({f"rnn.{k}": v for k, v in self.rnn.params.items()})
        out["head.weight"] = self._own["head.weight"]
        out["head.bias"] = self._own["head.bias"]
        return out

    @property
    def grads(self) -> dict:
        """Gradients, same keys as :attr:`params` (the live arrays)."""
        out = {k: self._own_grads[k] for k in ("embedding.weight", "input.weight", "input.bias")
               if k in self._own_grads}
        out.update({f"rnn.{k}": v for k, v in self.rnn.grads.items()})
        out["head.weight"] = self._own_grads["head.weight"]
        out["head.bias"] = self._own_grads["head.bias"]
        return out

    def param_shapes(self) -> dict:
        return {k: tuple(v.shape) for k, v in self.params.items()}

    def num_params(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.param_shapes().values()))

    def zero_grad(self) -> None:
        """Zero every gradient in place (no reallocation)."""
        for g in self.grads.values():
            g.fill(0)

    def state_dict(self) -> dict:
        """Host (NumPy) copies of the parameters."""
        return {k: np.array(to_host(v), copy=True) for k, v in self.params.items()}

    def load_state_dict(self, state: dict) -> None:
        """Copy parameters in place; missing, extra or mis-shaped keys are errors."""
        if not hasattr(state, "keys"):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        params = self.params
        missing = sorted(set(params) - set(state))
        extra = sorted(set(state) - set(params))
        if missing or extra:
            raise ValueError(
                f"parameters do not match {self!r}: missing {missing}, unexpected {extra}"
            )
        for k, p in params.items():
            v = state[k]
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(
                    f"parameter {k!r} must have shape {list(p.shape)} for {self!r}, "
                    f"got {list(v.shape)}"
                )
            if np.dtype(str(v.dtype)) != self.dtype:
                raise TypeError(f"parameter {k!r} must have dtype {self.dtype}, got {v.dtype}")
        for k, p in params.items():
            host = to_host(state[k])
            if not np.isfinite(host).all():
                raise ValueError(f"parameter {k!r} contains NaN or infinity")
            p[...] = self.xp.asarray(host)

    def train(self, mode: bool = True) -> SequenceModel:
        self.rnn.train(mode)
        return self

    def eval(self) -> SequenceModel:
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.rnn.training

    # -- forward / backward ------------------------------------------------

    def __call__(self, x, h0=None, lengths=None):
        return self.forward(x, h0, lengths)

    def _check_tokens(self, x):
        if not hasattr(x, "shape") or len(x.shape) != 2:
            raise ValueError(
                f"x must be token ids of shape [T, B] for a model with vocab_size="
                f"{self.vocab_size}, got {type(x).__name__} of shape "
                f"{list(getattr(x, 'shape', []))}"
            )
        if not np.issubdtype(np.dtype(str(x.dtype)), np.integer):
            raise TypeError(f"x must hold integer token ids, got dtype {x.dtype}")
        if isinstance(x, np.ndarray) and x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got min {x.min()} max {x.max()}"
            )

    def forward(self, x, h0=None, lengths=None):
        """See the class docstring.  ``lengths`` is a host int array ``[B]``."""
        xp = self.xp
        x = self._time_major(x)
        if self.vocab_size is not None:
            self._check_tokens(x)
            tokens = xp.asarray(x)
            inp = self._own["embedding.weight"][tokens]
        else:
            tokens = None
            inp = x
            if self._projects_input:
                inp = x @ self._own["input.weight"].T + self._own["input.bias"]
        y, hn = self.rnn.forward(inp, h0, lengths)
        T, B = y.shape[0], y.shape[1]
        lens = _checks.check_lengths(lengths, B, T)
        W, b = self._own["head.weight"], self._own["head.bias"]
        if self.head == "seq":
            feats = y
        else:
            feats = self._gather_last(y, lens)
        out = feats @ W.T + b
        if self.training:
            self._ctx = (tokens, x, feats, lens, T, B)
        return (self._time_major(out) if self.head == "seq" else out), hn

    def _time_major(self, a):
        """[B, T, ...] <-> [T, B, ...] for ``batch_first`` (a view); identity otherwise."""
        return a.swapaxes(0, 1) if self.batch_first and getattr(a, "ndim", 0) >= 2 else a

    def _gather_last(self, y, lens):
        """Forward direction at each sequence's last step, reverse direction at step 0."""
        xp = self.xp
        H = self.rnn.output_size
        B = y.shape[1]
        rows = xp.arange(B)
        last = xp.asarray(np.maximum(lens - 1, 0))
        if y.shape[0] == 0:
            return xp.zeros((B, y.shape[2]), dtype=y.dtype)
        fwd = y[last, rows, :H]
        if self.rnn.num_directions == 1:
            return fwd
        return xp.concatenate([fwd, y[0, :, H:]], axis=1)

    def backward(self, dout, dhn=None):
        """Backward for the last training-mode forward; returns ``dh0``."""
        if self._ctx is None:
            raise ValueError("backward() needs a forward() call in training mode first")
        tokens, x, feats, lens, T, B = self._ctx
        xp = self.xp
        if self.head == "seq":
            want = (B, T, self.output_size) if self.batch_first else (T, B, self.output_size)
        else:
            want = (B, self.output_size)
        _checks.check_array(dout, "dout", want, self.dtype)
        if self.head == "seq":
            dout = self._time_major(dout)
        W = self._own["head.weight"]
        g = self._own_grads
        F = feats.shape[-1]
        d2 = dout.reshape(-1, self.output_size)
        g["head.weight"] += d2.T @ feats.reshape(-1, F)
        g["head.bias"] += d2.sum(axis=0)
        dfeats = dout @ W
        if self.head == "seq":
            dy = dfeats
        else:
            dy = xp.zeros((T, B, F), dtype=self.dtype)
            H = self.rnn.output_size
            if T > 0:
                rows = xp.arange(B)
                last = xp.asarray(np.maximum(lens - 1, 0))
                valid = xp.asarray((lens > 0).astype(self.dtype))[:, None]
                dy[last, rows, :H] = dfeats[:, :H] * valid
                if self.rnn.num_directions == 2:
                    dy[0, :, H:] = dfeats[:, H:] * valid
        dx, dh0 = self.rnn.backward(dy, dhn)
        self._ctx = None
        if tokens is not None:
            _scatter_add(xp, g["embedding.weight"], tokens.reshape(-1),
                         dx.reshape(-1, self.embedding_dim))
            self.last_dx = None
        else:
            if self._projects_input:
                Win = self._own["input.weight"]
                dx2 = dx.reshape(-1, Win.shape[0])
                g["input.weight"] += dx2.T @ x.reshape(-1, Win.shape[1])
                g["input.bias"] += dx2.sum(axis=0)
                dx = dx @ Win
            self.last_dx = self._time_major(dx)
        return dh0


def _reads_raw_input(cell, nonlinearity) -> bool:
    """Whether ``cell`` (a name or Cell, as SequenceModel takes it) reads x_t itself."""
    if nonlinearity is not None:  # the Elman RNN's spelling: never a raw-input cell
        return False
    return bool(resolve_cell(cell).raw_input)


def _scatter_add(xp, target, index, values):
    """``target[index[i]] += values[i]`` with repeated indices summed (NumPy or CuPy)."""
    at = getattr(xp.add, "at", None)
    if at is not None:
        at(target, index, values)
    else:  # CuPy releases before ufunc.at
        import cupyx

        cupyx.scatter_add(target, index, values)
