"""Plugin system: cells are contributed by pluggy plugins through one hook.

Third-party packages advertise a plugin under the entry-point group
``kernrnn``; its module implements ``kernrnn_register_cells(registry)`` and calls
``registry.add(cell)``.  The shipped cells (package ``kernrnn_cells``) use the
very same hook.  Every failure names the plugin and its distribution.

Set ``KERNRNN_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the shipped cells.

A broken third-party plugin fails alone: one that cannot be imported,
implements an unknown hook, raises in its hook, registers an invalid cell or
a name already taken is skipped as a whole (none of its cells is registered)
with one :class:`PluginWarning` naming it and its distribution; the shipped
cells are always registered first and every other plugin keeps working.
:attr:`CellRegistry.skipped` lists the skipped plugins (``kernrnn cells``
shows them).  ``KERNRNN_STRICT_PLUGINS=1`` turns every skip into a
:class:`PluginError` (the project's own tests run this way).  A plugin that
implements no hook at all gets a warning too: usually a forgotten ``@hookimpl``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import pluggy

from kernrnn import errors
from kernrnn.cell import Cell
from kernrnn.errors import BadCellError, CellError, PluginError, PluginWarning
from kernrnn.hooks import PROJECT, CellSpecs

__all__ = [
    "AUTOLOAD_ENV",
    "STRICT_ENV",
    "BadCellError",
    "CellRegistry",
    "CellSource",
    "PluginError",
    "PluginWarning",
    "SkippedPlugin",
    "get_registry",
    "load_registry",
    "register_plugin",
    "reset_registry",
    "resolve_cell",
]

#: Name of the environment variable that, set to 1, loads only the shipped cells.
AUTOLOAD_ENV = "KERNRNN_DISABLE_PLUGIN_AUTOLOAD"
#: Name of the environment variable that, set to 1, makes a broken plugin an error, not a skip.
STRICT_ENV = "KERNRNN_STRICT_PLUGINS"
BUILTIN_PLUGINS = (
    "kernrnn_cells.rnn", "kernrnn_cells.lstm", "kernrnn_cells.gru",
    "kernrnn_cells.indrnn", "kernrnn_cells.mingru", "kernrnn_cells.lstm_peephole",
    "kernrnn_cells.lstm_ln", "kernrnn_cells.slstm",
    "kernrnn_cells.cifg", "kernrnn_cells.janet", "kernrnn_cells.minlstm",
    "kernrnn_cells.gru_ln", "kernrnn_cells.ugrnn", "kernrnn_cells.mgu",
    "kernrnn_cells.antisymmetric", "kernrnn_cells.sru", "kernrnn_cells.cornn",
    "kernrnn_cells.rhn",
)


@dataclass(frozen=True)
class SkippedPlugin:
    """A third-party plugin left out of the registry, and why."""

    source: CellSource
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.source}: {self.reason}"


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
        #: Third-party plugins that were skipped while the registry was built.
        self.skipped: list[SkippedPlugin] = []

    @contextlib.contextmanager
    def _adding_from(self, source: CellSource) -> Iterator[None]:
        old, self._current = self._current, source
        try:
            yield
        finally:
            self._current = old

    def add(self, cell: Cell) -> None:
        """Register ``cell``; a name already taken is an error naming both sources."""
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

    def _remove(self, names) -> None:
        for name in names:
            self._cells.pop(name, None)
            self._sources.pop(name, None)

    def get(self, name: str) -> Cell:
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

    def __iter__(self) -> Iterator[Cell]:
        return iter(self._cells[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._cells)


def _autoload_default() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")


def _strict_default() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


def _entry_point_plugins() -> Iterator[tuple[object, CellSource, PluginError | None]]:
    """``(plugin or None, source, the load's error or None)`` for each entry point."""
    for ep in importlib.metadata.entry_points(group=PROJECT):
        dist = ep.dist
        dist_name = f"{dist.name} {dist.version}" if dist is not None else "unknown"
        source = CellSource(ep.name, dist_name)
        try:
            obj = ep.load()
        except CellError as exc:  # a cell built when the module is imported
            yield None, source, BadCellError(
                f"{source} defines a bad cell (entry point {ep.value!r}): {_one_line(exc)}")
            continue
        except Exception as exc:
            yield None, source, PluginError(
                f"{source} could not be loaded (entry point {ep.value!r}): "
                f"{type(exc).__name__}: {_one_line(exc)}")
            continue
        yield obj, source, None


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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _warn_no_hooks(obj, source: CellSource) -> None:
    hint = ""
    if callable(getattr(obj, "kernrnn_register_cells", None)):
        hint = " (its kernrnn_register_cells lacks the @hookimpl decorator)"
    warnings.warn(f"kernrnn: {source} implements no kernrnn hook{hint}; it adds no cells",
                  PluginWarning, stacklevel=3)


def _add_plugin(pm: pluggy.PluginManager, registry: CellRegistry, obj, source: CellSource):
    """Register one plugin and call its hook; on any failure leave no trace, raise PluginError."""
    if pm.is_registered(obj):
        return  # the same module behind two entry points
    try:
        name = pm.register(obj, name=source.plugin)
    except Exception as exc:  # pluggy's validation errors, name clashes
        raise PluginError(f"{source} could not be registered: {_one_line(exc)}") from exc
    try:
        pm.check_pending()  # a misspelt hook name fails here
    except pluggy.PluginValidationError as exc:
        pm.unregister(obj)
        raise PluginError(f"{source} implements an unknown hook: {_one_line(exc)}") from exc
    impls = [i for i in pm.hook.kernrnn_register_cells.get_hookimpls() if i.plugin_name == name]
    if not impls:
        _warn_no_hooks(obj, source)
    before = set(registry.names())
    with registry._adding_from(source):
        try:
            for impl in impls:
                kwargs = {"registry": registry} if "registry" in impl.argnames else {}
                impl.function(**kwargs)
        except Exception as exc:
            registry._remove(set(registry.names()) - before)  # all of the plugin, or nothing
            pm.unregister(obj)
            if isinstance(exc, PluginError):
                raise
            if isinstance(exc, CellError):
                raise BadCellError(f"{source} registered a bad cell: {_one_line(exc)}") from exc
            raise PluginError(f"{source} failed in kernrnn_register_cells: "
                              f"{type(exc).__name__}: {_one_line(exc)}") from exc


def load_registry(autoload: bool | None = None, plugins=(), strict: bool | None = None
                  ) -> CellRegistry:
    """Build a fresh registry from the shipped cells, entry points and ``plugins``.

    ``autoload`` (default: on unless ``KERNRNN_DISABLE_PLUGIN_AUTOLOAD`` is
    set) controls whether third-party entry points are loaded.  ``plugins``
    are extra plugin objects (modules or instances) registered too; their
    errors, and those of the shipped cells, always raise :class:`PluginError`.
    A broken entry-point plugin is skipped with a :class:`PluginWarning`
    (recorded in :attr:`CellRegistry.skipped`), or raises when ``strict``
    (default: ``KERNRNN_STRICT_PLUGINS`` set to 1).
    """
    if autoload is None:
        autoload = _autoload_default()
    if strict is None:
        strict = _strict_default()
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(CellSpecs)
    registry = CellRegistry()
    for obj, source in _builtin_plugins():  # first, so no plugin can take their names
        _add_plugin(pm, registry, obj, source)
    if autoload:
        for obj, source, error in _entry_point_plugins():
            try:
                if error is not None:
                    raise error
                _add_plugin(pm, registry, obj, source)
            except PluginError as exc:
                if strict:
                    raise
                reason = str(exc).removeprefix(f"{source} ")
                registry.skipped.append(SkippedPlugin(source, reason))
                warnings.warn(f"kernrnn: {exc}; skipped (set {STRICT_ENV}=1 to make this an "
                              f"error)", PluginWarning, stacklevel=2)
    for i, obj in enumerate(plugins):
        name = getattr(obj, "__name__", None) or f"{type(obj).__name__}-{i}"
        _add_plugin(pm, registry, obj, CellSource(name, "registered at run time"))
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


def _registered_source(cell) -> CellSource | None:
    """Where ``cell`` came from, if the process registry is built and holds it (for
    :func:`kernrnn.errors.describe_source`; never builds the registry, which validates cells)."""
    reg = _REGISTRY
    if reg is not None and cell.name in reg and reg.get(cell.name) is cell:
        return reg.source(cell.name)
    return None


errors.set_source_lookup(_registered_source)


def resolve_cell(cell) -> Cell:
    """A :class:`~kernrnn.cell.Cell` from a cell or a registered name."""
    if isinstance(cell, Cell):
        return cell
    if isinstance(cell, str):
        return get_registry().get(cell)
    raise TypeError(f"cell must be a registered name or a kernrnn.Cell, got {type(cell).__name__}")


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object (module or instance) into the process registry now.

    For notebooks and scripts that define a cell without packaging it; any
    problem raises :class:`PluginError`.
    """
    registry = get_registry()
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(CellSpecs)
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    _add_plugin(pm, registry, plugin, CellSource(name, "registered at run time"))
