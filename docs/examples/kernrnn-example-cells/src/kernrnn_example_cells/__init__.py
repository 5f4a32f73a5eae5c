"""Example kernrnn cell plugins (the documentation's plugin tutorial).

Each module defines one cell and its ``kernrnn_register_cells`` hook; the
package's ``pyproject.toml`` advertises both modules in the entry-point group
``kernrnn``.
"""
