"""Python source from derived graphs: scalar cell math, and a NumPy reference step.

The scalar functions are plain Python in the style of a hand-written cell
(``math``, ``sigmoid``, ``tanh``, ``relu`` and :mod:`kernrnn.scalar_math`'s
``sin``/``cos``; literals as plain numbers, which :mod:`kernrnn.scalar` casts
to the kernel's precision).  A node gets a line of its own when it has a name
(the user's variable, ``d_<name>`` for its adjoint) or is used more than once;
other nodes are written inline, parenthesised so that the evaluation order is
exactly the graph's.

Generated modules are registered with ``linecache`` and as a module in
``sys.modules`` whose loader returns the source, so ``inspect.getsource``
(which :mod:`kernrnn.scalar` uses to retype and compile the math) reads them
like functions in a file.
"""

from __future__ import annotations

import hashlib
import keyword
import linecache
import math
import re
import sys
import types

from kernrnn.autodiff.ir import Node, live, use_counts

__all__ = ["Style", "SCALAR", "NUMPY", "emit_function", "load_source"]

_PREC = {"select": 0, "or": 1, "and": 2, "not": 3, "cmp": 4, "add": 5, "sub": 5, "mul": 6,
         "div": 6, "neg": 7, "pow": 8}
_ATOM = 10
_RESERVED = {"math", "np", "sigmoid", "tanh", "relu", "sin", "cos", "norm", "matmul", "dgates",
             "xw", "hu", "prev", "saved", "dstate", "zn", "mid", "dz", "dmid", "abs", "min",
             "max", "float", "int", "range", "len", "tuple", "_np_sigmoid", "_np_relu",
             "_np_erf", "_np_state", "_as64"}


class Style:
    """How calls, selects and conditions are written (scalar math or NumPy arrays)."""

    def __init__(self, calls: dict, vectorised: bool):
        self.calls = calls
        self.vectorised = vectorised


SCALAR = Style({"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "sin": "sin",
                "cos": "cos", "exp": "math.exp", "log": "math.log", "sqrt": "math.sqrt",
                "erf": "math.erf", "fabs": "math.fabs"}, vectorised=False)
NUMPY = Style({"sigmoid": "_np_sigmoid", "tanh": "np.tanh", "relu": "_np_relu",
               "sin": "np.sin", "cos": "np.cos", "exp": "np.exp", "log": "np.log",
               "sqrt": "np.sqrt", "erf": "_np_erf", "fabs": "np.fabs"}, vectorised=True)


def tup(items) -> str:
    """A tuple literal (a 1-tuple keeps its comma)."""
    items = list(items)
    if len(items) == 1:
        return f"({items[0]},)"
    return "(" + ", ".join(items) + ")"


def _const(v: float) -> tuple[str, int]:
    if math.copysign(1.0, v) < 0:
        return f"-{-v!r}", _PREC["neg"]
    return repr(v), _ATOM


def _ident(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    if not name or name[0].isdigit():
        name = "v_" + name
    return name


class _Writer:
    def __init__(self, style: Style, input_source, reserved):
        self.style = style
        self.input_source = input_source
        self.names: dict[int, str] = {}
        self.taken = set(_RESERVED) | set(reserved) | set(keyword.kwlist)
        self.counter = 0

    def fresh(self, hint: str | None) -> str:
        if hint:
            base = _ident(hint)
            name, k = base, 1
            while name in self.taken:
                k += 1
                name = f"{base}_{k}"
        else:
            while True:
                self.counter += 1
                name = f"t{self.counter}"
                if name not in self.taken:
                    break
        self.taken.add(name)
        return name

    def render(self, n: Node) -> tuple[str, int]:
        if n.id in self.names:
            return self.names[n.id], _ATOM
        op, a = n.op, n.args
        if op == "in":
            return self.input_source(n.attr), _ATOM
        if op == "const":
            return _const(n.attr)
        if op in ("add", "sub", "mul", "div"):
            p = _PREC[op]
            sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
            return f"{self.wrap(a[0], p)} {sym} {self.wrap(a[1], p, strict=True)}", p
        if op == "neg":
            return f"-{self.wrap(a[0], _PREC['neg'], strict=True)}", _PREC["neg"]
        if op == "pow":
            return f"{self.wrap(a[0], _PREC['pow'], strict=True)} ** {n.attr}", _PREC["pow"]
        if op == "call":
            return f"{self.style.calls[n.attr]}({self.render(a[0])[0]})", _ATOM
        if op == "norm":
            return f"norm({n.attr!r}, {self.render(a[0])[0]})", _ATOM
        if op == "product":  # a tuple of the G_m pre-activations (the reference only)
            return f"matmul({n.attr!r}, {self.render(a[0])[0]})", _ATOM
        if op == "mmout":
            return f"{self.render(a[0])[0]}[{n.attr[1]}]", _ATOM
        if op == "select":
            c, x, y = (self.render(v)[0] for v in a) if self.style.vectorised else (
                self.wrap(a[0], 1), self.wrap(a[1], 1), self.wrap(a[2], 1))
            if self.style.vectorised:
                return f"np.where({c}, {x}, {y})", _ATOM
            return f"{x} if {c} else {y}", _PREC["select"]
        if op == "cmp":
            p = _PREC["cmp"]
            return f"{self.wrap(a[0], p, strict=True)} {n.attr} " \
                   f"{self.wrap(a[1], p, strict=True)}", p
        if op in ("and", "or"):
            if self.style.vectorised:
                return f"np.logical_{op}({self.render(a[0])[0]}, {self.render(a[1])[0]})", _ATOM
            p = _PREC[op]
            return f"{self.wrap(a[0], p)} {op} {self.wrap(a[1], p, strict=True)}", p
        if op == "not":
            if self.style.vectorised:
                return f"np.logical_not({self.render(a[0])[0]})", _ATOM
            return f"not {self.wrap(a[0], _PREC['not'])}", _PREC["not"]
        raise AssertionError(f"cannot write {n!r}")

    def wrap(self, n: Node, p: int, strict: bool = False) -> str:
        text, q = self.render(n)
        return f"({text})" if q < p or (strict and q == p) else text


def emit_function(fname: str, args: list[str], results: list[list[Node]], input_source, *,
                  unpack: dict[str, list[Node]] | None = None, style: Style = SCALAR,
                  share_first: bool = False, preamble=(), block: str | None = None,
                  return_format: str = "{}", doc: str = "") -> str:
    """Source of ``def fname(*args)`` returning the tuples ``results``.

    ``input_source(attr)`` writes an ``in`` node; ``unpack`` maps an argument
    to the input nodes read from it by position (written as one tuple
    assignment, ``_`` for unused ones).  ``share_first``: the first two
    results are the same nodes, returned as one tuple twice (``return d, d,
    ...``: the dxw == dhu form the CPU backend recognises).  ``preamble``:
    lines written first; ``block``: a line (``with ...:``) the body is indented
    under; ``return_format``: how the returned tuples are wrapped.
    """
    unpack = unpack or {}
    outputs = [n for group in results for n in group]
    nodes = live(outputs)
    counts = use_counts(nodes, outputs)
    w = _Writer(style, input_source, args)
    lines = [f"def {fname}({', '.join(args)}):"]
    if doc:
        lines.append(f'    """{doc}"""')
    lines += [f"    {line}" for line in preamble]
    pad = "    "
    if block:
        lines.append(f"{pad}{block}")
        pad = "        "
    for arg, loaded in unpack.items():
        if not loaded:
            continue
        names = []
        for k, x in enumerate(loaded):
            if counts.get(x.id):
                w.names[x.id] = w.fresh(x.name or f"{arg}{k}")
                names.append(w.names[x.id])
            else:
                names.append("_")
        if all(nm == "_" for nm in names):
            continue
        if len(names) == 1:
            lines.append(f"{pad}{names[0]} = {arg}[0]")
        else:
            lines.append(f"{pad}{', '.join(names)} = {arg}")
    for n in nodes:
        if n.op in ("in", "const") or n.id in w.names:
            continue
        if n.name is None and counts.get(n.id, 0) <= 1:
            continue  # written inline where it is used
        text = w.render(n)[0]
        w.names[n.id] = w.fresh(n.name)
        lines.append(f"{pad}{w.names[n.id]} = {text}")
    rendered = [[w.render(n)[0] for n in group] for group in results]
    if share_first and len(results) >= 2 and rendered[0]:
        lines.append(f"{pad}dgates = {tup(rendered[0])}")
        parts = ["dgates", "dgates"] + [tup(r) for r in rendered[2:]]
    else:
        parts = [tup(r) if r else "()" for r in rendered]
    lines.append(f"{pad}return {return_format.format(', '.join(parts))}")
    return "\n".join(lines) + "\n"


class _SourceLoader:
    """Hands the generated source to :mod:`linecache` (and so to :mod:`inspect`)."""

    def __init__(self, source: str):
        self.source = source

    def get_source(self, name):
        return self.source


def load_source(source: str, tag: str, namespace: dict) -> types.ModuleType:
    """Execute generated ``source`` as a module whose source :mod:`inspect` can read.

    The module is ``kernrnn.autodiff.generated_<hash>`` in ``sys.modules``
    with file name ``kernrnn_derived_<tag>_<hash>.py`` (no file is written:
    its loader and :mod:`linecache` serve the source).
    """
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    modname = f"kernrnn.autodiff.generated_{_ident(tag)}_{digest}"
    module = sys.modules.get(modname)
    if module is not None:
        return module
    filename = f"kernrnn_derived_{_ident(tag)}_{digest}.py"
    loader = _SourceLoader(source)
    module = types.ModuleType(modname)
    module.__file__ = filename
    module.__loader__ = loader
    module.__dict__.update(namespace)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), module.__dict__)
    sys.modules[modname] = module
    return module
