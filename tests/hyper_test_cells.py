"""A test-only cell with hyperparameters of every kind (:class:`kernrnn.cell.Hyper`).

``t_hyper``: two gates, one state, a per-unit parameter ``u`` and four
hyperparameters, listed by the forward in another order than declared (they
are bound by name)::

    h' = h + s * eps * tanh(a + hu_a - gamma * h) + k * u * sigmoid(b + hu_b)

with ``s = -1`` when ``flip`` else ``1``; ``eps``, ``gamma`` floats, ``k`` an
int, ``flip`` a bool.  So a change of each value changes the step as the
formula says, which the tests check.  ``kernrnn_register_cells`` registers it
(for the tests that need a registered name: checkpoints, the CLI).
"""

from kernrnn.cell import Cell, Hyper, Param, hookimpl, sigmoid, tanh


def hyper_step(xw, hu, prev, u, flip, gamma, k, eps):
    a = tanh(xw[0] + hu[0] - gamma * prev[0])
    s = -1.0 if flip > 0.5 else 1.0
    return (prev[0] + s * eps * a + k * u[0] * sigmoid(xw[1] + hu[1]),)


HYPER = (Hyper("eps", 0.5, "step size"), Hyper("gamma", 0.1, "damping"),
         Hyper("k", 1, "an int factor"), Hyper("flip", False, "a bool"))

HYP = Cell("t_hyper", gates="ab", forward=hyper_step, params=(Param("u", init=0.3),),
           hyper=HYPER, description="test cell with hyperparameters")


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(HYP)
