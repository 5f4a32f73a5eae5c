"""Shared by the tests of kernrnn.autodiff (tests/test_derive.py, tests/cudasim/): random
forward steps drawn by hypothesis, finite differences, and drivers that call the derived
math from Numba CPU code and CUDA kernels with every tuple index unrolled."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import strategies as st

from kernrnn.autodiff import derive
from kernrnn.autodiff.emit import load_source
from kernrnn.cell import relu, sigmoid, tanh

# One statement of a random forward: name, number of operands, template.  Growth is kept
# moderate (exp of a tanh, divisions by 1.5 + b^2, logs and roots of positive values) so the
# float64 finite differences stay accurate.
OPS = [
    ("add", 2, "{0} + {1}"), ("sub", 2, "{0} - {1}"), ("mul", 2, "{0} * {1}"),
    ("div", 2, "{0} / (1.5 + {1} * {1})"), ("neg", 1, "-{0}"), ("square", 1, "{0} ** 2"),
    ("affine", 1, "0.5 * {0} - 1"), ("sigmoid", 1, "sigmoid({0})"), ("tanh", 1, "tanh({0})"),
    ("relu", 1, "relu({0})"), ("exp", 1, "math.exp(tanh({0}))"),
    ("log", 1, "math.log(1.0 + {0} * {0})"), ("sqrt", 1, "math.sqrt(0.25 + {0} * {0})"),
    ("sin", 1, "math.sin({0})"), ("cos", 1, "math.cos({0})"), ("erf", 1, "math.erf({0})"),
    ("fabs", 1, "math.fabs({0})"), ("abs", 1, "abs({0})"), ("min", 2, "min({0}, {1})"),
    ("max", 2, "max({0}, {1}, -0.25)"), ("ifexp", 4, "{0} if {1} > {2} else {3}"),
    ("ifexp2", 2, "{0} if {1} >= 0.0 and not {0} > 2.0 else 0.5 * {1}"),
    ("helper", 2, "_helper({0}, {1})"), ("pair", 2, None), ("aug", 2, None),
]

HELPERS = '''
def _helper(a, b):
    """A module-level helper: inlined by the differentiator."""
    t = a * sigmoid(b)
    return t - 0.5 * a


def _pair(a, b):
    return a * b, _helper(b, a)
'''


@dataclass
class Program:
    """A random forward: its source, sizes and the loaded Python function."""

    source: str
    gates: int
    state: int
    recurrent: bool
    params: tuple
    norm: bool
    fn: object = None

    def derive(self, **kw):
        return derive(self.fn, name="random", gates=self.gates, state=self.state,
                      recurrent=self.recurrent, params=self.params,
                      normalize=("c",) if self.norm else (), **kw)


@st.composite
def programs(draw, norm: bool = False, max_statements: int = 8) -> Program:
    """A straight-line scalar forward of 1-3 gates, 1-2 states, 0-2 per-unit parameters.

    The statements take distinct operations (a permutation of :data:`OPS`), and their
    operands are mostly earlier results, so that most statements reach the outputs.
    """
    G = draw(st.integers(1, 3))
    S = draw(st.integers(1, 2))
    rec = draw(st.booleans())
    params = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    leaves = [f"xw[{k}]" for k in range(G)] + ([f"hu[{k}]" for k in range(G)] if rec else [])
    leaves += [f"prev[{s}]" for s in range(S)]
    leaves += [f"q{i}[{b}]" for i, blocks in enumerate(params) for b in range(blocks)]
    pool = list(leaves)
    body = []
    n = draw(st.integers(2, max_statements))
    order = draw(st.permutations(range(len(OPS))))
    norm_at = draw(st.integers(0, n - 1)) if norm else None
    for i in range(n):
        name, arity, template = OPS[order[i]]
        args = []
        for _ in range(arity):
            computed = pool[len(leaves):]
            recent = computed and draw(st.integers(0, 2))
            args.append(draw(st.sampled_from(computed[-3:] if recent else pool)))
        v = f"v{i}"
        if name == "pair":
            body.append(f"{v}, {v}b = _pair({args[0]}, {args[1]})")
            pool.append(f"{v}b")
        elif name == "aug":
            body += [f"{v} = {args[0]}", f"{v} += {args[1]}"]
        else:
            body.append(f"{v} = {template.format(*args)}")
        pool.append(v)
        if i == norm_at:
            body.append(f"c = norm('c', {v})")
            pool.append("c")
    computed = pool[len(leaves):]
    outs = [pool[-1]] + [draw(st.sampled_from(computed if draw(st.integers(0, 4)) else pool))
                         for _ in range(S - 1)]
    args = ["xw"] + (["hu"] if rec else []) + ["prev"] + [f"q{i}" for i in range(len(params))]
    args += ["norm"] if norm else []
    src = HELPERS + f"\n\ndef step({', '.join(args)}):\n"
    src += "".join(f"    {line}\n" for line in body)
    src += f"    return ({', '.join(outs)},)\n"
    prog = Program(src, G, S, rec, params, norm)
    module = load_source(src, "random_forward", {"math": math, "sigmoid": sigmoid,
                                                 "tanh": tanh, "relu": relu})
    prog.fn = module.step
    return prog


def random_inputs(rng, G, S, recurrent, params, n=None):
    """xw, hu (or None), prev, params (tuple of tuples) and dstate of floats in [-1, 1]."""
    def draw(k):
        return tuple(float(v) for v in rng.uniform(-1, 1, k))
    return (draw(G), draw(G) if recurrent else None, draw(S),
            tuple(draw(b) for b in params), draw(S))


def args_of(xw, hu, prev, params):
    return ((xw,) + ((hu,) if hu is not None else ()) + (prev,) + tuple(params))


def relclose(a, b, rel) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


# -- finite differences --------------------------------------------------------------------

def _central(f, x, i, h):
    def d(step):
        xp, xm = list(x), list(x)
        xp[i] += step
        xm[i] -= step
        return (f(xp) - f(xm)) / (2 * step)
    return (4 * d(h / 2) - d(h)) / 3  # Richardson: O(h^4)


def _one_sided(f, x, i, h):
    def d(step):
        xs = list(x)
        xs[i] += step
        return (f(xs) - f(x)) / step
    return 2 * d(h / 2) - d(h)  # Richardson: O(h^2); h < 0 for the left side


def fd_mismatches(f, x, grad, rel=1e-6):
    """Entries of ``grad`` that match neither the central difference of ``f`` at ``x`` nor,
    where ``x`` lies at a kink (relu, fabs, min/max, a condition) closer than the central
    step, a one-sided difference: ``[(index, derived, central)]``."""
    fx = f(list(x))
    bad = []
    for i, g in enumerate(grad):
        c = _central(f, x, i, 1e-4)
        scale = max(1.0, abs(g), abs(c), 1e-3 * abs(fx))
        if abs(g - c) <= rel * scale:
            continue
        sides = [_one_sided(f, x, i, h) for h in (1e-6, -1e-6)]
        if any(abs(g - s) <= 100 * rel * scale for s in sides):
            continue
        bad.append((i, g, c))
    return bad


# -- calling the math from compiled code ---------------------------------------------------

def chain(d, prog, rng, zn_of=None):
    """Run the derived math of ``d`` in Python on consistent random inputs: ``[(name,
    function, arguments, results)]`` for forward, backward (and forward2, backward2).

    The values between stages are the real ones (saved from forward, mid and z from stage
    1); ``zn_of(z)`` stands for the normalisation (default: z itself)."""
    xw, hu, prev, params, dstate = random_inputs(rng, prog.gates, prog.state, prog.recurrent,
                                                 prog.params)
    fargs = list(args_of(xw, hu, prev, params))
    f = d.forward(*fargs)
    calls = [("forward", d.forward, fargs, f)]
    if d.forward2 is None:
        bargs = [f[1], prev, dstate] + list(params)
        calls.append(("backward", d.backward, bargs, d.backward(*bargs)))
        return calls
    z, mid = f
    zn = tuple(zn_of(v) for v in z) if zn_of else z
    f2args = [zn, mid, prev] + list(params)
    f2 = d.forward2(*f2args)
    b2args = [f2[1], zn, mid, prev, dstate] + list(params)
    b2 = d.backward2(*b2args)
    b1args = [mid, prev, zn, b2[1]] + list(params)
    calls += [("forward2", d.forward2, f2args, f2), ("backward2", d.backward2, b2args, b2),
              ("backward", d.backward, b1args, d.backward(*b1args))]
    return calls


def flat(groups) -> list[float]:
    return [float(v) for group in groups for v in group]


def driver_source(fname: str, sizes, out_sizes) -> str:
    """``def run(inp, out)`` reading the arguments of ``fname`` from ``inp`` and writing its
    results to ``out``, every index a constant (as Numba's PTX compiler needs)."""
    lines = ["def run(inp, out):"]
    k = 0
    names = []
    for a, n in enumerate(sizes):
        items = [f"inp[{k + j}]" for j in range(n)]
        k += n
        names.append(f"a{a}")
        lines.append(f"    a{a} = " + ("(" + ", ".join(items) + ("," if n == 1 else "") + ")"
                                        if n else "()"))
    lines.append(f"    r = {fname}({', '.join(names)})")
    j = 0
    for g, n in enumerate(out_sizes):
        for m in range(n):
            lines.append(f"    out[{j}] = r[{g}][{m}]")
            j += 1
    return "\n".join(lines) + "\n"


def make_driver(fn_compiled, args, result):
    """A plain Python ``run(inp, out)`` calling ``fn_compiled`` (see :func:`driver_source`)."""
    ns = {"math_fn": fn_compiled}
    exec(driver_source("math_fn", [len(a) for a in args], [len(r) for r in result]), ns)
    return ns["run"]
