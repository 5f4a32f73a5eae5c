"""Numba-CUDA kernels of one cell, generated from its definition (the GEMM-per-step path).

Every kernel is written for the cell at hand (its gates, state, saved values,
recurrence form, per-unit parameters and normalisations, see
:mod:`kernrnn.cell`) with the per-element calls of
:mod:`kernrnn.backends.codegen`, the same as the CPU kernels use.  Each kernel
is described once by a :class:`KernelSpec` (name, typed arguments, body), from
which both the Python source and the signatures for
:func:`numba.cuda.compile_ptx` are made, so the PTX check always compiles
exactly what runs.

Thread layouts: the element kernels run one thread per (batch row b, unit j)
with ``hd = j // dh``, ``i = j % dh`` (head and unit within it; a dense cell
has one head of ``dh = H``); the row kernels (normalisation statistics) one
block per row and segment (:mod:`kernrnn.backends.cuda.rownorm`); the fused
and scan kernels of cells without a recurrent matrix one thread per element
(and time chunk) looping over time.
Per-unit parameter gradients are accumulated per (b, j) by the thread that
owns the element (no atomics) and summed over b afterwards.  Array layouts are
those of :mod:`kernrnn.backends.common`; ``XW`` holds ``b_ih`` already.  A cell
with ``raw_input`` reads x_t as block G of ``XW`` (x itself, no bias: the
default ``x`` of :func:`~kernrnn.backends.codegen.forward_call`) and writes its
gradient to block G of ``dXW``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kernrnn.backends.codegen import (
    backward1_call,
    backward2_call,
    backward_call,
    forward2_call,
    forward_call,
    hu_gates,
    stage_backward_call,
    stage_forward_call,
    staged_layout,
    zoneout_backward,
    zoneout_stores,
)
from kernrnn.backends.cuda.rownorm import ROW_HEAD, block_row_norm, block_row_norm_backward

__all__ = ["KernelSpec", "kernel_specs", "kernel_source", "signatures", "SCAN_CHUNK",
           "kernel_args"]

#: Time steps per chunk of the parallel scan of linear-in-state cells.
SCAN_CHUNK = 16
#: Regularisation arguments of the step kernels (a kernel keeps those its body reads).
REG_ARGS = (("Mr", 2), ("Hd", 2), ("Zthr", "U"), ("Zp", 1), ("seed_lo", "i"), ("seed_hi", "i"),
            ("zstream", "i"), ("ztrain", "i"))


@dataclass(frozen=True)
class KernelSpec:
    """One generated kernel: its name, arguments ``(name, kind)`` and body.

    ``kind`` is the number of dimensions of a float array, ``"i"`` an int64
    scalar, ``"L"`` the int64 lengths ``[B]``, ``"U"`` a uint64 vector, ``"Y"`` a float array of 3
    dimensions that may be a strided view (a slice of a bidirectional output).
    """

    name: str
    args: tuple
    body: str


def _ind(text: str, n: int) -> str:
    pad = " " * n
    return "\n".join(pad + line if line else line for line in text.splitlines())


_ELEM = """idx = cuda.grid(1)
B = lengths.shape[0]
if idx >= B * H:
    return
b = idx // H
j = idx - b * H
hd = j // dh
i = j - hd * dh
"""

def _hu_row(rnorm, Gr: int):
    """How a row kernel of the recurrent norm visits its values ``HU[., hd, b, r * dh + i]``:
    ``(visit, length, rstd, head)``, ``rstd`` with ``{t}`` for the time slot.  Over the
    whole row (``Gr*H`` values, one segment) or per recurrent gate (segment = gate)."""
    heads = ["hd = q // dh", "i = q - hd * dh"]
    if rnorm.over == "row":
        return ([f"for e in range(tid, {Gr} * H, nt):", "r = e // H", "q = e - r * H"] + heads,
                f"{Gr} * H", "Rhh[{t}, b, 0]", "")
    return ["for q in range(tid, H, nt):"] + heads, "H", "Rhh[{t}, b, r]", "r = seg\n"


def _carry(S: int, indent: int) -> str:
    lines = [f"States[{s}, n, b, j] = States[{s}, p, b, j]" for s in range(S)]
    return _ind("\n".join(lines + ["Y[t, b, j] = 0"]), indent)


def _hu(cell, rnorm):
    def hu(r):
        v = f"HU[tt, hd, b, {r} * dh + i]"
        if rnorm is not None:
            v += f" * g_hh[{r} * H + j]"
        return v + f" + b_hh[{r} * H + j]"
    return hu_gates(cell, hu, "ZERO")


def _common():
    def xw(g):
        return f"XW[t, b, {g} * H + j]"

    def prev(s):
        return f"States[{s}, p, b, j]"

    def new(s):
        return f"States[{s}, n, b, j]"

    def pp(k):
        return f"P[{k} * H + j]"

    def dpp(k):
        return f"dP[b, {k} * H + j]"

    return xw, prev, new, pp, dpp


def kernel_specs(cell, reg=(False, False)) -> list[KernelSpec]:
    """The kernels ``cell`` needs on the GEMM-per-step path (and its fused/scan passes).

    ``reg`` = (recurrent dropout, zoneout): the sections of
    :mod:`kernrnn.regularization` to generate.
    """
    rdrop, zone = reg
    S, Gr = cell.n_state, cell.n_recurrent_gates
    rec, rnorm = cell.has_recurrent, cell.recurrent_norm
    xw, prev, new, pp, dpp = _common()
    gates = _hu(cell, rnorm)
    target = (lambda s: f"cand{s}") if zone else new  # zoneout decides after the step
    after = ("\n" + zoneout_stores(S, target, prev, new)) if zone else ""
    # the next step's recurrent input, h masked by the per-sequence dropout mask
    masked_h = "\nHd[b, j] = States[0, n, b, j] * Mr[b, j]" if rdrop else ""
    if not cell.reads_h_only:  # the states the next product reads, side by side
        masked_h = "".join(f"\nHd[b, {k} * H + j] = States[{s}, n, b, j]"
                           for k, s in enumerate(cell.recurrent_state_indices))
    specs = []
    fwd_args = (("XW", 3), ("HU", 4), ("b_hh", 1), ("g_hh", 1), ("P", 1), ("States", 4),
                ("Saved", 4), ("Mid", 4), ("Zhat", 4), ("Y", "Y"), ("lengths", "L"), ("t", "i"),
                ("p", "i"), ("n", "i"), ("tt", "i"), ("tm", "i"), ("H", "i"), ("dh", "i"))
    if cell.staged:
        specs += _staged_forward_specs(cell, fwd_args, gates, target, after, masked_h)
    for train in (True, False):
        saved = (lambda k: f"Saved[{k}, t, b, j]") if train else (lambda k: None)
        tag = "train" if train else "infer"
        if cell.staged:
            pass
        elif not cell.normalize:
            body = forward_call(cell, xw=xw, hu=lambda g: gates[g], prev=prev, p=pp,
                                z_or_new=target, saved_or_mid=saved, indent=0) + after
            body += "\nY[t, b, j] = States[0, n, b, j]"
            specs.append(KernelSpec(f"step_forward_{tag}", fwd_args + REG_ARGS, _ELEM + (
                "if t < lengths[b]:\n" + _ind(body, 4) + "\nelse:\n" + _carry(S, 4))
                + masked_h))
        else:
            st2 = forward2_call(cell, zn=lambda k: f"(Zhat[{k}, tm, b, j] * Gz[{k} * H + j] + "
                                                   f"Bz[{k} * H + j])",
                                mid=lambda m: f"Mid[{m}, tm, b, j]", prev=prev, p=pp,
                                new=target, saved=saved, indent=0) + after
            st2 += "\nY[t, b, j] = States[0, n, b, j]"
            specs.append(KernelSpec(f"step_stage2_{tag}",
                                    fwd_args + (("Gz", 1), ("Bz", 1)) + REG_ARGS,
                                    _ELEM + "if t < lengths[b]:\n" + _ind(st2, 4)
                                    + "\nelse:\n" + _carry(S, 4) + masked_h))
    if cell.normalize:
        st1 = forward_call(cell, xw=xw, hu=lambda g: gates[g], prev=prev, p=pp,
                           z_or_new=lambda k: f"Zhat[{k}, tm, b, j]",
                           saved_or_mid=lambda m: f"Mid[{m}, tm, b, j]", indent=0)
        specs.append(KernelSpec("step_stage1", fwd_args,
                                _ELEM + "if t < lengths[b]:\n" + _ind(st1, 4)))
        body = "".join(
            f"if seg == {k}:\n" + _ind(block_row_norm(
                cell.normalize_kind, ["for j in range(tid, H, nt):"], f"Zhat[{k}, tm, b, j]",
                "H", f"Rz[{k}, tm, b]", prefix="z_"), 4) + "\n"
            for k in range(cell.n_norm))
        specs.append(KernelSpec("norm_z", (("Zhat", 4), ("Rz", 3), ("lengths", "L"), ("t", "i"),
                                           ("tm", "i"), ("H", "i"), ("NSEG", "i")),
                                ROW_HEAD + body))
    if rnorm is not None:
        visit, length, rstd, head = _hu_row(rnorm, Gr)
        body = head + block_row_norm(rnorm.kind, visit, "HU[tt, hd, b, r * dh + i]", length,
                                     rstd.format(t="tt"), prefix="n_")
        specs.append(KernelSpec("norm_hu", (("HU", 4), ("Rhh", 3), ("lengths", "L"), ("t", "i"),
                                            ("tt", "i"), ("H", "i"), ("dh", "i"), ("NSEG", "i")),
                                ROW_HEAD + body))
    specs += _backward_specs(cell, reg)
    if not rec and not cell.normalize and not cell.staged:
        specs += _fused_specs(cell, reg)
    if not any(reg) and _projectable(cell):
        specs += _projection_specs()
    return [_used_args(spec) for spec in specs]


def _used_args(spec: KernelSpec) -> KernelSpec:
    """``spec`` without the arguments its body never reads.

    The argument lists above are written per kernel family; a cell or
    variant that has no per-unit parameters, normalisation, saved values or
    regularisation would otherwise be passed one-element stand-ins, and each
    array argument costs about 3.5 us of launch time (numba-cuda), every step.
    """
    used = tuple(a for a in spec.args if re.search(rf"\b{a[0]}\b", spec.body))
    return replace(spec, args=used)


def kernel_args(cell, reg=(False, False)) -> dict:
    """The argument names of every kernel of ``cell``, in order, by kernel name."""
    return {spec.name: tuple(a for a, _ in spec.args) for spec in kernel_specs(cell, reg)}


def _projectable(cell) -> bool:
    from kernrnn.cell import CellError

    try:
        cell.check_projection()
    except CellError:
        return False
    return True


_PROJ = """idx = cuda.grid(1)
B = lengths.shape[0]
if idx >= B * NP:
    return
b = idx // NP
k = idx - b * NP
"""


def _projection_specs() -> list[KernelSpec]:
    """LSTMP around the cell's step, one thread per (b, k) of the projected h (``[.., NP]``).

    ``proj_forward`` runs after ``Hp[n] = States[0, n] @ W_hr.T``: it gives a
    finished row its previous projected h back and writes the output.
    ``proj_backward`` runs before the step's backward: the projected h's
    gradient ``dHp[t]`` (output, recurrent and carried parts; ``dSp`` carries
    it past finished rows), whose product with ``W_hr`` the step then reads;
    ``proj_carry`` adds the first step's recurrent part to ``h_0``'s gradient.
    """
    return [
        KernelSpec("proj_forward", (("Hp", 3), ("Y", "Y"), ("lengths", "L"), ("t", "i"),
                                    ("p", "i"), ("n", "i"), ("NP", "i")),
                   _PROJ + "if t < lengths[b]:\n    Y[t, b, k] = Hp[n, b, k]\nelse:\n"
                   "    Hp[n, b, k] = Hp[p, b, k]\n    Y[t, b, k] = 0"),
        KernelSpec("proj_backward", (("dY", "Y"), ("dHrec", 3), ("dSp", 2), ("dHp", 3),
                                     ("lengths", "L"), ("t", "i"), ("NP", "i")),
                   _PROJ + "if t < lengths[b]:\n"
                   "    dHp[t, b, k] = dY[t, b, k] + dHrec[0, b, k] + dSp[b, k]\n"
                   "    dSp[b, k] = 0\nelse:\n    dSp[b, k] = dSp[b, k] + dHrec[0, b, k]\n"
                   "    dHp[t, b, k] = 0"),
        KernelSpec("proj_carry", (("dHrec", 3), ("dSp", 2), ("lengths", "L"), ("NP", "i")),
                   _PROJ + "dSp[b, k] = dSp[b, k] + dHrec[0, b, k]"),
    ]


def _backward_specs(cell, reg) -> list[KernelSpec]:
    rdrop, zone = reg
    Gr, S = cell.n_recurrent_gates, cell.n_state
    rec, rnorm = cell.has_recurrent, cell.recurrent_norm
    xw, prev, new, pp, dpp = _common()
    mr = " * Mr[b, j]" if rdrop else ""  # dHrec is the gradient of the masked h
    rs = cell.recurrent_state_indices
    multi = not cell.reads_h_only  # dHrec [1, B, R*H]: the states' gradients side by side
    ds0 = "dS[0, b, j] + dY[t, b, j]" + (f" + dHrec[hd, b, i]{mr}" if rec and not multi else "")

    def arriving(s):
        head = ds0 if s == 0 else f"dS[{s}, b, j]"
        return head + (f" + dHrec[0, b, {rs.index(s)} * H + j]" if multi and s in rs else "")

    dstate, zwrap = zoneout_backward(S, arriving, lambda s: f"dS[{s}, b, j]", zone)

    def dxw(g):
        return f"dXW[t, b, {g} * H + j]"

    def dhu(r):
        return f"dHU[hd, t, b, {r} * dh + i]"

    def dprev(s):
        return f"dS[{s}, b, j]"

    args = (("dY", "Y"), ("dS", 3), ("dHrec", 3), ("Saved", 4), ("States", 4), ("Mid", 4),
            ("Zhat", 4), ("P", 1), ("lengths", "L"), ("dXW", 3), ("dHU", 4), ("dP", 2),
            ("DZ", 3), ("DM", 3), ("Gz", 1), ("Bz", 1), ("dGz", 2), ("dBz", 2), ("t", "i"),
            ("p", "i"), ("H", "i"), ("dh", "i")) + REG_ARGS
    add_rec = "".join(f"dS[{s}, b, j] = dS[{s}, b, j] + dHrec[0, b, {k} * H + j]\n"
                      for k, s in enumerate(rs)) if multi else \
        f"dS[0, b, j] = dS[0, b, j] + dHrec[hd, b, i]{mr}\n"
    masked = add_rec if rec else ""
    masked += "".join(f"dXW[t, b, {g} * H + j] = 0\n" for g in range(cell.n_input_blocks))
    if rec:
        masked += "".join(f"dHU[hd, t, b, {r} * dh + i] = 0\n" for r in range(Gr))
    specs = []
    if cell.staged:
        specs += _staged_backward_specs(cell, args, dstate, zwrap, masked, dxw, dhu, dprev)
    elif not cell.normalize:
        body = zwrap(backward_call(cell, saved=lambda k: f"Saved[{k}, t, b, j]", prev=prev,
                                   dstate=dstate, p=pp, dxw=dxw, dhu=dhu, dprev=dprev, dp=dpp,
                                   indent=0))
        specs.append(KernelSpec("step_backward", args, _ELEM + "if t < lengths[b]:\n"
                                + _ind(body, 4) + "\nelse:\n" + _ind(masked.rstrip(), 4)))
    else:
        def zhat(k):
            return f"Zhat[{k}, t, b, j]"

        st2 = backward2_call(cell, saved=lambda k: f"Saved[{k}, t, b, j]",
                             zn=lambda k: f"({zhat(k)} * Gz[{k} * H + j] + Bz[{k} * H + j])",
                             mid=lambda m: f"Mid[{m}, t, b, j]", prev=prev, dstate=dstate, p=pp,
                             dzn=lambda k: f"DZ[{k}, b, j]", dmid=lambda m: f"DM[{m}, b, j]",
                             dprev=dprev, dp=dpp, indent=0)
        st2 = zwrap(st2) + "\n" + "\n".join(f"dGz[b, {k} * H + j] += DZ[{k}, b, j] * {zhat(k)}\n"
                                f"dBz[b, {k} * H + j] += DZ[{k}, b, j]\n"
                                f"DZ[{k}, b, j] = DZ[{k}, b, j] * Gz[{k} * H + j]"
                                for k in range(cell.n_norm))
        specs.append(KernelSpec("step_backward2", args, _ELEM + "if t < lengths[b]:\n"
                                + _ind(st2, 4) + "\nelse:\n" + _ind(masked.rstrip(), 4)))
        body = "".join(
            f"if seg == {k}:\n" + _ind(block_row_norm_backward(
                cell.normalize_kind, ["for j in range(tid, H, nt):"], f"DZ[{k}, b, j]",
                f"Zhat[{k}, t, b, j]", "H", f"Rz[{k}, t, b]", prefix="z_"), 4) + "\n"
            for k in range(cell.n_norm))
        specs.append(KernelSpec("norm_z_backward", (("DZ", 3), ("Zhat", 4), ("Rz", 3),
                                                    ("lengths", "L"), ("t", "i"), ("H", "i"),
                                                    ("NSEG", "i")), ROW_HEAD + body))
        st1 = backward1_call(cell, mid=lambda m: f"Mid[{m}, t, b, j]", prev=prev,
                             dz=lambda k: f"DZ[{k}, b, j]", dmid=lambda m: f"DM[{m}, b, j]",
                             p=pp, dxw=dxw, dhu=dhu, dprev=dprev, dp=dpp, indent=0)
        specs.append(KernelSpec("step_backward1", args,
                                _ELEM + "if t < lengths[b]:\n" + _ind(st1, 4)))
    if rnorm is not None:
        u = "r * H + hd * dh + i"
        v = "dHU[hd, t, b, r * dh + i]"
        xhat = "HU[t, hd, b, r * dh + i]"
        visit, length, rstd, head = _hu_row(rnorm, Gr)
        before = [f"db_hh[b, {u}] += {v}", f"dg_hh[b, {u}] += {v} * {xhat}",
                  f"{v} = {v} * g_hh[{u}]"]
        back = block_row_norm_backward(rnorm.kind, visit, v, xhat, length, rstd.format(t="t"),
                                       prefix="n_", before=before)
        specs.append(KernelSpec("norm_hu_backward", (("dHU", 4), ("HU", 4), ("Rhh", 3),
                                                     ("g_hh", 1), ("db_hh", 2), ("dg_hh", 2),
                                                     ("lengths", "L"), ("t", "i"), ("H", "i"),
                                                     ("dh", "i"), ("NSEG", "i")),
                                ROW_HEAD + head + back))
    if rec:
        specs.append(KernelSpec("add_recurrent", (("dS", 3), ("dHrec", 3), ("lengths", "L"),
                                                  ("H", "i"), ("dh", "i"), ("Mr", 2)),
                                _ELEM + add_rec.rstrip()))
    return specs


def _staged_zin(layout, s):
    """What stage ``s`` of a staged cell receives from the products before it, at (t?, b, j):
    ``HM{q}[T, b, g * H + j] + bM[...]`` with ``T`` the time slot."""
    out = []
    for q, _, G, gq, _ in layout[s - 1]["products"]:
        out += [f"HM{q}[{{T}}, b, {g} * H + j] + bM[{gq + g} * H + j]" for g in range(G)]
    return out


def _staged_product_args(layout, array: str):
    return tuple((f"{array}{q}", 3) for bnd in layout for q, *_ in bnd["products"])


def _staged_forward_specs(cell, fwd_args, gates, target, after, masked_h) -> list[KernelSpec]:
    """A staged cell's forward: one kernel per stage, ``staged_forward{s}`` and the last one
    ``staged_forward_train``/``_infer``; the host runs the products' GEMMs between them
    (``HM{q}[tm] = Zhat[row, tm] @ W_q.T``)."""
    layout = staged_layout(cell)
    K = len(layout) + 1
    S = cell.n_state
    xw, prev, new, pp, _ = _common()
    args = fwd_args + (("bM", 1),) + _staged_product_args(layout, "HM")
    specs = []
    for s in range(K):
        kw = dict(prev=prev, p=pp)
        if s == 0:
            kw.update(xw=xw, hu=lambda g: gates[g])
        else:
            zin = [v.format(T="tm") for v in _staged_zin(layout, s)]
            kw.update(zn=lambda k, zin=zin: zin[k],
                      mid=lambda m, o=layout[s - 1]["moff"]: f"Mid[{o + m}, tm, b, j]")
        if s < K - 1:
            bnd = layout[s]
            body = stage_forward_call(
                cell, s, out0=lambda k, o=bnd["zoff"]: f"Zhat[{o + k}, tm, b, j]",
                out1=lambda m, o=bnd["moff"]: f"Mid[{o + m}, tm, b, j]", indent=0, **kw)
            zero = "\n".join(f"Zhat[{bnd['zoff'] + k}, tm, b, j] = 0" for k in range(bnd["nz"]))
            specs.append(KernelSpec(f"staged_forward{s}", args, _ELEM + "if t < lengths[b]:\n"
                                    + _ind(body, 4) + "\nelse:\n" + _ind(zero, 4)))
            continue
        for train in (True, False):
            saved = (lambda k: f"Saved[{k}, t, b, j]") if train else (lambda k: None)
            body = stage_forward_call(cell, s, out0=target, out1=saved, indent=0, **kw) + after
            body += "\nY[t, b, j] = States[0, n, b, j]"
            specs.append(KernelSpec(f"staged_forward_{'train' if train else 'infer'}",
                                    args + REG_ARGS, _ELEM + "if t < lengths[b]:\n"
                                    + _ind(body, 4) + "\nelse:\n" + _carry(S, 4) + masked_h))
    return specs


def _staged_backward_specs(cell, args, dstate, zwrap, masked, dxw, dhu, dprev) -> list:
    """A staged cell's BPTT: one kernel per stage, last stage first; between them the host
    runs the products backward (``DZ[row] = dHM{q}[t] @ W_q``).  The last stage's kernel
    zeroes every product's gradient at a finished row."""
    layout = staged_layout(cell)
    K = len(layout) + 1
    _, prev, _, pp, dpp = _common()
    args = args + (("bM", 1),) + _staged_product_args(layout, "HM") + \
        _staged_product_args(layout, "dHM")
    specs = []
    for s in range(K - 1, -1, -1):
        kw = dict(prev=prev, p=pp, dp=dpp, dprev=dprev)
        if s:
            zin = [v.format(T="t") for v in _staged_zin(layout, s)]
            dz = [f"dHM{q}[t, b, {g} * H + j]" for q, _, G, _, _ in layout[s - 1]["products"]
                  for g in range(G)]
            mo = layout[s - 1]["moff"]
            kw.update(zn=lambda k, zin=zin: zin[k], mid=lambda m, o=mo: f"Mid[{o + m}, t, b, j]",
                      dzn=lambda k, dz=dz: dz[k], dmid_out=lambda m, o=mo: f"DM[{o + m}, b, j]")
        if s == K - 1:
            kw.update(own=lambda k: f"Saved[{k}, t, b, j]", dstate=dstate)
        else:
            bnd = layout[s]
            kw.update(own=lambda m, o=bnd["moff"]: f"Mid[{o + m}, t, b, j]",
                      dz=lambda k, o=bnd["zoff"]: f"DZ[{o + k}, b, j]",
                      dmid=lambda m, o=bnd["moff"]: f"DM[{o + m}, b, j]")
        if s == 0:
            kw.update(dxw=dxw, dhu=dhu)
        body = stage_backward_call(cell, s, indent=0, **kw)
        if s == K - 1:
            zeros = [f"dHM{q}[t, b, {g} * H + j] = 0" for bnd in layout
                     for q, _, G, _, _ in bnd["products"] for g in range(G)]
            text = (_ELEM + "if t < lengths[b]:\n" + _ind(zwrap(body), 4) + "\nelse:\n"
                    + _ind(masked.rstrip() + "\n" + "\n".join(zeros), 4))
        else:
            text = _ELEM + "if t < lengths[b]:\n" + _ind(body, 4)
        specs.append(KernelSpec(f"staged_backward{s}", args, text))
    return specs


def _fused_specs(cell, reg) -> list[KernelSpec]:
    """Whole-sequence passes for cells without a recurrent matrix or row statistics.

    Each thread runs every step of its element (the elements are independent);
    a linear-in-state cell also gets the three kernels of a chunked parallel
    scan over time (forward and backward).
    """
    zone = reg[1]
    S = cell.n_state
    xw, prev, new, pp, dpp = _common()
    target = (lambda s: f"cand{s}") if zone else new
    after = ("\n" + zoneout_stores(S, target, prev, new)) if zone else ""
    head = "T = XW.shape[0]\n"
    steps = ("for step in range(s0, s1):\n"
             "    if reverse:\n        t = T - 1 - step\n        p = t + 1\n        n = t\n"
             "    else:\n        t = step\n        p = t\n        n = t + 1\n")
    specs = []
    fused_args = (("XW", 3), ("P", 1), ("States", 4), ("Saved", 4), ("Y", "Y"),
                  ("lengths", "L"), ("reverse", "i"), ("H", "i"), ("dh", "i"), ("s0", "i"),
                  ("s1", "i")) + REG_ARGS
    # inference keeps two state slots taking turns (step s reads slot s & 1)
    slots = ("for step in range(s0, s1):\n    t = T - 1 - step if reverse else step\n"
             "    p = step & 1\n    n = 1 - p\n")
    for train in (True, False):
        saved = (lambda k: f"Saved[{k}, t, b, j]") if train else (lambda k: None)
        body = forward_call(cell, xw=xw, hu=lambda g: "ZERO", prev=prev, p=pp, z_or_new=target,
                            saved_or_mid=saved, indent=0) + after
        body += "\nY[t, b, j] = States[0, n, b, j]"
        specs.append(KernelSpec(f"fused_forward_{'train' if train else 'infer'}", fused_args,
                                _ELEM + head + (steps if train else slots)
                                + "    if t < lengths[b]:\n"
                                + _ind(body, 8) + "\n    else:\n" + _carry(S, 8)))

    def arriving(s):
        return "dS[0, b, j] + dY[t, b, j]" if s == 0 else f"dS[{s}, b, j]"

    dstate, zwrap = zoneout_backward(S, arriving, lambda s: f"dS[{s}, b, j]", zone)
    body = zwrap(backward_call(cell, saved=lambda k: f"Saved[{k}, t, b, j]", prev=prev,
                               dstate=dstate, p=pp, dxw=lambda g: f"dXW[t, b, {g} * H + j]",
                               dhu=lambda r: None, dprev=lambda s: f"dS[{s}, b, j]", dp=dpp,
                               indent=0))
    zero = "\n".join(f"dXW[t, b, {g} * H + j] = 0" for g in range(cell.n_input_blocks))
    bsteps = ("for step in range(s0, s1):\n"
              "    if reverse:\n        t = step\n        p = t + 1\n"
              "    else:\n        t = T - 1 - step\n        p = t\n")
    specs.append(KernelSpec("fused_backward", (("dY", "Y"), ("dS", 3), ("Saved", 4),
                                               ("States", 4), ("P", 1), ("lengths", "L"),
                                               ("dXW", 3), ("dP", 2), ("reverse", "i"),
                                               ("H", "i"), ("dh", "i"), ("s0", "i"), ("s1", "i"))
                            + REG_ARGS,
                            _ELEM + "T = dXW.shape[0]\n" + bsteps + "    if t < lengths[b]:\n"
                            + _ind(body, 8) + "\n    else:\n" + _ind(zero, 8)))
    if cell.linear and not zone:  # zoneout makes a: the scan would need its masks too
        specs += _scan_specs(cell)
    return specs


def _scan_specs(cell) -> list[KernelSpec]:
    """Chunked parallel scan of ``new_s = a_s * prev_s + b_s`` over time.

    Forward: ``scan_reduce`` composes each chunk's affine maps (one thread per
    element and chunk; ``a``, ``b`` from the cell's forward at prev = 0 and at
    the unit vectors), ``scan_carry`` runs the chunk maps in order (one thread
    per element) to get each chunk's starting state, and ``scan_apply_*``
    replays every chunk from its start at once, with the cell's own forward.
    Backward runs the same three phases on the adjoint recurrence
    ``D' = a * (D + dy)`` (``a`` from the cell's backward at ``dstate = 1``),
    then ``scan_apply_backward`` the cell's backward per chunk.  Each value has
    one writer: deterministic.
    """
    S = cell.n_state
    xw, prev, new, pp, dpp = _common()
    zeros, ones = ["ZERO"] * S, ["ONE"] * S
    lines = [forward_call(cell, xw=xw, hu=lambda g: "ZERO", prev=lambda q: zeros[q], p=pp,
                          z_or_new=lambda q: f"bb{q}", saved_or_mid=lambda k: None, indent=0)]
    for s in range(S):
        unit = ["ONE" if q == s else "ZERO" for q in range(S)]
        lines.append(forward_call(cell, xw=xw, hu=lambda g: "ZERO", prev=lambda q: unit[q],
                                  p=pp, z_or_new=lambda q, s=s: f"aa{s}" if q == s else None,
                                  saved_or_mid=lambda k: None, indent=0))
        lines.append(f"aa{s} = aa{s} - bb{s}")
    coeffs = "\n".join(lines)
    init = "\n".join(f"CA[{s}, c, b, j] = ONE\nCB[{s}, c, b, j] = ZERO" for s in range(S))
    compose = "\n".join(f"CA[{s}, c, b, j] = aa{s} * CA[{s}, c, b, j]\n"
                        f"CB[{s}, c, b, j] = aa{s} * CB[{s}, c, b, j] + bb{s}" for s in range(S))
    chunk = ("idx = cuda.grid(1)\nB = lengths.shape[0]\n"
             "if idx >= B * H * NC:\n    return\nc = idx // (B * H)\nrest = idx - c * B * H\n"
             "b = rest // H\nj = rest - b * H\ns0 = c * CHUNK\ns1 = min(T, s0 + CHUNK)\n")
    fsteps = ("for step in range(s0, s1):\n"
              "    if reverse:\n        t = T - 1 - step\n        n = t\n"
              "    else:\n        t = step\n        n = t + 1\n")
    bsteps = ("for step in range(s0, s1):\n"
              "    if reverse:\n        t = step\n        p = t + 1\n"
              "    else:\n        t = T - 1 - step\n        p = t\n")
    cargs = (("CA", 4), ("CB", 4), ("lengths", "L"), ("reverse", "i"), ("H", "i"), ("T", "i"),
             ("NC", "i"), ("CHUNK", "i"))
    specs = [KernelSpec("scan_reduce", (("XW", 3), ("P", 1)) + cargs,
                        chunk + init + "\n" + fsteps + "    if t < lengths[b]:\n"
                        + _ind(coeffs + "\n" + compose, 8))]
    carry = ("idx = cuda.grid(1)\nB = lengths.shape[0]\nif idx >= B * H:\n    return\n"
             "b = idx // H\nj = idx - b * H\n"
             + "\n".join(f"v{s} = Start[{s}, 0, b, j]" for s in range(S)) + "\n"
             "for c in range(CA.shape[1]):\n"
             + "\n".join(f"    Start[{s}, c, b, j] = v{s}\n"
                         f"    v{s} = CA[{s}, c, b, j] * v{s} + CB[{s}, c, b, j]"
                         for s in range(S)))
    specs.append(KernelSpec("scan_carry", (("CA", 4), ("CB", 4), ("Start", 4),
                                           ("lengths", "L"), ("H", "i")), carry))
    pv = "\n".join(f"pv{s} = Start[{s}, c, b, j]" for s in range(S)) + "\n"
    for train in (True, False):
        saved = (lambda k: f"Saved[{k}, t, b, j]") if train else (lambda k: None)
        if train:  # every boundary's state, for BPTT
            body = forward_call(cell, xw=xw, hu=lambda g: "ZERO", prev=lambda q: f"pv{q}",
                                p=pp, z_or_new=new, saved_or_mid=saved, indent=0)
            body += "\nY[t, b, j] = States[0, n, b, j]\n" + "\n".join(
                f"pv{s} = States[{s}, n, b, j]" for s in range(S))
            held = "\n".join([f"States[{s}, n, b, j] = pv{s}" for s in range(S)]
                             + ["Y[t, b, j] = 0"])
            end = ""
        else:  # two state slots: only the last chunk stores its final state, in slot T & 1
            body = forward_call(cell, xw=xw, hu=lambda g: "ZERO", prev=lambda q: f"pv{q}",
                                p=pp, z_or_new=lambda q: f"nv{q}", saved_or_mid=saved, indent=0)
            body += "\nY[t, b, j] = nv0\n" + "\n".join(f"pv{s} = nv{s}" for s in range(S))
            held = "Y[t, b, j] = 0"
            end = "\nif c == NC - 1:\n" + _ind("\n".join(
                f"States[{s}, T & 1, b, j] = pv{s}" for s in range(S)), 4)
        specs.append(KernelSpec(
            f"scan_apply_{'train' if train else 'infer'}",
            (("XW", 3), ("P", 1), ("Start", 4), ("States", 4), ("Saved", 4), ("Y", "Y"))
            + cargs[2:],
            chunk + pv + fsteps + "    if t < lengths[b]:\n" + _ind(body, 8) + "\n    else:\n"
            + _ind(held, 8) + end))
    # backward coefficients: a from the cell's backward at dstate = 1 (dprev = a * dstate)
    bl = backward_call(cell, saved=lambda k: f"Saved[{k}, t, b, j]", prev=prev,
                       dstate=lambda q: ones[q], p=pp, dxw=lambda g: None, dhu=lambda r: None,
                       dprev=lambda q: f"aa{q}", dp=lambda k: None, indent=0)
    bcompose = "\n".join(
        f"CA[{s}, c, b, j] = aa{s} * CA[{s}, c, b, j]\n"
        f"CB[{s}, c, b, j] = aa{s} * (CB[{s}, c, b, j]"
        + (" + dY[t, b, j])" if s == 0 else ")") for s in range(S))
    specs.append(KernelSpec("scan_reduce_backward",
                            (("dY", "Y"), ("Saved", 4), ("States", 4), ("P", 1)) + cargs,
                            chunk + init + "\n" + bsteps + "    if t < lengths[b]:\n"
                            + _ind(bl + "\n" + bcompose, 8)))
    dv = "\n".join(f"dv{s} = Start[{s}, c, b, j]" for s in range(S)) + "\n"

    def dstate(s):
        return "dv0 + dY[t, b, j]" if s == 0 else f"dv{s}"

    body = backward_call(cell, saved=lambda k: f"Saved[{k}, t, b, j]", prev=prev,
                         dstate=dstate, p=pp, dxw=lambda g: f"dXW[t, b, {g} * H + j]",
                         dhu=lambda r: None, dprev=lambda q: f"dv{q}",
                         dp=lambda k: f"dP[c * B + b, {k} * H + j]", indent=0)
    zero = "\n".join(f"dXW[t, b, {g} * H + j] = 0" for g in range(cell.n_input_blocks))
    last = "if c == NC - 1:\n" + _ind("\n".join(f"dS[{s}, b, j] = dv{s}" for s in range(S)), 4)
    specs.append(KernelSpec("scan_apply_backward",
                            (("dY", "Y"), ("Saved", 4), ("States", 4), ("P", 1), ("Start", 4),
                             ("dXW", 3), ("dP", 2), ("dS", 3)) + cargs[2:],
                            chunk + dv + bsteps + "    if t < lengths[b]:\n" + _ind(body, 8)
                            + "\n    else:\n" + _ind(zero, 8) + "\n" + last))
    return specs


def kernel_source(cell, reg=(False, False)) -> str:
    """Python source of every kernel of ``cell`` (``name_py`` functions and jitted ``name``)."""
    specs = kernel_specs(cell, reg)
    args = {spec.name: tuple(a for a, _ in spec.args) for spec in specs}
    parts = ["from numba import cuda\n\n", f"ARGS = {args!r}\n"]
    for spec in specs:
        args = ", ".join(a for a, _ in spec.args)
        parts.append(f"\ndef {spec.name}_py({args}):\n{_ind(spec.body, 4)}\n\n\n"
                     f"{spec.name} = cuda.jit(cache=CACHE)({spec.name}_py)\n")
    return "".join(parts)


def signatures(cell, dtype, y_layout: str = "A", reg=(False, False)) -> dict:
    """Numba signatures of every kernel for :func:`numba.cuda.compile_ptx`, by ``name_py``."""
    import numpy as np
    from numba import types as nt

    f = nt.float32 if np.dtype(dtype) == np.float32 else nt.float64
    out = {}
    for spec in kernel_specs(cell, reg):
        sig = []
        for _, kind in spec.args:
            if kind == "i":
                sig.append(nt.int64)
            elif kind == "L":
                sig.append(nt.Array(nt.int64, 1, "C"))
            elif kind == "U":
                sig.append(nt.Array(nt.uint64, 1, "C"))
            elif kind == "Y":
                sig.append(nt.Array(f, 3, y_layout))
            else:
                sig.append(nt.Array(f, kind, "C"))
        out[f"{spec.name}_py"] = tuple(sig)
    return out
