"""Tolerances for comparing kernels with the float64 reference, in one place.

float64: kernels and reference do the same operations in a different order
(BLAS blocking, fused bias adds), so results differ by a few ulps per step; the
error grows at most linearly in T for the contracting cells tested here.
``rtol = atol = 1e-10`` leaves a margin of ~10^4 over eps = 2.2e-16 at the
sequence lengths the property tests draw (T <= 12).

float32: eps = 1.2e-7.  Each step rounds the GEMMs (sum of I+H products, error
~ sqrt(I+H) * eps relative to the magnitude of the terms) and the transcendental
functions (fast CPU approximations are within ~2e-7).  With weights bounded by
1/sqrt(H) as in the default init, activations are O(1) and errors add up over
T steps and L layers.  ``2e-4`` absolute + relative is meant for any problem
size a plugin author may pass to :func:`kernrnn.testing.check_cell` (T, I, H up to a few
hundred): a random-walk estimate eps * sqrt(I+H) * sqrt(T) gives ~3e-5 at
T = I = H = 300.  On the small problems the test-suite draws (T <= 12, I, H <= 6) the worst errors seen are 4e-7 forward
and 1.6e-6 for gradients (300 examples per property, ``HYPOTHESIS_PROFILE=
thorough pytest tests/test_layer_properties.py``), far inside it.  Gradients
sum over T*B rows and carry one more GEMM, hence the 4x looser bound.

Finite differences: central differences in float64 with step 1e-6 have
truncation error ``~ h^2 |f'''| ~ 1e-12`` and rounding error ``~ eps |f| / h ~ 1e-10``;
directional derivatives are compared with ``rtol = 1e-6``.  Cells that normalise
over a few units (layer norm over H = 2..6 values) have third derivatives of
1e6 and more: there the plain central difference is off by 1e-6 relative at
h = 1e-6 (measured on ``lstm_ln``, the error falling exactly as h^2), so the
conformance check uses Richardson's extrapolation of two central differences
(:func:`directional_derivative`, h = 2e-6 and 1e-6), whose error falls as h^4:
worst relative error seen 4e-9 on ``lstm_ln``, 5e-9 on ``slstm``.
"""

import numpy as np

#: float64 kernels vs the reference.
FLOAT64 = {"rtol": 1e-10, "atol": 1e-10}
#: float32 forward vs the reference.
FLOAT32 = {"rtol": 2e-4, "atol": 2e-4}
#: float32 gradients vs the reference.
FLOAT32_GRAD = {"rtol": 8e-4, "atol": 8e-4}
#: Step of the central finite differences.
FD_STEP = 1e-6
#: Directional derivatives vs finite differences.
FD = {"rtol": 1e-6, "atol": 1e-8}
#: Step of :func:`directional_derivative` (h and h/2; fourth-order accurate).
RICHARDSON_STEP = 2e-6


def directional_derivative(loss_at, h: float = RICHARDSON_STEP) -> float:
    """d/de loss_at(e) at 0 by Richardson's extrapolation of central differences.

    ``(4 D(h/2) - D(h)) / 3`` with ``D(s) = (f(s) - f(-s)) / 2s``: truncation
    error O(h^4), rounding error ``~ 3 eps |f| / h``.
    """
    def central(s):
        return (loss_at(s) - loss_at(-s)) / (2 * s)

    return (4 * central(h / 2) - central(h)) / 3


def forward_tolerance(dtype) -> dict:
    """The forward tolerance for ``dtype``."""
    return FLOAT64 if np.dtype(dtype) == np.float64 else FLOAT32


def grad_tolerance(dtype) -> dict:
    """The gradient tolerance for ``dtype``."""
    return FLOAT64 if np.dtype(dtype) == np.float64 else FLOAT32_GRAD
