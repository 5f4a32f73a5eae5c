"""The graph the differentiator works on: one node per scalar operation.

A forward step is parsed into a :class:`Graph` (straight-line code, so a
list of nodes in evaluation order is a topological order).  Nodes are
hash-consed: building the same operation on the same operands twice returns
the first node, so ``xw[0]`` read twice is one input, and two adjoints built
from the same contributions are one node.  That identity is what makes "the
gradients of ``xw[k]`` and ``hu[k]`` are the same value" a structural fact.

Operations (``Node.op``):

* ``in`` (``attr = (group, index)``: ``("xw", 0)``, ``("prev", 1)``,
  ``("p0", 2)`` for block 2 of the first per-unit parameter, ``("saved", k)``,
  ...) and ``const`` (``attr`` a float);
* ``add sub mul div neg`` and ``pow`` (``attr`` a non-negative int exponent);
* ``call`` (``attr`` one of :data:`FUNCTIONS`);
* ``select`` (condition, value if true, value if false);
* conditions: ``cmp`` (``attr`` one of ``< <= > >= == !=``), ``and or not``;
* ``norm`` (``attr`` the normalised value's name, one operand): the row
  normalisation the core runs between the two stages of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Scalar functions a forward may call, by their name in generated code.
FUNCTIONS = ("sigmoid", "tanh", "relu", "exp", "log", "sqrt", "sin", "cos", "erf", "fabs")
#: Operations recomputed in a backward (instead of saved) when their operands are at hand.
CHEAP = frozenset({"add", "sub", "mul", "div", "neg", "pow", "select", "cmp", "and", "or",
                   "not"})
#: Functions as cheap as arithmetic (a select in disguise).
CHEAP_CALLS = frozenset({"relu", "fabs"})
BOOL_OPS = frozenset({"cmp", "and", "or", "not"})
COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")


@dataclass(eq=False)
class Node:
    """One scalar value: ``op`` applied to ``args`` (see the module docstring)."""

    id: int
    op: str
    args: tuple = ()
    attr: object = None
    name: str | None = None  # a readable name for generated code (the user's variable)
    where: str | None = field(default=None, repr=False)  # "file line N: 'text'"

    @property
    def is_bool(self) -> bool:
        """True for a condition (a comparison or a logical combination of them)."""
        return self.op in BOOL_OPS

    @property
    def cheap(self) -> bool:
        """Recomputing it costs about as much as loading a saved value."""
        return self.op in CHEAP or (self.op == "call" and self.attr in CHEAP_CALLS)

    def __repr__(self) -> str:
        label = self.name or f"%{self.id}"
        if self.op in ("in", "const"):
            return f"{label}={self.op}{self.attr!r}"
        return f"{label}={self.op}({self.attr or ''}; {', '.join(f'%{a.id}' for a in self.args)})"


def is_const(node: Node, value: float) -> bool:
    """``node`` is the constant ``value``."""
    return node.op == "const" and node.attr == value


class Graph:
    """Nodes in evaluation order, hash-consed.

    With ``simplify`` the arithmetic helpers drop additions of zero,
    multiplications by one and products with zero (adjoint code is full of
    them); parsed forward steps are built without, so their arithmetic stays
    as written.
    """

    def __init__(self, simplify: bool = False):
        self.nodes: list[Node] = []
        self._memo: dict = {}
        self.simplify = simplify

    def node(self, op: str, args=(), attr=None, *, where=None) -> Node:
        """The node for ``op(args)``: the existing one if it was built before."""
        key = (op, tuple(a.id for a in args), repr(attr) if op == "const" else attr)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        n = Node(len(self.nodes), op, tuple(args), attr, where=where)
        self.nodes.append(n)
        self._memo[key] = n
        return n

    def const(self, value: float) -> Node:
        return self.node("const", (), float(value))

    def input(self, group: str, index) -> Node:
        return self.node("in", (), (group, index))

    # -- arithmetic, simplified when asked ----------------------------------------------

    def add(self, a: Node, b: Node) -> Node:
        if self.simplify:
            if is_const(a, 0.0):
                return b
            if is_const(b, 0.0):
                return a
            if b.op == "neg":
                return self.sub(a, b.args[0])
        return self.node("add", (a, b))

    def sub(self, a: Node, b: Node) -> Node:
        if self.simplify:
            if is_const(b, 0.0):
                return a
            if is_const(a, 0.0):
                return self.neg(b)
        return self.node("sub", (a, b))

    def mul(self, a: Node, b: Node) -> Node:
        if self.simplify:
            if is_const(a, 0.0) or is_const(b, 0.0):
                return self.const(0.0)
            if is_const(a, 1.0):
                return b
            if is_const(b, 1.0):
                return a
            if a.op == "neg":
                return self.neg(self.mul(a.args[0], b))
            if b.op == "neg":
                return self.neg(self.mul(a, b.args[0]))
        return self.node("mul", (a, b))

    def div(self, a: Node, b: Node) -> Node:
        if self.simplify:
            if is_const(a, 0.0):
                return self.const(0.0)
            if is_const(b, 1.0):
                return a
            if a.op == "neg":
                return self.neg(self.div(a.args[0], b))
        return self.node("div", (a, b))

    def neg(self, a: Node) -> Node:
        if self.simplify:
            if a.op == "const":
                return self.const(-a.attr)
            if a.op == "neg":
                return a.args[0]
        return self.node("neg", (a,))

    def pow(self, a: Node, k: int) -> Node:
        if self.simplify and k == 1:
            return a
        if self.simplify and k == 0:
            return self.const(1.0)
        return self.node("pow", (a,), k)

    def call(self, fn: str, a: Node) -> Node:
        return self.node("call", (a,), fn)

    def select(self, cond: Node, a: Node, b: Node) -> Node:
        if self.simplify and a is b:
            return a
        return self.node("select", (cond, a, b))

    def cmp(self, op: str, a: Node, b: Node) -> Node:
        return self.node("cmp", (a, b), op)

    def total(self, terms: list[Node]) -> Node:
        """The sum of ``terms`` in order (0 for none)."""
        out = None
        for t in terms:
            out = t if out is None else self.add(out, t)
        return self.const(0.0) if out is None else out


def live(outputs) -> list[Node]:
    """The nodes ``outputs`` depend on, in evaluation order."""
    seen: dict[int, Node] = {}
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n.id in seen:
            continue
        seen[n.id] = n
        stack.extend(n.args)
    return [seen[k] for k in sorted(seen)]


def use_counts(nodes, outputs) -> dict[int, int]:
    """How often each node is an operand of ``nodes`` or one of ``outputs``."""
    counts: dict[int, int] = {}
    for n in nodes:
        for a in n.args:
            counts[a.id] = counts.get(a.id, 0) + 1
    for n in outputs:
        counts[n.id] = counts.get(n.id, 0) + 1
    return counts
