"""A cell plugin used by the tests, shipped as a test-only distribution.

It registers the minimal gated unit defined in ``tests/cuda_test_cells.py``
(one definition serves the CPU, CUDA and plugin tests).
"""

from cuda_test_cells import MGU

from kernrnn.cell import hookimpl


@hookimpl
def kernrnn_register_cells(registry):
    registry.add(MGU)
