"""Every hook specification and every public name is documented and has a docstring.

"Documented" means an autodoc directive in the API pages under ``docs/``
covers it: ``automodule`` with ``:members:`` (which follows the module's
``__all__``), ``autoclass``/``autofunction``/..., an explicit ``py:`` entry,
or the generated hook reference (``kernrnn-hookspecs``).  A name re-exported
elsewhere (``kernrnn.RNN``) counts as documented when the object it names is
documented where it is defined (``kernrnn.layer.RNN``).  The test reads the
page sources, so it needs no Sphinx.

A new public module goes into PUBLIC_MODULES and gets a page under docs/api/.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from pathlib import Path

import pytest

from kernrnn.hooks import PROJECT, CellSpecs

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
import kernrnn_docs  # noqa: E402  (the docs' own Sphinx extension; Sphinx-free helpers)

PUBLIC_MODULES = [
    "kernrnn",
    "kernrnn.cell",
    "kernrnn.errors",
    "kernrnn.scalar_math",
    "kernrnn.autodiff",
    "kernrnn.hooks",
    "kernrnn.plugins",
    "kernrnn.layer",
    "kernrnn.regularization",
    "kernrnn.functional",
    "kernrnn.testing",
    "kernrnn.testing.conformance",
    "kernrnn.testing.reference",
    "kernrnn.testing.strategies",
    "kernrnn.testing.compiles",
    "kernrnn.cli",
    "kernrnn.torch",
    "kernrnn.torch.modules",
    "kernrnn.torch.cells",
    "kernrnn.torch.patching",
]

_DIRECTIVE = re.compile(
    r"^(?P<indent>[ \t]*)(?:\.\.[ \t]+|```\{)(?P<kind>auto\w+|py:\w+)(?:::|\})[ \t]+(?P<name>[\w.]+)"
)
_OPTION = re.compile(r"^[ \t]*:(?P<opt>[\w-]+):[ \t]*(?P<value>.*)$")


def page_sources() -> list[tuple[str, str]]:
    """(name, text) of every documentation page, plus the generated hook reference."""
    pages = [
        (str(p.relative_to(DOCS)), p.read_text())
        for p in sorted(DOCS.rglob("*.md"))
        if p.relative_to(DOCS).parts[0] not in ("_build", "examples", "benchmarks")
    ]
    hooks_used = any("kernrnn-hookspecs" in text for _, text in pages)
    if hooks_used:
        pages.append(("<kernrnn-hookspecs>", kernrnn_docs.hookspec_rst()))
    return pages


def _module_members(modname: str) -> list[str]:
    """What ``automodule`` with ``:members:`` documents, as autodoc decides it.

    The names in ``__all__`` (or the public names when there is none) that are
    classes or functions defined in the module, or data with a ``#:`` comment
    there; autodoc skips imported objects and undocumented data.
    """
    module = importlib.import_module(modname)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    found = []
    for n in names:
        value = getattr(module, n)
        if isinstance(value, types.ModuleType):
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            if value.__module__ == modname:
                found.append(n)
        elif doc_comment(modname, n):
            found.append(n)
    return found


def documented_names(pages, explicit_data=False) -> set[str]:
    """Fully qualified names covered by the directives in ``pages``.

    With ``explicit_data``, only the names given an explicit ``py:data`` entry
    (whose text is then the data's documentation).
    """
    names: set[str] = set()
    for _, text in pages:
        lines = text.splitlines()
        module = None
        for i, line in enumerate(lines):
            m = _DIRECTIVE.match(line)
            if not m:
                continue
            kind, name = m["kind"], m["name"]
            if kind in ("automodule", "py:module", "py:currentmodule"):
                module = name
            elif kind.startswith("py:") and "." not in name and module:
                name = f"{module}.{name}"  # relative to the current module
            if explicit_data:
                if kind == "py:data":
                    names.add(name)
                continue
            options = {}
            for follow in lines[i + 1:]:
                o = _OPTION.match(follow)
                if not o:
                    break
                options[o["opt"]] = o["value"]
            names.add(name)
            if kind == "automodule" and "members" in options:
                exclude = {s.strip() for s in options.get("exclude-members", "").split(",")}
                names |= {f"{name}.{n}" for n in _module_members(name) if n not in exclude}
    return names


def is_documented(qualname: str, obj, documented: set[str]) -> bool:
    if qualname in documented:
        return True
    return kernrnn_docs.canonical_target(qualname, dict.fromkeys(documented)) is not None


def own_docstring(obj) -> str:
    """The docstring written for ``obj`` itself (not inherited, not a dataclass's signature)."""
    obj = obj.fget if isinstance(obj, property) else obj
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__") or ""
        if doc.startswith(f"{obj.__name__}("):  # dataclass default: its signature
            return ""
        return doc.strip()
    return (getattr(obj, "__doc__", None) or "").strip()


def doc_comment(modname: str, name: str) -> str:
    """The ``#:`` comment above the module-level assignment of ``name``, if any."""
    lines = inspect.getsource(importlib.import_module(modname)).splitlines()
    assign = re.compile(rf"^{re.escape(name)}\s*(:[^=]*)?=")
    for i, line in enumerate(lines):
        if assign.match(line) and i and lines[i - 1].startswith("#:"):
            return lines[i - 1][2:].strip()
    return ""


def has_docs(modname: str, name: str, obj, described=frozenset()) -> bool:
    """A docstring for classes and functions; for data a ``#:`` comment or a ``py:data`` entry."""
    if inspect.isclass(obj) or callable(obj) and not hasattr(obj, "project_name"):
        return bool(own_docstring(obj))
    if f"{modname}.{name}" in described:
        return True
    return any(doc_comment(m, name) for m in PUBLIC_MODULES)


def public_names():
    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        assert hasattr(module, "__all__"), f"public module {modname} has no __all__"
        for name in module.__all__:
            yield modname, name, getattr(module, name)


def undocumented(names, documented, described=frozenset()):
    """The public names that the pages do not cover or that lack a docstring."""
    missing, no_doc = [], []
    for modname, name, obj in names:
        if not is_documented(f"{modname}.{name}", obj, documented):
            missing.append(f"{modname}.{name}")
        if not has_docs(modname, name, obj, described):
            no_doc.append(f"{modname}.{name}")
    return missing, no_doc


@pytest.fixture(scope="module")
def documented():
    return documented_names(page_sources())


def test_the_docs_have_api_pages(documented):
    assert "kernrnn.cell" in documented and "kernrnn.layer.RNN" in documented


def test_every_hook_spec_is_documented_with_a_docstring(documented):
    specs = [(name, fn) for name, fn, _ in kernrnn_docs.hookspecs()]
    marked = [n for n, v in vars(CellSpecs).items() if hasattr(v, f"{PROJECT}_spec")]
    assert [n for n, _ in specs] == marked and marked, "no hook specification found"
    for name, fn in specs:
        assert name.startswith(f"{PROJECT}_"), name
        assert own_docstring(fn), f"hook {name} has no docstring"
        assert f"kernrnn.hooks.CellSpecs.{name}" in documented, f"hook {name} is not documented"


def test_every_public_name_is_documented_with_a_docstring(documented):
    described = documented_names(page_sources(), explicit_data=True)
    missing, no_doc = undocumented(public_names(), documented, described)
    assert not missing, f"public names not in the API pages: {missing}"
    assert not no_doc, f"public names without a docstring or #: comment: {no_doc}"


def test_public_methods_have_docstrings():
    lacking = []
    seen = set()
    for _, _, obj in public_names():
        if not inspect.isclass(obj) or obj in seen or not obj.__module__.startswith("kernrnn"):
            continue
        seen.add(obj)
        for attr, value in vars(obj).items():
            if attr.startswith("_") or not (callable(value) or isinstance(value, property)):
                continue
            if not own_docstring(value):
                lacking.append(f"{obj.__module__}.{obj.__qualname__}.{attr}")
    assert not lacking, f"public methods without a docstring: {lacking}"


def test_the_check_notices_an_undocumented_name(documented):
    """The checker itself: a new, undocumented public function is reported."""

    def new_function():
        pass

    cell_module = importlib.import_module("kernrnn.cell")
    fake = [("kernrnn.cell", "new_function", new_function),
            ("kernrnn.cell", "Cell", cell_module.Cell)]
    missing, no_doc = undocumented(fake, documented)
    assert missing == ["kernrnn.cell.new_function"]
    assert no_doc == ["kernrnn.cell.new_function"]
