"""Plugin system: cells are contributed by pluggy plugins through one hook.

Third-party packages advertise a plugin under the entry-point group
``kernrnn``; its module implements ``kernrnn_register_cells(registry)`` and calls
``registry.add(cell)``.  The shipped cells (package ``kernrnn_cells``) use the
very same hook.  Every failure names the plugin and its distribution.

Set ``KERNRNN_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the shipped cells.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import pluggy

from kernrnn.cell import CellError
from kernrnn.hooks import PROJECT, CellSpecs

if TYPE_CHECKING:
    from kernrnn.cell import Cell

__all__ = [
    "AUTOLOAD_ENV",
    "BadCellError",
    "CellRegistry",
    "CellSource",
    "PluginError",
    "get_registry",
    "load_registry",
    "register_plugin",
    "reset_registry",
]

#: Name of the environment variable that, set to 1, loads only the shipped cells.
AUTOLOAD_ENV = "KERNRNN_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PLUGINS = (
    "kernrnn_cells.rnn", "kernrnn_cells.lstm", "kernrnn_cells.gru",
    "kernrnn_cells.indrnn", "kernrnn_cells.mingru", "kernrnn_cells.lstm_peephole",
    "kernrnn_cells.lstm_ln", "kernrnn_cells.slstm",
    "kernrnn_cells.cifg", "kernrnn_cells.janet", "kernrnn_cells.minlstm",
    "kernrnn_cells.gru_ln", "kernrnn_cells.ugrnn", "kernrnn_cells.mgu",
)

class PluginError(RuntimeError):
    """A plugin could not be loaded or registered a bad cell."""


class BadCellError(PluginError, CellError):
    """A plugin's cell definition is wrong (a :class:`PluginError` and a ``CellError``).

    The message names the plugin, its distribution and the cell, and says what
    the cell contract expected and what the cell gave.
    """


@dataclass(frozen=True)
class CellSource:
    """Where a cell came from: the plugin name and its distribution."""

    plugin: str
    distribution: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from distribution {self.distribution!r}"


class CellRegistry:
    """Registered cells by name, with the source of each."""

    def __init__(self) -> None:
        self._cells: dict[str, Cell] = {}
        self._sources: dict[str, CellSource] = {}
        self._current = CellSource("<runtime>", "registered at run time")

    @contextlib.contextmanager
    def _adding_from(self, source: CellSource) -> Iterator[None]:
        old, self._current = self._current, source
        try:
            yield
        finally:
            self._current = old

    def add(self, cell: "Cell") -> None:
        """Register ``cell``; a name already taken is an error naming both sources."""
        from kernrnn.cell import Cell, CellError

        if not isinstance(cell, Cell):
            raise PluginError(
                f"{self._current} called registry.add() with {type(cell).__name__} "
                f"{cell!r}; expected a kernrnn.cell.Cell"
            )
        try:
            cell.validate()
        except CellError as exc:
            raise BadCellError(f"{self._current} registered a bad cell: {exc}") from exc
        if cell.name in self._cells:
            raise PluginError(
                f"cell name {cell.name!r} is registered twice: by "
                f"{self._sources[cell.name]} and by {self._current}"
            )
        self._cells[cell.name] = cell
        self._sources[cell.name] = self._current

    def get(self, name: str) -> "Cell":
        """The cell called ``name``; an unknown name lists the known ones."""
        if not isinstance(name, str):
            raise TypeError(f"cell name must be a str, got {type(name).__name__}")
        try:
            return self._cells[name]
        except KeyError:
            known = ", ".join(sorted(self._cells)) or "none"
            raise ValueError(
                f"unknown cell {name!r}; registered cells: {known}"
            ) from None

    def source(self, name: str) -> CellSource:
        """Where the cell called ``name`` came from (plugin and distribution)."""
        self.get(name)
        return self._sources[name]

    def names(self) -> list[str]:
        """The registered cell names, sorted."""
        return sorted(self._cells)

    def __contains__(self, name: object) -> bool:
        return name in self._cells

    def __iter__(self) -> Iterator["Cell"]:
        return iter(self._cells[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._cells)


def _autoload_default() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")


def _entry_point_plugins() -> Iterator[tuple[object, CellSource]]:
    for ep in importlib.metadata.entry_points(group=PROJECT):
        dist = ep.dist
        dist_name = f"{dist.name} {dist.version}" if dist is not None else "unknown"
        source = CellSource(ep.name, dist_name)
        try:
            obj = ep.load()
        except CellError as exc:  # a cell built when the module is imported
            raise BadCellError(f"{source} defines a bad cell (entry point {ep.value!r}): "
                               f"{exc}") from exc
        except Exception as exc:
            raise PluginError(
                f"{source} could not be loaded (entry point {ep.value!r}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        yield obj, source


def _builtin_plugins() -> Iterator[tuple[object, CellSource]]:
    version = _kernrnn_version()
    for modname in BUILTIN_PLUGINS:
        source = CellSource(modname, f"kernrnn {version} (built in)")
        try:
            module = importlib.import_module(modname)
        except CellError as exc:
            raise BadCellError(f"{source} defines a bad cell: {exc}") from exc
        yield module, source


def _kernrnn_version() -> str:
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_registry(autoload: bool | None = None, plugins=()) -> CellRegistry:
    """Build a fresh registry from the shipped cells, entry points and ``plugins``.

    ``autoload`` (default: on unless ``KERNRNN_DISABLE_PLUGIN_AUTOLOAD`` is
    set) controls whether third-party entry points are loaded.  ``plugins``
    are extra plugin objects (modules or instances) registered too.
    """
    if autoload is None:
        autoload = _autoload_default()
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(CellSpecs)
    sources: dict[str, CellSource] = {}
    candidates = list(_builtin_plugins())
    if autoload:
        candidates += list(_entry_point_plugins())
    for i, obj in enumerate(plugins):
        name = getattr(obj, "__name__", None) or f"{type(obj).__name__}-{i}"
        candidates.append((obj, CellSource(name, "registered at run time")))
    for obj, source in candidates:
        if pm.is_registered(obj):
            continue
        try:
            name = pm.register(obj, name=source.plugin)
        except Exception as exc:  # pluggy's validation errors, name clashes
            raise PluginError(f"{source} could not be registered: {exc}") from exc
        sources[name] = source
    try:
        pm.check_pending()  # a misspelt hook name fails here
    except pluggy.PluginValidationError as exc:
        src = sources.get(pm.get_name(exc.plugin), exc.plugin)
        raise PluginError(f"{src} implements an unknown hook: {exc}") from exc

    registry = CellRegistry()
    # Call each implementation on its own so every cell knows its source.
    for impl in reversed(pm.hook.kernrnn_register_cells.get_hookimpls()):
        source = sources[impl.plugin_name]
        kwargs = {"registry": registry} if "registry" in impl.argnames else {}
        with registry._adding_from(source):
            try:
                impl.function(**kwargs)
            except PluginError:
                raise
            except CellError as exc:
                raise BadCellError(f"{source} registered a bad cell: {exc}") from exc
            except Exception as exc:
                raise PluginError(
                    f"{source} failed in kernrnn_register_cells: {type(exc).__name__}: {exc}"
                ) from exc
    return registry


_REGISTRY: CellRegistry | None = None


def get_registry() -> CellRegistry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry (the next use rebuilds it)."""
    global _REGISTRY
    _REGISTRY = None


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object (module or instance) into the process registry now.

    For notebooks and scripts that define a cell without packaging it.
    """
    registry = get_registry()
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(CellSpecs)
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    source = CellSource(name, "registered at run time")
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except Exception as exc:
        raise PluginError(f"{source} could not be registered: {exc}") from exc
    with registry._adding_from(source):
        for impl in pm.hook.kernrnn_register_cells.get_hookimpls():
            impl.function(registry=registry)
