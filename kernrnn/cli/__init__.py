"""The ``kernrnn`` command line.

Each sub-command lives in its own module and adds itself through a
``add_parser(subparsers)`` function listed in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "COMMANDS"]

# module paths providing add_parser(subparsers); each parser sets func=handler
COMMANDS = [
    "kernrnn.cli.cells",
    "kernrnn.cli.train",
    "kernrnn.cli.bench",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``kernrnn`` parser with one sub-parser per module in :data:`COMMANDS`."""
    from kernrnn import __version__

    parser = argparse.ArgumentParser(
        prog="kernrnn",
        description="Recurrent networks with fused Numba kernels; cells are plugins.",
    )
    parser.add_argument("--version", action="version", version=f"kernrnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for modname in COMMANDS:
        importlib.import_module(modname).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``kernrnn`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as exc:
        # Bad input gets one clear line, not a traceback.
        print(f"kernrnn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
