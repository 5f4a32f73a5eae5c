"""Math helpers for cell definitions: scalar activations and the kernels' normalisation.

``sigmoid``, ``tanh`` and ``relu`` are plain Python; the core compiles them
together with a cell's functions, in the kernel's precision, and swaps in the
float32 variants below for float32 kernels (see :mod:`kernrnn.scalar`).
:func:`reference_norm` is the float64 NumPy form of the normalisation the
kernels run, for a cell's ``reference`` step.  Plugins import them from
:mod:`kernrnn.cell`, which re-exports them.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["sigmoid", "tanh", "relu", "NORM_EPS", "reference_norm"]


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


#: Added to the variance in every normalisation (as PyTorch's and haste's layer norm).
NORM_EPS = 1e-5


def reference_norm(z, gain, bias, kind: str = "layer"):
    """Float64 NumPy normalisation of ``z [..., N]`` over its last axis, then ``* gain + bias``.

    For ``reference`` steps of cells with ``normalize`` (the layer passes it in
    as ``norm``) and for :mod:`kernrnn.testing`.
    """
    z = np.asarray(z, dtype=np.float64)
    if kind == "layer":
        z = z - z.mean(axis=-1, keepdims=True)
    zhat = z / np.sqrt((z * z).mean(axis=-1, keepdims=True) + NORM_EPS)
    return zhat * gain + bias
