"""Source generation shared by the backends.

Cells are arbitrary (G gates, S state components, K saved values), while
Numba's PTX compiler needs tuple indices known at compile time.  So the core
writes each kernel's source for the cell at hand, with every gate, state and
saved index unrolled, and compiles it.  The per-element body is written here
once; the CPU and CUDA kernels wrap it in their own loops.

Generated modules are written to the kernel cache directory
(:mod:`kernrnn.backends.kernel_cache`) so Numba's on-disk cache applies; the
file name hashes the kernel source *and* the cell's retyped math, so editing a
cell never reuses a stale kernel.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from kernrnn.backends import kernel_cache
from kernrnn.philox import zoneout_words
from kernrnn.scalar import (  # cell_fingerprint: re-exported
    cell_fingerprint,
    compile_scalar,
    python_scalar,
)
from kernrnn.scalar_math import NORM_EPS

__all__ = ["tup", "call", "forward_body", "backward_body", "forward_call", "backward_call",
           "forward2_call", "backward2_call", "stage_sizes", "staged_layout", "stage_function",
           "stage_forward_call", "stage_backward_call", "backward1_call", "param_groups",
           "hyper_group", "unit_groups", "hu_gates", "row_norm", "row_norm_backward",
           "load_module", "cell_fingerprint", "math_namespace", "zoneout_stores",
           "zoneout_backward"]


def tup(items) -> str:
    """Python source of a tuple literal (a 1-tuple keeps its comma)."""
    items = list(items)
    if len(items) == 1:
        return f"({items[0]},)"
    return "(" + ", ".join(items) + ")"


def call(fn: str, args, outs, *, indent: int, accumulate=()) -> str:
    """Source lines that call the scalar function ``fn`` and store its results.

    ``args`` is a list of argument tuples, each a list of source expressions;
    ``outs[r][k]`` is the assignment target of value ``k`` of result ``r``
    (None: not stored).  Results whose index is in ``accumulate`` are added to
    their targets (``+=``).  Every index is unrolled, as Numba's PTX compiler
    needs constant tuple indices.
    """
    pad = " " * indent
    lines = []
    names = []
    for a, arg in enumerate(args):
        names.append(f"{fn}_a{a}")
        lines.append(f"{names[-1]} = {tup(arg)}" if arg else f"{names[-1]} = ()")
    lines.append(f"{fn}_r = {fn}({', '.join(names)})")
    for r, targets in enumerate(outs):
        op = "+=" if r in accumulate else "="
        for k, target in enumerate(targets):
            if target is not None:
                lines.append(f"{target} {op} {fn}_r[{r}][{k}]")
    return "\n".join(pad + line for line in lines)


def param_groups(cell, p) -> list[list[str]]:
    """One list per per-unit parameter of ``cell``: ``p(i)`` for its flat scalar indices."""
    groups, i = [], 0
    for param in cell.params:
        groups.append([p(i + k) for k in range(param.blocks)])
        i += param.blocks
    return groups


def hyper_group(cell, p) -> list[str]:
    """The hyperparameters' tuple: they follow the per-unit parameters in the kernels'
    per-unit vector (each repeated over the H units), so ``p(n_param_scalars + k)`` reads
    hyperparameter k (see :attr:`kernrnn.cell.Cell.n_unit_scalars`)."""
    return [p(cell.n_param_scalars + k) for k in range(cell.n_hyper)]


def unit_groups(cell, p) -> list[list[str]]:
    """The trailing arguments of every math call: :func:`param_groups`, then the
    hyperparameters' tuple (:func:`hyper_group`) when the cell has any."""
    return param_groups(cell, p) + ([hyper_group(cell, p)] if cell.hyper else [])


def hu_gates(cell, hu_rec, zero: str) -> list[str]:
    """The G entries of ``hu``: ``hu_rec(r)`` for the r-th recurrent gate, ``zero`` elsewhere."""
    rec = cell.recurrent_gate_indices
    return [hu_rec(rec.index(g)) if g in rec else zero for g in range(cell.n_gates)]


def forward_call(cell, *, xw, hu, prev, p, z_or_new, saved_or_mid, indent, x=None) -> str:
    """Stage 1 (or the whole step): ``forward(xw, [hu,] prev, *params[, x])``.

    ``xw(g)``, ``hu(g)``, ``prev(s)``, ``p(i)`` give source expressions;
    ``z_or_new(k)`` / ``saved_or_mid(k)`` the targets of the two results (None
    entries are dropped).  ``x`` (a source expression) is the raw input of a
    cell with ``raw_input``; by default ``xw(G)``, the block after the gates
    in ``XW`` (right where ``XW`` already holds the bias: the raw block has none).
    """
    G, S = cell.n_gates, cell.n_state
    raw = None
    if cell.raw_input:
        raw = [x if x is not None else xw(G)]
    args = cell.forward_args([xw(g) for g in range(G)], [hu(g) for g in range(G)],
                             [prev(s) for s in range(S)], param_groups(cell, p), raw,
                             hyper_group(cell, p))
    n0 = cell.n_norm if cell.normalize else S
    n1 = cell.n_mid if cell.normalize else cell.n_saved
    return call("cell_forward", list(args),
                [[z_or_new(k) for k in range(n0)], [saved_or_mid(k) for k in range(n1)]],
                indent=indent)


def forward2_call(cell, *, zn, mid, prev, p, new, saved, indent) -> str:
    """Stage 2 of a two-stage step: ``forward2(zn, mid, prev, *params)``."""
    args = [[zn(k) for k in range(cell.n_norm)], [mid(m) for m in range(cell.n_mid)],
            [prev(s) for s in range(cell.n_state)]] + unit_groups(cell, p)
    return call("cell_forward2", args,
                [[new(s) for s in range(cell.n_state)], [saved(k) for k in range(cell.n_saved)]],
                indent=indent)


def _grad_outs(cell, dxw, dhu, dprev, dp, dx=None):
    """Targets of ``(dxw, [dhu,] dprev, *dparams[, dx])``, and the index of the first
    accumulated one (dparams); the raw input's ``dx`` goes to ``dx`` (default ``dxw(G)``)."""
    G, S = cell.n_gates, cell.n_state
    outs = [[dxw(g) for g in range(G)]]
    if cell.has_recurrent:
        rec = cell.recurrent_gate_indices
        outs.append([dhu(rec.index(g)) if g in rec else None for g in range(G)])
    outs.append([dprev(s) for s in range(S)])
    base = len(outs)
    for group in param_groups(cell, dp):
        outs.append(group)
    if cell.raw_input:
        outs.append([dx if dx is not None else dxw(G)])
    return outs, base


def backward_call(cell, *, saved, prev, dstate, p, dxw, dhu, dprev, dp, indent,
                  dx=None) -> str:
    """The whole step's backward (no mid-step normalisation).

    ``dhu(r)`` is the target for the r-th recurrent gate; ``dp(i)`` targets are
    accumulated; ``dhu`` may return None to drop a value (cells whose dxw and
    dhu are the same expression).  ``dx``: the target of the raw input's
    gradient (``raw_input``; default ``dxw(G)``, the raw block of ``dXW``), stored.
    """
    S = cell.n_state
    args = [[saved(k) for k in range(cell.n_saved)], [prev(s) for s in range(S)],
            [dstate(s) for s in range(S)]] + unit_groups(cell, p)
    outs, base = _grad_outs(cell, dxw, dhu, dprev, dp, dx)
    return call("cell_backward", args, outs, indent=indent,
                accumulate=range(base, base + len(cell.params)))


def backward2_call(cell, *, saved, zn, mid, prev, dstate, p, dzn, dmid, dprev, dp,
                   indent) -> str:
    """Backward of stage 2: ``backward2(saved, zn, mid, prev, dstate, *params)``."""
    S = cell.n_state
    args = [[saved(k) for k in range(cell.n_saved)], [zn(k) for k in range(cell.n_norm)],
            [mid(m) for m in range(cell.n_mid)], [prev(s) for s in range(S)],
            [dstate(s) for s in range(S)]] + unit_groups(cell, p)
    outs = [[dzn(k) for k in range(cell.n_norm)], [dmid(m) for m in range(cell.n_mid)],
            [dprev(s) for s in range(S)]] + param_groups(cell, dp)
    return call("cell_backward2", args, outs, indent=indent, accumulate=range(3, len(outs)))


def backward1_call(cell, *, mid, prev, dz, dmid, p, dxw, dhu, dprev, dp, indent,
                   dx=None) -> str:
    """Backward of stage 1: ``backward(mid, prev, dz, dmid, *params)``; dprev is added
    (``dx``: as for :func:`backward_call`)."""
    S = cell.n_state
    args = [[mid(m) for m in range(cell.n_mid)], [prev(s) for s in range(S)],
            [dz(k) for k in range(cell.n_norm)], [dmid(m) for m in range(cell.n_mid)]]
    args += unit_groups(cell, p)
    outs, base = _grad_outs(cell, dxw, dhu, dprev, dp, dx)
    return call("cell_backward", args, outs, indent=indent,
                accumulate=[base - 1] + list(range(base, base + len(cell.params))))


def stage_sizes(cell) -> list[tuple[int, int, int]]:
    """Per boundary of a staged cell: ``(nz, nzin, nm)``, the products' operands stage s
    gives, the pre-activations stage s + 1 receives and the values passed on (``mid_s``)."""
    return [(len(b), sum(g for _, g in b), nm) for b, nm in cell.stage_boundaries]


def staged_layout(cell) -> list[dict]:
    """Where a staged cell's values live in the flat and stacked buffers, per boundary:
    ``zoff``/``moff`` its first row of ``Zhat``/``Mid``, ``nz``/``nzin``/``nm`` its sizes,
    and ``products``: per product ``(q, name, G_q, pre-activation offset, Zhat row)``; ``q``
    counts the products over all boundaries (``HM``, ``WMT``, ``bM`` take them in that
    order, each after the ones before)."""
    out, zoff, moff, q, gq = [], 0, 0, 0, 0
    for nz, nzin, nm in stage_sizes(cell):
        prods = []
        bnd = cell.stage_boundaries[len(out)][0]
        for i, (name, G) in enumerate(bnd):
            prods.append((q, name, G, gq, zoff + i))
            q, gq = q + 1, gq + G
        out.append(dict(zoff=zoff, moff=moff, nz=nz, nzin=nzin, nm=nm, products=prods))
        zoff, moff = zoff + nz, moff + nm
    return out


def stage_function(s: int, backward: bool = False) -> str:
    """The compiled name of stage ``s``'s function (0-based): ``cell_forward``,
    ``cell_forward2``, ..., ``cell_backward2``, ``cell_backward``."""
    base = "cell_backward" if backward else "cell_forward"
    return base if s == 0 else f"{base}{s + 1}"


def stage_forward_call(cell, s: int, *, xw=None, hu=None, zn=None, mid=None, prev, p, out0,
                       out1, indent) -> str:
    """Stage ``s`` of a staged step: ``forward(xw, [hu,] prev, *p)`` for s = 0, else
    ``forward{s+1}(zn, mid, prev, *p)``; results ``(z_s, mid_s)``, or ``(new_state,
    saved)`` for the last stage, to the targets ``out0(k)``, ``out1(k)`` (None: dropped)."""
    sizes = stage_sizes(cell)
    K = len(sizes) + 1
    S = cell.n_state
    if s == 0:
        G = cell.n_gates
        args = list(cell.forward_args([xw(g) for g in range(G)], [hu(g) for g in range(G)],
                                      [prev(q) for q in range(S)], param_groups(cell, p),
                                      hyper=hyper_group(cell, p)))
    else:
        args = [[zn(k) for k in range(sizes[s - 1][1])], [mid(m) for m in range(sizes[s - 1][2])],
                [prev(q) for q in range(S)]] + unit_groups(cell, p)
    n0, n1 = (S, cell.n_saved) if s == K - 1 else (sizes[s][0], sizes[s][2])
    return call(stage_function(s), args, [[out0(k) for k in range(n0)],
                                          [out1(k) for k in range(n1)]], indent=indent)


def stage_backward_call(cell, s: int, *, own, zn=None, mid=None, prev, dz=None, dmid=None,
                        dstate=None, p, dzn=None, dmid_out=None, dxw=None, dhu=None, dprev, dp,
                        indent) -> str:
    """Backward of stage ``s`` of a staged step (see
    ``kernrnn.autodiff.reverse.plan_stages``).  ``own(k)``: the stage's saved values
    (the last stage's ``saved``, else its ``mid_s``); the last stage reads ``dstate``,
    the others ``dz``/``dmid``.  Results: ``dzn``, ``dmid`` of the values stage s - 1
    passed (s > 0) or ``dxw``, ``dhu`` (s = 0); ``dprev`` is assigned by the last stage and
    added by the others; ``dp`` always added."""
    sizes = stage_sizes(cell)
    K = len(sizes) + 1
    S = cell.n_state
    last = s == K - 1
    n_own = cell.n_saved if last else sizes[s][2]
    args = [[own(k) for k in range(n_own)]]
    if s:
        args += [[zn(k) for k in range(sizes[s - 1][1])],
                 [mid(m) for m in range(sizes[s - 1][2])]]
    args.append([prev(q) for q in range(S)])
    if last:
        args.append([dstate(q) for q in range(S)])
    else:
        args += [[dz(k) for k in range(sizes[s][0])], [dmid(m) for m in range(sizes[s][2])]]
    args += unit_groups(cell, p)
    if s == 0:
        args = [args[0]] + args[1:]  # (mid_0, prev, dz, dmid, *p)
        outs, base = _grad_outs(cell, dxw, dhu, dprev, dp)
        return call(stage_function(0, True), args, outs, indent=indent,
                    accumulate=[base - 1] + list(range(base, len(outs))))
    outs = [[dzn(k) for k in range(sizes[s - 1][1])],
            [dmid_out(m) for m in range(sizes[s - 1][2])],
            [dprev(q) for q in range(S)]] + param_groups(cell, dp)
    acc = list(range(3, len(outs))) if last else list(range(2, len(outs)))
    return call(stage_function(s, True), args, outs, indent=indent, accumulate=acc)


def forward_body(G, S, K, *, xw, hu, prev, new, saved, y, indent) -> str:
    """Per-element forward step of a plain cell (dense recurrence over all gates, no
    per-unit parameters or normalisation), as the persistent CUDA kernel runs it.

    ``saved`` may be None for inference, ``y`` None when there is no output array.
    """
    body = call("cell_forward", [[xw(g) for g in range(G)], [hu(g) for g in range(G)],
                                 [prev(s) for s in range(S)]],
                [[new(s) for s in range(S)],
                 [saved(k) for k in range(K)] if saved is not None else []], indent=indent)
    if y is not None:
        body += "\n" + " " * indent + f"{y} = {new(0)}"
    return body


def backward_body(G, S, K, *, saved, prev, dstate, dxw, dhu, dprev, indent) -> str:
    """Per-element backward step of a plain cell (see :func:`forward_body`)."""
    return call("cell_backward", [[saved(k) for k in range(K)], [prev(s) for s in range(S)],
                                  [dstate(s) for s in range(S)]],
                [[dxw(g) for g in range(G)], [dhu(g) for g in range(G)],
                 [dprev(s) for s in range(S)]], indent=indent)


def _zoneout_draws(S: int) -> list[str]:
    """Source of the zoneout weights ``zk{s}`` of element (t, b, j): in training 1 where the
    unit keeps its previous value (one Philox call per four states), else the rate (the
    evaluation rule's weight).  Branch-free per element, so the loop still vectorises."""
    lines = []
    for g in range(0, S, 4):
        lines.append(f"zw{g // 4} = zoneout_words(seed_lo, seed_hi, zstream + {g // 4}, t, b, j)")
    for s in range(S):
        lines.append(f"zk{s} = (ONE if zw{s // 4}[{s % 4}] < Zthr[{s}] else ZERO) if ztrain "
                     f"else Zp[{s}]")
    return lines


def zoneout_stores(S: int, cand, prev, new) -> str:
    """Store the new state with zoneout: ``new = zk * prev + (1 - zk) * cand`` with ``zk`` 1
    where the unit keeps its previous value (training, a fresh mask per step; exactly
    ``prev`` then) or the rate (evaluation: the expectation)."""
    lines = _zoneout_draws(S)
    lines += [f"{new(s)} = zk{s} * {prev(s)} + (ONE - zk{s}) * {cand(s)}" for s in range(S)]
    return "\n".join(lines)


def zoneout_backward(S: int, arriving, dprev, zone: bool):
    """``(dstate, wrap)`` for a backward call under zoneout.

    The gradient ``g_s`` arriving at a unit that kept its previous value goes
    straight to that value (``dprev += zk * g``); the cell's backward sees
    ``(1 - zk) * g``.  The masks are regenerated from the same Philox stream as
    in forward (backward runs in training only).  Without zoneout, ``dstate``
    is ``arriving`` and ``wrap`` the identity.
    """
    if not zone:
        return arriving, (lambda src: src)
    pre = "\n".join([f"g{s} = {arriving(s)}" for s in range(S)] + _zoneout_draws(S))
    post = "\n".join(f"{dprev(s)} += zk{s} * g{s}" for s in range(S))
    return (lambda s: f"g{s} * (ONE - zk{s})"), (lambda src: pre + "\n" + src + "\n" + post)


def row_norm(kind: str, loops: list[str], value: str, length: str, rstd: str, *,
             indent: int, prefix: str) -> str:
    """Normalise, in place, the values ``value`` visited by the nested ``loops``.

    Two passes for the statistics (mean, then the centred second moment; RMS
    norm skips the mean), then ``value = (value - mean) * rstd``; the reciprocal
    standard deviation is stored to ``rstd``.  Needs ``ZERO``, ``EPS``, ``DT``
    (the dtype) and ``math`` in the generated module.
    """
    pad = " " * indent

    def nest(body: list[str]) -> list[str]:
        out = [("    " * d) + loop for d, loop in enumerate(loops)]
        return out + [("    " * len(loops)) + line for line in body]

    m, q, r = f"{prefix}mean", f"{prefix}sq", f"{prefix}rstd"
    lines = [f"{m} = ZERO", f"{q} = ZERO"]
    if kind == "layer":
        lines += nest([f"{m} += {value}"]) + [f"{m} = {m} / DT({length})"]
    lines += nest([f"{prefix}d = {value} - {m}", f"{q} += {prefix}d * {prefix}d"])
    lines += [f"{r} = ONE / math.sqrt({q} / DT({length}) + EPS)"]
    lines += nest([f"{value} = ({value} - {m}) * {r}"])
    lines += [f"{rstd} = {r}"]
    return "\n".join(pad + line for line in lines)


def row_norm_backward(kind: str, loops: list[str], grad: str, xhat: str, length: str,
                      rstd: str, *, indent: int, prefix: str) -> str:
    """In place: ``grad`` (d of the normalised values) becomes d of the raw values.

    Layer norm: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``; RMS norm
    drops the ``mean(g)`` term.
    """
    pad = " " * indent

    def nest(body: list[str]) -> list[str]:
        out = [("    " * d) + loop for d, loop in enumerate(loops)]
        return out + [("    " * len(loops)) + line for line in body]

    m1, m2 = f"{prefix}m1", f"{prefix}m2"
    lines = [f"{m1} = ZERO", f"{m2} = ZERO"]
    lines += nest(([f"{m1} += {grad}"] if kind == "layer" else []) + [f"{m2} += {grad} * {xhat}"])
    lines += [f"{m1} = {m1} / DT({length})", f"{m2} = {m2} / DT({length})"]
    lines += nest([f"{grad} = {rstd} * ({grad} - {m1} - {xhat} * {m2})"])
    return "\n".join(pad + line for line in lines)


def math_namespace(cell, dtype, python: bool = False) -> dict:
    """Globals of a generated kernel module: the cell's compiled math and typed constants.

    ``cell_forward``/``cell_backward`` (and ``cell_forward2``/``cell_backward2``
    for a two-stage step) compiled for ``dtype``; ``ZERO``, ``ONE``, ``EPS`` and
    ``DT`` keep the generated normalisation code in the kernel's precision.
    ``python``: the retyped math left as Python (:func:`~kernrnn.scalar.python_scalar`),
    for kernels that Numba's CUDA simulator runs as Python.
    """
    dtype = np.dtype(dtype)
    build = python_scalar if python else compile_scalar
    ns = {f"cell_{which}": build(cell.math_function(which), dtype)
          for which, _, _ in cell.math_signatures()}
    ns.update(ZERO=dtype.type(0), ONE=dtype.type(1), EPS=dtype.type(NORM_EPS), DT=dtype.type,
              math=math, zoneout_words=zoneout_words)
    return ns


def _cache_dir():
    """The kernel cache directory in use (see :mod:`kernrnn.backends.kernel_cache`)."""
    return kernel_cache.cache_dir()


def load_module(source: str, tag: str, namespace: dict):
    """Execute generated ``source`` as a module whose file lives in the kernel cache.

    ``namespace`` (the cell's compiled scalar functions, numpy, ...) is put in
    the module's globals first.  Loading is thread-safe, never imports byte
    code, and refuses cache directories other users can write; see
    :mod:`kernrnn.backends.kernel_cache`.
    """
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return kernel_cache.load_module(source, f"kernrnn_gen_{tag}_{digest}", namespace)
