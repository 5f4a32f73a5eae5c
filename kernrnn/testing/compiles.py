"""Compile checks for a cell: what ``kernrnn cells --check`` runs, for plugin authors too.

:func:`check_compiles` compiles a cell's kernels the way they are used, instead
of trusting that valid Python will compile:

* its scalar math for each precision (``kernrnn.scalar.check_cell_compiles``);
* its **CPU kernels**: a tiny forward (training and inference) and backward
  through :class:`kernrnn.RNN`, so the backend's ``get_kernels`` builds and
  Numba compiles exactly what a real run does;
* math the **GPU** cannot compile, flagged without a GPU: a static check of
  every function the cell's math calls (only ``math``, the
  :mod:`kernrnn.cell` helpers, plain scalar Python functions and a few
  builtins; no NumPy or SciPy functions, no lists, dicts or sets, which need
  Numba's runtime), and float32 math that computes in float64 (slow on GPUs);
* where NVVM is installed (the ``cudasim`` or CUDA extras), its **CUDA
  kernels compiled to PTX** for sm_90, float32 ones without any ``.f64``
  instruction.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import math
import os
import re
import sys
import textwrap
import types
from dataclasses import dataclass, field

import numpy as np

from kernrnn.errors import CellError
from kernrnn.layer import RNN
from kernrnn.plugins import resolve_cell
from kernrnn.scalar import check_cell_compiles, find_precision_leaks

__all__ = ["check_compiles", "CompileReport", "CompileCheckError", "gpu_math_problems",
           "ptx_unavailable_reason"]

#: Builtins a cell's math may call (Numba compiles them for CPUs and GPUs alike).
ALLOWED_BUILTINS = frozenset({"abs", "min", "max", "float", "int", "bool", "range", "len"})
_CONTAINERS = {ast.List: "a list", ast.ListComp: "a list comprehension", ast.Dict: "a dict",
               ast.DictComp: "a dict comprehension", ast.Set: "a set",
               ast.SetComp: "a set comprehension", ast.GeneratorExp: "a generator"}
_F64 = re.compile(r"\.f64\b")


class CompileCheckError(AssertionError):
    """A cell's kernels do not compile (or compile to float64 math in float32).

    ``report`` is the :class:`CompileReport` with every failure.
    """

    def __init__(self, report: "CompileReport"):
        super().__init__(str(report))
        self.report = report


@dataclass
class CompileReport:
    """What :func:`check_compiles` checked, skipped (with the reason) and found wrong."""

    cell: str
    checked: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failures

    def __str__(self) -> str:
        head = f"cell {self.cell!r}: " + ("ok" if self.ok else f"{len(self.failures)} failure(s)")
        parts = [head, "checked " + ", ".join(self.checked)]
        if self.skipped:
            parts.append("skipped " + "; ".join(self.skipped))
        parts += self.failures
        return "; ".join(parts)


# -- static check of GPU-compilable math ---------------------------------------------------


def _namespace(fn) -> dict:
    ns = dict(fn.__globals__)
    if fn.__closure__:
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
            ns[name] = cell.cell_contents
    return ns


_MISSING = object()


def _resolve(node, ns):
    """The object an expression names (``np.exp``, ``math.tanh``, ``helper``), or _MISSING."""
    if isinstance(node, ast.Name):
        if node.id in ns:
            return ns[node.id]
        return getattr(builtins, node.id, _MISSING)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, ns)
        return _MISSING if base is _MISSING else getattr(base, node.attr, _MISSING)
    return _MISSING


def _callee_problem(obj, label) -> str | None:
    if obj is _MISSING:
        return None  # a local variable or an argument: nothing to say statically
    if isinstance(obj, types.BuiltinFunctionType) and getattr(math, obj.__name__, None) is obj:
        return None
    if isinstance(obj, type) and issubclass(obj, np.generic):
        return None  # np.float32(x): a scalar conversion
    if getattr(builtins, getattr(obj, "__name__", ""), None) is obj:
        return None if obj.__name__ in ALLOWED_BUILTINS else (
            f"calls the builtin {label}(), which CUDA kernels cannot compile")
    module = getattr(obj, "__module__", None) or type(obj).__module__ or ""
    special = sys.modules.get("scipy.special")
    if isinstance(obj, np.ufunc) and getattr(special, obj.__name__, None) is obj:
        module = "scipy.special"  # SciPy's ufuncs carry no module of their own
    elif isinstance(obj, np.ufunc) and getattr(np, obj.__name__, None) is not obj:
        return (f"calls the ufunc {label} (not from math), which CUDA kernels cannot call; "
                f"use math functions")
    if module.split(".")[0] == "numpy":
        alt = getattr(math, getattr(obj, "__name__", ""), None)
        hint = f"; use math.{obj.__name__}" if alt is not None else ""
        return f"calls the NumPy function {label}, which CUDA kernels cannot call{hint}"
    if module.split(".")[0] == "scipy":
        return f"calls the SciPy function {label}, which neither Numba target can compile"
    if hasattr(obj, "py_func"):
        return (f"calls {label}, an already compiled Numba function, which CUDA kernels "
                f"cannot call; pass the plain Python function (kernrnn compiles it)")
    if isinstance(obj, types.FunctionType):
        return None  # a helper: checked on its own
    return (f"calls {label} ({type(obj).__name__} from {module or 'unknown'}); cell math may "
            f"call only math functions, kernrnn.cell helpers and plain scalar functions")


def _functions_of(fn):
    """``fn``, its precision variants and the plain helpers they call, recursively."""
    from kernrnn.scalar import _helpers

    seen, stack = [], [fn]
    while stack:
        f = stack.pop()
        if f in seen or not isinstance(f, types.FunctionType):
            continue
        seen.append(f)
        variants = getattr(f, "kernrnn_variants", None)
        if isinstance(variants, dict):
            stack.extend(variants.values())
        stack.extend(obj for _, obj in _helpers(f))
    return seen


def gpu_math_problems(cell) -> list[str]:
    """Calls and constructs in a cell's math that CUDA kernels cannot compile, each with its line.

    A static check (no GPU, no NVVM): every function the math calls must be a
    ``math`` function, a plain Python helper (checked the same way), a
    NumPy scalar type or an allowed builtin; lists, dicts and sets need
    Numba's runtime, which GPU kernels lack.
    """
    problems = []
    roots = [cell.math_function(which) for which, _, _ in cell.math_signatures()]
    for fn in [f for root in roots for f in _functions_of(root)]:
        try:
            src = textwrap.dedent(inspect.getsource(fn))
            filename = inspect.getsourcefile(fn) or fn.__code__.co_filename
        except (OSError, TypeError):
            continue  # check_cell_compiles reports unreadable sources
        first = fn.__code__.co_firstlineno
        ns = _namespace(fn)
        fdef = ast.parse(src).body[0]
        for node in ast.walk(fdef):
            where = f"{os.path.basename(filename)} line {first + getattr(node, 'lineno', 1) - 1}"
            if type(node) in _CONTAINERS and node is not fdef:
                problems.append(f"{fn.__qualname__} ({where}) builds {_CONTAINERS[type(node)]}, "
                                f"which needs Numba's runtime (NRT), absent in CUDA kernels; "
                                f"use a tuple")
            elif isinstance(node, ast.Call):
                label = ast.unparse(node.func)
                problem = _callee_problem(_resolve(node.func, ns), label)
                if problem:
                    problems.append(f"{fn.__qualname__} ({where}) {problem}")
    return problems


# -- CUDA ----------------------------------------------------------------------------------


def ptx_unavailable_reason() -> str | None:
    """Why CUDA kernels cannot be compiled to PTX here, or None when they can (NVVM works)."""
    try:
        from numba import cuda
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return f"numba-cuda is not installed ({type(exc).__name__}); pip install 'kernrnn[cudasim]'"
    from kernrnn.backends.cuda import SIMULATOR

    if SIMULATOR:
        return "the CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM=1)"
    try:
        cuda.compile_ptx(_noop_kernel, "void(float32[:])", cc=(9, 0))
    except Exception as exc:  # noqa: BLE001
        return (f"NVVM is not available ({type(exc).__name__}); install "
                f"'kernrnn[cudasim]' for the PTX check")
    return None


def _noop_kernel(a):
    pass


class _PtxToolchainMissing(Exception):
    """Compiling a kernel to PTX needs a library this machine lacks (the CUDA driver,
    NVVM, libdevice): a fact about the machine, not about the cell."""


def _toolchain_missing(exc: BaseException) -> bool:
    # numba-cuda's CudaSupportError and NvvmSupportError are ImportErrors
    return isinstance(exc, ImportError) or "driver library cannot be found" in str(exc)


def _check_ptx(cell, dtype) -> list[str]:
    """Failures of ``cell``'s kernels; raises :class:`_PtxToolchainMissing` when a kernel
    cannot be compiled here for want of a CUDA library."""
    from numba import cuda

    from kernrnn.backends import cuda as cb

    try:
        kernels = cb.get_kernels(cell, dtype)
    except Exception as exc:
        if _toolchain_missing(exc):
            raise _PtxToolchainMissing(f"loading the kernels needs a CUDA library missing here "
                                       f"({type(exc).__name__}: {exc})") from exc
        raise
    failures = []
    for name, sig in cb.ptx_signatures(cell, dtype).items():
        try:
            ptx, _ = cuda.compile_ptx(getattr(kernels, name), sig, cc=(9, 0))
        except Exception as exc:  # noqa: BLE001 - reported with the kernel's name
            if _toolchain_missing(exc):
                raise _PtxToolchainMissing(
                    f"compiling {name} needs a CUDA library missing here ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:200]})") from exc
            failures.append(f"CUDA kernel {name} ({np.dtype(dtype)}) does not compile to PTX: "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
            continue
        if np.dtype(dtype) == np.float32:
            hits = [line.strip() for line in ptx.splitlines() if _F64.search(line)]
            if hits:
                code = [h for h in hits if not h.startswith(".reg")] or hits
                failures.append(f"CUDA kernel {name} (float32) holds {len(hits)} float64 "
                                f"instructions, e.g. {' '.join(code[0].split())!r}, "
                                f"{_f64_origin(cell, getattr(kernels, name), sig)}")
    return failures


_LOC = re.compile(r"^\s*\.loc\s+\d+\s+(\d+)\s")


def _f64_origin(cell, kernel, sig) -> str:
    """``from FUNCTION (FILE line N: 'text')``: where a float32 kernel's float64 code comes from.

    The kernel is compiled again with line information; each ``.f64`` instruction
    follows a ``.loc`` with its source line.  Numba inlines the cell's math into the
    kernel and reports those lines under the kernel's own file, so a line is matched
    with the functions of the cell's math (and their helpers) whose source holds it.
    Without a match, the float64 types Numba infers (:func:`find_precision_leaks`).
    """
    from numba import cuda

    lines = []
    try:
        ptx, _ = cuda.compile_ptx(kernel, sig, cc=(9, 0), lineinfo=True)
    except Exception:  # noqa: BLE001 - the origin is a courtesy; the failure stands
        ptx = ""
    line = None
    for text in ptx.splitlines():
        m = _LOC.match(text)
        if m:
            line = int(m.group(1))
        elif line is not None and _F64.search(text) and line not in lines:
            lines.append(line)
    spans = []
    for fn in [f for which, _, _ in cell.math_signatures()
               for f in _functions_of(cell.math_function(which))]:
        try:
            src, first = inspect.getsourcelines(fn)
            filename = inspect.getsourcefile(fn) or fn.__code__.co_filename
        except (OSError, TypeError):
            continue
        spans.append((first, first + len(src) - 1, fn, filename, src))
    found = []
    for line in lines:
        for first, last, fn, filename, src in spans:
            if first <= line <= last:
                found.append(f"{fn.__qualname__} ({os.path.basename(filename)} line {line}: "
                             f"{src[line - first].strip()!r})")
                break
        if len(found) == 3:
            break
    if found:
        return "from " + "; then ".join(dict.fromkeys(found))
    leaks = [leak for which, sizes, _ in cell.math_signatures()
             for leak in _leaks(cell.math_function(which), sizes)]
    if leaks:
        return "float64 computed at " + "; then ".join(leaks[:3])
    return "from no line of the cell's math (a function Numba's CUDA target lowers to float64)"


def _leaks(fn, sizes) -> list[str]:
    import numba

    args = tuple(numba.types.UniTuple(numba.float32, n) if n else numba.types.Tuple(())
                 for n in sizes)
    try:
        return find_precision_leaks(fn, np.float32, args)
    except Exception:  # noqa: BLE001 - a courtesy, as above
        return []


# -- the whole check -----------------------------------------------------------------------


def _run_cpu_kernels(cell, dtype) -> None:
    """A tiny forward (training and inference) and backward: compiles what a real run uses."""
    layer = RNN(cell, 2, 2 * cell.n_heads, dtype=dtype, seed=0)
    x = np.zeros((2, 1, 2), dtype=dtype)
    y, _ = layer(x)
    layer.backward(np.ones_like(y))
    layer.eval()
    layer(x)


def _scalar_args(cell, dtype):
    """Numba argument types of each function of the math (:meth:`Cell.math_signatures`)."""
    import numba

    nb = numba.from_dtype(np.dtype(dtype))

    def tuple_type(n):
        return numba.types.UniTuple(nb, n) if n else numba.types.Tuple(())

    return {which: tuple(tuple_type(n) for n in sizes)
            for which, sizes, _ in cell.math_signatures()}


def check_compiles(cell, dtypes=("float32", "float64"), cpu=True, cuda=None) -> CompileReport:
    """Compile ``cell`` (a Cell or a registered name) as every backend would.

    ``cuda``: compile the CUDA kernels to PTX: True requires NVVM, False skips,
    None (default) does it where NVVM is available.  The static GPU checks
    always run.  Raises :class:`CompileCheckError` listing every failure;
    returns a :class:`CompileReport` otherwise.
    """
    cell = resolve_cell(cell)
    report = CompileReport(cell.name)
    dtypes = [np.dtype(d) for d in dtypes]
    report.failures += [f"GPU: {p}" for p in gpu_math_problems(cell)]
    report.checked.append("GPU-compatible calls")
    math_ok = []
    for dtype in dtypes:
        try:
            check_cell_compiles(cell, dtype)
            math_ok.append(dtype)
        except CellError as exc:
            report.failures.append(f"{dtype}: {exc}")
    report.checked.append("scalar math " + ", ".join(d.name for d in dtypes))
    if np.dtype(np.float32) in math_ok:
        for which, args in _scalar_args(cell, np.float32).items():
            leaks = find_precision_leaks(cell.math_function(which), np.float32, args)
            if leaks:
                report.failures.append(f"float32 {which} math computes in another precision "
                                       f"(float64 on a GPU is many times slower): "
                                       + "; ".join(leaks))
        report.checked.append("float32 purity")
    if cpu:
        for dtype in math_ok:
            try:
                _run_cpu_kernels(cell, dtype)
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                report.failures.append(f"CPU kernels ({dtype}) failed: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())[:400]}")
        report.checked.append("CPU kernels")
    if cuda is not False:
        reason = ptx_unavailable_reason()
        if reason is None:
            try:
                ptx_failures = [f for dtype in math_ok for f in _check_ptx(cell, dtype)]
            except _PtxToolchainMissing as exc:
                reason = str(exc)
            else:
                report.failures += ptx_failures
                report.checked.append("CUDA PTX (sm_90)")
        if reason is not None and cuda:
            report.failures.append(f"CUDA PTX check requested but impossible: {reason}")
        elif reason is not None:
            report.skipped.append(f"CUDA PTX: {reason}")
    if report.failures:
        raise CompileCheckError(report)
    return report
