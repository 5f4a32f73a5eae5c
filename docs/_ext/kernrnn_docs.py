"""Sphinx helpers for kernrnn's documentation.

* ``kernrnn-hookspecs``: the plugin hook reference, generated from the hook
  specifications in :class:`kernrnn.hooks.CellSpecs`, so a new hook is
  documented as soon as it is specified (use it inside an ``eval-rst`` block).
* ``kernrnn-cells``: a table of the cells shipped with kernrnn, read from the
  registry.
* ``kernrnn-cli-help``: the ``--help`` text of ``kernrnn`` and of each
  sub-command in :data:`kernrnn.cli.COMMANDS` (or of the one named), so the
  command-line reference follows the parsers.

The functions that produce text import nothing from Sphinx, so the test-suite
(tests/test_docs_coverage.py) can call them without Sphinx installed.
"""

from __future__ import annotations

import inspect
from pathlib import Path


def hookspecs() -> list[tuple[str, object, dict]]:
    """(name, function, pluggy options) of every hook specification, in source order."""
    from kernrnn.hooks import PROJECT, CellSpecs

    marker = f"{PROJECT}_spec"
    found = []
    for name, fn in vars(CellSpecs).items():
        opts = getattr(fn, marker, None)
        if opts is not None:
            found.append((name, fn, dict(opts)))
    return found


def hookspec_rst() -> str:
    """reStructuredText documenting every hook specification."""
    lines = [".. autoclass:: kernrnn.hooks.CellSpecs", ""]
    for name, fn, opts in hookspecs():
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        flags = ", ".join(f"``{k}={v!r}``" for k, v in sorted(opts.items()) if v) or "none"
        lines += [
            f".. automethod:: kernrnn.hooks.CellSpecs.{name}",
            "",
            f"   **Hook options:** {flags}.  A plugin implements it as a plain function",
            "   (or method) of the same name, decorated with :data:`kernrnn.hookimpl`,",
            "   taking any subset of these arguments::",
            "",
            "      from kernrnn import hookimpl",
            "",
            "      @hookimpl",
            f"      def {name}({', '.join(params)}):",
            "          ...",
            "",
        ]
    return "\n".join(lines)


def cli_help(command: str | None = None, width: int = 88) -> list[tuple[str, str]]:
    """(title, help text) for ``kernrnn`` and its sub-commands, or for ``command`` only.

    An unknown ``command`` gives an empty list (the sub-command is not part of
    this build).
    """
    import argparse
    import os

    from kernrnn.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to the terminal width
    try:
        parser = build_parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if command is not None:
            sub = subparsers.choices.get(command)
            return [] if sub is None else [(f"kernrnn {command}", sub.format_help())]
        found = [("kernrnn", parser.format_help())]
        found += [(f"kernrnn {name}", sub.format_help()) for name, sub in subparsers.choices.items()]
        return found
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def setup(app):
    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective

    class HookSpecs(SphinxDirective):
        """Autodoc entries for every hook specification."""

        def run(self):
            container = nodes.container()
            self.state.nested_parse(
                StringList(hookspec_rst().splitlines(), source="kernrnn-hookspecs"),
                self.content_offset, container,
            )
            return container.children

    class Cells(SphinxDirective):
        """Table of the shipped cells: name, gate blocks, state, description."""

        def run(self):
            from kernrnn.plugins import load_registry

            registry = load_registry(autoload=False)
            header = ("cell", "gate blocks (weight row order)", "state", "description")
            rows = [(c.name, f"{c.n_gates}: {', '.join(c.gate_labels)}", ", ".join(c.state),
                     c.description) for c in registry]
            table = nodes.table()
            group = nodes.tgroup(cols=len(header))
            table += group
            for width in (12, 24, 10, 44):
                group += nodes.colspec(colwidth=width)
            thead, tbody = nodes.thead(), nodes.tbody()
            group += thead
            group += tbody
            for target, values in ((thead, [header]), (tbody, rows)):
                for values_row in values:
                    row = nodes.row()
                    for i, value in enumerate(values_row):
                        entry = nodes.entry()
                        text = nodes.literal(text=value) if i == 0 and target is tbody \
                            else nodes.Text(value)
                        entry += nodes.paragraph("", "", text)
                        row += entry
                    target += row
            return [table]

    class CliHelp(SphinxDirective):
        """``--help`` of the command line, or a note when the command is absent."""

        optional_arguments = 1

        def run(self):
            command = self.arguments[0] if self.arguments else None
            result = []
            helps = cli_help(command)
            if not helps:
                note = nodes.admonition()
                note += nodes.title(text=f"kernrnn {command}: not in this build")
                note += nodes.paragraph(text=f"This build of kernrnn has no '{command}' command; "
                                             "its help appears here once it does.")
                return [note]
            for title, text in helps:
                if command is None:
                    result.append(nodes.rubric(text=title))
                block = nodes.literal_block(text, text)
                block["language"] = "text"
                result.append(block)
            return result

    app.add_directive("kernrnn-hookspecs", HookSpecs)
    app.add_directive("kernrnn-cells", Cells)
    app.add_directive("kernrnn-cli-help", CliHelp)
    _setup_aliases(app)
    app.connect("build-finished", _check_offline)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def remote_scripts(html: str) -> list[str]:
    """``src``/``href`` of scripts and stylesheets that ``html`` loads from another host."""
    import re

    tags = re.findall(r"<(?:script|link)\b[^>]*>", html)
    return [m for tag in tags for m in re.findall(r"(?:src|href)=[\"'](?:https?:)?//[^\"']+", tag)
            if "<link" not in tag or "stylesheet" in tag]


def _check_offline(app, exc) -> None:
    """Fail the build when a page would fetch a script or stylesheet (MathJax, say) from a CDN."""
    if exc is not None or app.builder.format != "html":
        return
    bad = {}
    for page in Path(app.outdir).rglob("*.html"):
        found = remote_scripts(page.read_text(encoding="utf-8", errors="replace"))
        if found:
            bad[page.name] = found
    if bad:
        raise RuntimeError(f"pages load scripts or styles from the network (the docs must work "
                           f"offline): {bad}")


# -- references to re-exported names ------------------------------------------
# kernrnn re-exports names (kernrnn.RNN is kernrnn.layer.RNN, kernrnn.testing
# .check_cell is kernrnn.testing.conformance.check_cell).  Each object is
# documented once, where it is defined; a reference by any public name that
# imports to the same object resolves to that entry.

_SCALARS = (str, bytes, int, float, bool, type(None), tuple)


def import_path(dotted: str):
    """The object at ``dotted`` (module attributes and class members), or None."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _unwrap(obj):
    return obj.fget if isinstance(obj, property) else obj


def canonical_target(target: str, documented: dict, modname=None, clsname=None):
    """The documented name of the object ``target`` refers to, or None."""
    candidates = []
    if modname and clsname:
        candidates.append(f"{modname}.{clsname}.{target}")
    if modname:
        candidates.append(f"{modname}.{target}")
    candidates.append(target)
    for cand in candidates:
        if not cand.startswith("kernrnn"):
            continue
        obj = import_path(cand)
        if obj is None:
            continue
        qual = getattr(_unwrap(obj), "__qualname__", None)
        mod = getattr(_unwrap(obj), "__module__", None)
        if qual and mod and f"{mod}.{qual}" in documented:
            return f"{mod}.{qual}"
        if isinstance(obj, _SCALARS):
            continue
        for name in documented:
            if import_path(name) is obj:
                return name
    return None


def _resolve_alias(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    target = canonical_target(node["reftarget"], domain.objects,
                              node.get("py:module"), node.get("py:class"))
    if target is None or target == node["reftarget"]:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], target,
                               node, contnode)


def _setup_aliases(app):
    app.connect("missing-reference", _resolve_alias)
