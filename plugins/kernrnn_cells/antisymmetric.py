"""AntisymmetricRNN (Chang, Chen, Haber & Chi 2019, "AntisymmetricRNN: A Dynamical
System View on Recurrent Neural Networks", ICLR).

The forward Euler step of the ODE h' = tanh(A h + V x + b) with an
antisymmetric A, whose Jacobian has eigenvalues near the imaginary axis (so
gradients neither explode nor vanish), plus diffusion -gamma I for a stable
discretisation::

    h_t = h_{t-1} + eps * tanh(W_x x_t + (W_h - W_h^T - gamma I) h_{t-1} + b)

``weight_ih`` is W_x, ``weight_hh`` the stored W_h [H, H] (any matrix: the
antisymmetry is the parametrisation, so it holds after every optimiser step),
b = ``bias_ih`` + ``bias_hh``.  ``eps`` (the step size) and ``gamma`` (the
diffusion) are hyperparameters, 0.01 each by default; the paper searches
eps and gamma over powers of ten.  The effective matrix W_h - W_h^T - gamma I
is computed once per call, before the time loop (a
:class:`kernrnn.cell.RecurrentWeight`), and BPTT's gradient dA of it gives
dW_h = dA - dA^T after the loop.  Initialised as PyTorch's RNN (uniform in
+-1/sqrt(H)).

The paper's gated variant (its section on gating, an optional extension
evaluated next to the plain cell) adds z_t = sigmoid(A h_{t-1} + V_z x_t + b_z)
and h_t = h_{t-1} + eps * z_t * tanh(...), with the same A in both; it is
not shipped here.
"""

from kernrnn.cell import Cell, Hyper, RecurrentWeight, hookimpl, tanh


def forward(xw, hu, prev, eps):
    return (prev[0] + eps * tanh(xw[0] + hu[0]),)


def antisymmetric(W, xp, eps, gamma):
    """A = W - W^T - gamma I, in W's dtype."""
    return W - W.T - gamma * xp.eye(W.shape[0], dtype=W.dtype)


def antisymmetric_vjp(W, dA, xp, eps, gamma):
    """dW from dA: the transpose term sends -dA^T back (gamma I is a constant)."""
    return dA - dA.T


ANTISYMMETRIC = Cell(
    "antisymmetric", gates="h", forward=forward,
    hyper=(Hyper("eps", 0.01, "step size of the Euler step"),
           Hyper("gamma", 0.01, "diffusion: A = W_h - W_h^T - gamma I")),
    recurrent_weight=RecurrentWeight(antisymmetric, antisymmetric_vjp,
                                     "W_h - W_h^T - gamma I"),
    description="AntisymmetricRNN, W_h - W_h^T - gamma I, step eps (Chang et al. 2019)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(ANTISYMMETRIC)
