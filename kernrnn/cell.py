"""The cell contract: what a plugin author writes, once, for a new recurrent cell.

A cell is its per-element math.  ``forward(xw, hu, prev)`` receives, for one
(batch, unit) element, the G gate pre-activations coming from the input
(``xw``, bias ``b_ih`` included) and from the previous hidden state (``hu``,
bias ``b_hh`` included) as tuples of scalars, and the previous state as a tuple
of scalars (``(h,)`` or ``(h, c)``).  It returns ``(new_state, saved)``: the new
state tuple and whatever scalars the backward pass needs.

``backward(saved, prev, dstate)`` receives those saved scalars, the previous
state and the gradient arriving at this step's new state, and returns
``(dxw, dhu, dprev)``: gradients of the G input and recurrent pre-activations
and the element-wise part of the gradient of the previous state (the part that
does not flow through ``W_hh``; the core adds ``dhu @ W_hh`` itself).

Both are plain Python using ``math`` and the helpers below.  The core compiles
them with Numba for every backend and precision (constants take the kernel's
precision, see :mod:`kernrnn.scalar`) and builds the time loop, the GEMMs and
backpropagation through time around them.  ``reference`` is an independent
float64 NumPy version of ``forward`` used by the tests and by
:func:`kernrnn.testing.check_cell`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kernrnn.hooks import hookimpl

__all__ = ["Cell", "CellError", "hookimpl", "sigmoid", "tanh", "relu"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class CellError(ValueError):
    """A cell definition is wrong; the message names the cell and its source."""


# -- scalar helpers usable inside cell math ---------------------------------
# Plain Python: the core compiles them together with the cell's functions,
# in the kernel's precision.


def sigmoid(x):
    """Logistic function, computed without overflow for large ``|x|``.

    float32 kernels use ``_sigmoid_float32`` instead (see ``kernrnn_variants``).
    """
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def tanh(x):
    """Hyperbolic tangent.

    float32 kernels use ``_tanh_float32`` instead (see ``kernrnn_variants``).
    """
    return math.tanh(x)


# float32 variants.  Without SVML, ``math.tanh``/``math.exp`` in a Numba loop
# are scalar libm calls (10-15 ns each) that stop the pointwise loop from
# vectorising; these use only arithmetic and selects, so LLVM turns the loop
# into AVX/AVX-512 code.  float64 kernels keep libm's accuracy.


def _tanh_float32(x):
    """tanh(x) ~ x P(x^2) / Q(x^2) on [-9, 9], clamped outside.

    A minimax-style rational fit (degrees 13/6, relative error 1.1e-8 in exact
    arithmetic); evaluated in float32 the error against libm's float64 tanh is
    at most 3.3e-7 (libm's float32 tanhf: 6e-8).  tanh(9) rounds to 1 in
    float32.  NaN propagates.
    """
    a = 9.0 if x > 9.0 else x
    a = -9.0 if a < -9.0 else a
    s = a * a
    p = -8.530291755456029e-14 * s + 5.2919522301657174e-11
    p = p * s - 2.0250007846842598e-08
    p = p * s + 1.1159567567522661e-05
    p = p * s + 0.0031044121090496673
    p = p * s + 0.13084405684319494
    p = p * s + 0.9999999939213771
    q = 0.0002546836383110213 * s + 0.024496953312122864
    q = q * s + 0.4641773289598095
    q = q * s + 1.0
    t = a * p / q
    t = 1.0 if t > 1.0 else t
    return -1.0 if t < -1.0 else t


def _sigmoid_float32(x):
    """sigmoid(x) = (1 + tanh(x/2)) / 2: absolute error <= 2e-7, branch-free."""
    return 0.5 * _tanh_float32(0.5 * x) + 0.5


# ``compile_scalar`` swaps a helper for its variant of the kernel's precision.
tanh.kernrnn_variants = {"float32": _tanh_float32}
sigmoid.kernrnn_variants = {"float32": _sigmoid_float32}


def relu(x):
    """max(x, 0)."""
    return x if x > 0.0 else 0.0 * x


def _default_init(rng: np.random.Generator, name: str, shape: tuple, hidden_size: int):
    """PyTorch's default: every parameter uniform in +-1/sqrt(hidden_size)."""
    bound = 1.0 / math.sqrt(hidden_size)
    return rng.uniform(-bound, bound, size=shape)


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
    forward, backward:
        The per-element math, see the module docstring.
    reference:
        Float64 NumPy step ``reference(xw, hu, prev) -> new_state``, where each
        argument is a tuple of ``[B, H]`` arrays (G, G and S of them).
    state:
        Names of the state components; the first is the output ``h``.
    init:
        ``init(rng, name, shape, hidden_size) -> array`` for each parameter
        (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``); PyTorch's
        uniform default when omitted.
    description:
        One line shown by ``kernrnn cells``.
    """

    name: str
    gates: str | int
    forward: Callable
    backward: Callable
    reference: Callable
    state: tuple[str, ...] = ("h",)
    init: Callable | None = None
    description: str = ""
    n_saved: int = field(init=False, default=-1)

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

    def init_params(self, rng, name: str, shape: tuple, hidden_size: int) -> np.ndarray:
        """Initial float64 values of parameter ``name`` (``weight_ih``, ...), shape checked."""
        fn = self.init or _default_init
        arr = np.asarray(fn(rng, name, shape, hidden_size), dtype=np.float64)
        if arr.shape != tuple(shape):
            raise CellError(
                f"cell {self.name!r}: init returned shape {arr.shape} for {name}, "
                f"expected {tuple(shape)}"
            )
        return arr

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check the definition by running its math on sample values.

        Raises :class:`CellError` saying what is wrong.  Runs in plain Python
        (no compilation), so registering cells stays cheap; compilation
        problems surface, with the cell's source named, when its kernels are
        first built.
        """
        def fail(msg: str):
            raise CellError(f"cell {self.name!r}: {msg}")

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
        for attr in ("forward", "backward", "reference"):
            if not callable(getattr(self, attr)):
                fail(f"{attr} must be a function, got {getattr(self, attr)!r}")
        if self.init is not None and not callable(self.init):
            fail(f"init must be a function or None, got {self.init!r}")

        G, S = self.n_gates, self.n_state
        rng = np.random.default_rng(0)
        xw = tuple(float(v) for v in rng.uniform(-1, 1, G))
        hu = tuple(float(v) for v in rng.uniform(-1, 1, G))
        prev = tuple(float(v) for v in rng.uniform(-1, 1, S))
        try:
            out = self.forward(xw, hu, prev)
        except Exception as exc:
            fail(f"forward failed on sample input ({G} gates, state {self.state}): "
                 f"{type(exc).__name__}: {exc}")
        if not (isinstance(out, tuple) and len(out) == 2
                and isinstance(out[0], tuple) and isinstance(out[1], tuple)):
            fail("forward must return (new_state, saved), two tuples of scalars; got "
                 f"{out!r}")
        new_state, saved = out
        if len(new_state) != S:
            fail(f"forward returned a state of {len(new_state)} values, the cell declares "
                 f"{S} ({self.state})")
        object.__setattr__(self, "n_saved", len(saved))
        try:
            back = self.backward(saved, prev, new_state)
        except Exception as exc:
            fail(f"backward failed on sample input: {type(exc).__name__}: {exc}")
        if not (isinstance(back, tuple) and len(back) == 3
                and all(isinstance(b, tuple) for b in back)):
            fail(f"backward must return (dxw, dhu, dprev), three tuples; got {back!r}")
        for label, got, want in (("dxw", back[0], G), ("dhu", back[1], G),
                                 ("dprev", back[2], S)):
            if len(got) != want:
                fail(f"backward returned {len(got)} values for {label}, expected {want}")
        try:
            ref = self.reference(
                tuple(np.array([[v]]) for v in xw),
                tuple(np.array([[v]]) for v in hu),
                tuple(np.array([[v]]) for v in prev),
            )
        except Exception as exc:
            fail(f"reference failed on sample input: {type(exc).__name__}: {exc}")
        if not isinstance(ref, tuple) or len(ref) != S:
            fail(f"reference must return a tuple of {S} arrays, got {ref!r}")
        for k, (r, f) in enumerate(zip(ref, new_state)):
            r = float(np.asarray(r).reshape(-1)[0])
            if not math.isfinite(f) or abs(r - f) > 1e-9 * max(1.0, abs(r)):
                fail(f"forward and reference disagree on state {self.state[k]!r}: "
                     f"{f!r} vs {r!r} on the same sample input")
