"""The cell contract: what a plugin author writes, once, for a new recurrent cell.

A cell is its forward step.  ``forward(xw, hu, prev, *params)`` receives, for
one (batch, unit) element, the G gate pre-activations coming from the input
(``xw``, bias ``b_ih`` included) and from the previous hidden state (``hu``,
bias ``b_hh`` included) as tuples of scalars, the previous state as a tuple of
scalars (``(h,)`` or ``(h, c)``), and one tuple of scalars per declared
per-unit parameter (:class:`Param`).  It returns the new state tuple::

    def forward(xw, hu, prev):
        f = sigmoid(xw[0] + hu[0])
        g = tanh(xw[1] + hu[1])
        o = sigmoid(xw[2] + hu[2])
        c = f * prev[1] + (1 - f) * g
        return (o * tanh(c), c)

kernrnn derives everything else from it (:mod:`kernrnn.autodiff`): the
backward step, the values the forward saves for it and a float64 NumPy
reference; then it builds the time loop, the GEMMs and backpropagation
through time around them, for every backend.  The step is straight-line
scalar code: assignments and tuples, ``+ - * /``, integer powers, unary minus,
the helpers this module re-exports from :mod:`kernrnn.scalar_math`
(``sigmoid``, ``tanh``, ``relu``, ``sin``, ``cos``), ``math.exp``/``log``/
``sqrt``/``sin``/``cos``/``erf``/``fabs``, ``abs``, ``min``/``max``,
conditional expressions (``a if c else b``: the gradient follows the branch
taken), calls of module-level helper functions (inlined), numeric literals
and numeric module constants.  Anything else (a loop, an ``if`` statement, a
list, an unknown call) is a :class:`CellError` naming the cell, the line and
the construct.  Literals take the kernel's precision (see :mod:`kernrnn.scalar`).

The recurrent product is declared with ``recurrent``:

* ``"dense"`` (default): ``hu = W_hh h + b_hh`` with ``weight_hh [Gr*H, H]``;
* ``"heads"``: a block-diagonal ``W_hh`` of ``heads`` blocks of ``dh = H/heads``
  units, run as one product per head (the sLSTM / FlashRNN layout);
  ``weight_hh`` is ``[heads, Gr*dh, dh]``: row ``g*dh + i`` of head ``k`` feeds
  gate ``g`` of unit ``k*dh + i`` from units ``k*dh .. k*dh+dh-1``;
* ``"none"``: no recurrent matrix and no ``weight_hh``/``bias_hh`` at all; the
  math then has no ``hu`` argument: ``forward(xw, prev, *params)``.

``recurrent_gates`` names the gates that have a recurrent part (default: all);
``hu`` still has G entries, zero for the others, and ``weight_hh`` has ``Gr*H``
rows for the ``Gr`` recurrent gates only.  ``recurrent_states`` names the state
components a dense product reads, side by side (default ``("h",)``):
``("h", "z")`` gives ``weight_hh [Gr*H, 2*H]`` and ``hu = W_hh [h; z] + b_hh``.

Normalisation inside the kernels (each optional):

* ``input_norm`` / ``recurrent_norm``: layer norm or RMS norm (:class:`Norm`)
  of ``W_ih x`` / ``W_hh h`` over each gate block (or the whole row), times a
  learnable gain (``norm_ih_weight`` / ``norm_hh_weight``); ``bias_ih`` /
  ``bias_hh`` are added after it and act as the norm's bias;
* ``normalize = ("c",)``: a value normalised over the hidden units in the
  middle of the step (LayerNorm LSTM's cell state).  The forward takes a last
  argument ``norm`` and calls ``norm("c", c)`` where the normalised value is
  used; the core splits the step there into two stages, normalises ``c`` over
  the H units of the row, applies gain and bias (``norm_c_weight``,
  ``norm_c_bias``), and runs the normalisation's backward between the stages'
  derived backwards.

``linear=True`` declares a step linear in the state, ``new_s = a_s * prev_s +
b_s`` with ``a``, ``b`` from the input alone (minGRU, minLSTM; needs
``recurrent="none"``): the CUDA backend then runs time as a parallel scan.

Hyperparameters
---------------
``hyper`` declares constants chosen per layer, not learned (a step size, a
damping): a dict ``{name: default}`` or a tuple of :class:`Hyper`.  The
forward takes each it reads as a trailing argument of that name, after the
per-unit parameters (and ``norm``), in any order::

    def forward(xw, hu, prev, eps, gamma):
        return (prev[0] + eps * tanh(xw[0] + hu[0] - gamma * prev[0]),)

    Cell("damped", gates="a", forward=forward, hyper={"eps": 0.01, "gamma": 0.01})

A layer sets them: ``kernrnn.RNN("damped", I, H, eps=0.1)`` or
``cell_args={"eps": 0.1}``; ``kernrnn train --cell-arg eps=0.1``.  No
gradient flows to them.  The kernels read them as numbers of their precision
from the per-unit parameter vector (each repeated over the units), so a new
value compiles nothing; cells without hyperparameters get the same kernels as
before.  The generated functions take them as one last tuple ``hyper`` in
declaration order (``backward(saved, prev, dstate, *params, hyper)``), a
reference as keyword arguments (``reference(xw, hu, prev, *params, eps=...,
gamma=...)``).  They need a derived backward.

``recurrent_weight=RecurrentWeight(forward, vjp)`` parametrises ``W_hh``: the
step uses ``forward(W, xp, **hyper)`` of the stored ``weight_hh`` ``W`` (e.g.
``W - W.T - gamma * xp.eye(H)``), computed once per call before the time
loop; after BPTT the gradient of that effective weight goes back through
``vjp(W, dW_eff, xp, **hyper)`` to the stored one (``xp``: NumPy or CuPy).

Stages with recurrent products
------------------------------
``products=(Product("m", gates=2),)`` lets the step apply a learnable matrix
between two element-wise stages: the forward takes a trailing ``matmul`` and
calls ``hm = matmul("m", value)``; kernrnn multiplies the row's values (H
units) by ``weight_hm [G_m*H, H]``, adds ``bias_hm [G_m*H]`` and hands the
next stage the G_m pre-activations of this unit.  kernrnn cuts the step at
each ``matmul`` into stages (the recurrent highway network's depth, the
multiplicative LSTM's ``W_hm (W_mx x * W_mh h)``); BPTT runs the products in
reverse.  Forward-only cells, no ``normalize``; the CPU's BLAS-per-step loop
and the CUDA GEMM-per-step path run them (one GEMM per product and step).

``recurrent_states=("h", "z")`` makes the dense recurrent product read
several state components side by side: ``weight_hh [Gr*H, 2*H]``, ``hu =
W_hh [h; z] + b_hh`` (coRNN's ``W y + 𝒲 z`` in one GEMM).

The raw input
-------------
``raw_input=True`` lets the step read its input x_t itself, element-wise: the
forward takes a trailing argument ``x``, a number (unit j reads ``x[t, b, j]``),
as SRU's highway ``h = r * c + (1 - r) * x``; its gradient is derived and the
layer adds it to the input's.  So every layer needs ``input_size ==
hidden_size`` (a :class:`CellError` otherwise).  Layers above the first read the
``D*H`` outputs of the layer below (``D*P`` with ``proj_size``): a stack of one
direction works, a bidirectional or projected stack is refused above layer 0.
``x`` is the layer's input after input dropout (the one ``W_ih`` reads), never
normalised by ``input_norm``.  The CPU's packed path and the CUDA persistent
kernel decline such cells: the BLAS-per-step and GEMM-per-step loops run them.
Trailing arguments (``norm``, ``x``, ``matmul``, hyperparameters) are bound by
name, in any order.

The reference
-------------
``reference`` is optional: without one, the float64 reference the tests and
:func:`kernrnn.testing.check_cell` compare the kernels with is the forward
itself, run on NumPy arrays (``Derived.reference`` of :mod:`kernrnn.autodiff`).  A
hand-written ``reference(xw, hu, prev, *params)`` on ``[B, H]`` float64 arrays
(no ``hu`` for ``recurrent="none"``; each parameter a tuple of ``[H]`` arrays;
with ``normalize`` also ``norm=``, a function ``norm(name, z)`` applying the
layer's normalisation; with ``raw_input`` also ``x=``, x_t as ``[B, H]``)
returning the new state tuple stays accepted, as an independent check of the
forward (written from the paper, say).

A hand-written backward
-----------------------
A cell that passes ``backward=`` keeps its own gradient instead of the derived
one, as ``jax.custom_vjp`` does: for a particular gradient, or a backward that
measures faster.  The presence of ``backward`` tells the two forms of
``forward`` apart: with it, ``forward(xw, hu, prev, *params)`` returns
``(new_state, saved)``, the new state and whatever scalars the backward
needs, and ``backward(saved, prev, dstate, *params)`` receives those saved
scalars, the previous state, the gradient arriving at this step's new state
and the parameters, and returns ``(dxw, dhu, dprev, *dparams)``: gradients of
the G input and recurrent pre-activations, the element-wise part of the
gradient of the previous state (the part that does not flow through
``W_hh``; the core adds ``dhu @ W_hh`` itself) and one tuple per parameter
with this element's contribution to its gradient (the core sums them over
time and batch, in a fixed order, without atomics).  Without ``hu``
(``recurrent="none"``) the backward returns no ``dhu``.  With ``normalize``
the step is written as two stages: ``forward(...) -> (z, mid)`` returns the
values to normalise and the values stage 2 needs, the core normalises each
``z[k]`` and calls ``forward2(zn, mid, prev, *params) -> (new_state, saved)``;
backward runs in reverse: ``backward2(saved, zn, mid, prev, dstate, *params)
-> (dzn, dmid, dprev, *dparams)``, the core's normalisation backward, then
``backward(mid, prev, dz, dmid, *params) -> (dxw, dhu, dprev, *dparams)``
(both ``dprev`` and ``dparams`` are added up).  With ``raw_input``, ``forward``
(stage 1) takes ``x`` last as a 1-tuple, ``backward`` (stage 1) returns its
gradient ``dx``, a 1-tuple, last, and a hand-written ``reference`` takes ``x=``
(a ``[B, H]`` array) by name.  These are also the functions
kernrnn generates for a forward-only cell (``cell.forward``, ``cell.backward``,
... are the generated ones then, and ``cell.step`` is the forward written).
:func:`kernrnn.testing.check_cell` compares a hand-written backward with the
derived one and names the first gradient on which they disagree.
"""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kernrnn import _cell_validate
from kernrnn._cell_validate import CellFacts
from kernrnn.errors import CellError, describe_source
from kernrnn.hooks import hookimpl
from kernrnn.scalar_math import NORM_EPS, cos, reference_norm, relu, sigmoid, sin, tan, tanh

__all__ = ["Cell", "CellError", "Param", "Hyper", "RecurrentWeight", "Norm", "Product", "hookimpl",
           "sigmoid", "tanh", "relu", "sin", "cos", "tan", "NORM_EPS", "RECURRENT_FORMS",
           "reference_norm"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _default_init(rng: np.random.Generator, name: str, shape: tuple, hidden_size: int):
    """PyTorch's default: every parameter uniform in +-1/sqrt(hidden_size)."""
    bound = 1.0 / math.sqrt(hidden_size)
    return rng.uniform(-bound, bound, size=shape)


#: The recurrence forms a cell can declare (see the module docstring).
RECURRENT_FORMS = ("dense", "heads", "none")
_NORM_KINDS = ("layer", "rms")
_NORM_OVER = ("gate", "row")


@dataclass(frozen=True)
class Param:
    """A learnable per-unit vector of a cell: ``blocks * H`` values.

    The math receives it as a tuple of ``blocks`` scalars per element (value
    ``k*H + j`` is entry ``k`` at unit ``j``); in ``state_dict()`` it is
    ``{name}_l{layer}``.  ``init`` is a number (every value) or a function
    ``init(rng, shape, hidden_size) -> array``; it is required, since no
    default suits every parameter.
    """

    name: str
    init: Callable | float | int | None = None
    blocks: int = 1
    description: str = ""


@dataclass(frozen=True)
class Hyper:
    """A hyperparameter of a cell: a constant chosen per layer, not learned.

    The forward takes it as a trailing argument called ``name`` (after the
    per-unit parameters and ``norm``, bound by name, in any order; it may
    leave out one it does not read); the layer sets it (``kernrnn.RNN(cell, I, H, name=value)`` or
    ``cell_args={name: value}``), else it is ``default``.  The type of
    ``default`` is the type a value must have: a float takes any finite
    number, an int an integer, a bool ``True``/``False``.  The kernels read
    every value as a number of their precision (a bool as 1.0 or 0.0), so
    changing a value never compiles anything; no gradient flows to it.
    """

    name: str
    default: float | int | bool
    description: str = ""

    @property
    def kind(self) -> type:
        """``float``, ``int`` or ``bool``: what a value of this hyperparameter must be."""
        return bool if isinstance(self.default, (bool, np.bool_)) else \
            int if isinstance(self.default, (int, np.integer)) else float

    def check(self, value, fail):
        """``value`` as this hyperparameter's type; ``fail(message)`` (raising) when it is not
        one (a string, a non-finite float, a float for an int, ...)."""
        kind = self.kind
        ok = False
        if kind is bool:
            ok = isinstance(value, (bool, np.bool_))
        elif not isinstance(value, (bool, np.bool_)):
            if kind is int:
                ok = isinstance(value, (int, np.integer))
            else:
                ok = isinstance(value, (int, float, np.integer, np.floating)) and \
                    math.isfinite(float(value))
        if not ok:
            want = {bool: "a bool", int: "an int", float: "a finite float"}[kind]
            fail(f"hyperparameter {self.name!r} must be {want} (default {self.default!r}), got "
                 f"{value!r} ({type(value).__name__})")
        return kind(value)


@dataclass(frozen=True)
class RecurrentWeight:
    """A parametrised recurrent weight: the step's ``W_hh`` is a function of the stored one.

    ``forward(W, xp, **hyper) -> W_eff``: the effective weight from the stored
    ``weight_hh`` ``W`` of one layer direction (its shape, e.g. ``[Gr*H, H]``;
    ``W_eff`` has the same shape and dtype), with ``xp`` the array module of the
    layer's device (NumPy, or CuPy on a GPU; under ``kernrnn.torch`` the same,
    on views of the tensors) and the cell's hyperparameters as keywords.
    ``vjp(W, dW_eff, xp, **hyper) -> dW``: its vector-Jacobian product, the
    gradient of the stored weight from that of the effective one.  Computed once
    per call, before the time loop; the gradient is chained after BPTT.
    :func:`kernrnn.testing.check_cell` checks ``vjp`` against finite differences
    of ``forward``.
    """

    forward: Callable
    vjp: Callable
    description: str = ""


#: Names a hyperparameter may not take: the arguments of the forward bound by position or
#: by name, names of the generated math, and the keyword arguments of the layers
#: (``kernrnn.RNN``, ``kernrnn.torch.Recurrent``, ``kernrnn.train.SequenceModel``), which take
#: hyperparameters as keywords too.
RESERVED_HYPER_NAMES = frozenset({
    "xw", "hu", "prev", "norm", "x", "hyper", "saved", "dstate", "zn", "mid", "dz", "dmid",
    "dgates", "math", "np", "sigmoid", "tanh", "relu", "sin", "cos", "cell", "input_size",
    "hidden_size", "num_layers", "bidirectional", "dtype", "device", "nonlinearity", "seed",
    "bias", "batch_first", "dropout", "recurrent_dropout", "input_dropout", "zoneout", "proj_size",
    "cell_args", "output_size", "vocab_size", "embedding_dim", "head"})


@dataclass(frozen=True)
class Product:
    """A recurrent product between two element-wise stages of a step (a staged cell).

    The forward calls ``hm = matmul(name, m)`` on a value ``m`` of the stage
    before; the core multiplies the row's ``m`` (its H units) by the learnable
    ``weight_h{name}`` ``[G_m*H, H]``, adds ``bias_h{name}`` ``[G_m*H]`` and hands
    the next stage ``hm``, this unit's ``G_m`` pre-activations (gate ``k`` of unit
    ``j`` is row ``k*H + j``).  ``gates``: G_m, a number or a string of labels.
    """

    name: str
    gates: int | str = 1
    description: str = ""

    @property
    def n_gates(self) -> int:
        """G_m, the pre-activations per unit (rows of ``weight_h{name}`` are ``G_m*H``)."""
        return self.gates if isinstance(self.gates, int) else len(self.gates)


@dataclass(frozen=True)
class Norm:
    """A normalisation the core runs inside the kernels.

    ``kind``: ``"layer"`` ((v - mean) / sqrt(var + eps)) or ``"rms"``
    (v / sqrt(mean(v^2) + eps)); ``over``: ``"gate"`` normalises each gate
    block of H units separately, ``"row"`` all values of the row together (as
    haste's LayerNormLSTM does for ``W x`` and ``R h``).
    """

    kind: str = "layer"
    over: str = "gate"


def _as_norm(value, what: str, fail) -> Norm | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = Norm(value)
    if not isinstance(value, Norm):
        fail(f"{what} must be None, 'layer', 'rms' or a kernrnn.cell.Norm, got {value!r}")
    if value.kind not in _NORM_KINDS:
        fail(f"{what}.kind must be one of {_NORM_KINDS}, got {value.kind!r}")
    if value.over not in _NORM_OVER:
        fail(f"{what}.over must be one of {_NORM_OVER}, got {value.over!r}")
    return value


@dataclass(frozen=True, eq=False)
class Cell:
    """One recurrent cell type, defined once for every backend.

    Parameters
    ----------
    name:
        Registry name (lower case, digits, underscores), e.g. ``"lstm"``.
    gates:
        Gate labels in the order of the weight rows (``"ifgo"`` for the LSTM),
        or the number of gate blocks G.  ``weight_ih`` is ``[G*H, input_size]``.
    forward:
        The per-element step returning the new state tuple; kernrnn derives
        its backward (see the module docstring).  After construction this
        attribute holds the generated forward of the contract (returning
        ``(new_state, saved)``), and :attr:`step` the function given.
    backward:
        Optional: a hand-written backward; then ``forward`` returns
        ``(new_state, saved)`` (see "A hand-written backward" in the module
        docstring).
    reference:
        Optional: an independent float64 NumPy step on ``[B, H]`` arrays
        returning the new state tuple (default: the forward run on arrays).
    state:
        Names of the state components; the first is the output ``h``.
    init:
        ``init(rng, name, shape, hidden_size) -> array`` for the matrices and
        biases (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``);
        PyTorch's uniform default when omitted.
    description:
        One line shown by ``kernrnn cells``.
    params:
        Per-unit learnable vectors (:class:`Param`), passed to the math in this
        order after ``prev``.
    recurrent:
        ``"dense"``, ``"heads"`` or ``"none"`` (see the module docstring).
    heads:
        Number of heads for ``recurrent="heads"`` (must divide the hidden size).
    recurrent_gates:
        Labels of the gates with a recurrent part (default: all gates).
    input_norm, recurrent_norm:
        None, ``"layer"``, ``"rms"`` or a :class:`Norm`.
    normalize, normalize_kind:
        Names of the values the step normalises over the hidden units (the
        forward calls ``norm(name, value)``), and how (``"layer"`` or ``"rms"``).
    forward2, backward2:
        Only with a hand-written backward and ``normalize``: the second stage.
    linear:
        The step is linear in the state (``new = a * prev + b``, element-wise
        per state component); checked on samples.
    state_sampler:
        ``state_sampler(rng, shape) -> tuple of S arrays``: initial states the
        cell is defined for, drawn by the tests and conformance checks
        (default: every component uniform in [-1, 1]).  For states with a
        restricted domain, such as sLSTM's positive normaliser.
    hyper:
        Hyperparameters (:class:`Hyper`), or a dict ``{name: default}``: constants
        set per layer, read by the forward as trailing arguments of those names
        (see "Hyperparameters" in the module docstring).  Needs a derived backward.
    recurrent_weight:
        A :class:`RecurrentWeight`: the step's ``W_hh`` is a function of the stored
        ``weight_hh`` (such as ``W - W^T - gamma I``); needs a recurrent product.
    raw_input:
        The step reads its raw input ``x_t`` element-wise (unit j reads
        ``x[t, b, j]``): the forward takes a trailing argument ``x``.  Needs
        ``input_size == hidden_size`` in every layer (see "The raw input" in the
        module docstring).
    recurrent_states:
        Names of the state components the recurrent product reads, side by side
        (default: ``("h",)``, the first).  ``("h", "z")`` gives ``weight_hh
        [Gr*H, 2*H]`` and ``hu = W_hh [h; z] + b_hh`` (coRNN's ``W y + 𝒲 z``);
        dense recurrence only.
    products:
        Recurrent products between stages of the step (:class:`Product`); the
        forward takes ``matmul`` last and calls ``matmul(name, value)`` (see the
        module docstring).  Forward-only cells, no ``normalize``.
    """

    name: str
    gates: str | int
    forward: Callable
    backward: Callable | None = None
    reference: Callable | None = None
    state: tuple[str, ...] = ("h",)
    init: Callable | None = None
    description: str = ""
    params: tuple[Param, ...] = ()
    recurrent: str = "dense"
    heads: int | None = None
    recurrent_gates: str | None = None
    input_norm: Norm | str | None = None
    recurrent_norm: Norm | str | None = None
    normalize: tuple[str, ...] = ()
    normalize_kind: str = "layer"
    forward2: Callable | None = None
    backward2: Callable | None = None
    linear: bool = False
    state_sampler: Callable | None = None
    hyper: tuple[Hyper, ...] | dict = ()
    recurrent_weight: RecurrentWeight | None = None
    raw_input: bool = False
    recurrent_states: tuple[str, ...] | None = None
    products: tuple[Product, ...] = ()
    #: K, the values forward saves for backward (known once the constructor ran the math).
    n_saved: int = field(init=False, default=-1)
    #: NM, the values stage 1 of a two-stage step passes to stage 2 (0 without ``normalize``).
    n_mid: int = field(init=False, default=0)
    #: Per gate, whether the input and recurrent pre-activations get one and the same
    #: gradient (``dxw[k] == dhu[k]`` by construction); empty without ``hu``.  A fact of the
    #: derivation (the gate enters the step only as ``xw[k] + hu[k]``), or for a hand-written
    #: backward, read from its ``return`` (one expression for both).
    same_grads: tuple[bool, ...] = field(init=False, default=())
    #: The forward-only step the cell was defined with (None with a hand-written backward).
    step: Callable | None = field(init=False, default=None)
    _derivation: object = field(init=False, default=None, repr=False)

    # -- sizes -------------------------------------------------------------------

    @property
    def n_gates(self) -> int:
        """G, the number of gate blocks (rows of ``weight_ih`` are ``G*H``)."""
        return self.gates if isinstance(self.gates, int) else len(self.gates)

    @property
    def n_state(self) -> int:
        """S, the number of state components (1 for ``(h,)``, 2 for ``(h, c)``)."""
        return len(self.state)

    @property
    def gate_labels(self) -> str:
        """One character per gate block (``?`` when ``gates`` was given as a number)."""
        return self.gates if isinstance(self.gates, str) else "?" * self.gates

    @property
    def has_recurrent(self) -> bool:
        """True unless ``recurrent="none"`` (then there is no ``hu`` and no ``W_hh``)."""
        return self.recurrent != "none"

    @property
    def recurrent_gate_indices(self) -> tuple[int, ...]:
        """Indices of the gates with a recurrent part (rows of ``weight_hh``, in order)."""
        if not self.has_recurrent:
            return ()
        if self.recurrent_gates is None:
            return tuple(range(self.n_gates))
        return tuple(self.gate_labels.index(c) for c in self.recurrent_gates)

    @property
    def recurrent_state_indices(self) -> tuple[int, ...]:
        """Indices of the state components the recurrent product reads, in order
        (``(0,)``: h alone, the default)."""
        if self.recurrent_states is None:
            return (0,)
        return tuple(self.state.index(v) for v in self.recurrent_states)

    @property
    def n_recurrent_states(self) -> int:
        """R, the state components side by side in the recurrent product's input
        (``weight_hh`` is ``[Gr*H, R*H]``)."""
        return len(self.recurrent_state_indices)

    @property
    def reads_h_only(self) -> bool:
        """True when the recurrent product reads ``h`` alone (the default ``recurrent_states``)."""
        return self.recurrent_state_indices == (0,)

    @property
    def n_recurrent_gates(self) -> int:
        """Gr, the number of gate blocks with a recurrent part."""
        return len(self.recurrent_gate_indices)

    @property
    def n_param_scalars(self) -> int:
        """Scalars of per-unit parameters per element (the sum of their ``blocks``)."""
        return sum(p.blocks for p in self.params)

    @property
    def staged(self) -> bool:
        """True for a step cut into stages by recurrent products (``products``)."""
        return bool(self.products)

    @property
    def n_stages(self) -> int:
        """The number K of element-wise stages of the step (1, or 2 with ``normalize``, or one
        more than the boundaries of recurrent products, known once the math was derived)."""
        if self.staged:
            return self._derivation.n_stages
        return 2 if self.normalize else 1

    @property
    def stage_boundaries(self) -> tuple:
        """Per boundary of a staged step, its products ``((name, G_m), ...)`` in declaration
        order, and the number of values stage s passes to stage s + 1: ``((products,
        n_mid), ...)``; empty for other cells."""
        if not self.staged:
            return ()
        d = self._derivation
        return tuple((b, len(m)) for b, m in zip(d.boundaries, d.stage_mids))

    def math_function(self, which: str):
        """The scalar function ``which`` of :meth:`math_signatures` (``forward``,
        ``forward3``, ``backward2``, ...): an attribute, or for a step of more than two
        stages one of the derivation's."""
        if self.staged:
            return self._derivation.functions[which]
        return getattr(self, which)

    @property
    def n_norm(self) -> int:
        """Number of values normalised in the middle of the step (``len(normalize)``)."""
        return len(self.normalize)

    @property
    def n_hyper(self) -> int:
        """Number of hyperparameters (:class:`Hyper`)."""
        return len(self.hyper)

    @property
    def n_unit_scalars(self) -> int:
        """Values per unit in the kernels' per-unit vector (the per-unit parameters'
        scalars, then each hyperparameter, repeated over the H units)."""
        return self.n_param_scalars + self.n_hyper

    def hyper_values(self, given=None) -> dict:
        """``{name: value}`` of every hyperparameter: ``given`` (a mapping) checked, the
        defaults for the rest.  Raises :class:`CellError` for an unknown name or a value of
        the wrong type, naming the cell, its source, what it declares and what was given."""
        given = {} if given is None else dict(given)
        declared = {h.name: h for h in self.hyper}
        unknown = [k for k in given if k not in declared]
        if unknown:
            have = ", ".join(f"{h.name}={h.default!r}" for h in self.hyper) or "none"
            self._fail(f"unknown hyperparameter{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(map(repr, unknown))}; the cell declares: {have}")
        return {h.name: h.check(given[h.name], self._fail) if h.name in given else h.default
                for h in self.hyper}

    def hyper_vector(self, values=None) -> tuple:
        """The hyperparameters as the kernels read them: floats in declaration order
        (``values`` from :meth:`hyper_values`; None: the defaults)."""
        values = self.hyper_values(values)
        return tuple(float(values[h.name]) for h in self.hyper)

    def effective_weight_hh(self, W, xp, values=None):
        """The ``W_hh`` the step uses: ``recurrent_weight.forward(W, xp, **hyper)`` of the
        stored ``W`` (``W`` itself without a :class:`RecurrentWeight`); ``values``: the
        hyperparameters (:meth:`hyper_values`; None: the defaults).  Raises
        :class:`CellError` when the result's shape or dtype is not ``W``'s."""
        if self.recurrent_weight is None:
            return W
        out = self.recurrent_weight.forward(W, xp, **self.hyper_values(values))
        self._check_weight(out, W, "recurrent_weight.forward")
        return out

    def weight_hh_vjp(self, W, dW_eff, xp, values=None):
        """The gradient of the stored ``W`` from that of :meth:`effective_weight_hh`
        (``recurrent_weight.vjp``; ``dW_eff`` itself without a :class:`RecurrentWeight`)."""
        if self.recurrent_weight is None:
            return dW_eff
        out = self.recurrent_weight.vjp(W, dW_eff, xp, **self.hyper_values(values))
        self._check_weight(out, W, "recurrent_weight.vjp")
        return out

    def _check_weight(self, out, W, what: str) -> None:
        shape, dtype = tuple(getattr(out, "shape", ())), getattr(out, "dtype", None)
        if shape != tuple(W.shape) or dtype != W.dtype:
            self._fail(f"{what} must return an array of the stored weight_hh's shape and "
                       f"dtype, {list(W.shape)} {W.dtype}, got {type(out).__name__} "
                       f"{list(shape)} {dtype}")

    def hyper_args(self, values=None) -> tuple:
        """The trailing argument of the cell's math for hyperparameter ``values`` (a tuple of
        floats as :meth:`hyper_vector` gives, or None for the defaults): ``(values,)``, or
        ``()`` for a cell without hyperparameters."""
        if not self.hyper:
            return ()
        return (tuple(values) if values is not None else self.hyper_vector(),)

    @property
    def plain(self) -> bool:
        """True for a dense recurrence over all gates and nothing else (no per-unit
        parameters, no normalisation, no hyperparameters, no raw input): an Elman RNN, LSTM
        or GRU-like cell.

        The persistent CUDA kernel runs only these.
        """
        return self.plain_layout and not self.hyper

    @property
    def plain_layout(self) -> bool:
        """:attr:`plain`, hyperparameters aside: a dense recurrence over all gates, no
        per-unit parameters, no normalisation (the arrays' layouts are a plain cell's)."""
        return (self.recurrent == "dense" and self.recurrent_gates is None and not self.params
                and self.input_norm is None and self.recurrent_norm is None
                and not self.normalize and not self.raw_input and self.reads_h_only
                and not self.products)

    @property
    def derived_backward(self) -> bool:
        """True when kernrnn derived the backward from the forward (no hand-written one)."""
        return self.step is not None

    def derivation(self):
        """The :class:`kernrnn.autodiff.Derived` math of this cell's forward step.

        For a forward-only cell, the functions it runs (with the names of the saved
        values and the generated source); for a hand-written backward, what kernrnn
        would derive instead (read from the hand-written forward, see
        :func:`kernrnn.autodiff.derive_hand_written`).  Raises :class:`CellError` when
        the forward is outside what the differentiator reads.
        """
        if self._derivation is None:
            from kernrnn.autodiff import derive_hand_written

            self._set({"_derivation": derive_hand_written(self)})
        return self._derivation

    @property
    def n_heads(self) -> int:
        """Heads of the recurrent product (``heads`` for ``"heads"``, else 1)."""
        return self.heads if self.recurrent == "heads" else 1

    def check_hidden_size(self, hidden_size: int) -> None:
        """Raise :class:`CellError` if this cell cannot run with ``hidden_size`` units."""
        if self.recurrent == "heads" and hidden_size % self.heads:
            raise CellError(
                f"cell {self.name!r}{describe_source(self)}: heads={self.heads} must divide the "
                f"hidden size, got hidden_size={hidden_size}"
            )

    def check_projection(self) -> None:
        """Raise :class:`CellError` unless the layer may project this cell's output (LSTMP).

        ``proj_size`` replaces the state ``h`` the recurrence and the output
        read by ``W_hr h``.  That is only the same cell if its step reads
        ``h_{t-1}`` through ``W_hh`` alone (the LSTM: yes; the GRU mixes
        ``h_{t-1}`` in element-wise: no).  Checked on sample values with the
        cell's reference step; the recurrence must be ``"dense"`` and the
        state have a second component to carry the step.
        """
        _cell_validate.check_projection(self)

    def check_input_size(self, input_size: int, hidden_size: int, where: str = "") -> None:
        """Raise :class:`CellError` unless a layer with ``input_size`` inputs may run this cell.

        A cell with ``raw_input`` reads ``x[t, b, j]`` at unit j, so it needs
        ``input_size == hidden_size``; ``where`` (e.g. ``" at layer 1"``, with why
        that layer has that many inputs) goes into the message.
        """
        if self.raw_input and input_size != hidden_size:
            raise CellError(
                f"cell {self.name!r}{describe_source(self)}: raw_input=True reads x_t "
                f"element-wise (unit j reads x[t, b, j]), so a layer needs input_size == "
                f"hidden_size: expected input_size={hidden_size}, got {input_size}{where}")

    # -- parameters --------------------------------------------------------------

    def param_shapes(self, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        """Every learnable array of one layer direction: name (no suffix) -> shape.

        PyTorch's four first (``weight_hh``/``bias_hh`` only with a recurrent
        product), then the per-unit parameters, then the normalisation gains
        and biases.  Raises :class:`CellError` for a size the cell cannot run
        (:meth:`check_hidden_size`, :meth:`check_input_size`).
        """
        self.check_hidden_size(hidden_size)
        self.check_input_size(input_size, hidden_size)
        G, H, Gr = self.n_gates, hidden_size, self.n_recurrent_gates
        shapes = {"weight_ih": (G * H, input_size)}
        if self.recurrent == "dense":
            shapes["weight_hh"] = (Gr * H, self.n_recurrent_states * H)
        elif self.recurrent == "heads":
            dh = H // self.heads
            shapes["weight_hh"] = (self.heads, Gr * dh, dh)
        shapes["bias_ih"] = (G * H,)
        if self.has_recurrent:
            shapes["bias_hh"] = (Gr * H,)
        for prod in self.products:
            shapes[f"weight_h{prod.name}"] = (prod.n_gates * H, H)
            shapes[f"bias_h{prod.name}"] = (prod.n_gates * H,)
        for p in self.params:
            shapes[p.name] = (p.blocks * H,)
        if self.input_norm is not None:
            shapes["norm_ih_weight"] = (G * H,)
        if self.recurrent_norm is not None:
            shapes["norm_hh_weight"] = (Gr * H,)
        for v in self.normalize:
            shapes[f"norm_{v}_weight"] = (H,)
            shapes[f"norm_{v}_bias"] = (H,)
        return shapes

    def init_params(self, rng, name: str, shape: tuple, hidden_size: int) -> np.ndarray:
        """Initial float64 values of parameter ``name`` (``weight_ih``, ...), shape checked."""
        declared = {p.name: p for p in self.params}
        if name in declared:
            init = declared[name].init
            if callable(init):
                arr = np.asarray(init(rng, tuple(shape), hidden_size), dtype=np.float64)
            else:
                arr = np.full(shape, float(init))
        elif name.startswith("norm_"):
            arr = np.zeros(shape) if name.endswith("_bias") else np.ones(shape)
        else:
            fn = self.init or _default_init
            arr = np.asarray(fn(rng, name, shape, hidden_size), dtype=np.float64)
        if arr.shape != tuple(shape):
            raise CellError(
                f"cell {self.name!r}{describe_source(self)}: init returned shape {arr.shape} for "
                f"{name}, expected {tuple(shape)} (hidden_size={hidden_size})"
            )
        return arr

    # -- how the math is called (shared by validation, codegen and the reference) ---

    def forward_args(self, xw, hu, prev, params, x=None, hyper=None) -> tuple:
        """Arguments of ``forward`` in order (``hu`` dropped without a recurrent product;
        then the hyperparameters' tuple, see :meth:`hyper_args`; ``x``, the raw input as a
        1-tuple, last with ``raw_input``)."""
        head = (xw, hu, prev) if self.has_recurrent else (xw, prev)
        return head + tuple(params) + self.hyper_args(hyper) + ((x,) if self.raw_input else ())

    def split_backward(self, out) -> tuple:
        """``(dxw, dhu, dprev, dparams)`` from what ``backward`` returned (dhu None for "none";
        the raw input's gradient, last with ``raw_input``, is :meth:`raw_input_grad`'s)."""
        end = len(out) - (1 if self.raw_input else 0)
        if self.has_recurrent:
            return out[0], out[1], out[2], tuple(out[3:end])
        return out[0], None, out[1], tuple(out[2:end])

    def raw_input_grad(self, out):
        """The raw input's gradient ``dx`` (a 1-tuple) from what ``backward`` returned, or
        None without ``raw_input``."""
        return out[-1] if self.raw_input else None

    @property
    def n_input_blocks(self) -> int:
        """Blocks of H values per element in the kernels' ``XW``: G, plus one holding the raw
        input x itself (no weights, no bias) with ``raw_input``."""
        return self.n_gates + (1 if self.raw_input else 0)

    def math_signatures(self) -> list[tuple[str, list[int], list[int]]]:
        """Each function of the math: ``(attribute, tuple sizes of its arguments, of its results)``.

        The one description of the calling convention, used to compile and
        check the math (:mod:`kernrnn.scalar`) and to generate the kernels
        (:mod:`kernrnn.backends.codegen`).
        """
        G, S, K, NZ, NM = self.n_gates, self.n_state, self.n_saved, self.n_norm, self.n_mid
        P = [p.blocks for p in self.params] + ([self.n_hyper] if self.hyper else [])
        dP = [p.blocks for p in self.params]
        rec = [G] if self.has_recurrent else []
        raw = [1] if self.raw_input else []
        grads = [G] + rec + [S] + dP + raw
        if self.staged:
            return self._staged_signatures(G, S, K, P, dP, rec, grads)
        if not self.normalize:
            return [("forward", [G] + rec + [S] + P + raw, [S, K]),
                    ("backward", [K, S, S] + P, grads)]
        return [("forward", [G] + rec + [S] + P + raw, [NZ, NM]),
                ("forward2", [NZ, NM, S] + P, [S, K]),
                ("backward2", [K, NZ, NM, S, S] + P, [NZ, NM, S] + dP),
                ("backward", [NM, S, NZ, NM] + P, grads)]

    def _staged_signatures(self, G, S, K, P, dP, rec, grads) -> list:
        """:meth:`math_signatures` of a step of K stages (see
        ``kernrnn.autodiff.reverse.plan_stages``)."""
        bounds = self.stage_boundaries
        nz = [len(b) for b, _ in bounds]  # operands of boundary s
        nzin = [sum(g for _, g in b) for b, _ in bounds]  # pre-activations it hands on
        nm = [m for _, m in bounds]
        n = len(bounds) + 1
        fwd = [("forward", [G] + rec + [S] + P, [nz[0], nm[0]])]
        bwd = [("backward", [nm[0], S, nz[0], nm[0]] + P, grads)]
        for s in range(1, n):
            last = s == n - 1
            fwd.append((f"forward{s + 1}", [nzin[s - 1], nm[s - 1], S] + P,
                        [S, K] if last else [nz[s], nm[s]]))
            args = ([K, nzin[s - 1], nm[s - 1], S, S] if last else
                    [nm[s], nzin[s - 1], nm[s - 1], S, nz[s], nm[s]])
            bwd.append((f"backward{s + 1}", args + P, [nzin[s - 1], nm[s - 1], S] + dP))
        return fwd + bwd[::-1]

    def sample_states(self, rng, shape) -> tuple:
        """Initial states for tests: ``state_sampler`` or uniform in [-1, 1], float64."""
        if self.state_sampler is None:
            return tuple(rng.uniform(-1, 1, shape) for _ in range(self.n_state))
        out = tuple(np.asarray(v, dtype=np.float64) for v in self.state_sampler(rng, shape))
        if len(out) != self.n_state or any(v.shape != tuple(shape) for v in out):
            raise CellError(f"cell {self.name!r}{describe_source(self)}: state_sampler must return "
                            f"{self.n_state} arrays of shape {tuple(shape)}, got "
                            f"{[getattr(v, 'shape', v) for v in out]}")
        return out

    def __post_init__(self):
        # The one place a Cell is written to, before the constructor returns (the
        # dataclasses way for a frozen class): the canonical spellings of the declaration
        # ("layer" -> Norm("layer"), "c" -> ("c",)), the math derived from a forward-only
        # step, then the sizes only the math reveals.  validate() reads and never
        # writes, so the registry may run it again.
        canonical = {}
        for name in ("input_norm", "recurrent_norm"):
            if isinstance(getattr(self, name), str):
                canonical[name] = Norm(getattr(self, name))
        if isinstance(self.normalize, str):
            canonical["normalize"] = (self.normalize,)
        if isinstance(self.hyper, dict):
            canonical["hyper"] = tuple(Hyper(k, v) for k, v in self.hyper.items())
        elif isinstance(self.hyper, list):
            canonical["hyper"] = tuple(self.hyper)
        if isinstance(self.recurrent_states, str):
            canonical["recurrent_states"] = (self.recurrent_states,)
        self._set(canonical)
        self._set(self._math())
        facts = self.validate()
        self._set({"n_saved": facts.n_saved, "n_mid": facts.n_mid,
                   "same_grads": facts.same_grads})

    def _set(self, values: dict) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _fail(self, msg: str):
        raise CellError(f"cell {self.name!r}{describe_source(self)}: {msg}")

    def _math(self) -> dict:
        """The functions the cell runs: derived from a forward-only step, or hand-written.

        Functions kernrnn generated (they carry ``kernrnn_step``) given back to the
        constructor, by ``dataclasses.replace`` or unpickling, are derived again from
        their step, so a changed declaration (sizes, ``normalize``) takes effect.
        """
        from kernrnn.autodiff import derive_for_cell, derive_hand_written

        def generated(fn):
            return getattr(fn, "kernrnn_step", None) is not None

        forward, backward = self.forward, self.backward
        if generated(backward) or (backward is None and generated(forward)):
            # kernrnn's own math given back: derive again, from the forward given (a new
            # step replacing the old one) or from the step the generated forward came from
            self._set({"forward": forward.kernrnn_step if generated(forward) else forward,
                       "backward": None})
            for name in ("forward2", "backward2"):
                if generated(getattr(self, name)):
                    self._set({name: None})
        if generated(self.reference):
            self._set({"reference": None})
        self._validate_declaration(self._fail, derived=self.backward is None)
        if self.backward is not None:
            if self.reference is not None:
                return {}
            try:
                d = derive_hand_written(self)
            except CellError as exc:
                self._fail(f"no reference given, and none can be derived from the forward (give "
                           f"reference=...): {exc}")
            return {"reference": d.reference, "_derivation": d}
        d = derive_for_cell(self, self.forward)
        return {"step": self.forward, "forward": d.forward, "backward": d.backward,
                "forward2": d.forward2, "backward2": d.backward2,
                "reference": self.reference or d.reference, "_derivation": d}

    def __reduce__(self):
        """Pickle the declaration: a forward-only cell is derived again when unpickled
        (generated functions live only in the process that derived them)."""
        from dataclasses import fields

        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if self.step is not None:
            kwargs.update(forward=self.step, backward=None, forward2=None, backward2=None)
        if getattr(kwargs["reference"], "kernrnn_step", None) is not None:
            kwargs["reference"] = None
        return _unpickle_cell, (type(self), kwargs)

    # -- validation --------------------------------------------------------------

    def validate(self) -> CellFacts:
        """Check the definition, then run its math on sample values.

        Raises :class:`CellError` saying what is wrong; returns the facts the
        math revealed (a frozen ``CellFacts`` with ``n_saved``, ``n_mid`` and
        ``same_grads``) and changes nothing.  Runs in plain Python (no compilation),
        so registering cells stays cheap; compilation problems surface, with the
        cell's source named, when its kernels are first built.
        """
        fail = self._fail
        self._validate_declaration(fail, derived=self.derived_backward)
        for attr in ("forward", "backward", "reference"):
            if not callable(getattr(self, attr)):
                fail(f"{attr} must be a function, got {getattr(self, attr)!r}")
        facts = _cell_validate.sample_math(self, fail)
        if not self.has_recurrent:
            same = ()
        elif self.derived_backward:
            same = tuple(self._derivation.same_grads)
        else:
            same = _cell_validate.shared_gradients(self)
        return CellFacts(facts.n_saved, facts.n_mid, same)

    def _validate_declaration(self, fail, derived: bool) -> None:
        """Everything but the math: names, sizes, forms (``derived``: no hand-written
        backward, so no ``forward2``/``backward2`` of the author's)."""
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise CellError(
                f"cell name must be lower case letters, digits and '_' starting with a "
                f"letter, got {self.name!r}"
            )
        if isinstance(self.gates, bool) or not isinstance(self.gates, (int, str)):
            fail(f"gates must be a string of gate labels or an int, got {self.gates!r}")
        if self.n_gates < 1:
            fail(f"needs at least one gate, got gates={self.gates!r}")
        if isinstance(self.gates, str) and len(set(self.gates)) != len(self.gates):
            fail(f"gate labels must be distinct, got {self.gates!r}")
        if (
            not isinstance(self.state, tuple)
            or not self.state
            or self.state[0] != "h"
            or len(set(self.state)) != len(self.state)
        ):
            fail(f"state must be a tuple of distinct names starting with 'h', got {self.state!r}")
        if not callable(self.forward):
            fail(f"forward must be a function, got {self.forward!r}")
        for attr in ("backward", "reference"):
            if getattr(self, attr) is not None and not callable(getattr(self, attr)):
                fail(f"{attr} must be a function or None, got {getattr(self, attr)!r}")
        if self.init is not None and not callable(self.init):
            fail(f"init must be a function or None, got {self.init!r}")
        if self.state_sampler is not None and not callable(self.state_sampler):
            fail(f"state_sampler must be a function or None, got {self.state_sampler!r}")
        self._validate_forms(fail, derived)

    def _validate_forms(self, fail, derived: bool) -> None:
        if self.recurrent not in RECURRENT_FORMS:
            fail(f"recurrent must be one of {RECURRENT_FORMS}, got {self.recurrent!r}")
        if self.recurrent == "heads":
            if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1:
                fail(f"recurrent='heads' needs heads=<int >= 1>, got heads={self.heads!r}")
        elif self.heads is not None:
            fail(f"heads={self.heads!r} is only meaningful with recurrent='heads', "
                 f"got recurrent={self.recurrent!r}")
        if self.recurrent_gates is not None:
            if not self.has_recurrent:
                fail("recurrent_gates needs a recurrent product, got recurrent='none'")
            if not isinstance(self.recurrent_gates, str) or not isinstance(self.gates, str):
                fail(f"recurrent_gates must be a string of gate labels (with gates given as "
                     f"labels), got recurrent_gates={self.recurrent_gates!r}, "
                     f"gates={self.gates!r}")
            bad = [c for c in self.recurrent_gates if c not in self.gates]
            if bad or not self.recurrent_gates or len(set(self.recurrent_gates)) != len(
                    self.recurrent_gates):
                fail(f"recurrent_gates must be distinct labels out of gates={self.gates!r}, "
                     f"got {self.recurrent_gates!r}")
            order = [self.gates.index(c) for c in self.recurrent_gates]
            if order != sorted(order):
                fail(f"recurrent_gates must keep the order of gates={self.gates!r}, got "
                     f"{self.recurrent_gates!r}")
        self._validate_recurrent_states(fail)
        self._validate_products(fail, derived)
        if not isinstance(self.params, tuple) or not all(isinstance(p, Param)
                                                           for p in self.params):
            fail(f"params must be a tuple of kernrnn.cell.Param, got {self.params!r}")
        reserved = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
        names = [p.name for p in self.params]
        for p in self.params:
            if not isinstance(p.name, str) or not _NAME_RE.match(p.name) or p.name in reserved \
                    or p.name.startswith("norm_"):
                fail(f"parameter name must be lower case letters, digits and '_' (not "
                     f"{sorted(reserved)} or 'norm_*'), got {p.name!r}")
            if isinstance(p.blocks, bool) or not isinstance(p.blocks, int) or p.blocks < 1:
                fail(f"parameter {p.name!r}: blocks must be an int >= 1 (its size is "
                     f"blocks*H), got blocks={p.blocks!r}")
            if p.init is None:
                fail(f"parameter {p.name!r} has no initialiser: give init=<number> or "
                     f"init=<function(rng, shape, hidden_size)>")
            if not (callable(p.init) or isinstance(p.init, (int, float))) or isinstance(
                    p.init, bool):
                fail(f"parameter {p.name!r}: init must be a number or a function, got "
                     f"{p.init!r}")
            if callable(p.init):
                try:
                    v = np.asarray(p.init(np.random.default_rng(0), (p.blocks * 3,), 3))
                except Exception as exc:
                    fail(f"parameter {p.name!r}: init failed on shape ({p.blocks * 3},): "
                         f"{type(exc).__name__}: {exc}")
                if v.shape != (p.blocks * 3,):
                    fail(f"parameter {p.name!r} must have blocks*H = {p.blocks * 3} values "
                         f"for H=3, its init returned shape {v.shape}")
        if len(set(names)) != len(names):
            fail(f"parameter names must be distinct, got {names}")
        _as_norm(self.input_norm, "input_norm", fail)
        _as_norm(self.recurrent_norm, "recurrent_norm", fail)
        if self.recurrent_norm is not None and not self.has_recurrent:
            fail("recurrent_norm needs a recurrent product, got recurrent='none'")
        if not isinstance(self.normalize, tuple) or not all(
                isinstance(v, str) and _NAME_RE.match(v) for v in self.normalize):
            fail(f"normalize must be a tuple of value names, got {self.normalize!r}")
        if self.normalize_kind not in _NORM_KINDS:
            fail(f"normalize_kind must be one of {_NORM_KINDS}, got {self.normalize_kind!r}")
        if derived:
            if self.step is None and (self.forward2 is not None or self.backward2 is not None):
                fail("forward2/backward2 come with a hand-written backward (the two-stage "
                     "contract); a forward-only cell calls norm(name, value) in its forward "
                     "instead")
        elif self.normalize and not (callable(self.forward2) and callable(self.backward2)):
            fail(f"normalize={self.normalize!r} with a hand-written backward needs forward2 and "
                 f"backward2 (the second stage of the step), got forward2={self.forward2!r}, "
                 f"backward2={self.backward2!r}; or leave out backward and call "
                 f"norm({self.normalize[0]!r}, value) in the forward")
        elif not self.normalize and (self.forward2 is not None or self.backward2 is not None):
            fail("forward2/backward2 are only used with normalize=(...) (a two-stage step)")
        self._validate_hyper(fail, derived)
        self._validate_recurrent_weight(fail)
        if not isinstance(self.raw_input, bool):
            fail(f"raw_input must be True or False, got {self.raw_input!r}")
        if self.raw_input and (self.products or not self.reads_h_only):
            fail(f"raw_input runs on steps of one stage whose recurrent product reads h alone; "
                 f"expected no products and recurrent_states=('h',), got products="
                 f"{tuple(p.name for p in self.products)!r}, recurrent_states="
                 f"{self.recurrent_states!r}")
        if self.linear and (self.has_recurrent or self.normalize):
            fail(f"linear=True needs recurrent='none' and no normalize (the step must be "
                 f"new = a*prev + b with a, b from the input), got recurrent="
                 f"{self.recurrent!r}")


    def _validate_hyper(self, fail, derived: bool) -> None:
        if not isinstance(self.hyper, tuple) or not all(isinstance(h, Hyper) for h in self.hyper):
            fail(f"hyper must be a dict {{name: default}} or a tuple of kernrnn.cell.Hyper, got "
                 f"{self.hyper!r}")
        names = [h.name for h in self.hyper]
        for h in self.hyper:
            if not isinstance(h.name, str) or not _NAME_RE.match(h.name) or \
                    h.name in RESERVED_HYPER_NAMES or keyword.iskeyword(h.name):
                fail(f"hyperparameter name must be lower case letters, digits and '_', and not "
                     f"an argument of the forward or a keyword of the layers "
                     f"({sorted(RESERVED_HYPER_NAMES)}), got {h.name!r}")
            if not isinstance(h.default, (bool, int, float, np.bool_, np.integer, np.floating)) \
                    or not math.isfinite(float(h.default)):
                fail(f"hyperparameter {h.name!r}: the default must be a finite float, an int or "
                     f"a bool (its type is the type of the values), got {h.default!r}")
        if len(set(names)) != len(names):
            fail(f"hyperparameter names must be distinct, got {names}")
        if self.hyper and not derived:
            fail(f"hyperparameters {names} need a derived backward (leave out backward=..., the "
                 f"forward takes them as trailing arguments by name), got a hand-written one")


    def _validate_recurrent_weight(self, fail) -> None:
        rw = self.recurrent_weight
        if rw is None:
            return
        if not isinstance(rw, RecurrentWeight) or not callable(rw.forward) or \
                not callable(rw.vjp):
            fail(f"recurrent_weight must be a kernrnn.cell.RecurrentWeight(forward, vjp) of two "
                 f"functions, got {rw!r}")
        if not self.has_recurrent:
            fail("recurrent_weight parametrises W_hh: it needs a recurrent product, got "
                 "recurrent='none'")
        # both functions on a sample weight (H = 3 units, or one per head), in float64 NumPy
        shape = self.param_shapes(3, 3 * self.n_heads)["weight_hh"]
        W = np.random.default_rng(0).uniform(-1, 1, shape)
        for what, call in (("forward", lambda: rw.forward(W, np, **self.hyper_values())),
                           ("vjp", lambda: rw.vjp(W, np.ones_like(W), np,
                                                  **self.hyper_values()))):
            try:
                out = call()
            except Exception as exc:
                fail(f"recurrent_weight.{what} failed on a sample weight_hh {list(shape)} "
                     f"(float64 NumPy): {type(exc).__name__}: {exc}")
            self._check_weight(out, W, f"recurrent_weight.{what}")
    def _validate_products(self, fail, derived: bool) -> None:
        prods = self.products
        if not isinstance(prods, tuple) or not all(isinstance(p, Product) for p in prods):
            fail(f"products must be a tuple of kernrnn.cell.Product, got {prods!r}")
        if not prods:
            return
        names = [p.name for p in prods]
        for p in prods:
            if not isinstance(p.name, str) or not _NAME_RE.match(p.name) or p.name == "h":
                fail(f"product name must be lower case letters, digits and '_' (not 'h': "
                     f"weight_hh is the first stage's), got {p.name!r}")
            g = p.gates
            if isinstance(g, bool) or not isinstance(g, (int, str)) or \
                    (isinstance(g, int) and g < 1) or (isinstance(g, str) and not g):
                fail(f"product {p.name!r}: gates must be an int >= 1 or a string of labels "
                     f"(G_m, the pre-activations per unit), got {g!r}")
        if len(set(names)) != len(names):
            fail(f"product names must be distinct, got {names}")
        if not derived:
            fail("products need a forward-only cell: kernrnn derives the staged backward "
                 "(leave out backward)")
        if self.normalize:
            fail(f"a step with recurrent products cannot also normalise a value in the middle "
                 f"yet: expected normalize=() with products, got normalize={self.normalize!r}")
        if self.linear:
            fail("linear=True needs a step with no recurrent product, got products="
                 f"{tuple(names)!r}")
        taken = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"} | {
            q.name for q in self.params if isinstance(q, Param)}
        for n in names:
            for key in (f"weight_h{n}", f"bias_h{n}"):
                if key in taken:
                    fail(f"product {n!r} gives the parameter {key!r}, which the cell already "
                         f"has; expected distinct parameter names")

    def _validate_recurrent_states(self, fail) -> None:
        rs = self.recurrent_states
        if rs is None:
            return
        if not isinstance(rs, tuple) or not rs or not all(isinstance(v, str) for v in rs):
            fail(f"recurrent_states must be a non-empty tuple of state names out of "
                 f"{self.state}, got {rs!r}")
        unknown = [v for v in rs if v not in self.state]
        if unknown:
            fail(f"recurrent_states names the state components the recurrent product reads: "
                 f"expected names out of the state {self.state}, got {rs!r} "
                 f"({', '.join(repr(v) for v in unknown)} not a state)")
        if len(set(rs)) != len(rs):
            fail(f"recurrent_states must name each state component once, got {rs!r}")
        if rs != ("h",) and self.recurrent != "dense":
            fail(f"recurrent_states={rs!r} needs recurrent='dense' (one W_hh over the states "
                 f"side by side), got recurrent={self.recurrent!r}")


def _unpickle_cell(cls, kwargs):
    """A cell from its pickled declaration (see :meth:`Cell.__reduce__`)."""
    return cls(**kwargs)
