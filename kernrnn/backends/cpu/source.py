"""Source of the plain CPU kernels: the time loop forward and BPTT, BLAS per step.

One forward and one backward kernel per cell, written for the cell at hand:
its recurrence form (dense, heads, none), per-unit parameters and
normalisations decide which sections the source has.  Every kernel of a kind
has the same arguments (:mod:`~kernrnn.backends.cpu.kernel_args`); arrays a
cell does not use are one-element stand-ins.  Element (b, j) of head hd is
unit j = hd*dh + i, so the innermost loop over i reads contiguous memory and
vectorises.  :func:`backward_source` also writes the BPTT of the packed
(fused) path, with ``packed``; the fused forward is in
:mod:`~kernrnn.backends.cpu.fused_source`.
"""

from __future__ import annotations

from kernrnn.backends.codegen import (
    backward1_call,
    backward2_call,
    backward_call,
    forward2_call,
    forward_call,
    hu_gates,
    row_norm,
    row_norm_backward,
    stage_backward_call,
    stage_forward_call,
    staged_layout,
    zoneout_backward,
    zoneout_stores,
)
from kernrnn.backends.cpu import microkernel as mk
from kernrnn.backends.cpu.kernel_args import BACKWARD, BACKWARD_STAGED, FORWARD, FORWARD_STAGED

__all__ = ["forward_source", "backward_source", "same_input_and_recurrent_grads", "ind",
           "staged_views"]


def ind(text: str, n: int) -> str:
    """``text`` with every non-empty line indented by ``n`` spaces."""
    pad = " " * n
    return "\n".join(pad + line if line else line for line in text.splitlines())


def forward_source(cell, train: bool, reg=(False, False), proj=False) -> str:
    """All T steps of one direction for batch rows b0:b1 (see the module docstring).

    ``reg``: (recurrent dropout, zoneout) sections to generate.  ``proj``: an
    LSTMP projection inside the loop: after each step ``Hp[n] = States[0, n]
    @ W_hr.T`` (``WrT [H, proj]``), which the next step's product and ``Y`` read.
    """
    rdrop, zone = reg
    S, Gr = cell.n_state, cell.n_recurrent_gates
    rec, rnorm = cell.has_recurrent, cell.recurrent_norm
    tt = "t" if (train and rnorm is not None) else "0"  # HU keeps every step only when needed
    tm = "t" if train else "0"  # Mid, Zhat, Rz keep every step only for training

    def hu(r):
        v = f"HU[{tt}, hd, b, {r} * dh + i]"
        if rnorm is not None:
            v += f" * g_hh[{r} * H + j]"
        return v + f" + b_hh[{r} * H + j]"

    def xw(g):
        return f"XW[t, b, {g} * H + j] + b_ih[{g} * H + j]"

    # the raw input (raw_input): XW's block after the gates holds x itself, no bias
    raw = f"XW[t, b, {cell.n_gates} * H + j]" if cell.raw_input else None

    def prev(s):
        return f"States[{s}, p, b, j]"

    def new(s):
        return f"States[{s}, n, b, j]"

    def pp(i):
        return f"unit_params[{i} * H + j]"

    saved = (lambda k: f"Saved[{k}, t, b, j]") if train else (lambda k: None)
    gates = hu_gates(cell, hu, "ZERO")
    elem = "for hd in range(NH):\n    for i in range(dh):\n        j = hd * dh + i"
    target = (lambda s: f"cand{s}") if zone else new  # zoneout decides after the step
    after = ("\n" + zoneout_stores(S, target, prev, new)) if zone else ""
    # the recurrent product's input: the masked h, the projected h or h
    h_in = "Hd" if rdrop else ("Hp[p]" if proj else "States[0, p]")
    y_store = "" if proj else "\n        Y[t, b, j] = States[0, n, b, j]"
    lines = []
    if not cell.reads_h_only:  # the states the product reads, side by side in Hd [B, R*H]
        h_in = "Hd"
        lines.append("for b in range(b0, b1):\n    for j in range(H):\n" + "\n".join(
            f"        Hd[b, {k} * H + j] = States[{s}, p, b, j]"
            for k, s in enumerate(cell.recurrent_state_indices)))
    if cell.recurrent == "dense":  # contiguous operands: BLAS straight on the arrays
        lines.append(f"np.dot({h_in}[b0:b1], WT[0], HU[{tt}, 0, b0:b1])")
    elif rec:
        lines.append("for hd in range(NH):\n"
                     f"    np.dot(np.ascontiguousarray({h_in}[b0:b1, hd * dh:(hd + 1) * dh]), "
                     f"WT[hd], HU[{tt}, hd, b0:b1])")
    lines.append("for b in range(b0, b1):\n    if t < lengths[b]:")
    body = []
    if rnorm is not None:
        loops = ["for hd in range(NH):", "for i in range(dh):"]
        value = f"HU[{tt}, hd, b, r * dh + i]"
        if rnorm.over == "gate":
            body.append(f"for r in range({Gr}):\n" + ind(row_norm(
                rnorm.kind, loops, value, "H", f"Rhh[{tt}, b, r]", indent=0, prefix="n_"), 4))
        else:
            body.append(row_norm(rnorm.kind, [f"for r in range({Gr}):"]
                                 + loops, value, f"{Gr} * H",
                                 f"Rhh[{tt}, b, 0]", indent=0, prefix="n_"))
    if cell.staged:
        return _staged_forward(cell, train, lines, body, elem, dict(
            xw=xw, hu=lambda g: gates[g], prev=prev, p=pp), target, after, saved, tm, rdrop)
    if not cell.normalize:
        step = forward_call(cell, xw=xw, hu=lambda g: gates[g], prev=prev, p=pp,
                            z_or_new=target, saved_or_mid=saved, indent=0, x=raw) + after
        body.append(elem + "\n" + ind(step, 8) + y_store)
    else:
        st1 = forward_call(cell, xw=xw, hu=lambda g: gates[g], prev=prev, p=pp,
                           z_or_new=lambda k: f"Zhat[{k}, {tm}, b, j]",
                           saved_or_mid=lambda m: f"Mid[{m}, {tm}, b, j]", indent=0, x=raw)
        body.append(elem + "\n" + ind(st1, 8))
        for k in range(cell.n_norm):
            body.append(row_norm(cell.normalize_kind, ["for j in range(H):"],
                                 f"Zhat[{k}, {tm}, b, j]", "H", f"Rz[{k}, {tm}, b]", indent=0,
                                 prefix=f"z{k}_"))
        st2 = forward2_call(cell, zn=lambda k: f"(Zhat[{k}, {tm}, b, j] * Gz[{k} * H + j] + "
                                               f"Bz[{k} * H + j])",
                            mid=lambda m: f"Mid[{m}, {tm}, b, j]", prev=prev, p=pp, new=target,
                            saved=saved, indent=0) + after
        body.append(elem + "\n" + ind(st2, 8) + y_store)
    lines.append(ind("\n".join(body), 8))
    carry = "\n".join(f"            States[{s}, n, b, j] = States[{s}, p, b, j]"
                      for s in range(S)) + ("" if proj else "\n            Y[t, b, j] = 0")
    lines.append(f"    else:\n        for j in range(H):\n{carry}")
    if proj:  # project the new h; a finished row keeps its projected h
        lines.append("np.dot(States[0, n, b0:b1], WrT, Hp[n, b0:b1])\n"
                     "for b in range(b0, b1):\n    if t < lengths[b]:\n"
                     "        for k in range(Hp.shape[2]):\n            Y[t, b, k] = Hp[n, b, k]\n"
                     "    else:\n        for k in range(Hp.shape[2]):\n"
                     "            Hp[n, b, k] = Hp[p, b, k]\n            Y[t, b, k] = 0")
    if rdrop:  # the next step's recurrent input: this step's h, masked
        lines.append("    for j in range(H):\n        Hd[b, j] = States[0, n, b, j] * Mr[b, j]")
    loop = ind("\n".join(lines), 8)
    name = "forward_train" if train else "forward_infer"
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
{FORWARD.signature(name)}
    """All T steps for batch rows b0:b1 (with recurrent dropout ``Hd`` holds the masked
    previous h, filled for the first step by the caller)."""
    T = XW.shape[0]
    H = States.shape[3]
    NH = HU.shape[1]
    dh = H // NH
    for step in range(T):
        if reverse:
            t = T - 1 - step
            p = t + 1
            n = t
        else:
            t = step
            p = t
            n = t + 1
{loop}
'''



def staged_views(cell, tslots: str, array: str = "HM") -> str:
    """Lines that cut the flat ``array`` (``HM`` or ``dHM``) into per-product views
    ``{array}{q} [tslots, B, G_q*H]``, before the time loop; ``tslots`` its time slots
    (``T`` or ``Tm``)."""
    lines = []
    for bnd in staged_layout(cell):
        for q, _, G, gq, _ in bnd["products"]:
            lines += [f"{array}{q} = {array}[{tslots} * B * H * {gq}:{tslots} * B * H * "
                      f"{gq + G}].reshape(({tslots}, B, {G} * H))"]
    return "\n".join(lines)


def _staged_forward(cell, train, lines, body, elem, stage0, target, after, saved, tm,
                    rdrop) -> str:
    """The steps of a staged cell: per stage a pass over the rows, the products of the
    stage's operands (one GEMM each, over the thread's rows) between the passes."""
    layout = staged_layout(cell)
    K = len(layout) + 1
    S = cell.n_state
    lines = lines[:-1]  # the one-stage step's pass over the rows: written per stage below

    def zeros(bnd):  # a finished row's operands: zero rows in the products' GEMMs
        return "\n".join(f"        Zhat[{bnd['zoff'] + i}, {tm}, b, j] = 0"
                         for i in range(bnd["nz"]))

    for s in range(K):
        last = s == K - 1
        kw = dict(stage0) if s == 0 else dict(prev=stage0["prev"], p=stage0["p"])
        if s:
            inb = layout[s - 1]
            zin = []
            for q, _, G, gq, _ in inb["products"]:
                zin += [f"HM{q}[{tm}, b, {g} * H + j] + bM[{gq + g} * H + j]" for g in range(G)]
            kw.update(zn=lambda k, zin=zin: zin[k],
                      mid=lambda m, o=inb["moff"]: f"Mid[{o + m}, {tm}, b, j]")
        if last:
            out0, out1 = target, saved
        else:
            bnd = layout[s]

            def out0(k, o=bnd["zoff"]):
                return f"Zhat[{o + k}, {tm}, b, j]"

            def out1(m, o=bnd["moff"]):
                return f"Mid[{o + m}, {tm}, b, j]"
        step = stage_forward_call(cell, s, out0=out0, out1=out1, indent=0, **kw)
        if last:
            step += after
        stage_body = (body if s == 0 else []) + [elem + "\n" + ind(step, 8) + (
            "\n        Y[t, b, j] = States[0, n, b, j]" if last else "")]
        lines.append("for b in range(b0, b1):\n    if t < lengths[b]:")
        lines.append(ind("\n".join(stage_body), 8))
        if last:
            carry = "\n".join(f"            States[{q}, n, b, j] = States[{q}, p, b, j]"
                              for q in range(S)) + "\n            Y[t, b, j] = 0"
            lines.append(f"    else:\n        for j in range(H):\n{carry}")
            if rdrop:
                lines.append("    for j in range(H):\n        Hd[b, j] = States[0, n, b, j] "
                             "* Mr[b, j]")
        else:
            lines.append("    else:\n        for j in range(H):\n" + ind(zeros(layout[s]), 4))
            for q, _, G, gq, zrow in layout[s]["products"]:
                lines.append(f"np.dot(Zhat[{zrow}, {tm}, b0:b1], WMT[H * H * {gq}:H * H * "
                             f"{gq + G}].reshape((H, {G} * H)), HM{q}[{tm}, b0:b1])")
    loop = ind("\n".join(lines), 8)
    name = "forward_train" if train else "forward_infer"
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
{FORWARD_STAGED.signature(name)}
    """All T steps for batch rows b0:b1, stage by stage, the recurrent products between."""
    T = XW.shape[0]
    H = States.shape[3]
    B = States.shape[2]
    Tm = Zhat.shape[1]
    NH = HU.shape[1]
    dh = H // NH
{ind(staged_views(cell, "Tm"), 4)}
    for step in range(T):
        if reverse:
            t = T - 1 - step
            p = t + 1
            n = t
        else:
            t = step
            p = t
            n = t + 1
{loop}
'''


def backward_source(cell, same: bool, packed=None, reg=(False, False), proj=False) -> str:
    """BPTT over all steps for batch rows b0:b1.

    ``dS`` holds the element-wise part of the state gradients; the recurrent
    part ``dH = dHU_t @ W_hh`` of the previous step is added when it is read
    (saves a pass).  ``same``: the cell returns the same values for dxw and
    dhu (LSTM, Elman), so only dXW is written and used for both.  ``packed``
    ``(mr, nu)``: a dense cell's ``dH = dHU_t @ W_hh`` runs on ``W_hh`` packed
    in panels of ``nu`` units (``W`` is then ``[NB, Gr*H, nu]``) with
    ``mr``-row register tiles, instead of BLAS.  ``reg``: (recurrent dropout,
    zoneout) sections to generate.  ``proj``: the LSTMP projection: per step,
    before the rows, the projected h's gradient ``dHp[t] = dY_t + dH + dSp``
    (``dSp``: what arrives at the projected h from later; finished rows pass
    it on) and the unprojected h's ``dR = dHp[t] @ W_hr``; ``dH`` is then
    ``[1, B, proj]``.

    Threads split the rows (``b0:b1``) or, with ``packed``, the unit blocks
    (``jb0:jb1`` of all rows, ``nthr`` threads meeting at one barrier per
    step, before ``dH`` needs every unit's ``dHU``).  The bias and
    per-unit gradients of row ``b`` go to row ``chunk[b]`` of the
    accumulators, its chunk under the row split, so both splits add the same
    values in the same order (bit for bit the same gradients).
    """
    if cell.staged:
        return _staged_backward(cell, reg)
    rdrop, zone = reg
    G, Gr = cell.n_gates, cell.n_recurrent_gates
    rec, rnorm = cell.has_recurrent, cell.recurrent_norm
    tt = "t" if rnorm is not None else "0"
    S, K, NP = cell.n_state, cell.n_saved, cell.n_param_scalars
    # Element index of the per-row views: the unit ``j`` (generic: views span all
    # H units), or, packed, ``e`` counted from the thread's first unit ``j_lo``
    # (views start there).  A loop index from 0 is one LLVM proves
    # non-negative, so it drops Numba's wraparound select and vectorises the
    # loop; on ``j`` from ``range(j_lo, j_hi)`` the LSTM's BPTT step stayed
    # scalar (LSTM BPTT, 2 threads: B=32, H=128 5.4 -> 3.6 ms; B=8, H=256 4.1 -> 3.1).
    x = "j" if packed is None else "e"
    mr_ = f" * mrr[{x}]" if rdrop else ""  # dH is the gradient of the masked h
    dh_in = "dH[hd, b, i]" if packed is None else "dhv[e]"
    ds0 = f"ds0[{x}] + dRr[{x}]" if proj else \
        f"ds0[{x}] + dyr[{x}]" + (f" + {dh_in}{mr_}" if rec else "")

    rs = cell.recurrent_state_indices
    if not cell.reads_h_only:  # dH [1, B, R*H]: the gradients of the states side by side
        ds0 = f"ds0[{x}] + dyr[{x}]"

    def arriving(s):
        head = ds0 if s == 0 else f"ds{s}[{x}]"
        if cell.reads_h_only or s not in rs:
            return head
        return head + f" + dH[0, b, {rs.index(s)} * H + j]"

    dstate, zwrap = zoneout_backward(S, arriving, lambda s: f"ds{s}[{x}]", zone)

    def prev(s):
        return f"hp{s}[{x}]"

    def saved(k):
        return f"sv{k}[{x}]"

    def pp(i):
        return f"pv{i}[{x}]"

    def dp(i):
        return f"dpv{i}[{x}]"

    def dxw(g):
        return f"dxw{g}[{x}]"

    def dprev(s):
        return f"ds{s}[{x}]"

    dhu = (lambda r: None) if same else (lambda r: f"dhu{r}[{'i' if packed is None else 'e'}]")
    # the thread's units: all of a head (generic), or its unit blocks (packed, NH = 1)
    irange = "range(dh)" if packed is None else "range(j_lo, j_hi)"
    lo, hi = ("", "") if packed is None else ("j_lo", "j_hi")

    def span(g):  # units of gate block g in a row of G*H (the thread's, packed)
        return f"{g} * H + {lo}:{g} * H + {hi}" if packed is not None else f"{g} * H:{g + 1} * H"

    # One 1-d view per row and gate block: a store to dXW[t, b, g*H + j]
    # carries Numba's negative-index select, which LLVM cannot analyse for
    # overlap between the G stores; dxw_g[j] it can.  Likewise for the
    # states: on dS[s, b, j] LLVM's run-time overlap check spans every s and
    # finds the read and written spans interleaved (scalar fallback).
    row = f"{lo}:{hi}" if packed is not None else ""
    sub = f", {row}" if row else ""
    # (with raw_input, view G is dXW's raw block: the raw input's gradient, no bias)
    views = "\n".join(
        [f"dxw{g} = dXW[t, b, {span(g)}]" for g in range(cell.n_input_blocks)]
        + [f"ds{s} = dS[{s}, b{sub}]\nhp{s} = States[{s}, p, b{sub}]" for s in range(S)]
        + [f"sv{k} = Saved[{k}, t, b{sub}]" for k in range(K)]
        + [f"dRr = dR[b{sub}]" if proj else f"dyr = dY[t, b{sub}]"]
        + [f"pv{i} = unit_params[{span(i)}]\ndpv{i} = d_unit_params[c, {span(i)}]"
           for i in range(NP)]
        + [f"pv{i} = unit_params[{span(i)}]" for i in range(NP, NP + cell.n_hyper)]
        + ([f"mrr = Mr[b{sub}]"] if rdrop else [])
        + ([f"dhv = dH[0, b{sub}]"] if packed is not None and rec else []))
    if packed is None:
        hviews = "" if (same or not rec) else "\n".join(
            f"    dhu{r} = dHU[hd, t, b, {r} * dh:{r + 1} * dh]" for r in range(Gr))
        elem_head = ("for hd in range(NH):\n" + (hviews + "\n" if hviews else "")
                     + "    for i in range(dh):\n        j = hd * dh + i")
    else:
        if not same and rec:
            views += "\n" + "\n".join(f"dhu{r} = dHU[0, t, b, {span(r)}]" for r in range(Gr))
        elem_head = "for e in range(j_hi - j_lo):\n    j = j_lo + e"
    elem_pad = 8 if packed is None else 4
    body = [views]
    if not cell.normalize:
        step = zwrap(backward_call(cell, saved=saved, prev=prev, dstate=dstate, p=pp, dxw=dxw,
                                   dhu=dhu, dprev=dprev, dp=dp, indent=0))
        body.append(elem_head + "\n" + ind(step, elem_pad))
    else:
        def zhat(k):
            return f"Zhat[{k}, t, b, j]"

        st2 = backward2_call(cell, saved=saved,
                             zn=lambda k: f"({zhat(k)} * Gz[{k} * H + j] + Bz[{k} * H + j])",
                             mid=lambda m: f"Mid[{m}, t, b, j]", prev=prev, dstate=dstate, p=pp,
                             dzn=lambda k: f"DZ[{k}, b, j]", dmid=lambda m: f"DM[{m}, b, j]",
                             dprev=dprev, dp=dp, indent=0)
        st2 = zwrap(st2)
        acc = "\n".join(f"dGz[c, {k} * H + j] += DZ[{k}, b, j] * {zhat(k)}\n"
                        f"dBz[c, {k} * H + j] += DZ[{k}, b, j]\n"
                        f"DZ[{k}, b, j] = DZ[{k}, b, j] * Gz[{k} * H + j]"
                        for k in range(cell.n_norm))
        body.append("for hd in range(NH):\n    for i in range(dh):\n        j = hd * dh + i\n"
                    + ind(st2, 8) + "\n" + ind(acc, 8))
        for k in range(cell.n_norm):
            body.append(row_norm_backward(cell.normalize_kind, ["for j in range(H):"],
                                          f"DZ[{k}, b, j]", zhat(k), "H", f"Rz[{k}, t, b]",
                                          indent=0, prefix=f"z{k}_"))
        st1 = backward1_call(cell, mid=lambda m: f"Mid[{m}, t, b, j]", prev=prev,
                             dz=lambda k: f"DZ[{k}, b, j]", dmid=lambda m: f"DM[{m}, b, j]",
                             p=pp, dxw=dxw, dhu=dhu, dprev=dprev, dp=dp, indent=0)
        body.append(elem_head + "\n" + ind(st1, 8))
    # Bias gradients: summed per row after the element loop, from the row just
    # written (hot in cache); inside the loop the G strided updates of one
    # array would stop LLVM from vectorising it.
    # (the dxw views span the thread's units j_lo:j_hi, all H when not packed)
    body.append("\n".join(f"dbi{g} = db_ih[c, {g} * H + j_lo:{g} * H + j_hi]\n"
                          f"for e in range(j_hi - j_lo):\n    dbi{g}[e] += dxw{g}[e]"
                          for g in range(G)))
    if rec and not same and packed is not None:
        body.append("\n".join(f"dbh{r} = db_hh[c, {span(r)}]\n"
                              f"for e in range(j_hi - j_lo):\n    dbh{r}[e] += dhu{r}[e]"
                              for r in range(Gr)))
    elif rec and not same:
        body += _hu_backward(Gr, rnorm, tt, irange)
    active = ind("\n".join(body), 16)
    masked = ("                for g in range(G):\n"
              "                    for u in range(j_hi - j_lo):\n"
              "                        dXW[t, b, g * H + j_lo + u] = 0")
    mrj = " * Mr[b, hd * dh + i]" if rdrop else ""
    if not cell.reads_h_only:
        masked += "\n                for j in range(H):\n" + "\n".join(
            f"                    dS[{s}, b, j] += dH[0, b, {k} * H + j]" for k, s in enumerate(rs))
    elif rec and not proj:
        masked += ("\n                for hd in range(NH):\n"
                   f"                    for i in {irange}:\n"
                   f"                        dS[0, b, hd * dh + i] += dH[hd, b, i]{mrj}")
    if rec:
        masked += ("\n                for hd in range(NH):\n"
                   f"                    for r in range({Gr}):\n"
                   f"                        for i in {irange}:\n"
                   "                            dHU[hd, t, b, r * dh + i] = 0")
    gemm = ("        for hd in range(NH):\n"
            "            np.dot(dHU[hd, t, b0:b1], W[hd], dH[hd, b0:b1])" if rec else "")
    if packed is not None:  # dH is [1, B, Hpad] here: tiles of the last panel store past H
        mr, nu = packed
        tiles = mk.row_tiles_source(
            mr, nu, mk.tail_heights(mr, exact=False), "b0", "b1",
            lambda tile, i0: f"{tile}(A, {i0}, b1, W, jb, dH[0], {i0}, jb * {nu}, 0)")
        gemm = f"""        if nthr > 1:  # dH needs every unit's dHU of this step
            step_barrier(flags, tid, nthr, step + 1)
        A = dHU[0, t]
        for jb in range(jb0, jb1):
{ind(tiles, 12)}"""
    final = ("    for hd in range(NH):\n        for b in range(b0, b1):\n"
             f"            for i in {irange}:\n"
             f"                dS[0, b, hd * dh + i] += dH[hd, b, i]{mrj}") if rec else ""
    if not cell.reads_h_only:
        final = "    for b in range(b0, b1):\n        for j in range(H):\n" + "\n".join(
            f"            dS[{s}, b, j] += dH[0, b, {k} * H + j]" for k, s in enumerate(rs))
    pre = ""
    if proj:
        final = ("    for b in range(b0, b1):\n        for k in range(dSp.shape[1]):\n"
                 "            dSp[b, k] += dH[0, b, k]")
        pre = """        for b in range(b0, b1):
            if t < lengths[b]:
                for k in range(dSp.shape[1]):
                    dHp[t, b, k] = dY[t, b, k] + dH[0, b, k] + dSp[b, k]
                    dSp[b, k] = 0
            else:
                for k in range(dSp.shape[1]):
                    dSp[b, k] += dH[0, b, k]
                    dHp[t, b, k] = 0
        np.dot(dHp[t, b0:b1], Wr, dR[b0:b1])
"""
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
{BACKWARD.signature("backward_loop")}
    """BPTT for rows b0:b1{", unit blocks jb0:jb1" if packed is not None else ""}."""
    T = dY.shape[0]
    H = dS.shape[2]
    G = dXW.shape[2] // H
    NH = dHU.shape[0]
    dh = H // NH
    j_lo = {"0" if packed is None else f"max(jb0 * {packed[1]}, 0)"}
    j_hi = {"H" if packed is None else f"min(jb1 * {packed[1]}, H)"}
    for hd in range(dH.shape[0]):
        for b in range(b0, b1):
            for i in range({"dH.shape[2]" if packed is None else
                            f"j_lo, min(jb1 * {packed[1]}, dH.shape[2])"}):
                dH[hd, b, i] = 0
    for step in range(T):
        if reverse:
            t = step
            p = t + 1
        else:
            t = T - 1 - step
            p = t
{pre}        for b in range(b0, b1):
            c = chunk[b]
            if t < lengths[b]:
{active}
            else:
{masked}
{gemm}
{final}
'''


def same_input_and_recurrent_grads(cell) -> bool:
    """True when every gate's input and recurrent pre-activations get one gradient.

    The CPU fast path for cells whose input and recurrent pre-activations
    enter only as a sum (LSTM, Elman): their gradients ``dxw`` and ``dhu`` are
    then equal, so BPTT stores them once (``dHU`` shares ``dXW``'s memory: one
    ``[T, B, G*H]`` array less to write and read) and ``b_hh``'s gradient is a
    copy of ``b_ih``'s.  Only for plain cells (no per-unit parameters or
    norms; hyperparameters, mere values in the step, do not matter here).  A structural
    fact of the cell (:attr:`kernrnn.cell.Cell.same_grads`):
    of the derivation for a forward-only cell, of its ``return`` for a
    hand-written backward.
    """
    return bool(cell.plain_layout and cell.same_grads and all(cell.same_grads))


def _staged_backward(cell, reg) -> str:
    """BPTT of a staged cell for rows b0:b1: per step the stages' backwards in reverse, each a
    pass over the rows, and between them the products' ``dm = dhm @ W_m`` (one GEMM each);
    ``dHM`` keeps every step's ``dhm`` for the weight gradients after the loop.  The last
    stage's pass also handles finished rows (their products' gradients are zero)."""
    rdrop, zone = reg
    G, Gr = cell.n_gates, cell.n_recurrent_gates
    rec, rnorm = cell.has_recurrent, cell.recurrent_norm
    tt = "t" if rnorm is not None else "0"
    S, K, NP = cell.n_state, cell.n_saved, cell.n_param_scalars
    layout = staged_layout(cell)
    NS = len(layout) + 1
    rs = cell.recurrent_state_indices
    multi = not cell.reads_h_only
    mr_ = " * mrr[j]" if rdrop else ""
    ds0 = "ds0[j] + dyr[j]" + (f" + dH[hd, b, i]{mr_}" if rec and not multi else "")

    def arriving(q):
        head = ds0 if q == 0 else f"ds{q}[j]"
        return head + (f" + dH[0, b, {rs.index(q)} * H + j]" if multi and q in rs else "")

    dstate, zwrap = zoneout_backward(S, arriving, lambda q: f"ds{q}[j]", zone)

    def prev(q):
        return f"hp{q}[j]"

    def pp(i):
        return f"pv{i}[j]"

    def dp(i):
        return f"dpv{i}[j]"

    def dprev(q):
        return f"ds{q}[j]"

    elem = "for hd in range(NH):\n    for i in range(dh):\n        j = hd * dh + i"
    common = ([f"ds{q} = dS[{q}, b]\nhp{q} = States[{q}, p, b]" for q in range(S)]
              + [f"pv{i} = unit_params[{i} * H:{i + 1} * H]\n"
                 f"dpv{i} = d_unit_params[c, {i} * H:{i + 1} * H]" for i in range(NP)]
              + [f"pv{i} = unit_params[{i} * H:{i + 1} * H]"
                 for i in range(NP, cell.n_unit_scalars)])

    def zin(s):  # what stage s received from the products before it, at (t, b, j)
        out = []
        for q, _, Gq, gq, _ in layout[s - 1]["products"]:
            out += [f"HM{q}[t, b, {g} * H + j] + bM[{gq + g} * H + j]" for g in range(Gq)]
        return out

    def dzin(s):
        out = []
        for q, _, Gq, _, _ in layout[s - 1]["products"]:
            out += [f"dHM{q}[t, b, {g} * H + j]" for g in range(Gq)]
        return out

    passes = []
    for s in range(NS - 1, -1, -1):
        last, first = s == NS - 1, s == 0
        kw = dict(prev=prev, p=pp, dp=dp, dprev=dprev)
        views = list(common)
        if s:
            z, dz_ = zin(s), dzin(s)
            mo = layout[s - 1]["moff"]
            kw.update(zn=lambda k, z=z: z[k], mid=lambda m, o=mo: f"Mid[{o + m}, t, b, j]",
                      dzn=lambda k, d=dz_: d[k], dmid_out=lambda m, o=mo: f"DM[{o + m}, b, j]")
        if last:
            views += [f"sv{k} = Saved[{k}, t, b]" for k in range(K)] + ["dyr = dY[t, b]"]
            views += ["mrr = Mr[b]"] if rdrop else []
            kw.update(own=lambda k: f"sv{k}[j]", dstate=dstate)
        else:
            bnd = layout[s]
            kw.update(own=lambda m, o=bnd["moff"]: f"Mid[{o + m}, t, b, j]",
                      dz=lambda k, o=bnd["zoff"]: f"DZ[{o + k}, b, j]",
                      dmid=lambda m, o=bnd["moff"]: f"DM[{o + m}, b, j]")
        head = elem
        if first:
            views += [f"dxw{g} = dXW[t, b, {g} * H:{g + 1} * H]" for g in range(G)]
            if rec:
                head = ("for hd in range(NH):\n" + "\n".join(
                    f"    dhu{r} = dHU[hd, t, b, {r} * dh:{r + 1} * dh]" for r in range(Gr))
                    + "\n    for i in range(dh):\n        j = hd * dh + i")
            kw.update(dxw=lambda g: f"dxw{g}[j]", dhu=lambda r: f"dhu{r}[i]")
        call_src = stage_backward_call(cell, s, indent=0, **kw)
        if last:
            call_src = zwrap(call_src)
        body = ["\n".join(views), head + "\n" + ind(call_src, 8)]
        if first:
            body.append("\n".join(f"dbi{g} = db_ih[c, {g} * H:{g + 1} * H]\n"
                                   f"for e in range(H):\n    dbi{g}[e] += dxw{g}[e]"
                                   for g in range(G)))
            if rec:
                body += _hu_backward(Gr, rnorm, tt)
        text = ("for b in range(b0, b1):\n    c = chunk[b]\n    if t < lengths[b]:\n"
                + ind("\n".join(body), 8))
        if last:  # a finished row: no gradient into this step; the carried one passes on
            masked = [f"dXW[t, b, {g} * H + j] = 0" for g in range(G)]
            for bnd in layout:
                for q, _, Gq, _, _ in bnd["products"]:
                    masked += [f"dHM{q}[t, b, {g} * H + j] = 0" for g in range(Gq)]
            if multi:
                masked += [f"dS[{q}, b, j] += dH[0, b, {k} * H + j]" for k, q in enumerate(rs)]
            text += "\n    else:\n        for j in range(H):\n" + ind("\n".join(masked), 12)
            if rec:
                heads = [f"dHU[hd, t, b, {r} * dh + i] = 0" for r in range(Gr)]
                if not multi:
                    heads.append(f"dS[0, b, hd * dh + i] += dH[hd, b, i]"
                                 f"{' * Mr[b, hd * dh + i]' if rdrop else ''}")
                text += ("\n        for hd in range(NH):\n            for i in range(dh):\n"
                         + ind("\n".join(heads), 16))
        passes.append(text)
        if not first:  # the products before stage s, backward: dm = dhm @ W_m
            for q, _, Gq, gq, zrow in layout[s - 1]["products"]:
                passes.append(f"np.dot(dHM{q}[t, b0:b1], WMb[H * H * {gq}:H * H * "
                              f"{gq + Gq}].reshape(({Gq} * H, H)), DZ[{zrow}, b0:b1])")
    if rec:
        passes.append("for hd in range(NH):\n    np.dot(dHU[hd, t, b0:b1], W[hd], dH[hd, b0:b1])")
    if rec and multi:
        final = ("for b in range(b0, b1):\n    for j in range(H):\n" + "\n".join(
            f"        dS[{q}, b, j] += dH[0, b, {k} * H + j]" for k, q in enumerate(rs)))
    elif rec:
        final = ("for hd in range(NH):\n    for b in range(b0, b1):\n        for i in range(dh):\n"
                 f"            dS[0, b, hd * dh + i] += dH[hd, b, i]"
                 f"{' * Mr[b, hd * dh + i]' if rdrop else ''}")
    else:
        final = ""
    views = staged_views(cell, "T") + "\n" + staged_views(cell, "T", "dHM")
    return f'''
@numba.njit(cache=True, nogil=True, error_model="numpy")
{BACKWARD_STAGED.signature("backward_loop")}
    """BPTT of a staged step for rows b0:b1."""
    T = dY.shape[0]
    H = dS.shape[2]
    B = dS.shape[1]
    NH = dHU.shape[0]
    dh = H // NH
{ind(views, 4)}
    for hd in range(dH.shape[0]):
        for b in range(b0, b1):
            for i in range(dH.shape[2]):
                dH[hd, b, i] = 0
    for step in range(T):
        if reverse:
            t = step
            p = t + 1
        else:
            t = T - 1 - step
            p = t
{ind(chr(10).join(passes), 8)}
{ind(final, 4)}
'''


def _hu_backward(Gr: int, rnorm, tt: str, irange: str = "range(dh)") -> list[str]:
    """Source of one row's step: ``b_hh``'s gradient from ``dHU`` and, with a recurrent
    norm, its gain's gradient and the norm's backward (``dHU`` becomes the product's)."""
    u = "r * H + hd * dh + i"
    v = "dHU[hd, t, b, r * dh + i]"
    hu_sum = ["for hd in range(NH):", f"    for r in range({Gr}):",
              f"        for i in {irange}:", f"            db_hh[c, {u}] += {v}"]
    if rnorm is not None:
        hu_sum += [f"            dg_hh[c, {u}] += {v} * HU[{tt}, hd, b, r * dh + i]",
                   f"            {v} = {v} * g_hh[{u}]"]
    out = ["\n".join(hu_sum)]
    if rnorm is not None:
        loops = ["for hd in range(NH):", "for i in range(dh):"]
        xhat = f"HU[{tt}, hd, b, r * dh + i]"
        if rnorm.over == "gate":
            out.append(f"for r in range({Gr}):\n" + ind(row_norm_backward(
                rnorm.kind, loops, v, xhat, "H", f"Rhh[{tt}, b, r]", indent=0,
                prefix="n_"), 4))
        else:
            out.append(row_norm_backward(
                rnorm.kind, [f"for r in range({Gr}):"] + loops,
                v, xhat, f"{Gr} * H", f"Rhh[{tt}, b, 0]", indent=0, prefix="n_"))
    return out
