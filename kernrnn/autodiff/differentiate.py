"""The differentiator's entry points: :func:`derive` and :func:`derive_for_cell`.

:func:`derive` reads a forward step (:mod:`kernrnn.autodiff.parse`),
differentiates it in reverse mode (:mod:`kernrnn.autodiff.reverse`) and writes
ordinary cell math (:mod:`kernrnn.autodiff.emit`) with the contract of
:class:`kernrnn.cell.Cell`: ``forward(xw, hu, prev, *params) -> (new_state,
saved)`` and ``backward(saved, prev, dstate, *params) -> (dxw, dhu, dprev,
*dparams)``, or for a step that calls ``norm("c", c)`` the two stages
``forward``, ``forward2``, ``backward2`` and ``backward``.  The generated
functions are plain Python whose source ``inspect.getsource`` reads, so
:func:`kernrnn.scalar.compile_scalar` retypes and compiles them for every
backend like hand-written math.  ``Derived.reference`` is the same step on
float64 NumPy arrays.

What is saved (the rule)
------------------------
The backward reads, for each operation, the values its local derivative
needs: the *result* of ``sigmoid``, ``tanh``, ``exp``, ``sqrt`` and ``relu``
(``y (1 - y)``, ``1 - y^2``, ``y``, ``0.5 / y``, ``y > 0``, as haste does),
the *argument* of ``log``, ``sin``, ``cos``, ``erf`` and ``fabs``, the other
factor of a product, the divisor and the quotient of a division, and the
condition of a conditional expression (``min``/``max`` are conditional
expressions).  The previous state and the parameters are arguments of the
backward, so they are never saved.  A needed value is *recomputed* in the
backward when it is arithmetic (``+ - * /``, negation, integer powers,
conditional expressions, comparisons, ``relu``, ``fabs``) of values already
at hand (arguments, saved values, other recomputed values); otherwise it is
saved.  Values are considered in evaluation order, so a value saved early can
make later ones recomputable.  Conditions travel as ``1.0``/``0.0`` (a saved
tuple holds numbers of the kernel's precision).  The transcendental functions
are thus evaluated once, in the forward; the backward only adds arithmetic,
and loads fewer values than it would if every needed value were saved
(``recompute=False`` does that instead, for comparison).

For a two-stage step the first stage's backward receives only ``mid``, so
``mid`` holds both the first-stage values the second stage reads and those the
first stage's backward needs (the rule above, with the values stage 2 reads
counted as at hand); the second stage's ``saved`` follows the rule with
``zn`` and ``mid`` at hand.

Gradients of ``xw`` and ``hu``
------------------------------
Adjoints are hash-consed nodes, and a value that only passes through a sum
gets its consumer's adjoint node itself.  So when gate ``k`` enters the step
only as ``xw[k] + hu[k]`` (possibly plus other terms), ``dxw[k]`` and
``dhu[k]`` are one node: ``Derived.same_grads`` records it per gate, and
when it holds for every gate the backward ends in ``return dgates, dgates,
...``, the form the CPU backend already detects.

Writing the math
----------------
``math.tanh`` is written as :func:`kernrnn.cell.tanh`, ``abs`` as
``math.fabs``, ``sin``/``cos`` as :func:`kernrnn.scalar_math.sin`/``cos``
(whose float32 versions keep CUDA kernels free of float64), ``min``/``max`` as
conditional expressions (Python's choice between equal values).  Helpers are
inlined; a helper with ``kernrnn_variants`` (a precision-specific version) is
inlined with its default body, so the derived step computes the default math
in every precision.  Module-level numbers (and ``math.pi``) become literals.

API
---
:func:`derive` (sizes given) and :func:`derive_for_cell` (sizes read from a
:class:`kernrnn.cell.Cell`) return a :class:`Derived`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernrnn.autodiff.emit import NUMPY, emit_function, load_source
from kernrnn.autodiff.ir import Node
from kernrnn.autodiff.parse import Signature, parse_forward
from kernrnn.autodiff.reverse import Plan, StagedPlan, plan_single, plan_stages, plan_two_stage

__all__ = ["derive", "derive_for_cell", "derive_hand_written", "Derived"]


@dataclass(frozen=True, eq=False)
class Derived:
    """The functions and facts :func:`derive` produces for one forward step.

    ``forward``/``backward`` (and ``forward2``/``backward2`` for a two-stage
    step) follow :class:`kernrnn.cell.Cell`'s contract; ``reference`` is the
    float64 NumPy step, ``reference(xw, [hu,] prev, *params[, norm])`` on
    arrays (``norm(name, z)`` normalises a row, as for a hand-written
    reference), returning the new state tuple; ``source`` is the generated module
    (all of them).  ``saved`` and ``mid`` name the values the forward stores
    (as written in the generated code); ``same_grads[k]`` is True when gate
    ``k``'s input and recurrent pre-activations have one and the same
    gradient (they enter only as ``xw[k] + hu[k]``); empty without ``hu``.
    ``step`` is the forward they were derived from; each generated function
    carries it as its attribute ``kernrnn_step`` (so a :class:`kernrnn.cell.Cell`
    given generated functions back, by ``dataclasses.replace`` or pickling,
    derives again from the step).
    """

    name: str
    forward: object
    backward: object
    reference: object
    source: str
    saved: tuple
    same_grads: tuple
    forward2: object = None
    backward2: object = None
    mid: tuple = ()
    normalize: tuple = ()
    step: object = None
    #: The one-stage step's ``forward``/``backward`` on arrays of any precision (NumPy
    #: element-wise, ``np.where`` for a condition): the first tier runs these while the
    #: kernels compile (:mod:`kernrnn.backends.cpu.tiers`).  None for a two-stage step.
    array_forward: object = None
    array_backward: object = None
    #: Per boundary of a step cut by recurrent products, its products ``((name, G_m), ...)``
    #: in declaration order (empty for a one- or two-stage step).
    boundaries: tuple = ()
    #: Per boundary, the names of the values stage s passes to stage s + 1 (staged step).
    stage_mids: tuple = ()
    #: Every generated scalar function by name (``forward``, ``forward2``, ...,
    #: ``backward2``, ``backward``), for a staged step of any number of stages.
    functions: dict = None

    @property
    def n_saved(self) -> int:
        """Values the forward saves per element (the last stage's, for a two-stage step)."""
        return len(self.saved)

    @property
    def n_mid(self) -> int:
        """Values stage 1 passes to stage 2 (0 for a one-stage step)."""
        return len(self.mid)

    @property
    def n_stages(self) -> int:
        """K, the element-wise stages of the step (1, 2 with a normalised value, 1 + the
        boundaries of a step with recurrent products)."""
        if self.boundaries:
            return len(self.boundaries) + 1
        return 2 if self.forward2 is not None else 1


def _namespace() -> dict:
    from kernrnn import scalar_math as sm

    return {"math": math, "sigmoid": sm.sigmoid, "tanh": sm.tanh, "relu": sm.relu,
            "sin": sm.sin, "cos": sm.cos}


def _np_sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def _np_relu(x):
    return np.where(x > 0.0, x, 0.0 * x)


_np_erf = np.vectorize(math.erf, otypes=[np.float64])


def _as64(values) -> tuple:
    return tuple(np.asarray(v, dtype=np.float64) for v in values)


def _np_state(values, inputs) -> tuple:
    shape = np.broadcast_shapes(*(np.shape(v) for group in inputs for v in group))
    return tuple(np.broadcast_to(np.asarray(v, dtype=np.float64), shape).copy()
                 for v in values)


def _reference_namespace() -> dict:
    return {"np": np, "math": math, "_np_sigmoid": _np_sigmoid, "_np_relu": _np_relu,
            "_np_erf": _np_erf, "_as64": _as64, "_np_state": _np_state}


def _array_namespace() -> dict:
    """:func:`_reference_namespace` with a sigmoid of one ``tanh`` (fast, stable, exact to
    rounding in either precision): the first tier's step runs in the caller's precision."""
    ns = _reference_namespace()
    ns["_np_sigmoid"] = lambda x: 0.5 + 0.5 * np.tanh(0.5 * x)
    return ns


def _label(n: Node) -> str:
    return n.name or f"%{n.id}"


def derive(forward, *, name: str, gates: int, state: int = 1, recurrent: bool = True,
           params=(), normalize=None, hyper=(), raw_input: bool = False, products=None,
           recompute: bool = True) -> Derived:
    """Differentiate the scalar step ``forward`` and generate the cell's math.

    ``forward(xw, [hu,] prev, *params[, norm])`` returns the new state tuple
    (see the module docstring).  ``gates`` G and ``state`` S are the cell's
    sizes, ``recurrent=False`` a cell without ``hu`` (``recurrent="none"``),
    ``params`` the block count of each per-unit parameter, ``normalize`` the
    names ``norm`` may be called with (None: taken from the calls, in order of
    appearance), ``hyper`` the names of the hyperparameters in declaration order
    (trailing arguments of the forward bound by name; every generated function
    takes them as one last tuple ``hyper`` (before ``x``), the reference as keyword
    arguments, and no gradient is derived for them).  ``raw_input``: the forward
    takes a trailing ``x`` (the element's raw input x_t, a number); the generated
    ``forward`` then takes ``x`` as a 1-tuple last, ``backward`` returns its
    gradient ``dx`` (a 1-tuple) last, and ``reference`` takes ``x`` (an array) by
    name.  ``products``: the recurrent products ``matmul`` may be called with
    (``{name: G_m}``, in declaration order; the step is then cut into stages, see
    ``kernrnn.autodiff.reverse.plan_stages``).  ``recompute=False`` saves
    every value the backward reads
    instead of recomputing arithmetic.  ``name`` is the cell's name, used in
    errors.  Raises :class:`kernrnn.cell.CellError` for a construct outside
    the supported set, naming the file, line and construct.
    """
    from kernrnn.errors import CellError

    for label, v in (("gates", gates), ("state", state)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CellError(f"cell {name!r}: {label} must be an int >= 1, got {v!r}")
    sig = Signature(gates, state, recurrent, params, normalize, hyper, raw_input, products)
    graph, outputs, norms, argnames, prods = parse_forward(forward, name, sig)
    order = tuple(sig.normalize if sig.normalize is not None else norms)
    if sig.products:
        if order:
            raise CellError(f"cell {name!r}: a step with recurrent products (matmul) cannot "
                            f"also normalise a value in the middle (norm) yet; expected one "
                            f"of the two, got normalize={order!r} and products "
                            f"{tuple(sig.products)!r}")
        return _derive_staged(forward, name, sig, graph, outputs, prods, argnames, recompute)
    if order:
        plan = plan_two_stage(graph, outputs, norms, order, sig, recompute, name)
    else:
        plan = plan_single(graph, outputs, sig, recompute)

    pnames = _param_names(argnames, sig)
    origin = f"{getattr(forward, '__module__', '?')}.{forward.__qualname__}"
    source = _scalar_source(plan, sig, pnames, name, origin)
    module = load_source(source, name, _namespace())
    ref_source = _reference_source(graph, outputs, sig, pnames, bool(order))
    ref_module = load_source(ref_source, f"{name}_reference", _reference_namespace())
    arrays = None
    if not order:
        array_source = _array_source(plan, sig, pnames, name, origin)
        arrays = load_source(array_source, f"{name}_arrays", _array_namespace())
    d = Derived(
        name=name, forward=module.forward, backward=module.backward,
        reference=ref_module.reference, source=source + "\n\n" + ref_source,
        saved=tuple(_label(v) for v in plan.saved), same_grads=plan.same_grads,
        forward2=getattr(module, "forward2", None), backward2=getattr(module, "backward2", None),
        mid=tuple(_label(v) for v in plan.mid), normalize=order, step=forward,
        array_forward=arrays.forward if arrays else None,
        array_backward=arrays.backward if arrays else None,
    )
    for fn in (d.forward, d.backward, d.forward2, d.backward2, d.reference):
        if fn is not None:
            fn.kernrnn_step = forward
    return d


def _derive_staged(forward, name, sig, graph, outputs, prods, argnames, recompute) -> Derived:
    """:func:`derive` for a step with recurrent products: K stages, K forwards and backwards."""
    plan = plan_stages(graph, outputs, prods, tuple(sig.products), sig, recompute, name)
    pnames = _param_names(argnames, sig)
    origin = f"{getattr(forward, '__module__', '?')}.{forward.__qualname__}"
    source = _staged_source(plan, sig, pnames, name, origin)
    module = load_source(source, name, _namespace())
    ref_source = _reference_source(graph, outputs, sig, pnames, False, matmul=True)
    ref_module = load_source(ref_source, f"{name}_reference", _reference_namespace())
    K = plan.n_stages
    functions = {fn: getattr(module, fn) for fn in _stage_names(K)}
    d = Derived(
        name=name, forward=module.forward, backward=module.backward,
        reference=ref_module.reference, source=source + "\n\n" + ref_source,
        saved=tuple(_label(v) for v in plan.saved), same_grads=plan.same_grads,
        forward2=None, backward2=None, step=forward,
        boundaries=tuple(tuple(b) for b in plan.boundaries),
        stage_mids=tuple(tuple(_label(v) for v in m) for m in plan.mids), functions=functions)
    for fn in list(functions.values()) + [d.reference]:
        fn.kernrnn_step = forward
    return d


def _stage_names(K: int) -> list[str]:
    """The generated functions of a K-stage step, in the order they are written."""
    fwd = ["forward"] + [f"forward{s + 1}" for s in range(1, K)]
    bwd = [f"backward{s + 1}" for s in range(K - 1, 0, -1)] + ["backward"]
    return fwd + bwd


def _staged_source(plan: StagedPlan, sig, pnames, name, origin) -> str:
    src = _input_source(pnames)
    K = plan.n_stages

    args = _arg_names(sig, pnames)
    share = bool(sig.recurrent and plan.same_grads and all(plan.same_grads))
    parts = [f"# Derived by kernrnn.autodiff from {origin}, the forward of cell {name!r}: "
             f"{K} stages split by the recurrent products "
             f"{[[p for p, _ in b] for b in plan.boundaries]}.\n"]
    for s, fname in enumerate(_stage_names(K)[:K]):
        doc = (f"Stage {s + 1} of {K}: " + ("(new_state, saved)." if s == K - 1 else
                                            "the products' operands and mid."))
        fn = plan.forwards[s]
        parts.append(emit_function(fname, args(fn.args), fn.results, src, unpack=fn.unpack,
                                   doc=doc))
    for fname in _stage_names(K)[K:]:
        s = 0 if fname == "backward" else int(fname[len("backward"):]) - 1
        fn = plan.backwards[s]
        doc = (f"Backward of stage {s + 1}: " + ("(dxw, dhu, dprev, *dparams)." if s == 0 else
                                                 "(dzn, dmid, dprev, *dparams)."))
        parts.append(emit_function(fname, args(fn.args), fn.results, src, unpack=fn.unpack,
                                   share_first=share and s == 0, doc=doc))
    return "\n\n".join(parts)


def derive_for_cell(cell, forward, *, recompute: bool = True) -> Derived:
    """:func:`derive` with the sizes of :class:`kernrnn.cell.Cell` ``cell`` (its name,
    gates, state, recurrence, per-unit parameters, normalised values, hyperparameters and
    raw input)."""
    return derive(forward, name=cell.name, gates=cell.n_gates, state=cell.n_state,
                  recurrent=cell.has_recurrent, params=tuple(p.blocks for p in cell.params),
                  normalize=tuple(cell.normalize), hyper=tuple(h.name for h in cell.hyper),
                  raw_input=cell.raw_input,
                  products={p.name: p.n_gates for p in cell.products}, recompute=recompute)


def derive_hand_written(cell, *, recompute: bool = True) -> Derived:
    """:func:`derive_for_cell` for a cell with a hand-written backward.

    The step is read from the cell's own forward, which returns ``(new_state,
    saved)`` (the saved values are ignored), or from its two stages: ``forward``,
    ``norm`` of each value in ``normalize``, ``forward2``.  For the reference such
    a cell may leave out, and for :func:`kernrnn.testing.check_cell`, which compares
    the hand-written backward with this one.
    """
    args = ["xw"] + (["hu"] if cell.has_recurrent else []) + ["prev"] + \
        [f"p{i}" for i in range(len(cell.params))]
    call = ", ".join(args)
    # the step takes the raw input as a number, the contract's forward as a 1-tuple
    head, call1 = (f"{call}, x", f"{call}, (x,)") if cell.raw_input else (call, call)
    fwd = cell.forward
    # the id keeps two cells' steps apart in the module cache (load_source)
    lines = [f"# The step of cell {cell.name!r}: its hand-written forward "
             f"{getattr(fwd, '__module__', '?')}.{getattr(fwd, '__qualname__', '?')} "
             f"(id {id(fwd):x}) without the saved values."]
    if not cell.normalize:
        lines += [f"def step({head}):", f"    return _forward({call1})[0]"]
    else:
        zn = ", ".join(f"norm({v!r}, z[{k}])" for k, v in enumerate(cell.normalize))
        rest = ", ".join(args[args.index("prev"):])
        lines += [f"def step({head}, norm):", f"    z, mid = _forward({call1})",
                  f"    return _forward2(({zn},), mid, {rest})[0]"]
    module = load_source("\n".join(lines) + "\n", f"{cell.name}_hand_written_step",
                         {"_forward": fwd, "_forward2": cell.forward2})
    return derive_for_cell(cell, module.step, recompute=recompute)


def _param_names(argnames, sig) -> list[str]:
    first = 3 if sig.recurrent else 2
    out = []
    for i in range(len(sig.params)):
        n = argnames[first + i]
        taken = _TAKEN | set(sig.hyper) | set(out) | ({"x"} if sig.raw_input else set())
        out.append(n if n.isidentifier() and n not in taken else f"p{i}")
    return out


_TAKEN = {"xw", "hu", "prev", "saved", "dstate", "zn", "mid", "dz", "dmid", "norm", "matmul",
          "math", "np", "sigmoid", "tanh", "relu", "sin", "cos", "dgates", "hyper"}


def _input_source(pnames, hyper_names=None, raw_array: bool = False):
    """How an input is written: ``group[index]``; a parameter by its argument's name; a
    hyperparameter as ``hyper[k]`` (scalar math) or by its name (``hyper_names``, the
    reference); the raw input ``x`` as an array with ``raw_array`` (the reference), else
    as the 1-tuple of the scalar math."""
    def source(attr) -> str:
        group, index = attr
        if group.startswith("p") and group[1:].isdigit():
            return f"{pnames[int(group[1:])]}[{index}]"
        if group == "hyper" and hyper_names is not None:
            return hyper_names[index]
        if group == "x" and raw_array:
            return "x"
        return f"{group}[{index}]"
    return source


def _arg_names(sig, pnames):
    """``args(kinds)``: the argument names of a generated function from its kinds (``fwd``:
    the forward's own arguments; ``params``: the per-unit parameters and hyperparameters)."""
    hyper = ["hyper"] if sig.hyper else []

    def args(kinds):
        out = []
        for k in kinds:
            if k == "fwd":
                out += ["xw"] + (["hu"] if sig.recurrent else []) + ["prev"] + pnames + hyper
                out += ["x"] if sig.raw_input else []
            elif k == "params":
                out += pnames + hyper
            else:
                out.append(k)
        return out
    return args


def _scalar_source(plan: Plan, sig, pnames, name, origin) -> str:
    src = _input_source(pnames)
    args = _arg_names(sig, pnames)

    share = bool(sig.recurrent and plan.same_grads and all(plan.same_grads))
    parts = [f"# Derived by kernrnn.autodiff from {origin}, the forward of cell {name!r}.\n"]
    two = plan.forward2 is not None
    docs = {
        "forward": "Stage 1: the values to normalise and mid." if two else
        "The step: (new_state, saved).",
        "forward2": "Stage 2: (new_state, saved) from the normalised values.",
        "backward2": "Backward of stage 2: (dzn, dmid, dprev, *dparams).",
        "backward": "Backward of stage 1: (dxw, dhu, dprev, *dparams)." if two else
        "Backward of the step: (dxw, dhu, dprev, *dparams).",
    }
    if sig.raw_input:  # the raw input's gradient comes last
        docs["backward"] = docs["backward"].replace("*dparams)", "*dparams, dx)")
    fns = [("forward", plan.forward), ("backward", plan.backward)]
    if two:
        fns = [("forward", plan.forward), ("forward2", plan.forward2),
               ("backward2", plan.backward2), ("backward", plan.backward)]
    for fname, fn in fns:
        parts.append(emit_function(fname, args(fn.args), fn.results, src, unpack=fn.unpack,
                                   share_first=share and fname == "backward",
                                   doc=docs[fname]))
    return "\n\n".join(parts)


def _array_source(plan: Plan, sig, pnames, name, origin) -> str:
    """A one-stage step's ``forward`` and ``backward`` written for arrays (NumPy style)."""
    args = _arg_names(sig, pnames)
    parts = [f"# Derived by kernrnn.autodiff from {origin}, the forward of cell {name!r}, "
             "on arrays.\n"]
    for fname, fn in (("forward", plan.forward), ("backward", plan.backward)):
        parts.append(emit_function(fname, args(fn.args), fn.results, _input_source(pnames),
                                   unpack=fn.unpack, style=NUMPY,
                                   block='with np.errstate(all="ignore"):'))
    return "\n\n".join(parts)


def _reference_source(graph, outputs, sig, pnames, has_norm, matmul=False) -> str:
    args = ["xw"] + (["hu"] if sig.recurrent else []) + ["prev"] + pnames
    pre = [f"{a} = _as64({a})" for a in args] + ["inputs = (" + ", ".join(args) + ",)"]
    if sig.raw_input:  # an array (by name: reference(..., x=x_t))
        args.append("x")
        pre += ["x = np.asarray(x, dtype=np.float64)", "inputs = inputs + ((x,),)"]
    return emit_function(
        "reference", args + (["norm"] if has_norm else []) + (["matmul"] if matmul else [])
        + list(sig.hyper), [list(outputs)],
        _input_source(pnames, sig.hyper, raw_array=True), style=NUMPY,
        doc="The step on float64 NumPy arrays: the new state tuple.",
        preamble=pre,
        block='with np.errstate(all="ignore"):', return_format="_np_state({}, inputs)")
