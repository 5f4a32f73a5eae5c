"""Reverse mode on a parsed forward: adjoints, the saved values, the two stages.

The backward of a step is built as a second graph (``kernrnn.autodiff.ir.Graph``,
simplified, hash-consed) by one sweep over the forward's nodes in reverse
order: each node's adjoint is the sum of its consumers' contributions, and
its local partials (``partials``) send contributions to its operands.
A node whose only contribution is its consumer's adjoint passed through
(``a + b``) gets that very node as its adjoint, so ``xw[k]`` and ``hu[k]``
that enter only as ``xw[k] + hu[k]`` end up with one node: the
``dxw == dhu`` fact is read off the graph (``Plan.same_grads``).

Which forward values the backward reads is decided here (``choose_saved``);
the rule is in :mod:`kernrnn.autodiff.differentiate`'s docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kernrnn.autodiff.ir import Graph, Node, is_const, live

__all__ = ["partials", "sweep", "choose_saved", "Plan", "plan_single", "plan_two_stage",
           "StagedPlan", "plan_stages"]

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
#: Nodes a sweep does not differentiate through: inputs, and the values a stage receives
#: from a stage boundary (a normalised value, a recurrent product's outputs).
_LEAVES = frozenset({"in", "norm", "product", "mmout"})
#: Input groups a backward receives (``xw`` and ``hu`` are gone by then).
_BACKWARD_INPUTS = ("prev",)


def _param_group(group: str) -> bool:
    return group.startswith("p") and group[1:].isdigit()


def is_step_input(v: Node) -> bool:
    """``v`` is a previous-state value, a per-unit parameter or a hyperparameter (every
    function receives them)."""
    return v.op == "in" and (v.attr[0] in _BACKWARD_INPUTS or _param_group(v.attr[0])
                             or v.attr[0] == "hyper")


def partials(n: Node, g: Node, P, B: Graph) -> list:
    """Contributions of adjoint ``g`` of ``n`` to its operands: ``[(operand index, thunk)]``.

    Calling a thunk builds the contribution; ``P(v)`` is forward value ``v``
    inside the backward graph ``B``.  Sigmoid, tanh, exp, sqrt and relu are
    differentiated through their result (as haste does), the others through
    their argument.
    """
    op, a = n.op, n.args
    if op == "add":
        return [(0, lambda: g), (1, lambda: g)]
    if op == "sub":
        return [(0, lambda: g), (1, lambda: B.neg(g))]
    if op == "mul":
        if a[0] is a[1]:
            return [(0, lambda: B.mul(B.const(2.0), B.mul(g, P(a[0]))))]
        return [(0, lambda: B.mul(g, P(a[1]))), (1, lambda: B.mul(g, P(a[0])))]
    if op == "div":
        if a[0] is a[1]:
            return []  # x / x
        return [(0, lambda: B.div(g, P(a[1]))),
                (1, lambda: B.neg(B.mul(B.div(g, P(a[1])), P(n))))]
    if op == "neg":
        return [(0, lambda: B.neg(g))]
    if op == "pow":
        k = n.attr
        return [(0, lambda: B.mul(g, B.mul(B.const(float(k)), B.pow(P(a[0]), k - 1))))]
    if op == "select":
        if a[1] is a[2]:
            return [(1, lambda: g)]
        zero = B.const(0.0)
        return [(1, lambda: B.select(P(a[0]), g, zero)), (2, lambda: B.select(P(a[0]), zero, g))]
    if op == "call":
        return [(0, lambda: _call_partial(n, g, P, B))]
    raise AssertionError(f"no derivative for {n!r}")


def _call_partial(n: Node, g: Node, P, B: Graph) -> Node:
    f, x = n.attr, n.args[0]
    one = B.const(1.0)
    if f == "sigmoid":
        y = P(n)
        return B.mul(g, B.mul(y, B.sub(one, y)))
    if f == "tanh":
        y = P(n)
        return B.mul(g, B.sub(one, B.mul(y, y)))
    if f == "exp":
        return B.mul(g, P(n))
    if f == "sqrt":
        return B.div(B.mul(B.const(0.5), g), P(n))
    if f == "relu":
        return B.select(B.cmp(">", P(n), B.const(0.0)), g, B.const(0.0))
    if f == "log":
        return B.div(g, P(x))
    if f == "sin":
        return B.mul(g, B.call("cos", P(x)))
    if f == "cos":
        return B.neg(B.mul(g, B.call("sin", P(x))))
    if f == "erf":
        px = P(x)
        return B.mul(g, B.mul(B.const(_TWO_OVER_SQRT_PI), B.call("exp", B.neg(B.mul(px, px)))))
    if f == "fabs":
        return B.select(B.cmp(">=", P(x), B.const(0.0)), g, B.neg(g))
    raise AssertionError(f"no derivative for {n!r}")


def sweep(scope: list[Node], seeds: dict[int, list[Node]], P, B: Graph) -> dict[int, list]:
    """Adjoint contributions of every node of ``scope`` (in evaluation order) and its leaves.

    ``seeds`` maps node ids to their initial contributions (the gradients
    arriving at the outputs).  Returns node id -> contributions; a node of
    ``scope`` that was processed holds its one summed adjoint.  Inputs,
    constants, ``norm`` results and conditions are leaves.
    """
    contrib = {k: list(v) for k, v in seeds.items()}
    # made of constants and hyperparameters only: needs no adjoint
    constant: dict[int, bool] = {}

    def is_constant(v: Node) -> bool:
        if v.id not in constant:
            constant[v.id] = v.op == "const" or (v.op == "in" and v.attr[0] == "hyper") or (
                v.op not in _LEAVES and all(is_constant(a) for a in v.args))
        return constant[v.id]
    for n in reversed(scope):
        terms = contrib.get(n.id)
        if not terms or n.op in _LEAVES or n.op == "const" or n.is_bool:
            continue
        g = B.total(terms)
        contrib[n.id] = [g]
        if n.name and g.name is None and g.op not in ("in", "const"):
            g.name = f"d_{n.name}"
        if is_const(g, 0.0):
            continue
        for i, build in partials(n, g, P, B):
            if not is_constant(n.args[i]):
                contrib.setdefault(n.args[i].id, []).append(build())
    return contrib


def needed_values(scope, seeds_fn, is_free) -> list[Node]:
    """The forward values the backward's partials read (a dry run of :func:`sweep`)."""
    R = Graph(simplify=True)
    needed: dict[int, Node] = {}

    def P(v: Node) -> Node:
        if v.op == "const":
            return R.const(v.attr)
        needed[v.id] = v
        return R.input("free" if is_free(v) else "?", v.id)

    sweep(scope, seeds_fn(R), P, R)
    return [needed[k] for k in sorted(needed)]


def choose_saved(needed: list[Node], is_free, recompute: bool = True) -> list[Node]:
    """The values to save so that the backward can read every one of ``needed``.

    A value is at hand when it is free (``is_free``: previous state,
    parameters, constants, and in a stage the values it receives), saved,
    or, with ``recompute``, a cheap operation (:attr:`Node.cheap`) of values
    at hand.  Walking ``needed`` in evaluation order, each one not at hand is
    saved.  Without ``recompute`` every needed value that is not free is saved.
    """
    saved: list[Node] = []
    chosen: set[int] = set()
    memo: dict[int, bool] = {}

    def at_hand(v: Node) -> bool:
        if v.op == "const" or is_free(v) or v.id in chosen:
            return True
        if not recompute or not v.cheap or v.op == "in":
            return False
        if v.id not in memo:
            memo[v.id] = all(at_hand(a) for a in v.args)
        return memo[v.id]

    for v in sorted(needed, key=lambda n: n.id):
        if not at_hand(v):
            saved.append(v)
            chosen.add(v.id)
            memo.clear()
    return saved


def _gate_of(v: Node, depth: int = 3):
    """The index of the first ``xw`` input within a few operations of ``v``, or None."""
    if v.op == "in" and v.attr[0] == "xw":
        return v.attr[1]
    if depth and v.op in ("add", "sub", "mul", "div", "neg"):
        for a in v.args:
            k = _gate_of(a, depth - 1)
            if k is not None:
                return k
    return None


def name_saved(nodes) -> None:
    """Give stored values without a user name a readable one (``tanh_c``, ``sigmoid1``
    for a sigmoid of gate 1's pre-activation, ``hu2``, ``cond``)."""
    for v in nodes:
        if v.name is None:
            arg = v.args[0] if v.args else None
            if v.op == "in":
                v.name = f"{v.attr[0]}{v.attr[1]}"
            elif v.is_bool:
                v.name = "cond"
            elif v.op == "call" and arg is not None and arg.name:
                v.name = f"{v.attr}_{arg.name}"
            elif v.op == "call":
                k = _gate_of(arg)
                v.name = f"{v.attr}{k}" if k is not None else f"{v.attr}_value"


def transplant(B: Graph, loads: dict[int, Node], inputs=None):
    """``P(v)``: forward value ``v`` rebuilt in graph ``B``.

    Values in ``loads`` (id -> node of ``B``) are taken from there; inputs
    whose group is in ``inputs`` (None: all) are inputs of ``B``; anything
    else is recomputed from its operands, as the forward computes it.
    """
    memo: dict[int, Node] = {}

    def P(v: Node) -> Node:
        r = memo.get(v.id)
        if r is not None:
            return r
        if v.id in loads:
            r = loads[v.id]
        elif v.op == "const":
            r = B.const(v.attr)
        elif v.op == "in":
            if inputs is not None and not (v.attr[0] in inputs or _param_group(v.attr[0])
                                           or v.attr[0] == "hyper"):
                raise AssertionError(f"{v!r} is not available here")
            r = B.input(*v.attr)
        elif v.op in ("norm", "product", "mmout"):
            raise AssertionError(f"{v!r} is not available here")
        else:
            r = B.node(v.op, tuple(P(a) for a in v.args), v.attr)
            if r.name is None:
                r.name = v.name
        memo[v.id] = r
        return r

    return P


def load(B: Graph, group: str, index: int, v: Node) -> Node:
    """Forward value ``v`` read from input ``group[index]`` (a condition travels as 1.0 / 0.0)."""
    x = B.input(group, index)
    if x.name is None:
        x.name = v.name
    if v.is_bool:
        return B.cmp("!=", x, B.const(0.0))
    return x


def as_number(G: Graph, v: Node) -> Node:
    """``v`` as a value to store: a condition becomes ``1.0 if v else 0.0``."""
    if v.is_bool:
        return G.select(v, G.const(1.0), G.const(0.0))
    return v


@dataclass
class Fn:
    """One function to generate: its graph's result tuples and how its arguments are read."""

    results: list  # list of lists of nodes
    args: list  # argument kinds in order, see emit
    unpack: dict = field(default_factory=dict)  # argument kind -> nodes read from it in order


@dataclass
class Plan:
    """The derived functions of a step (as graphs) and the facts about them."""

    forward: Fn
    backward: Fn
    forward2: Fn | None
    backward2: Fn | None
    saved: list  # forward nodes saved (the last stage's for a two-stage step)
    mid: list  # forward nodes passed from stage 1 to stage 2 (two-stage only)
    same_grads: tuple  # per gate: dxw[k] and dhu[k] are one node
    norms: tuple  # normalised value names in order


def _grads(sig, inputs, contrib, B: Graph):
    """Result tuples dxw, [dhu,] dprev, *dparams[, dx] from the contributions at the inputs
    (``dx``: the raw input's, with ``sig.raw_input``)."""
    def total(group, index):
        n = inputs.get((group, index))
        return B.total(contrib.get(n.id, [])) if n is not None else B.const(0.0)

    dxw = [total("xw", k) for k in range(sig.gates)]
    out = [dxw]
    same = ()
    if sig.recurrent:
        dhu = [total("hu", k) for k in range(sig.gates)]
        out.append(dhu)
        same = tuple(a is b for a, b in zip(dxw, dhu))
    out.append([total("prev", s) for s in range(sig.state)])
    out += [[total(f"p{i}", b) for b in range(blocks)] for i, blocks in enumerate(sig.params)]
    if sig.raw_input:
        out.append([total("x", 0)])
    return out, same


def _inputs(scope) -> dict:
    return {n.attr: n for n in scope if n.op == "in"}


def _dstate_seeds(outputs, group="dstate"):
    def seeds(R: Graph):
        s: dict[int, list] = {}
        for k, o in enumerate(outputs):
            s.setdefault(o.id, []).append(R.input(group, k))
        return s
    return seeds


def plan_single(graph: Graph, outputs, sig, recompute: bool = True) -> Plan:
    """A one-stage step: ``forward -> (new_state, saved)`` and its backward."""
    scope = live(outputs)
    seeds = _dstate_seeds(outputs)
    needed = needed_values(scope, seeds, is_step_input)
    saved = choose_saved([v for v in needed if not is_step_input(v)], is_step_input,
                         recompute)
    name_saved(saved)
    fwd = Fn([list(outputs), [as_number(graph, v) for v in saved]], ["fwd"])
    B = Graph(simplify=True)
    loads = {v.id: load(B, "saved", k, v) for k, v in enumerate(saved)}
    P = transplant(B, loads, _BACKWARD_INPUTS)
    contrib = sweep(scope, seeds(B), P, B)
    results, same = _grads(sig, _inputs(scope), contrib, B)
    bwd = Fn(results, ["saved", "prev", "dstate", "params"],
             {"saved": [B.input("saved", k) for k in range(len(saved))]})
    return Plan(fwd, bwd, None, None, saved, [], same, ())


def plan_two_stage(graph: Graph, outputs, norms: dict, order, sig, recompute=True,
                   name: str = "?") -> Plan:
    """A step with normalised values: stage 1 up to the values to normalise, stage 2 after.

    ``forward(...) -> (z, mid)``, ``forward2(zn, mid, prev, *p) -> (new_state,
    saved)``, ``backward2(saved, zn, mid, prev, dstate, *p) -> (dzn, dmid,
    dprev, *dp)`` and ``backward(mid, prev, dz, dmid, *p) -> (dxw, dhu, dprev,
    *dp[, dx])``: the contract of :class:`kernrnn.cell.Cell` with ``normalize``.
    ``mid`` holds the stage-1 values stage 2 reads and those stage 1's backward
    needs (its saved values), in evaluation order; the ``dmid`` of the latter
    are zero.
    """
    from kernrnn.errors import CellError

    norm_nodes = [norms[name] for name in order]
    zs = [n.args[0] for n in norm_nodes]
    dep2: set[int] = set()
    for n in graph.nodes:
        if n.op == "norm" or any(a.id in dep2 for a in n.args):
            dep2.add(n.id)
    for n, z in zip(norm_nodes, zs):
        if z.id in dep2:
            raise CellError(f"cell {name!r}: cannot derive the backward of the forward: "
                            f"norm({n.attr!r}, ...) ({n.where}) normalises a value computed "
                            f"from another normalised value; a step has one normalisation "
                            f"stage")
    scope = live(list(outputs) + norm_nodes)
    scope1 = [n for n in scope if n.id not in dep2]
    scope2 = [n for n in scope if n.id in dep2]

    def base_free(v):
        return v.op == "const" or is_step_input(v)

    used: dict[int, Node] = {}
    for n in scope2:
        if n.op == "norm":
            continue  # its operand is z, stage 1's first result
        for a in n.args:
            if a.id not in dep2 and not base_free(a):
                used[a.id] = a
    for o in outputs:
        if o.id not in dep2 and not base_free(o):
            used[o.id] = o

    def seeds1(R: Graph):
        s: dict[int, list] = {}
        for k, z in enumerate(zs):
            s.setdefault(z.id, []).append(R.input("dz", k))
        for j, m in enumerate(sorted(used)):
            if not used[m].is_bool:
                s.setdefault(m, []).append(R.input("dmid", j))
        return s

    def free1(v):
        return base_free(v) or v.id in used

    needed1 = needed_values(scope1, seeds1, free1)
    saved1 = choose_saved([v for v in needed1 if not free1(v)], free1, recompute)
    mid = sorted(list(used.values()) + saved1, key=lambda n: n.id)
    mid_index = {m.id: j for j, m in enumerate(mid)}
    name_saved(mid)

    # stage 1: forward -> (z, mid); backward(mid, prev, dz, dmid, *p)
    fwd1 = Fn([list(zs), [as_number(graph, m) for m in mid]], ["fwd"])
    B1 = Graph(simplify=True)
    loads1 = {m.id: load(B1, "mid", j, m) for j, m in enumerate(mid)}
    P1 = transplant(B1, loads1, _BACKWARD_INPUTS)
    s1: dict[int, list] = {}
    for k, z in enumerate(zs):
        s1.setdefault(z.id, []).append(B1.input("dz", k))
    for m in used.values():
        if not m.is_bool:
            s1.setdefault(m.id, []).append(B1.input("dmid", mid_index[m.id]))
    contrib1 = sweep(scope1, s1, P1, B1)
    results1, same = _grads(sig, _inputs(scope1), contrib1, B1)
    bwd1 = Fn(results1, ["mid", "prev", "dz", "dmid", "params"],
              {"mid": [B1.input("mid", j) for j in range(len(mid))]})

    # stage 2
    def free2(v):
        return base_free(v) or v.op == "norm" or v.id in mid_index

    seeds2 = _dstate_seeds(outputs)
    needed2 = needed_values(scope2, seeds2, free2)
    saved2 = choose_saved([v for v in needed2 if not free2(v)], free2, recompute)
    name_saved(saved2)

    F2 = Graph()
    loads_f = {n.id: F2.input("zn", k) for k, n in enumerate(norm_nodes)}
    loads_f.update({m.id: load(F2, "mid", j, m) for j, m in enumerate(mid)})
    Pf = transplant(F2, loads_f, _BACKWARD_INPUTS)
    fwd2 = Fn([[Pf(o) for o in outputs], [as_number(F2, Pf(v)) for v in saved2]],
              ["zn", "mid", "prev", "params"],
              {"mid": [F2.input("mid", j) for j in range(len(mid))]})

    B2 = Graph(simplify=True)
    loads2 = {v.id: load(B2, "saved", k, v) for k, v in enumerate(saved2)}
    loads2.update({n.id: B2.input("zn", k) for k, n in enumerate(norm_nodes)})
    loads2.update({m.id: load(B2, "mid", j, m) for j, m in enumerate(mid)})
    P2 = transplant(B2, loads2, _BACKWARD_INPUTS)
    contrib2 = sweep(scope2, seeds2(B2), P2, B2)
    dzn = [B2.total(contrib2.get(n.id, [])) for n in norm_nodes]
    dmid = [B2.total(contrib2.get(m.id, [])) if not m.is_bool else B2.const(0.0) for m in mid]
    inputs2 = {n.attr: n for n in scope if n.op == "in"}
    rest, _ = _grads(sig, inputs2, contrib2, B2)
    # stage 2 reads xw, hu and x only through mid: their gradients leave through dmid
    rest = rest[(2 if sig.recurrent else 1):len(rest) - (1 if sig.raw_input else 0)]
    results2 = [dzn, dmid] + rest
    bwd2 = Fn(results2, ["saved", "zn", "mid", "prev", "dstate", "params"],
              {"saved": [B2.input("saved", k) for k in range(len(saved2))],
               "mid": [B2.input("mid", j) for j in range(len(mid))]})
    return Plan(fwd1, bwd1, fwd2, bwd2, saved2, mid, same, tuple(order))


@dataclass
class StagedPlan:
    """The derived functions of a step of ``K`` stages split by recurrent products.

    Stage ``s`` (0-based) computes the operands of boundary ``s``'s products and
    ``mids[s]``, the values later stages read and its own backward needs (the
    last stage the new state and ``saved``).  ``boundaries[s]`` lists the products
    between stage ``s`` and ``s + 1`` as ``(name, G_m)``, in declaration order; the
    next stage receives their ``G_m`` pre-activations each, one after the other
    (``zn``).  See :func:`plan_stages` for the functions' arguments.
    """

    forwards: list  # Fn per stage
    backwards: list  # Fn per stage
    saved: list  # the last stage's saved values
    mids: list  # per boundary: the nodes passed from stage s to stage s + 1
    boundaries: list  # per boundary: [(product name, G_m), ...]
    same_grads: tuple

    @property
    def n_stages(self) -> int:
        return len(self.forwards)


def plan_stages(graph: Graph, outputs, products: dict, order, sig, recompute=True,
                name: str = "?") -> StagedPlan:
    """A step cut into stages by recurrent products (``matmul("m", m)``).

    A node's stage is the largest of its operands', plus one past a product;
    boundary ``s`` holds the products whose operand stage ``s`` computes.  With
    ``zn`` the pre-activations boundary ``s-1``'s products hand stage ``s``, and
    ``mid`` the values stage ``s-1`` passes on (mid_{s-1}):

    * stage 0: ``forward(xw, [hu,] prev, *p) -> (z_0, mid_0)`` and
      ``backward(mid_0, prev, dz_0, dmid_0, *p) -> (dxw, [dhu,] dprev, *dp)``;
    * a middle stage ``s``: ``forward{s+1}(zn, mid, prev, *p) -> (z_s, mid_s)`` and
      ``backward{s+1}(saved, zn, mid, prev, dz_s, dmid_s, *p) -> (dzn, dmid, dprev,
      *dp)`` where ``saved`` is its own ``mid_s``;
    * the last stage: ``forward{K}(zn, mid, prev, *p) -> (new_state, saved)`` and
      ``backward{K}(saved, zn, mid, prev, dstate, *p) -> (dzn, dmid, dprev, *dp)``.

    ``z_s`` are the products' operands (the core multiplies them by the
    products' matrices over the units of a row); ``dz_s`` their gradients, which
    the core computes from ``dzn`` of the stage after (``dm = W_m^T dhm``).
    ``mid_s`` holds the values of stages up to ``s`` that later stages read
    (carried on through every boundary up to their use), then the values stage
    ``s``'s backward needs (the rule of :func:`choose_saved`, with its inputs,
    ``zn``, ``mid_{s-1}`` and the carried values at hand); the ``dmid`` of
    values only saved are zero.  dprev and dparams of every stage add up.
    """
    from kernrnn.errors import CellError

    nodes = live(outputs)
    stage: dict[int, int] = {}
    for n in nodes:
        if n.op in ("in", "const"):
            stage[n.id] = 0
        elif n.op == "product":
            stage[n.id] = stage[n.args[0].id] + 1
        else:
            stage[n.id] = max(stage[a.id] for a in n.args)
    dead = [nm for nm in order if products[nm].id not in stage]
    if dead:
        raise CellError(f"cell {name!r}: cannot derive the backward of the forward: "
                        f"matmul({dead[0]!r}, ...) ({products[dead[0]].where}) does not reach "
                        f"the new state")
    K = 1 + max(stage[n.id] for n in nodes)
    bounds = [[products[nm] for nm in order if stage[products[nm].id] == s + 1]
              for s in range(K - 1)]
    mmouts = [[graph.node("mmout", (p,), (p.attr, k)) for p in bnd
               for k in range(sig.products[p.attr])] for bnd in bounds]

    def base_free(v):
        return v.op == "const" or is_step_input(v)

    carried: list[dict[int, Node]] = [{} for _ in range(K - 1)]

    def carry(v, upto):
        for b in range(stage[v.id], upto):
            carried[b][v.id] = v

    for n in nodes:
        if n.op == "product":
            continue
        for a in n.args:
            if not base_free(a) and stage[a.id] < stage[n.id]:
                carry(a, stage[n.id])
    for o in outputs:
        if not base_free(o):
            carry(o, K - 1)
    scopes = [[n for n in nodes if stage[n.id] == s and n.op != "product"] for s in range(K)]
    inputs_all = {n.attr: n for n in nodes if n.op == "in"}

    def dz_seeds(R, s):
        out: dict[int, list] = {}
        for k, p in enumerate(bounds[s]):
            out.setdefault(p.args[0].id, []).append(R.input("dz", k))
        return out

    def mid_seeds(R, s, index):
        out: dict[int, list] = {}
        for v in carried[s].values():
            if not v.is_bool:
                out.setdefault(v.id, []).append(R.input("dmid", index[v.id]))
        return out

    mids: list[list[Node]] = []
    forwards, backwards = [], []
    same = ()
    saved_last: list[Node] = []
    for s in range(K):
        last = s == K - 1
        prev_mid = mids[s - 1] if s else []
        zin = {v.id for v in mmouts[s - 1]} if s else set()
        received = {m.id for m in prev_mid} | zin

        def free(v, s=s, received=received):
            return base_free(v) or v.id in received or (s < K - 1 and v.id in carried[s])

        if last:
            seeds = _dstate_seeds(outputs)
        else:
            def seeds(R, s=s):
                out = dz_seeds(R, s)
                order_ = {m: j for j, m in enumerate(sorted(carried[s]))}
                for k, v in mid_seeds(R, s, order_).items():
                    out.setdefault(k, []).extend(v)
                return out
        needed = needed_values(scopes[s], seeds, free)
        own = choose_saved([v for v in needed if not free(v)], free, recompute)
        if last:
            saved_last = own
            name_saved(own)
        else:
            mid = sorted(list(carried[s].values()) + own, key=lambda n: n.id)
            name_saved(mid)
            mids.append(mid)

        # forward of stage s
        if s == 0:
            F, Pf = graph, (lambda v: v)
            fargs, funpack = ["fwd"], {}
        else:
            F = Graph()
            loads = {v.id: F.input("zn", k) for k, v in enumerate(mmouts[s - 1])}
            loads.update({m.id: load(F, "mid", j, m) for j, m in enumerate(prev_mid)})
            Pf = transplant(F, loads, _BACKWARD_INPUTS)
            fargs = ["zn", "mid", "prev", "params"]
            funpack = {"mid": [F.input("mid", j) for j in range(len(prev_mid))]}
        if last:
            results = [[Pf(o) for o in outputs], [as_number(F, Pf(v)) for v in own]]
        else:
            results = [[Pf(p.args[0]) for p in bounds[s]],
                       [as_number(F, Pf(m)) for m in mids[s]]]
        forwards.append(Fn(results, fargs, funpack))

        # backward of stage s
        B = Graph(simplify=True)
        loads = {}
        unpack = {}
        if s:
            loads.update({v.id: B.input("zn", k) for k, v in enumerate(mmouts[s - 1])})
            loads.update({m.id: load(B, "mid", j, m) for j, m in enumerate(prev_mid)})
            unpack["mid"] = [B.input("mid", j) for j in range(len(prev_mid))]
        own_loads = own if last else mids[s]
        group = "mid" if s == 0 else "saved"
        loads.update({v.id: load(B, group, k, v) for k, v in enumerate(own_loads)})
        if s == 0:
            unpack["mid"] = [B.input("mid", j) for j in range(len(own_loads))]
        else:
            unpack["saved"] = [B.input("saved", k) for k in range(len(own_loads))]
        P = transplant(B, loads, _BACKWARD_INPUTS)
        if last:
            contrib = sweep(scopes[s], _dstate_seeds(outputs)(B), P, B)
        else:
            index = {v.id: j for j, v in enumerate(mids[s])}
            sd = dz_seeds(B, s)
            for k, v in mid_seeds(B, s, index).items():
                sd.setdefault(k, []).extend(v)
            contrib = sweep(scopes[s], sd, P, B)
        if s == 0:
            results, same = _grads(sig, inputs_all, contrib, B)
            bargs = ["mid", "prev", "dz", "dmid", "params"]
        else:
            dzn = [B.total(contrib.get(v.id, [])) for v in mmouts[s - 1]]
            dmid = [B.total(contrib.get(m.id, [])) if not m.is_bool else B.const(0.0)
                    for m in prev_mid]
            rest, _ = _grads(sig, inputs_all, contrib, B)
            results = [dzn, dmid] + rest[(2 if sig.recurrent else 1):]
            bargs = (["saved", "zn", "mid", "prev", "dstate", "params"] if last else
                     ["saved", "zn", "mid", "prev", "dz", "dmid", "params"])
        backwards.append(Fn(results, bargs, unpack))
    boundaries = [[(p.attr, sig.products[p.attr]) for p in bnd] for bnd in bounds]
    return StagedPlan(forwards, backwards, saved_last, mids, boundaries, same)
