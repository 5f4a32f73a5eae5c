"""Which implementation runs the recurrence: the GEMM-per-step loops of
:mod:`kernrnn.backends.cuda.host`, or the persistent fused kernel of
:mod:`kernrnn.backends.cuda.persistent`.

Choose with ``KERNRNN_CUDA_PATH=auto|gemm|persistent`` or :func:`set_path`.
``auto`` asks the persistent module's ``supports``, which says no until the
kernel has been measured correct and faster on a GPU (``persistent.AUTO``).
The persistent module's contract:

* ``supports(cell, dtype, B, H, training) -> bool`` (used by ``auto``);
* ``forward_loop(cell, XW, W_hh, b_hh, States, Saved, Y, lengths, reverse,
  training)`` fills ``States`` (all boundaries after the initial one; in
  inference two slots taking turns, initial state in slot 0, final in slot
  ``T & 1``), ``Saved`` (when ``training``) and ``Y``, exactly as the GEMM loop does;
* ``backward_loop(cell, dY, dS, W_hh, States, Saved, lengths, reverse, dXW,
  dHU)``: ``dS [S,B,H]`` holds ``dhn`` on entry and the complete ``dh0`` on
  exit; fills ``dXW`` and ``dHU`` (zero rows at masked steps).

Both run on CuPy's current stream without host synchronisation; ``lengths``
is int64 ``[B]`` on the device; ``Y`` and ``dY`` may be strided views (a
slice of a bidirectional layer's output); all other arrays are C-contiguous.
"""

from __future__ import annotations

import importlib
import os
import warnings

import numpy as np

__all__ = ["PATHS", "PATH_ENV", "set_path", "get_path", "resolve_path", "persistent_module",
           "choose_path", "persistent_failed"]

PATHS = ("auto", "gemm", "persistent")
PATH_ENV = "KERNRNN_CUDA_PATH"

_path_override: str | None = None


def set_path(path: str | None) -> None:
    """Choose the recurrence implementation: ``"auto"``, ``"gemm"``, ``"persistent"``.

    None restores the default (environment variable ``KERNRNN_CUDA_PATH``, else
    ``"auto"``).
    """
    global _path_override
    if path is not None:
        _check_path(path, "path")
    _path_override = path


def get_path() -> str:
    """The configured path (``set_path`` first, then ``KERNRNN_CUDA_PATH``, else auto)."""
    if _path_override is not None:
        return _path_override
    return _check_path(os.environ.get(PATH_ENV, "auto").strip().lower() or "auto", PATH_ENV)


def _check_path(path, name):
    if path not in PATHS:
        raise ValueError(f"{name} must be one of {', '.join(PATHS)}; got {path!r}")
    return path


def persistent_module():
    """:mod:`kernrnn.backends.cuda.persistent`, or None where it cannot be imported."""
    try:
        return importlib.import_module("kernrnn.backends.cuda.persistent")
    except ModuleNotFoundError as exc:
        if exc.name != "kernrnn.backends.cuda.persistent":
            raise
        return None


def resolve_path(path, cell, dtype, B, H, training) -> str:
    """``"gemm"`` or ``"persistent"``: ``path`` (None: :func:`get_path`), with ``auto``
    asking the persistent module whether it takes this problem."""
    path = get_path() if path is None else _check_path(path, "path")
    if path == "gemm":
        return "gemm"
    mod = persistent_module()
    if path == "persistent":
        if mod is None:
            raise ValueError(
                "path='persistent' needs kernrnn.backends.cuda.persistent, which this "
                "installation lacks; use path='gemm' or 'auto'"
            )
        return "persistent"
    supports = getattr(mod, "supports", None) if mod is not None else None
    if supports is not None and supports(cell, np.dtype(dtype), B, H, training):
        return "persistent"
    return "gemm"


_fallback_warned: set = set()  # cell names warned about (once per process)
# (cell name, dtype, B, H, training) where the persistent kernel failed: gemm from then on
_persistent_failures: set = set()
_failure_warned: set = set()  # cell names warned about a failed persistent kernel


def _problem(cell, dtype, B, H, training):
    return cell.name, np.dtype(dtype).str, int(B), int(H), bool(training)


def persistent_failed(path, cell, dtype, B, H, training, exc) -> None:
    """The persistent kernel raised ``exc`` (a launch or compile error, too few resources
    on this GPU): re-raise it where ``path="persistent"`` was asked for explicitly;
    otherwise the caller runs the GEMM path, this problem stays on it from now on, and
    one warning per cell says why."""
    if path == "persistent":
        raise exc
    _persistent_failures.add(_problem(cell, dtype, B, H, training))
    if cell.name not in _failure_warned:
        _failure_warned.add(cell.name)
        warnings.warn(f"kernrnn: the persistent CUDA kernel failed for cell {cell.name!r} "
                      f"(B={B}, H={H}, {np.dtype(dtype)}: {type(exc).__name__}: {exc}); "
                      f"running the 'gemm' path instead", RuntimeWarning, stacklevel=3)


def choose_path(path, cell, dtype, B, H, training, regularised=False, projected=False) -> str:
    """The path one forward call runs on: :func:`resolve_path`, then the persistent
    kernel's limits.

    The persistent kernel has no dropout masks and no ``W_hr``: calls with
    regularisation or a projection run on ``"gemm"``.  It also runs only cells
    with a dense recurrence on h over all gates, one stage (``cell.plain``).  For another cell,
    an explicit ``path="persistent"`` raises; a ``persistent`` that comes from
    ``KERNRNN_CUDA_PATH`` or :func:`set_path` (a process-wide choice, meant for
    the cells that can use it) falls back to ``"gemm"`` with one warning per cell.
    A problem on which the persistent kernel failed (:func:`persistent_failed`) runs on
    ``"gemm"`` unless ``path="persistent"``.
    """
    chosen = resolve_path(path, cell, dtype, B, H, training)
    if chosen == "persistent" and path != "persistent" \
            and _problem(cell, dtype, B, H, training) in _persistent_failures:
        return "gemm"  # it failed here before (persistent_failed)
    if chosen != "persistent" or regularised or projected:
        return "gemm" if chosen == "persistent" else chosen
    if cell.plain:
        return chosen
    if path is not None:
        raise ValueError(f"path='persistent' runs cells with a dense recurrence on h over all "
                         f"gates, one stage and no per-unit parameters, normalisation or raw "
                         f"input; cell {cell.name!r} needs path='gemm' or 'auto'")
    if cell.name not in _fallback_warned:
        _fallback_warned.add(cell.name)
        warnings.warn(f"kernrnn: the persistent CUDA path ({PATH_ENV} or set_path) runs only "
                      f"cells with a dense recurrence on h over all gates, one stage and no "
                      f"per-unit parameters, normalisation or raw input; cell {cell.name!r} "
                      f"runs on the 'gemm' path",
                      RuntimeWarning, stacklevel=4)
    return "gemm"
