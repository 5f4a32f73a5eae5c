"""Compile a cell's scalar math for one precision.

Plugin authors write per-element math as plain Python with ``math`` calls and
plain constants (``1 - z``, ``0.5 * x``).  Numba types a Python literal as
float64/int64, so ``1 - z`` with a float32 ``z`` silently becomes float64 math:
slow on GPUs (``.f64`` instructions) and unvectorisable on CPUs.  Instead of
asking authors to write ``np.float32(1)`` everywhere, the core rewrites every
numeric literal of the function (and of the plain Python helpers it calls) into
a cast to the kernel's precision, then compiles it with
``numba.njit(inline="always")``.  Inlined at Numba IR level, the result can be
called from CPU kernels, from CUDA kernels (also under ``compile_ptx`` without
a GPU) and from the CUDA simulator.

Literals left alone: subscripts (``saved[0]``), integer exponents (``x ** 2``
stays a multiplication) and ``range`` arguments.

Precision variants: a helper may carry ``kernrnn_variants``, a dict from a
dtype name (``"float32"``) to another plain Python function; compiling for that
precision uses the variant instead.  :func:`kernrnn.scalar_math.tanh` and
:func:`kernrnn.scalar_math.sigmoid` use this for branch-free float32 approximations
that vectorise on CPUs, while float64 keeps libm's accuracy.

``math.sin``, ``math.cos`` and ``math.tan`` (however imported) are compiled as
:func:`kernrnn.scalar_math.sin`, :func:`~kernrnn.scalar_math.cos` and
:func:`~kernrnn.scalar_math.tan` in every precision those have a variant for
(float32): CUDA's float32 ``sinf``/``cosf``/``tanf`` hold float64
instructions (the only ``math`` functions that do), the variants do not.  So a hand-written cell
calling ``math.sin`` gets float32-clean kernels too.

The compiled functions keep the line numbers and file of their source, so
Numba's errors and the CUDA line information point at the cell's own lines.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import inspect
import linecache
import math
import os
import textwrap
import types
from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _metadata_version

import numba
import numpy as np

from kernrnn.errors import CellError, describe_source
from kernrnn.numba_inline import register

__all__ = ["compile_scalar", "python_scalar", "retype_source", "ScalarCompileError",
           "math_fingerprint", "find_precision_leaks"]

_CAST_NAME = "__kernrnn_cast"


class ScalarCompileError(Exception):
    """The scalar math of a cell cannot be turned into a Numba function."""


def _math_replacements() -> dict:
    """id of a ``math`` function -> the :mod:`kernrnn.scalar_math` helper compiled instead
    (in the precisions the helper has a variant for)."""
    from kernrnn import scalar_math

    return {id(math.sin): scalar_math.sin, id(math.cos): scalar_math.cos,
            id(math.tan): scalar_math.tan}


class _RetypeConstants(ast.NodeTransformer):
    """Wraps numeric literals in the precision cast; with ``replace(func_node)`` returning a
    name, also calls that name instead (``math.sin`` -> the float32 helper)."""

    def __init__(self, replace=None):
        self.replace = replace

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        node.value = self.visit(node.value)  # the index stays an integer
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        node.left = self.visit(node.left)
        if not (isinstance(node.op, ast.Pow) and isinstance(node.right, ast.Constant)):
            node.right = self.visit(node.right)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if isinstance(node.func, ast.Name) and node.func.id == "range":
            return node
        node = self.generic_visit(node)
        name = self.replace(node.func) if self.replace else None
        if name is not None:
            node.func = ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node.func)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            return node
        call = ast.Call(
            func=ast.Name(id=_CAST_NAME, ctx=ast.Load()),
            args=[ast.Constant(value=float(node.value))],
            keywords=[],
        )
        return ast.copy_location(call, node)


def retype_source(fn: types.FunctionType) -> str:
    """The source of ``fn`` with numeric literals wrapped in a precision cast."""
    return ast.unparse(_retyped_tree(fn)[0])


def _retyped_tree(fn: types.FunctionType, dtype=None) -> tuple[ast.Module, dict]:
    """The retyped AST of ``fn`` (line numbers count from its first source line, 1) and the
    helpers it now calls instead of ``math`` functions for ``dtype`` (name -> helper)."""
    if fn.__name__ == "<lambda>":
        raise ScalarCompileError(
            f"cell math must be a function defined with 'def' in a file, not a lambda "
            f"({fn.__qualname__} in {fn.__module__})"
        )
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise ScalarCompileError(
            f"cannot read the source of {fn.__qualname__!r} (defined in "
            f"{getattr(fn, '__module__', '?')}); cell math must be a function "
            f"defined with 'def' in a file, not a lambda or REPL function"
        ) from exc
    tree = ast.parse(src)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise ScalarCompileError(
            f"{fn.__qualname__!r} must be defined with 'def' (got {type(fdef).__name__})"
        )
    fdef.decorator_list = []
    used: dict = {}
    replace = _replacer(fn, fdef, np.dtype(dtype), used) if dtype is not None else None
    fdef.body = [_RetypeConstants(replace).visit(stmt) for stmt in fdef.body]
    return ast.fix_missing_locations(tree), used


def _replacer(fn, fdef: ast.FunctionDef, dtype: np.dtype, used: dict):
    """``replace(func_node)`` for :class:`_RetypeConstants`: the name to call instead of a
    ``math`` function that has a helper with a variant for ``dtype``, recorded in ``used``."""
    table = _math_replacements()
    ns = _namespace(fn)
    a = fdef.args
    local = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    local |= {n.id for n in ast.walk(fdef) if isinstance(n, ast.Name)
              and isinstance(n.ctx, ast.Store)}

    def resolve(node):
        if isinstance(node, ast.Name):
            if node.id in local:
                return None
            return ns.get(node.id, getattr(builtins, node.id, None))
        if isinstance(node, ast.Attribute):
            base = resolve(node.value)
            return getattr(base, node.attr, None) if isinstance(base, types.ModuleType) else None
        return None

    def replace(func):
        helper = table.get(id(resolve(func)))
        variants = getattr(helper, "kernrnn_variants", None) or {}
        if helper is None or dtype.name not in variants:
            return None
        name = f"__kernrnn_{helper.__name__}"
        used[name] = helper
        return name
    return replace


def _namespace(fn: types.FunctionType) -> dict:
    """The globals ``fn`` sees, its closure's variables included."""
    namespace = dict(fn.__globals__)
    if fn.__closure__:
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
            try:
                namespace[name] = cell.cell_contents
            except ValueError:  # an empty cell
                pass
    return namespace


def _is_plain_python_function(obj: object) -> bool:
    return isinstance(obj, types.FunctionType) and not hasattr(obj, "py_func")


def _variant(fn: types.FunctionType, dtype: np.dtype) -> types.FunctionType:
    """The function to compile for ``dtype``: ``fn`` or its declared variant."""
    variants = getattr(fn, "kernrnn_variants", None)
    if isinstance(variants, dict):
        alt = variants.get(dtype.name)
        if _is_plain_python_function(alt):
            return alt
    return fn


def _helpers(fn: types.FunctionType) -> list:
    """Plain Python functions ``fn`` refers to by a global or closure name."""
    namespace = _namespace(fn)
    out = []
    for name in fn.__code__.co_names + fn.__code__.co_freevars:
        obj = namespace.get(name)
        if _is_plain_python_function(obj) and obj is not fn:
            out.append((name, obj))
    return out


def math_fingerprint(fn: types.FunctionType) -> str:
    """Retyped source of ``fn``, its helpers and their precision variants, recursively.

    Everything that ends up in compiled code, so cache keys built from it
    change whenever any of it changes.
    """
    parts, stack, seen = [], [fn], set()
    while stack:
        f = stack.pop()
        if f in seen:
            continue
        seen.add(f)
        try:  # float32: with math.sin/cos as the helpers compiled instead
            tree, used = _retyped_tree(f, np.float32)
            parts.append(ast.unparse(tree))
        except ScalarCompileError:
            parts.append(f.__qualname__)
            used = {}
        stack.extend(used.values())
        variants = getattr(f, "kernrnn_variants", None)
        if isinstance(variants, dict):
            for key in sorted(variants):
                parts.append(f"variant {key}")
                if _is_plain_python_function(variants[key]):
                    stack.append(variants[key])
        stack.extend(obj for _, obj in _helpers(f))
    return "\n".join(parts)


def _retyped_namespace(fn: types.FunctionType, dtype: np.dtype, seen: dict,
                       used: dict, python: bool = False) -> dict:
    namespace = _namespace(fn)
    namespace[_CAST_NAME] = numba.from_dtype(dtype)
    for name, helper in used.items():
        namespace[name] = _rebuild(helper, dtype, seen, python)
    # Helpers the function calls are rewritten the same way, so a helper such
    # as ``sigmoid`` keeps the kernel's precision too (or becomes its variant).
    for name, obj in _helpers(fn):
        namespace[name] = _rebuild(obj, dtype, seen, python)
    return namespace


def _rebuild(fn: types.FunctionType, dtype: np.dtype, seen: dict,
             python: bool = False) -> types.FunctionType:
    key = (fn, dtype.str)
    if key in seen:
        return seen[key]
    orig, fn = fn, _variant(fn, dtype)
    tree, used = _located_tree(fn, dtype)
    namespace = _retyped_namespace(fn, dtype, seen, used, python)
    exec(compile(tree, _source_file(fn), "exec"), namespace)
    built = namespace[fn.__name__]
    if not python:
        built = register(numba.njit(inline="always")(built))
    seen[key] = built
    seen[(orig, dtype.str)] = built
    return built


def _located_tree(fn: types.FunctionType, dtype: np.dtype) -> tuple[ast.Module, dict]:
    """:func:`_retyped_tree` with the line numbers of ``fn``'s file."""
    tree, used = _retyped_tree(fn, dtype)
    ast.increment_lineno(tree, fn.__code__.co_firstlineno - 1)
    return tree, used


def _source_file(fn: types.FunctionType) -> str:
    try:
        return inspect.getsourcefile(fn) or fn.__code__.co_filename
    except TypeError:
        return fn.__code__.co_filename


def _require_plain(fn) -> None:
    if not _is_plain_python_function(fn):
        raise ScalarCompileError(
            f"expected a plain Python function for the cell math, got {type(fn).__name__} "
            f"{fn!r}; pass the undecorated function (the core compiles it)"
        )


@lru_cache(maxsize=None)
def compile_scalar(fn: types.FunctionType, dtype) -> numba.core.registry.CPUDispatcher:
    """``fn`` as an inline Numba function whose constants have ``dtype``."""
    _require_plain(fn)
    return _rebuild(fn, np.dtype(dtype), {})


@lru_cache(maxsize=None)
def python_scalar(fn: types.FunctionType, dtype) -> types.FunctionType:
    """``fn`` retyped like :func:`compile_scalar` (its helpers too), left as Python.

    For Numba's CUDA simulator, which runs the kernels as Python: a compiled function
    called from there is compiled for the CPU, for each new set of argument types, and
    called through Numba's dispatcher (half of ``tests/cudasim``'s time went there).
    The simulator checks the kernels' logic; the machine code of the math is checked by
    the CPU kernels and the PTX compile.
    """
    _require_plain(fn)
    return _rebuild(fn, np.dtype(dtype), {}, python=True)


def find_precision_leaks(fn: types.FunctionType, dtype, arg_types, limit: int = 3) -> list[str]:
    """Where the retyped ``fn`` computes in another float type than ``dtype``.

    Compiles the retyped function on its own (not inlined), with the line
    numbers of its real source, and reads Numba's type of every assignment:
    each entry names the file, line and source text, and the value at fault
    (``math.pi``, a global, a helper's result).  At most ``limit`` lines.
    """
    from numba.core import ir

    dtype = np.dtype(dtype)
    want = numba.from_dtype(dtype)
    fn = _variant(fn, dtype)
    tree, used = _located_tree(fn, dtype)
    namespace = _retyped_namespace(fn, dtype, {}, used)
    exec(compile(tree, _source_file(fn), "exec"), namespace)
    probe = numba.njit(namespace[fn.__name__])
    probe.compile(tuple(arg_types))
    annotation = probe.overloads[tuple(arg_types)].type_annotation

    def foreign(t) -> bool:
        if isinstance(t, numba.types.Float):
            return t != want
        return any(foreign(m) for m in getattr(t, "types", ()) or
                   ((t.dtype,) if isinstance(t, numba.types.UniTuple) else ()))

    found, lines = [], set()
    stmts = [st for block in annotation.blocks.values() for st in block.body]
    defs = {st.target.name: st.value for st in stmts if isinstance(st, ir.Assign)}
    assigns = (st for st in stmts if isinstance(st, ir.Assign))
    for stmt in sorted(assigns, key=lambda st: st.loc.line):
        t = annotation.typemap.get(stmt.target.name)
        if isinstance(stmt.value, ir.Const):
            continue  # a literal on its way into the precision cast
        if t is None or not foreign(t) or (stmt.loc.filename, stmt.loc.line) in lines:
            continue
        lines.add((stmt.loc.filename, stmt.loc.line))
        text = linecache.getline(stmt.loc.filename, stmt.loc.line).strip()
        found.append(f"{os.path.basename(stmt.loc.filename)} line {stmt.loc.line}"
                     + (f": {text!r}" if text else "") + f" gives {t}{_origin(stmt.value, defs)}")
        if len(found) >= limit:
            break
    return found


def _origin(value, defs) -> str:
    """What an IR value is, when it explains a leak (a global, a constant, an attribute)."""
    from numba.core import ir

    if isinstance(value, (ir.Global, ir.FreeVar)):
        return f" (the global {value.name!r})"
    if isinstance(value, ir.Const):
        return f" (the constant {value.value!r})"
    if isinstance(value, ir.Expr) and value.op == "getattr":
        base = defs.get(value.value.name)
        owner = base.name if isinstance(base, (ir.Global, ir.FreeVar)) else value.value.name
        return f" (from {owner}.{value.attr})"
    if isinstance(value, ir.Expr) and value.op == "call":
        return " (a call's result)"
    return ""


def cell_fingerprint(cell) -> str:
    """A hash of everything in a cell that ends up in compiled code."""
    h = hashlib.sha256()
    for which, args, results in cell.math_signatures():
        h.update(math_fingerprint(cell.math_function(which)).encode())
        h.update(f"{which}{args}{results}".encode())
    h.update(f"{cell.name}|{cell.recurrent}|{cell.heads}|{cell.recurrent_gate_indices}|"
             f"{cell.input_norm}|{cell.recurrent_norm}|{cell.normalize}|{cell.normalize_kind}|"
             f"{cell.linear}".encode())
    if cell.raw_input:  # (only then: the other cells' fingerprints, and kernels, stay as they were)
        h.update(b"|raw_input")
    if not cell.reads_h_only:  # only what a cell declares beyond the defaults: unchanged others
        h.update(f"|recurrent_states={cell.recurrent_state_indices}".encode())
    if cell.products:
        h.update(f"|products={cell.stage_boundaries}".encode())
    return h.hexdigest()[:16]


def _kernrnn_version() -> str:
    """The installed kernrnn's version (from its metadata: importing the package from
    here would make an import circle)."""
    try:
        return _metadata_version("kernrnn")
    except PackageNotFoundError:
        return "0.0.0+unknown"


#: Bump when :func:`check_cell_compiles` checks more: earlier passes are not remembered.
CHECK_VERSION = 1


def _check_record(cell, dtype) -> str:
    """The text that records that ``cell``'s math passed the check for ``dtype``: everything
    the outcome depends on (the math's fingerprint, the precision, Numba and kernrnn)."""
    return (f"kernrnn compile check {CHECK_VERSION} passed: cell {cell.name!r}, math "
            f"{cell_fingerprint(cell)}, {np.dtype(dtype).str}, kernrnn {_kernrnn_version()}, "
            f"numba {numba.__version__}\n")


@lru_cache(maxsize=None)
def check_cell_compiles(cell, dtype) -> None:
    """Type each function of ``cell``'s math for ``dtype``, naming the cell on failure.

    Run once per (cell, precision) before its kernels are first used, so a
    plugin whose math Numba cannot compile is reported as the plugin's fault
    (with its source) instead of as an error deep inside a generated kernel.
    Each function must return tuples of the sizes the contract gives
    (:meth:`kernrnn.cell.Cell.math_signatures`), every value in ``dtype``.

    A pass is remembered in the kernel cache (a text marker keyed by the math's
    fingerprint, :func:`kernrnn.backends.kernel_cache.has_marker`), so a later
    process with the same math skips the check; failures are not remembered, so the
    error is always reported afresh.  Numba's type inference is what the check runs
    (:func:`_return_type`): an error that only lowering would find surfaces when the kernels
    compile.
    """
    from kernrnn.backends import kernel_cache

    dtype = np.dtype(dtype)
    try:
        record = _check_record(cell, dtype)
    except Exception:  # e.g. unreadable source: the check below reports it
        record = None
    if record is not None and kernel_cache.has_marker(record):
        return
    _check_cell_compiles(cell, dtype)
    if record is not None:
        kernel_cache.write_marker(record)


def _check_cell_compiles(cell, dtype) -> None:
    nbtype = numba.from_dtype(dtype)

    def tuple_type(n):
        return numba.types.UniTuple(nbtype, n) if n else numba.types.Tuple(())

    for which, arg_sizes, result_sizes in cell.math_signatures():
        args = tuple(tuple_type(n) for n in arg_sizes)
        try:
            scalar = compile_scalar(cell.math_function(which), dtype)
            rtype = _return_type(_driver(scalar, len(args)), args)
            _check_result(which, rtype, nbtype, result_sizes)
        except CellError as exc:
            raise CellError(f"cell {cell.name!r}{describe_source(cell)}: {exc}"
                            f"{_leak_note(cell.math_function(which), dtype, args)}") from None
        except Exception as exc:
            raise CellError(
                f"cell {cell.name!r}{describe_source(cell)}: its {which} math does not compile "
                f"for {dtype} with Numba: {type(exc).__name__}: {_first_lines(exc)}"
            ) from exc


def _return_type(fn, args):
    """Numba's return type of ``fn`` for ``args``, from type inference alone.

    The check needs the types, not machine code: lowering and LLVM were about two thirds
    of each check's compile (0.07 against 0.02 s for a backward; the suite ran 232 of them).
    Falls back to a full compile where Numba's pipeline API differs.
    """
    pipeline = _type_inference_pipeline()
    if pipeline is None:
        driver = numba.njit(fn)
        driver.compile(args)
        return driver.overloads[args].signature.return_type
    from numba.core import compiler
    from numba.core.registry import cpu_target

    result = compiler.compile_extra(cpu_target.typing_context, cpu_target.target_context, fn,
                                    args, None, compiler.Flags(), {}, pipeline_class=pipeline)
    return result.return_type


@lru_cache(maxsize=None)
def _type_inference_pipeline():
    """A Numba compiler class that stops after type inference (None: not available)."""
    try:
        from numba.core.compiler import CompilerBase, DefaultPassBuilder
        from numba.core.compiler_machinery import AnalysisPass, register_pass
        from numba.core.typed_passes import NopythonTypeInference
    except ImportError:
        return None

    @register_pass(mutates_CFG=False, analysis_only=True)
    class KernrnnTypesKnown(AnalysisPass):
        _name = "kernrnn_types_known"

        def __init__(self):
            AnalysisPass.__init__(self)

        def run_pass(self, state):
            state.cr = types.SimpleNamespace(return_type=state.return_type)  # ends the run
            return False

    class TypeInferenceOnly(CompilerBase):
        def define_pipelines(self):
            pm = DefaultPassBuilder.define_untyped_pipeline(self.state)
            pm.add_pass(NopythonTypeInference, "nopython frontend")
            pm.add_pass(KernrnnTypesKnown, "kernrnn: the return type is known")
            pm.finalize()
            return [pm]

    return TypeInferenceOnly


def _driver(scalar, n_args: int):
    """A plain function of ``n_args`` arguments calling ``scalar`` (Numba needs a fixed arity)."""
    names = ", ".join(f"a{i}" for i in range(n_args))
    namespace = {"scalar": scalar}
    exec(f"def driver({names}):\n    return scalar({names})\n", namespace)
    return namespace["driver"]


def _check_result(which, rtype, nbtype, expected):
    parts = list(getattr(rtype, "types", ()))
    lens = [len(getattr(p, "types", ())) if hasattr(p, "types") else p.count for p in parts]
    if lens != list(expected):
        raise CellError(f"{which} returns {rtype}, expected tuples of sizes {list(expected)}")
    for part in parts:
        members = part.types if hasattr(part, "types") else (part.dtype,) * part.count
        if any(m != nbtype for m in members):
            raise CellError(
                f"{which} returns {rtype}: every value must be a {nbtype} scalar (a value of "
                f"another type, e.g. an int or float64 from an unconverted call, would change "
                f"the kernel's precision)"
            )


def _leak_note(fn, dtype, args) -> str:
    """``; first at file line N: ...`` for a precision leak, or "" when none is found."""
    try:
        leaks = find_precision_leaks(fn, dtype, args)
    except Exception:  # the note is a courtesy; the error itself stands
        return ""
    return f"; first at {'; then '.join(leaks)}" if leaks else ""


def _first_lines(exc: Exception, n: int = 6) -> str:
    return " ".join(str(exc).strip().splitlines()[:n])
