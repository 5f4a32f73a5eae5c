"""Benchmarks, side by side with the anchors in one process.

:mod:`kernrnn.bench.cpu` (``kernrnn bench``) against PyTorch on the CPU;
:mod:`kernrnn.bench.gpu` and :mod:`kernrnn.bench.persistent` against cuDNN on a GPU.
"""
