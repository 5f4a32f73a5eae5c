"""Math helpers for cell definitions: scalar activations and the kernels' normalisation.

``sigmoid``, ``tanh``, ``relu``, ``sin``, ``cos`` and ``tan`` are plain Python;
the core compiles them together with a cell's functions, in the kernel's
precision, and swaps in the float32 variants below for float32 kernels (see
:mod:`kernrnn.scalar`, which also compiles ``math.sin``/``cos``/``tan`` in
float32 math as :func:`sin`/:func:`cos`/:func:`tan`).
:func:`reference_norm` is the float64 NumPy form of the normalisation the
kernels run, for a cell's ``reference`` step.  Plugins import them from
:mod:`kernrnn.cell`, which re-exports them.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["sigmoid", "tanh", "relu", "sin", "cos", "tan", "NORM_EPS", "reference_norm"]


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


# float32 sine, cosine and tangent.  Numba lowers ``math.sin``/``cos``/``tan`` of a float32
# on CUDA to libdevice's ``__nv_sinf``/``__nv_cosf``/``__nv_tanf``, whose slow path for
# large arguments (Payne-Hanek reduction) holds float64 instructions: a float32 kernel's
# PTX then shows ``.f64`` although the cell wrote nothing in float64.  :func:`sin`,
# :func:`cos` and :func:`tan` keep libm for float64 and compile, through
# ``kernrnn_variants``, a float32 version made of float32 arithmetic and selects only (no
# branch, so CPU loops still vectorise):
#
# * reduction ``r = x - k pi/2`` with ``k = round(x 2/pi)`` (rounded by adding and
#   subtracting 1.5 * 2**23) and pi/2 split in three float32 parts (Cody-Waite, as
#   Cephes' ``sinf``);
# * Cephes' minimax polynomials for sin and cos on ``[-pi/4, pi/4]``;
# * the quadrant ``k mod 4`` picks polynomial and sign.
#
# Absolute error against float64 ``math.sin``/``math.cos`` of the same float32 argument:
# below 1e-7 for ``|x| <= 1e4`` (libm's ``sinf``: 7e-8) and below 1e-6 for ``|x| <= 1e5``
# (measured on 2e6 uniform samples; the tests check 2e-7 and 2e-6).  Beyond that the
# three-part reduction loses the phase and the results are meaningless (clamped to
# ``[-1, 1]`` or NaN).  NaN and infinity give NaN.


def sin(x):
    """Sine; float32 kernels use ``_sin_float32`` (see ``kernrnn_variants``), accurate
    to 2e-7 for ``|x| <= 1e4`` and free of float64 instructions on GPUs."""
    return math.sin(x)


def cos(x):
    """Cosine; float32 kernels use ``_cos_float32`` (see ``kernrnn_variants``), as
    :func:`sin`."""
    return math.cos(x)


def _sin_float32(x):
    """sin(x) from float32 arithmetic: quadrant reduction, then a polynomial."""
    k = (x * 0.6366197723675814 + 12582912.0) - 12582912.0  # round(2x/pi), |2x/pi| < 2**22
    r = ((x - k * 1.5703125) - k * 4.837512969970703125e-4) - k * 7.54978995489188216e-8
    q = k - 4.0 * ((k * 0.25 + 12582912.0) - 12582912.0)  # k mod 4 in {-2, -1, 0, 1, 2}
    z = r * r
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z \
        - 0.5 * z + 1.0
    v = c if (q == 1.0 or q == -1.0) else s
    v = -v if (q < -0.5 or q > 1.5) else v
    v = 1.0 if v > 1.0 else v
    return -1.0 if v < -1.0 else v


def _cos_float32(x):
    """cos(x) from float32 arithmetic: quadrant reduction, then a polynomial."""
    k = (x * 0.6366197723675814 + 12582912.0) - 12582912.0
    r = ((x - k * 1.5703125) - k * 4.837512969970703125e-4) - k * 7.54978995489188216e-8
    q = k - 4.0 * ((k * 0.25 + 12582912.0) - 12582912.0)
    z = r * r
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z \
        - 0.5 * z + 1.0
    v = s if (q == 1.0 or q == -1.0) else c
    v = -v if (q > 0.5 or q < -1.5) else v
    v = 1.0 if v > 1.0 else v
    return -1.0 if v < -1.0 else v


def tan(x):
    """Tangent; float32 kernels use ``_tan_float32`` (see ``kernrnn_variants``), free of
    float64 instructions on GPUs (as :func:`sin`)."""
    return math.tan(x)


def _tan_float32(x):
    """tan(x) from :func:`sin`'s float32 reduction: tan(r) for even k, -cot(r) for odd k."""
    k = (x * 0.6366197723675814 + 12582912.0) - 12582912.0
    r = ((x - k * 1.5703125) - k * 4.837512969970703125e-4) - k * 7.54978995489188216e-8
    q = k - 4.0 * ((k * 0.25 + 12582912.0) - 12582912.0)
    z = r * r
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z \
        - 0.5 * z + 1.0
    return -c / s if (q == 1.0 or q == -1.0) else s / c


sin.kernrnn_variants = {"float32": _sin_float32}
cos.kernrnn_variants = {"float32": _cos_float32}
tan.kernrnn_variants = {"float32": _tan_float32}


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
