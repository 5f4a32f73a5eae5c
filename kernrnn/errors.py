"""The errors of kernrnn's cell contract and plugin registry, and where a cell came from.

Below both :mod:`kernrnn.cell` and :mod:`kernrnn.plugins`, so each can raise
the other's errors without importing it.  The classes are re-exported where
users meet them (``kernrnn.CellError``, ``kernrnn.cell.CellError``,
``kernrnn.plugins.PluginError``, ...).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["CellError", "PluginError", "BadCellError", "PluginWarning", "describe_source",
           "set_source_lookup"]


class CellError(ValueError):
    """A cell definition is wrong; the message names the cell and its source."""


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered a bad cell."""


class PluginWarning(UserWarning):
    """A plugin was skipped, or implements no hook."""


class BadCellError(PluginError, CellError):
    """A plugin's cell definition is wrong (a :class:`PluginError` and a ``CellError``).

    The message names the plugin, its distribution and the cell, and says what
    the cell contract expected and what the cell gave.
    """


# ``lookup(cell) -> source or None``: installed by kernrnn.plugins when it is imported (the
# registry's answer for the cells of the process-wide registry, if that is built).  Without a
# registry there is no source to name.
_source_lookup: Callable[[object], object] | None = None


def set_source_lookup(lookup: Callable[[object], object] | None) -> None:
    """Install the function :func:`describe_source` asks: ``lookup(cell) -> source or None``.

    :mod:`kernrnn.plugins` installs its own when imported; this module never
    imports the registry, whose construction validates cells and so raises
    the errors above.
    """
    global _source_lookup
    _source_lookup = lookup


def describe_source(cell) -> str:
    """`` (plugin 'x' from distribution 'y')`` for a cell of the process registry, else ``""``.

    For error messages: ``f"cell {cell.name!r}{describe_source(cell)}: ..."``.
    Never builds the registry and never raises.
    """
    if _source_lookup is None:
        return ""
    try:
        source = _source_lookup(cell)
    except Exception:
        return ""
    return f" ({source})" if source is not None else ""
