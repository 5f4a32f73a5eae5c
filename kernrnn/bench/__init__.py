"""What ``kernrnn bench`` runs: the CPU comparison with PyTorch in one process.

:mod:`kernrnn.bench.cpu` times kernrnn and PyTorch side by side;
:mod:`kernrnn.bench.timeline` shows where one call's time goes
(``kernrnn bench --timeline``).  The other benchmarks (GPU, persistent kernel,
cell zoo, regularisation, PyTorch integration, training experiments) and the
GPU device check are scripts in the source checkout's ``benchmarks/`` folder,
not part of the installed package.
"""
