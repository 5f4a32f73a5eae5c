"""Derive a cell's backward, saved values and float64 reference from its forward step.

A cell author writes the step once, as scalar Python with the signature of a
``reference`` but on scalars, returning the new state tuple only::

    def lstm(xw, hu, prev):
        i = sigmoid(xw[0] + hu[0])
        f = sigmoid(xw[1] + hu[1])
        g = tanh(xw[2] + hu[2])
        o = sigmoid(xw[3] + hu[3])
        c = f * prev[1] + i * g
        return (o * tanh(c), c)

:class:`kernrnn.cell.Cell` calls :func:`derive_for_cell` on such a forward
when no ``backward`` is given; :func:`derive` does the same with the sizes
given.  Both return a :class:`Derived`: the cell's math in the contract's form
(``forward`` returning ``(new_state, saved)``, ``backward``, and for a step that
calls ``norm("c", c)`` the two stages ``forward2``/``backward2``), the float64
NumPy ``reference``, the names of the saved values and, per gate, whether the
input and recurrent pre-activations share one gradient (``same_grads``).

The modules:

* :mod:`kernrnn.autodiff.parse`: the forward's source into a graph; the
  supported constructs, and the :class:`~kernrnn.errors.CellError` naming
  cell, file, line and construct for anything else;
* :mod:`kernrnn.autodiff.reverse`: reverse mode, what is saved and what is
  recomputed (the rule is in :mod:`kernrnn.autodiff.differentiate`);
* :mod:`kernrnn.autodiff.emit`: the generated Python source;
* :mod:`kernrnn.autodiff.differentiate`: :func:`derive`, :func:`derive_for_cell`,
  :func:`derive_hand_written` (the step of a cell with a hand-written backward)
  and :class:`Derived`.
"""

from kernrnn.autodiff.differentiate import Derived, derive, derive_for_cell, derive_hand_written
from kernrnn.autodiff.parse import Signature

__all__ = ["derive", "derive_for_cell", "derive_hand_written", "Derived", "Signature"]
