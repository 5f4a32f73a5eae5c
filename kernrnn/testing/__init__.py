"""Public testing tools for kernrnn and for cell-plugin authors.

* :mod:`kernrnn.testing.reference`: float64 NumPy reference of a layer.
* :mod:`kernrnn.testing.strategies`: hypothesis strategies (needs hypothesis).
* :mod:`kernrnn.testing.conformance`: :func:`check_cell`, the check any cell
  must pass (forward vs reference, gradients vs finite differences).
* :mod:`kernrnn.testing.tolerances`: every tolerance, justified, in one place.
"""

from kernrnn.testing.conformance import ConformanceError, ConformanceReport, check_cell
from kernrnn.testing.reference import reference_direction, reference_rnn

__all__ = ["check_cell", "ConformanceError", "ConformanceReport", "reference_direction",
           "reference_rnn"]
