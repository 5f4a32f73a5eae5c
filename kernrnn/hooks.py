"""pluggy markers and hook specifications: the plugin API, and nothing else.

Both :mod:`kernrnn.cell` (which re-exports :data:`hookimpl` for plugin
authors) and :mod:`kernrnn.plugins` (discovery and the registry) import this
module; neither imports the other's internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kernrnn.plugins import CellRegistry

__all__ = ["PROJECT", "hookspec", "hookimpl", "CellSpecs"]

#: pluggy project name and entry-point group of cell plugins.
PROJECT = "kernrnn"

#: Marks a hook specification (used by :class:`CellSpecs`).
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's hook implementation, e.g. ``@hookimpl def kernrnn_register_cells(registry)``.
hookimpl = pluggy.HookimplMarker(PROJECT)


class CellSpecs:
    """Hook specifications of kernrnn (the plugin API)."""

    @hookspec
    def kernrnn_register_cells(self, registry: "CellRegistry") -> None:
        """Add this plugin's cells with ``registry.add(cell)``.

        Called once per plugin when the registry is built.  ``registry`` is a
        :class:`kernrnn.plugins.CellRegistry`.
        """
