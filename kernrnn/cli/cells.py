"""``kernrnn cells``: list the registered cells, where each comes from, and skipped plugins.

``--check`` compiles every cell as a run would (:func:`kernrnn.testing.check_compiles`):
its CPU kernels, a static check of the math for what GPUs cannot compile and,
where NVVM is installed, its CUDA kernels to PTX; any failure exits with status 1.
"""

from __future__ import annotations

import json
import sys
import warnings


def add_parser(sub) -> None:
    """Add the ``cells`` sub-command to ``sub``."""
    p = sub.add_parser("cells", help="list registered cells (name, gates, state, source, "
                                     "description, hyperparameters) and skipped plugins")
    p.add_argument("--check", action="store_true",
                   help="compile every cell's CPU kernels (float32, float64), check its math "
                        "for GPUs and, where NVVM is installed, compile its CUDA kernels to PTX; "
                        "exit 1 on any failure")
    p.add_argument("--json", action="store_true", help="machine-readable output (a list of cells)")
    p.add_argument("names", nargs="*", metavar="CELL", help="only these cells (default: all)")
    p.set_defaults(func=run)


def _registry():
    """The registry; skipped plugins are listed by this command, not warned about."""
    from kernrnn.plugins import PluginWarning, get_registry

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"kernrnn: .* skipped \(set", category=PluginWarning)
        return get_registry()


def run(args) -> int:
    """Print the registry as a table or JSON; with ``--check`` compile every cell."""
    registry = _registry()
    cells = [registry.get(name) for name in args.names] if args.names else list(registry)
    rows = []
    for cell in cells:
        src = registry.source(cell.name)
        rows.append({
            "name": cell.name, "gates": cell.gate_labels, "n_gates": cell.n_gates,
            "state": list(cell.state), "plugin": src.plugin,
            "distribution": src.distribution, "description": cell.description,
            "hyper": {h.name: h.default for h in cell.hyper},
        })
    failed = []
    if args.check:
        from kernrnn.testing.compiles import CompileCheckError, check_compiles

        for row, cell in zip(rows, cells):
            try:
                report = check_compiles(cell)
            except CompileCheckError as exc:
                report = exc.report
                failed.append(report)
            row["check"] = {"ok": report.ok, "checked": report.checked,
                            "skipped": report.skipped, "failures": report.failures}
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, registry.skipped)
        for cell in cells:
            if cell.hyper:  # what `kernrnn train --cell-arg NAME=VALUE` may set
                print(f"{cell.name} hyperparameters: " + ", ".join(
                    f"{h.name}={h.default!r}" + (f" ({h.description})" if h.description else "")
                    for h in cell.hyper))
        if args.check:
            for row in rows:
                check = row["check"]
                status = "ok" if check["ok"] else "FAILED"
                print(f"check {row['name']}: {status} ({', '.join(check['checked'])}"
                      + (f"; skipped {'; '.join(check['skipped'])}" if check["skipped"] else "")
                      + ")")
                for failure in check["failures"]:
                    print(f"  {failure}")
    for skip in registry.skipped:
        if args.json:
            print(f"kernrnn cells: {skip}", file=sys.stderr)
    if failed:
        print(f"kernrnn cells: error: {len(failed)} of {len(rows)} cells failed the compile "
              f"check: {', '.join(r.cell for r in failed)}", file=sys.stderr)
        return 1
    return 0


def _print_table(rows, skipped) -> None:
    header = ("cell", "gates", "state", "plugin", "distribution", "description")
    table = [header] + [
        (r["name"], r["gates"], ",".join(r["state"]), r["plugin"], r["distribution"],
         r["description"]) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if skipped:
        print(f"\nskipped plugins ({len(skipped)}):")
        for skip in skipped:
            print(f"  {skip.source.plugin} ({skip.source.distribution}): {skip.reason}")
