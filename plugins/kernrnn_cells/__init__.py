"""The cells shipped with kernrnn, written as ordinary plugins.

Each module uses only the public plugin API (:mod:`kernrnn.cell`), exactly as a
third-party plugin would: the forward step (kernrnn derives its backward, the
saved values and the float64 reference) and a ``kernrnn_register_cells`` hook.
"""
