"""Read a forward step's Python source into a graph (``kernrnn.autodiff.ir.Graph``).

The forward is straight-line scalar code: assignments (tuples unpacked),
``+ - * /``, integer powers, unary minus, the functions of
``kernrnn.autodiff.ir.FUNCTIONS`` (``sigmoid``/``tanh``/``relu`` from
:mod:`kernrnn.cell`, ``math.exp/log/sqrt/sin/cos/erf/fabs/tanh``, ``abs``),
``min``/``max``, conditional expressions, calls of plain module-level helper
functions (inlined), numeric literals and numeric module constants, and, in a
step with a normalised value, ``norm("name", value)``.  Anything else raises
:class:`kernrnn.cell.CellError` naming the cell, the file and line, the source
text and the construct.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import math
import os
import textwrap
import types

from kernrnn.autodiff.ir import Graph, Node

__all__ = ["parse_forward", "Signature", "PRIMITIVES"]


def _primitives() -> dict[int, str]:
    from kernrnn import scalar_math as sm

    table = {sm.sigmoid: "sigmoid", sm.tanh: "tanh", sm.relu: "relu",
             sm.sin: "sin", sm.cos: "cos", math.exp: "exp", math.log: "log",
             math.sqrt: "sqrt", math.sin: "sin", math.cos: "cos", math.erf: "erf",
             math.fabs: "fabs", math.tanh: "tanh", builtins.abs: "fabs",
             builtins.min: "min", builtins.max: "max"}
    return {id(k): v for k, v in table.items()}


#: id of each callable a forward may call -> its name in the graph.
PRIMITIVES = _primitives()
_SUPPORTED = ("assignments (tuples unpacked), + - * /, integer powers, unary minus, "
              "sigmoid/tanh/relu, math.exp/log/sqrt/sin/cos/erf/fabs, min/max/abs, "
              "'a if c else b', calls of plain helper functions, numeric literals")

_CONSTRUCTS = {
    ast.For: "a for loop", ast.While: "a while loop", ast.If: "an if statement (write a "
    "conditional expression, 'a if c else b')", ast.With: "a with statement",
    ast.Try: "a try statement", ast.FunctionDef: "a nested function", ast.ClassDef: "a class",
    ast.Import: "an import", ast.ImportFrom: "an import", ast.Global: "a global statement",
    ast.Nonlocal: "a nonlocal statement", ast.Raise: "a raise statement",
    ast.Assert: "an assert statement", ast.Delete: "a del statement",
    ast.List: "a list", ast.ListComp: "a list comprehension", ast.Dict: "a dict",
    ast.DictComp: "a dict comprehension", ast.Set: "a set", ast.SetComp: "a set comprehension",
    ast.GeneratorExp: "a generator expression", ast.Lambda: "a lambda",
    ast.JoinedStr: "an f-string", ast.NamedExpr: "an assignment expression (:=)",
    ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield", ast.Starred: "a starred "
    "expression", ast.Slice: "a slice", ast.AsyncFunctionDef: "a nested function",
    ast.AsyncFor: "a for loop", ast.AsyncWith: "a with statement",
}
_BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div"}
_CMPOPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
           ast.NotEq: "!="}


class Signature:
    """What the arguments of a forward are: the cell's sizes.

    ``gates`` G, ``state`` S, ``recurrent`` (an ``hu`` argument), ``params``
    (the block count of each per-unit parameter), ``normalize`` (the names
    a two-stage step may pass to ``norm``; ``None``: whatever it calls) and
    ``hyper`` (the names of the hyperparameters, in declaration order: trailing
    arguments bound by name, read as the inputs ``("hyper", k)``; a forward may
    leave out those it does not read, such as one only a
    :class:`~kernrnn.cell.RecurrentWeight` uses), ``raw_input`` (a trailing
    argument ``x``, the element's raw input x_t) and ``products`` (name -> G_m
    of each recurrent product a staged step may call ``matmul`` with; ``{}``: none).
    """

    def __init__(self, gates: int, state: int, recurrent: bool = True, params=(),
                 normalize=None, hyper=(), raw_input: bool = False, products=None):
        self.gates, self.state, self.recurrent = gates, state, recurrent
        self.params = tuple(params)
        self.normalize = None if normalize is None else tuple(normalize)
        self.hyper = tuple(hyper)
        self.raw_input = bool(raw_input)
        self.products = dict(products or {})


class _Norm:
    """The ``norm`` argument of a two-stage forward (callable only)."""


class _Matmul:
    """The ``matmul`` argument of a staged forward (callable only)."""


_LOCAL = object()  # a name of the function's own (a value, not a module or function)


class _Fail(Exception):
    pass


class _Context:
    """One function being read: its source lines, file and namespace."""

    def __init__(self, fn: types.FunctionType):
        self.fn = fn
        if fn.__name__ == "<lambda>":
            raise _Fail(f"{fn.__qualname__} is a lambda; a forward and its helpers must be "
                        f"functions defined with 'def' in a file")
        try:
            src = textwrap.dedent(inspect.getsource(fn))
        except (OSError, TypeError) as exc:
            raise _Fail(f"cannot read the source of {fn.__qualname__!r}; a forward and its "
                        f"helpers must be functions defined with 'def' in a file") from exc
        self.lines = src.splitlines()
        self.first = fn.__code__.co_firstlineno
        self.file = os.path.basename(inspect.getsourcefile(fn) or fn.__code__.co_filename)
        tree = ast.parse(src)
        self.fdef = tree.body[0]
        if not isinstance(self.fdef, ast.FunctionDef):
            raise _Fail(f"{fn.__qualname__!r} must be defined with 'def'")
        self.namespace = dict(fn.__globals__)
        if fn.__closure__:
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
                try:
                    self.namespace[name] = cell.cell_contents
                except ValueError:
                    pass

    def where(self, node: ast.AST) -> str:
        line = getattr(node, "lineno", 1)
        text = self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""
        return f"{self.file} line {self.first + line - 1}: {text!r}"


class _Reader:
    def __init__(self, cellname: str, sig: Signature, graph: Graph):
        self.cellname = cellname
        self.sig = sig
        self.g = graph
        self.stack: list = []
        self.norms: dict[str, Node] = {}  # name -> the norm node, in order of first call
        self.products: dict[str, Node] = {}  # name -> the product node, in order of first call

    # -- errors ---------------------------------------------------------------------

    def fail(self, ctx: _Context, node: ast.AST, what: str):
        raise _Fail(f"{ctx.fn.__qualname__} ({ctx.where(node)}): {what}")

    def unsupported(self, ctx: _Context, node: ast.AST, what: str | None = None,
                    hint: str = ""):
        what = what or _CONSTRUCTS.get(type(node)) or f"the construct {type(node).__name__}"
        self.fail(ctx, node, f"{what} is not supported in a forward to differentiate"
                             f"{hint}; supported: {_SUPPORTED}")

    # -- functions ------------------------------------------------------------------

    def trailing_arguments(self) -> dict:
        """The names a forward may take after its positional part, each with a function
        making its value: ``norm`` (a step with normalised values), ``x`` (the raw
        input, ``raw_input=True``), ``matmul`` (a staged step's recurrent products) and
        each hyperparameter."""
        out = {}
        if self.sig.normalize is None or self.sig.normalize:
            out["norm"] = _Norm
        if self.sig.raw_input:
            out["x"] = lambda: self.g.input("x", 0)
        if self.sig.products:
            out["matmul"] = _Matmul
        for k, h in enumerate(self.sig.hyper):  # a forward may leave one out
            out[h] = (lambda k=k: self.g.input("hyper", k))
        return out

    def top(self, fn: types.FunctionType):
        ctx = _Context(fn)
        args = ctx.fdef.args
        names = [a.arg for a in args.posonlyargs + args.args]
        sig = self.sig
        want = ["xw"] + (["hu"] if sig.recurrent else []) + ["prev"] + \
            [f"param {i}" for i in range(len(sig.params))]
        # after the positional part, trailing arguments are bound by name, in any order
        trailing = self.trailing_arguments()
        usage = ", ".join(want) + "".join(f", {n}" for n in trailing)
        if args.vararg or args.kwarg or args.kwonlyargs or args.defaults:
            self.fail(ctx, ctx.fdef, f"a forward takes plain positional arguments only ({usage})")
        if len(names) < len(want):
            self.fail(ctx, ctx.fdef, f"the forward takes {len(names)} arguments {names}, the "
                      f"cell gives {len(want)}: {', '.join(want)}"
                      + (f", and by name {', '.join(repr(n) for n in trailing)}"
                         if trailing else ""))
        extra = names[len(want):]
        if "norm" in extra and "norm" not in trailing:
            self.fail(ctx, ctx.fdef, "the forward takes 'norm' but the cell normalises no "
                      "value (declare normalize=(...))")
        if "matmul" in extra and "matmul" not in trailing:
            self.fail(ctx, ctx.fdef, "the forward takes 'matmul' but the cell declares no "
                      "recurrent product (declare products=(Product(...),))")
        if "x" in extra and "x" not in trailing:
            self.fail(ctx, ctx.fdef, "the forward takes 'x' (the raw input x_t) but the cell "
                      "does not declare raw_input=True")
        unknown = [n for n in extra if n not in trailing]
        if unknown:
            self.fail(ctx, ctx.fdef, f"the forward takes {len(names)} arguments {names}: after "
                      f"the cell's {len(want)} ({', '.join(want)}) its trailing arguments are "
                      f"bound by name; unknown trailing argument{'s' * (len(unknown) > 1)} "
                      f"{', '.join(map(repr, unknown))}, expected "
                      + (", ".join(repr(n) for n in trailing) if trailing else "none of them "
                         "('norm' needs normalize=(...), 'x' raw_input=True, 'matmul' "
                         "products=(...), a hyperparameter hyper={...})"))
        if sig.raw_input and "x" not in extra:
            self.fail(ctx, ctx.fdef, f"the cell declares raw_input=True but the forward takes no "
                      f"'x' (the raw input x_t, a trailing argument: ({', '.join(want)}, x))")
        env = {}
        env[names[0]] = tuple(self.g.input("xw", k) for k in range(sig.gates))
        i = 1
        if sig.recurrent:
            env[names[1]] = tuple(self.g.input("hu", k) for k in range(sig.gates))
            i = 2
        env[names[i]] = tuple(self.g.input("prev", s) for s in range(sig.state))
        for p, blocks in enumerate(sig.params):
            env[names[i + 1 + p]] = tuple(self.g.input(f"p{p}", b) for b in range(blocks))
        for name in extra:
            env[name] = trailing[name]()
        self.arg_names = names[:len(want)]
        out = self.body(ctx, env)
        if not isinstance(out, tuple):
            self.fail(ctx, ctx.fdef, f"the forward must return the new state, a tuple of "
                      f"{sig.state} values")
        if any(isinstance(v, tuple) for v in out):
            self.fail(ctx, ctx.fdef, "the forward returns nested tuples; a forward to "
                      "differentiate returns the new state tuple only (not (new_state, saved))")
        if len(out) != sig.state:
            self.fail(ctx, ctx.fdef, f"the forward returns {len(out)} state values, the cell "
                      f"has {sig.state}")
        for v in out:
            if isinstance(v, Node) and v.is_bool:
                self.fail(ctx, ctx.fdef, "the forward returns a condition as a state value; "
                          "write '1.0 if c else 0.0'")
        return out

    def helper(self, ctx: _Context, node: ast.AST, fn: types.FunctionType, args: list):
        if fn in self.stack:
            self.fail(ctx, node, f"{fn.__qualname__} calls itself (recursion) and cannot be "
                      f"inlined")
        hctx = _Context(fn)
        a = hctx.fdef.args
        names = [x.arg for x in a.posonlyargs + a.args]
        if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or len(names) != len(args):
            self.fail(ctx, node, f"{fn.__qualname__} must take {len(args)} plain positional "
                      f"arguments to be inlined, it takes ({ast.unparse(a)})")
        self.stack.append(fn)
        try:
            return self.body(hctx, dict(zip(names, args)))
        finally:
            self.stack.pop()

    def body(self, ctx: _Context, env: dict):
        stmts = list(ctx.fdef.body)
        if stmts and isinstance(stmts[0], ast.Expr) and isinstance(stmts[0].value, ast.Constant) \
                and isinstance(stmts[0].value.value, str):
            stmts = stmts[1:]  # the docstring
        for k, st in enumerate(stmts):
            if isinstance(st, ast.Return):
                if k != len(stmts) - 1:
                    self.fail(ctx, st, "a return before the last statement (the step must be "
                              "straight-line code ending in one return)")
                if st.value is None:
                    self.fail(ctx, st, "a bare return; return the value")
                return self.expr(ctx, st.value, env, allow_tuple=True)
            self.statement(ctx, st, env)
        self.fail(ctx, ctx.fdef, "no return statement at the end")

    def statement(self, ctx: _Context, st: ast.stmt, env: dict):
        if isinstance(st, ast.Pass):
            return
        if isinstance(st, ast.Assign):
            value = self.expr(ctx, st.value, env, allow_tuple=True)
            for target in st.targets:
                self.bind(ctx, target, value, env)
            return
        if isinstance(st, ast.AnnAssign) and st.value is not None and st.simple:
            self.bind(ctx, st.target, self.expr(ctx, st.value, env, allow_tuple=True), env)
            return
        if isinstance(st, ast.AugAssign) and isinstance(st.target, ast.Name):
            op = _BINOPS.get(type(st.op))
            if op is None:
                self.unsupported(ctx, st, f"the augmented assignment {type(st.op).__name__}=")
            left = self.expr(ctx, ast.Name(st.target.id, ast.Load(), lineno=st.lineno), env)
            right = self.expr(ctx, st.value, env)
            self.bind(ctx, st.target, self.g.node(op, (left, right), where=ctx.where(st)), env)
            return
        if isinstance(st, ast.Expr):
            self.unsupported(ctx, st, "an expression statement", " (its value is unused)")
        self.unsupported(ctx, st)

    def bind(self, ctx: _Context, target: ast.expr, value, env: dict):
        if isinstance(target, ast.Name):
            if isinstance(value, Node) and value.name is None and value.op not in ("in", "const"):
                value.name = target.id
            env[target.id] = value
            return
        if isinstance(target, (ast.Tuple, ast.List)):
            if not isinstance(value, tuple) or len(value) != len(target.elts):
                n = len(value) if isinstance(value, tuple) else "a scalar"
                self.fail(ctx, target, f"unpacking {n} into {len(target.elts)} names")
            for t, v in zip(target.elts, value):
                self.bind(ctx, t, v, env)
            return
        if isinstance(target, ast.Subscript):
            self.unsupported(ctx, target, "assignment to an item",
                             " (tuples cannot change; build a new tuple)")
        self.unsupported(ctx, target, f"assignment to {type(target).__name__}")

    # -- expressions ----------------------------------------------------------------

    def scalar(self, ctx, node, env) -> Node:
        v = self.expr(ctx, node, env)
        if isinstance(v, tuple):
            self.fail(ctx, node, f"{ast.unparse(node)!r} is a tuple where a number is needed")
        if v.is_bool:
            self.fail(ctx, node, f"{ast.unparse(node)!r} is a condition where a number is "
                      f"needed (write '1.0 if c else 0.0')")
        return v

    def condition(self, ctx, node, env) -> Node:
        v = self.expr(ctx, node, env)
        if isinstance(v, tuple) or not v.is_bool:
            self.fail(ctx, node, f"the condition {ast.unparse(node)!r} must be a comparison "
                      f"(such as 'x > 0.0'), optionally combined with and/or/not")
        return v

    def expr(self, ctx: _Context, node: ast.expr, env: dict, allow_tuple: bool = False):
        g = self.g
        where = ctx.where(node)
        if isinstance(node, ast.Constant):
            return self.constant(ctx, node, node.value)
        if isinstance(node, ast.Name):
            if node.id in env:
                v = env[node.id]
                if isinstance(v, _Norm):
                    self.fail(ctx, node, "'norm' may only be called: norm(\"name\", value)")
                if isinstance(v, _Matmul):
                    self.fail(ctx, node, "'matmul' may only be called: matmul(\"name\", value)")
                return v
            return self.global_value(ctx, node, self.resolve(ctx, node, env))
        if isinstance(node, ast.Attribute):
            return self.global_value(ctx, node, self.resolve(ctx, node, env))
        if isinstance(node, ast.Tuple):
            return tuple(self.expr(ctx, e, env, allow_tuple=True) for e in node.elts)
        if isinstance(node, ast.Subscript):
            return self.subscript(ctx, node, env)
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                return self.power(ctx, node, env)
            op = _BINOPS.get(type(node.op))
            if op is None:
                self.unsupported(ctx, node, f"the operator {type(node.op).__name__}")
            a, b = self.scalar(ctx, node.left, env), self.scalar(ctx, node.right, env)
            return g.node(op, (a, b), where=where)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return g.node("not", (self.condition(ctx, node.operand, env),), where=where)
            if isinstance(node.op, ast.UAdd):
                return self.scalar(ctx, node.operand, env)
            if isinstance(node.op, ast.USub):
                if isinstance(node.operand, ast.Constant):
                    return self.constant(ctx, node, -self.number(ctx, node.operand))
                return g.node("neg", (self.scalar(ctx, node.operand, env),), where=where)
            self.unsupported(ctx, node, f"the operator {type(node.op).__name__}")
        if isinstance(node, ast.IfExp):
            c = self.condition(ctx, node.test, env)
            a, b = self.scalar(ctx, node.body, env), self.scalar(ctx, node.orelse, env)
            return g.node("select", (c, a, b), where=where)
        if isinstance(node, ast.Compare):
            out, left = None, self.scalar(ctx, node.left, env)
            for op, right_node in zip(node.ops, node.comparators):
                sym = _CMPOPS.get(type(op))
                if sym is None:
                    self.unsupported(ctx, node, f"the comparison {type(op).__name__}")
                right = self.scalar(ctx, right_node, env)
                c = g.node("cmp", (left, right), sym, where=where)
                out = c if out is None else g.node("and", (out, c), where=where)
                left = right
            return out
        if isinstance(node, ast.BoolOp):
            op = "and" if isinstance(node.op, ast.And) else "or"
            vals = [self.condition(ctx, v, env) for v in node.values]
            out = vals[0]
            for v in vals[1:]:
                out = g.node(op, (out, v), where=where)
            return out
        if isinstance(node, ast.Call):
            return self.call(ctx, node, env)
        self.unsupported(ctx, node)

    def number(self, ctx, node) -> float:
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.unsupported(ctx, node, f"the constant {v!r}")
        return float(v)

    def constant(self, ctx, node, value) -> Node:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.unsupported(ctx, node, f"the constant {value!r}")
        if not math.isfinite(value):
            self.fail(ctx, node, f"the constant {value!r} is not finite")
        return self.g.const(float(value))

    def subscript(self, ctx, node: ast.Subscript, env):
        base = self.expr(ctx, node.value, env, allow_tuple=True)
        if not isinstance(base, tuple):
            self.fail(ctx, node, f"{ast.unparse(node.value)!r} is a number, not a tuple")
        idx = node.slice
        k = None
        if isinstance(idx, ast.Constant) and isinstance(idx.value, int) and \
                not isinstance(idx.value, bool):
            k = idx.value
        elif isinstance(idx, ast.UnaryOp) and isinstance(idx.op, ast.USub) and \
                isinstance(idx.operand, ast.Constant) and isinstance(idx.operand.value, int):
            k = -idx.operand.value
        if k is None:
            self.unsupported(ctx, node, f"the index {ast.unparse(idx)!r}",
                             " (only integer literals index a tuple)")
        if not -len(base) <= k < len(base):
            self.fail(ctx, node, f"index {k} is out of range: {ast.unparse(node.value)!r} has "
                      f"{len(base)} values")
        return base[k]

    def power(self, ctx, node: ast.BinOp, env) -> Node:
        e = node.right
        if not (isinstance(e, ast.Constant) and isinstance(e.value, int)
                and not isinstance(e.value, bool) and 0 <= e.value <= 16):
            self.unsupported(ctx, node, f"the power {ast.unparse(node)!r}",
                             " (only literal integer exponents 0..16; write "
                             "math.exp(y * math.log(x)))")
        base = self.scalar(ctx, node.left, env)
        if e.value == 0:
            return self.g.const(1.0)
        if e.value == 1:
            return base
        return self.g.node("pow", (base,), e.value, where=ctx.where(node))

    def resolve(self, ctx, node, env):
        """The object a global name or an attribute chain of modules names."""
        if isinstance(node, ast.Name):
            if node.id in env:
                return _LOCAL
            if node.id in ctx.namespace:
                return ctx.namespace[node.id]
            if hasattr(builtins, node.id):
                return getattr(builtins, node.id)
            self.fail(ctx, node, f"the name {node.id!r} is not defined")
        if isinstance(node, ast.Attribute):
            base = self.resolve(ctx, node.value, env) if isinstance(
                node.value, (ast.Name, ast.Attribute)) else _LOCAL
            if not isinstance(base, types.ModuleType):
                self.unsupported(ctx, node, f"the attribute {ast.unparse(node)!r}",
                                 " (only module attributes such as math.exp)")
            if not hasattr(base, node.attr):
                self.fail(ctx, node, f"{ast.unparse(node)!r} does not exist")
            return getattr(base, node.attr)
        self.unsupported(ctx, node)

    def global_value(self, ctx, node, obj) -> Node:
        if isinstance(obj, (int, float)) and not isinstance(obj, bool):
            return self.constant(ctx, node, obj)  # math.pi, a module constant: a literal
        kind = type(obj).__name__
        self.fail(ctx, node, f"{ast.unparse(node)!r} is a {kind}, not a number; a forward "
                  f"reads numbers from its arguments, literals and numeric constants")

    def call(self, ctx, node: ast.Call, env):
        where = ctx.where(node)
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            self.unsupported(ctx, node, "a call with keyword or starred arguments")
        f = node.func
        if isinstance(f, ast.Name) and isinstance(env.get(f.id), _Norm):
            return self.norm(ctx, node, env)
        if isinstance(f, ast.Name) and isinstance(env.get(f.id), _Matmul):
            return self.matmul(ctx, node, env)
        if isinstance(f, ast.Name) and f.id in env:
            self.fail(ctx, node, f"{f.id!r} is a value, not a function")
        if not isinstance(f, (ast.Name, ast.Attribute)):
            self.unsupported(ctx, node, f"the call of {ast.unparse(f)!r}")
        obj = self.resolve(ctx, f, env)
        label = ast.unparse(f)
        prim = PRIMITIVES.get(id(obj))
        if prim in ("min", "max"):
            if len(node.args) < 2:
                self.fail(ctx, node, f"{label}() needs two or more numbers")
            vals = [self.scalar(ctx, a, env) for a in node.args]
            out = vals[0]
            for v in vals[1:]:  # Python's choice: the first of equal values
                out = self.g.node("select", (self.g.node("cmp", (v, out), ">" if prim == "max"
                                                         else "<", where=where), v, out),
                                  where=where)
            return out
        if prim is not None:
            if len(node.args) != 1:
                self.fail(ctx, node, f"{label}() takes one number, got {len(node.args)}")
            return self.g.node("call", (self.scalar(ctx, node.args[0], env),), prim,
                               where=where)
        if isinstance(obj, types.FunctionType) and not hasattr(obj, "py_func"):
            args = [self.expr(ctx, a, env, allow_tuple=True) for a in node.args]
            return self.helper(ctx, node, obj, args)
        module = getattr(obj, "__module__", None) or ""
        if module.split(".")[0] == "numpy" or type(obj).__name__ == "ufunc":
            hint = f" (use math.{obj.__name__})" if hasattr(
                math, getattr(obj, "__name__", "")) else ""
            self.unsupported(ctx, node, f"the NumPy function {label}", hint)
        if hasattr(obj, "py_func"):
            self.unsupported(ctx, node, f"the compiled Numba function {label}",
                             " (pass the plain Python function; it is inlined)")
        self.unsupported(ctx, node, f"the call of {label} ({type(obj).__name__})")

    def norm(self, ctx, node: ast.Call, env) -> Node:
        if len(node.args) != 2 or not (isinstance(node.args[0], ast.Constant)
                                       and isinstance(node.args[0].value, str)):
            self.fail(ctx, node, "norm takes a name literal and a value: norm(\"c\", c)")
        name = node.args[0].value
        if self.sig.normalize is not None and name not in self.sig.normalize:
            self.fail(ctx, node, f"norm({name!r}, ...) but the cell normalises "
                      f"{self.sig.normalize!r}")
        value = self.scalar(ctx, node.args[1], env)
        n = self.g.node("norm", (value,), name, where=ctx.where(node))
        n.name = n.name or f"norm_{name}"
        if name in self.norms and self.norms[name] is not n:
            self.fail(ctx, node, f"norm({name!r}, ...) is applied to two different values; "
                      f"each normalised value has its own name")
        self.norms[name] = n
        return n


    def matmul(self, ctx, node: ast.Call, env) -> tuple:
        """``matmul("m", m)``: the G_m pre-activations the recurrent product of ``m`` (over
        the row's units) gives this unit, a tuple of ``mmout`` nodes of one ``product``."""
        if len(node.args) != 2 or not (isinstance(node.args[0], ast.Constant)
                                       and isinstance(node.args[0].value, str)):
            self.fail(ctx, node, "matmul takes a product name literal and a value: "
                      "matmul(\"m\", m)")
        name = node.args[0].value
        if name not in self.sig.products:
            self.fail(ctx, node, f"matmul({name!r}, ...) but the cell declares the products "
                      f"{tuple(self.sig.products)!r}")
        value = self.scalar(ctx, node.args[1], env)
        where = ctx.where(node)
        p = self.g.node("product", (value,), name, where=where)
        if name in self.products and self.products[name] is not p:
            self.fail(ctx, node, f"matmul({name!r}, ...) is applied to two different values; "
                      f"each product has its own name (and its own weight_h{name})")
        self.products[name] = p
        out = []
        for k in range(self.sig.products[name]):
            n = self.g.node("mmout", (p,), (name, k), where=where)
            n.name = n.name or f"{name}_hu{k}"
            out.append(n)
        return tuple(out)


def parse_forward(fn, cellname: str, sig: Signature):
    """``(graph, state outputs, norm nodes by name, argument names up to the per-unit
    parameters, product nodes by name)`` of forward ``fn``.

    Raises :class:`kernrnn.cell.CellError` naming the cell, file, line and
    construct for anything outside the supported set.
    """
    from kernrnn.errors import CellError

    graph = Graph()
    reader = _Reader(cellname, sig, graph)
    if not isinstance(fn, types.FunctionType) or hasattr(fn, "py_func"):
        raise CellError(f"cell {cellname!r}: the forward must be a plain Python function, got "
                        f"{type(fn).__name__} {fn!r}")
    try:
        out = reader.top(fn)
    except _Fail as exc:
        raise CellError(f"cell {cellname!r}: cannot derive the backward of the forward: "
                        f"{exc}") from None
    if sig.normalize:
        missing = [n for n in sig.normalize if n not in reader.norms]
        if missing:
            raise CellError(f"cell {cellname!r}: the cell normalises {sig.normalize!r}, the "
                            f"forward never calls norm({missing[0]!r}, ...)")
    missing = [n for n in sig.products if n not in reader.products]
    if missing:
        raise CellError(f"cell {cellname!r}: the cell declares the products "
                        f"{tuple(sig.products)!r}, the forward never calls "
                        f"matmul({missing[0]!r}, ...)")
    return graph, tuple(out), dict(reader.norms), reader.arg_names, dict(reader.products)
