"""``kernrnn cells``: list the registered cells and where each comes from."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    """Add the ``cells`` sub-command to ``sub``."""
    p = sub.add_parser("cells", help="list registered cells (name, source, gates, state)")
    p.add_argument("--check", action="store_true",
                   help="also compile every cell's CPU kernels (float32, float64)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    """Print the registry as a table or JSON; with ``--check`` compile every cell."""
    from kernrnn.plugins import get_registry

    registry = get_registry()
    rows = []
    for cell in registry:
        src = registry.source(cell.name)
        rows.append({
            "name": cell.name, "gates": cell.gate_labels, "n_gates": cell.n_gates,
            "state": list(cell.state), "plugin": src.plugin,
            "distribution": src.distribution, "description": cell.description,
        })
    if args.check:
        from kernrnn.backends import cpu

        for cell in registry:
            for dtype in ("float32", "float64"):
                cpu.get_kernels(cell, dtype)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("cell", "gates", "state", "plugin", "distribution")
    table = [header] + [
        (r["name"], r["gates"], ",".join(r["state"]), r["plugin"], r["distribution"]) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if args.check:
        print(f"compiled CPU kernels of {len(rows)} cells (float32, float64): ok")
    return 0
