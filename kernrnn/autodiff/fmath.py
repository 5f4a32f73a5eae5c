"""Scalar ``sin`` and ``cos`` for cell math that stay in float32.

Numba lowers ``math.sin``/``math.cos`` of a float32 on CUDA to libdevice's
``__nv_sinf``/``__nv_cosf``, whose slow path for large arguments (Payne-Hanek
reduction) holds float64 instructions: a float32 kernel's PTX then shows
``.f64`` although the cell wrote nothing in float64.  These helpers keep
libm's ``math.sin``/``math.cos`` for float64 and, through
``kernrnn_variants``, compile a float32 version made of float32 arithmetic and
selects only (no branch, so CPU loops still vectorise):

* reduction ``r = x - k pi/2`` with ``k = round(x 2/pi)`` (rounded by adding
  and subtracting 1.5 * 2**23) and pi/2 split in three float32 parts
  (Cody-Waite, as Cephes' ``sinf``);
* Cephes' minimax polynomials for sin and cos on ``[-pi/4, pi/4]``;
* the quadrant ``k mod 4`` picks polynomial and sign.

Absolute error against float64 ``math.sin``/``math.cos`` of the same float32
argument: below 1e-7 for ``|x| <= 1e4`` (libm's ``sinf``: 7e-8) and below 1e-6
for ``|x| <= 1e5`` (measured on 2e6 uniform samples; the tests check 2e-7 and
2e-6).  Beyond that the three-part reduction loses the phase and the results
are meaningless (clamped to ``[-1, 1]`` or NaN).  NaN and infinity give NaN.
"""

from __future__ import annotations

import math

__all__ = ["sin", "cos"]


def sin(x):
    """Sine; float32 kernels use ``_sin_float32`` (see ``kernrnn_variants``)."""
    return math.sin(x)


def cos(x):
    """Cosine; float32 kernels use ``_cos_float32`` (see ``kernrnn_variants``)."""
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


sin.kernrnn_variants = {"float32": _sin_float32}
cos.kernrnn_variants = {"float32": _cos_float32}
