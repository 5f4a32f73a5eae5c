"""The cells shipped with kernrnn, written as ordinary plugins.

Each module uses only the public plugin API (:mod:`kernrnn.cell`), exactly as a
third-party plugin would: per-element math, a float64 NumPy reference and a
``kernrnn_register_cells`` hook.
"""
