"""The ``kernrnn`` command line.

Each sub-command lives in its own module and adds itself through a
``add_parser(subparsers)`` function listed in :data:`COMMANDS`.

Every user error (bad options or files, a broken plugin, a missing optional
dependency, a diverging run) ends in one ``kernrnn COMMAND: error: ...`` line
on stderr and exit status 2, never a traceback.  A closed output pipe
(``kernrnn cells --json | head -1``) ends quietly with status 1, and Ctrl-C
with status 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

__all__ = ["main", "COMMANDS", "MissingExtraError", "require_extra"]

# module paths providing add_parser(subparsers); each parser sets func=handler
COMMANDS = [
    "kernrnn.cli.cells",
    "kernrnn.cli.train",
    "kernrnn.cli.predict",
    "kernrnn.cli.bench",
]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require_extra(module: str, extra: str, purpose: str):
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install 'kernrnn[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed ({e}); install it with: "
            f"pip install 'kernrnn[{extra}]'") from None


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
    from kernrnn.plugins import PluginError

    parser = build_parser()
    args = parser.parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"kernrnn {args.command}: warning: {' '.join(str(message).split())}",
              file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning  # not two lines with a source excerpt
            return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly; further writes go nowhere.
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        print(f"kernrnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"kernrnn {args.command}: error: out of memory; use smaller sizes",
              file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, PluginError, MissingExtraError) as exc:
        # Bad input gets one clear line, not a traceback.
        message = " ".join(str(exc).split("\n"))
        print(f"kernrnn {args.command}: error: {message}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
