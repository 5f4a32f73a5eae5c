"""coRNN, the coupled oscillatory RNN (Rusch & Mishra 2021, ICLR).

A second-order ODE ``y'' = tanh(W y + 𝒲 y' + V u + b) - γ y - ε y'`` discretised with
step Δt (the paper's implicit-explicit scheme), ``z = y'``::

    z_t = z_{t-1} + Δt (tanh(W y_{t-1} + 𝒲 z_{t-1} + V u_t + b) - γ y_{t-1} - ε z_{t-1})
    y_t = y_{t-1} + Δt z_t

State ``(h, z)`` with ``h = y``, the output.  The recurrent product reads both
states (``recurrent_states=("h", "z")``): ``weight_hh [H, 2H]`` is ``[W 𝒲]``,
``hu = W y + 𝒲 z + b_hh``; ``weight_ih`` is ``V`` and ``b = b_ih + b_hh``.

Δt, γ and ε are hyperparameters ``dt``, ``gamma``, ``epsilon``; their defaults are
the paper's sequential-MNIST setting (its code's defaults: dt 0.042, gamma 2.7,
epsilon 4.7).  ``kernrnn.RNN("cornn", I, H, dt=0.05)`` sets them per layer.
"""

from kernrnn.cell import Cell, Hyper, hookimpl, tanh


def forward(xw, hu, prev, dt, gamma, epsilon):
    y, z = prev
    z_new = z + dt * (tanh(xw[0] + hu[0]) - gamma * y - epsilon * z)
    return (y + dt * z_new, z_new)


CORNN = Cell(
    "cornn", gates="a", state=("h", "z"), forward=forward, recurrent_states=("h", "z"),
    hyper=(Hyper("dt", 0.042, "the time step Δt"),
           Hyper("gamma", 2.7, "γ, the oscillators' stiffness"),
           Hyper("epsilon", 4.7, "ε, their damping")),
    description="coRNN: coupled oscillators, W_hh over [y; z] (Rusch & Mishra 2021)",
)


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(CORNN)
