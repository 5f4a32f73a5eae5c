"""Public testing tools for kernrnn and for cell-plugin authors.

* :mod:`kernrnn.testing.reference`: float64 NumPy reference of a layer.
* :mod:`kernrnn.testing.strategies`: hypothesis strategies (``problems()`` needs
  hypothesis; the problems' arrays do not).
* :mod:`kernrnn.testing.conformance`: :func:`check_cell`, the check any cell
  must pass (forward vs reference, gradients vs finite differences).
* :mod:`kernrnn.testing.compiles`: :func:`check_compiles`, which compiles a
  cell's CPU kernels, checks its math for what GPUs cannot compile and, where
  NVVM is installed, compiles its CUDA kernels to PTX.
* :mod:`kernrnn.testing.tolerances`: every tolerance, justified, in one place.
"""

from kernrnn.testing.compiles import CompileCheckError, CompileReport, check_compiles
from kernrnn.testing.conformance import ConformanceError, ConformanceReport, check_cell
from kernrnn.testing.reference import reference_direction, reference_rnn

__all__ = ["check_cell", "ConformanceError", "ConformanceReport", "reference_direction",
           "reference_rnn", "check_compiles", "CompileReport", "CompileCheckError"]
