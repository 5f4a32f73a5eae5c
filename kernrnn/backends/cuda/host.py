"""The host side of the CUDA backend: ``forward`` and ``backward`` of one layer in one
direction, and the time loops they run.

Per layer and direction:

* forward: ``XW = x @ W_ih.T + b_ih`` for all steps in one cuBLAS GEMM, then
  per step one GEMM ``HU = h_{t-1} @ W_hh.T`` and one fused pointwise kernel
  (bias ``b_hh``, the cell's math, lengths masking, output and saved values);
* backward: per step one fused pointwise kernel (adds the pending recurrent
  gradient ``dHrec`` and ``dy_t``, runs the cell's backward, writes
  ``dXW_t``, ``dHU_t`` and the element-wise part of ``dh_{t-1}``) and one GEMM
  ``dHrec = dHU_t @ W_hh``; the weight gradients are large GEMMs afterwards.

So each step costs two launches; nothing waits on the host inside the time
loop.  The per-step GEMMs call cuBLAS directly (:mod:`.stepgemm`); with graphs
on, a loop is replayed as a CUDA graph (:mod:`.graphs`).  Cells without a
recurrent matrix run every step in one launch (or a parallel scan); the
recurrence can instead run in the persistent kernel (:mod:`.paths`).
"""

from __future__ import annotations

import numpy as np

from kernrnn import regularization
from kernrnn.backends import common
from kernrnn.backends.codegen import staged_layout
from kernrnn.backends.common import ForwardContext
from kernrnn.backends.cuda.arrays import xp
from kernrnn.backends.cuda.graphs import layout_key, may_capture, run_loop
from kernrnn.backends.cuda.kernels import SCAN_CHUNK
from kernrnn.backends.cuda.launch import Launcher, get_kernels
from kernrnn.backends.cuda.paths import choose_path, persistent_failed, persistent_module
from kernrnn.backends.cuda.stepgemm import batched_step_gemm, step_gemm

__all__ = ["forward", "backward", "release"]


def _reg_values(ka) -> dict:
    """The regularisation arguments of the step kernels (kernels.REG_ARGS), by name."""
    return dict(Mr=ka.Mr, Hd=ka.Hd, Zthr=ka.Zthr, Zp=ka.Zp, seed_lo=ka.seed_lo,
                seed_hi=ka.seed_hi, zstream=ka.zstream, ztrain=ka.ztrain)


_FORWARD_STEP = ("t", "p", "n", "tt", "tm")  # the forward step kernels' per-step scalars


def _gemm_forward_loop(cell, XW, params, P, buf, Y, lengths, reverse, training, reg, ka):
    """Per step: the recurrent product (cuBLAS; per head for ``heads``), its
    normalisation if any, then the cell's fused step (one or three kernels).
    With recurrent dropout the product reads ``ka.Hd``, the masked state the
    step kernels write."""
    T, B, _ = XW.shape
    H = buf.States.shape[3]
    dtype = XW.dtype
    k = get_kernels(cell, dtype, reg.flags() if reg is not None else (False, False))
    rdrop = reg is not None and reg.recurrent_dropout
    tag = "train" if training else "infer"
    NH = cell.n_heads
    dh = H // NH
    W3 = common.recurrent_weights(cell, params, H)
    b_hh = params["bias_hh"]
    g_hh, Gz, Bz = common.norm_vectors(xp, cell, params, H, dtype)
    keep_hu = buf.HU.shape[0] > 1 or (training and cell.recurrent_norm is not None)
    nseg = buf.Rhh.shape[2]
    proj = buf.Hp is not None  # LSTMP: the product and Y read Hp = States[0] @ W_hr.T

    dense = cell.recurrent == "dense" and not keep_hu
    scratch_in = rdrop or not cell.reads_h_only  # the product reads Hd, which the steps write

    def make_scratch():
        return xp.empty((T, B, H), dtype=dtype) if proj else Y

    def issue(scratch):
        Yk = scratch  # where the step kernels write the (unprojected) h
        # the product's input, by step: the masked h, the projected h or h
        h_in = ka.Hd[None] if scratch_in else (buf.Hp if proj else buf.States[0])
        first = _boundary_slots(T, reverse, training)[0]
        if rdrop:  # into Hd itself: a temporary made during a capture would be baked in
            xp.multiply(buf.States[0, first], ka.Mr, out=ka.Hd)
        elif scratch_in:  # the states of recurrent_states side by side
            for r, s in enumerate(cell.recurrent_state_indices):
                ka.Hd[:, r * H:(r + 1) * H] = buf.States[s, first]
        if dense:
            recurrent_gemm = step_gemm(h_in, params["weight_hh"], buf.HU[0, 0], trans_b=True)
        else:  # one product per head, [B, dh] @ [dh, Gr*dh], into HU's time slot
            heads = h_in.reshape(h_in.shape[0], B, NH, -1).transpose(0, 2, 1, 3)
            heads_gemm = batched_step_gemm(heads, W3, buf.HU, trans_b=True)
        proj_gemm = step_gemm(buf.States[0], params["weight_hr"], buf.Hp, trans_b=True,
                              c_stack=True) if proj else None
        launch = Launcher()
        # each kernel's arguments bound by name before the loop (each array wrapped once)
        values = dict(XW=XW, HU=buf.HU, b_hh=b_hh, g_hh=g_hh, P=P, States=buf.States,
                      Saved=buf.Saved, Mid=buf.Mid, Zhat=buf.Zhat, Y=Yk, lengths=lengths, H=H,
                      dh=dh, Gz=Gz, Bz=Bz, Rhh=buf.Rhh, Rz=buf.Rz, **_reg_values(ka))
        args = k.ARGS

        def bind(name, **extra):
            return launch.bind(args[name], {**values, **extra}, _FORWARD_STEP)

        if cell.normalize:
            stage1, stage2 = bind("step_stage1"), bind(f"step_stage2_{tag}")
            norm_z = bind("norm_z", NSEG=cell.n_norm)
        elif not cell.staged:
            step_args = bind(f"step_forward_{tag}")
        if cell.recurrent_norm is not None:
            norm_hu = bind("norm_hu", NSEG=nseg)
        if proj:
            proj_args = bind("proj_forward", Hp=buf.Hp, Y=Y, NP=buf.Hp.shape[2])
        if cell.staged:  # one kernel per stage, the products' GEMMs between them
            stages, products = _staged_forward(k, cell, params, buf, tag, values, bind)
        for step in range(T):
            t, p, n = _step_indices(step, T, reverse, training)
            tt = t if keep_hu else 0
            tm = t if training else 0
            if dense:
                recurrent_gemm(0 if scratch_in else p)
            else:
                heads_gemm(0 if scratch_in else p, tt)
            if cell.recurrent_norm is not None:
                launch.rows(k.norm_hu, B * nseg, *norm_hu(t, p, n, tt, tm))
            if cell.staged:
                for (kernel, stage_args), gemms in zip(stages, products):
                    launch(kernel, B * H, *stage_args(t, p, n, tt, tm))
                    for gemm in gemms:
                        gemm(tm)
            elif cell.normalize:
                launch(k.step_stage1, B * H, *stage1(t, p, n, tt, tm))
                launch.rows(k.norm_z, B * cell.n_norm, *norm_z(t, p, n, tt, tm))
                launch(getattr(k, f"step_stage2_{tag}"), B * H, *stage2(t, p, n, tt, tm))
            else:
                launch(getattr(k, f"step_forward_{tag}"), B * H, *step_args(t, p, n, tt, tm))
            if proj:
                proj_gemm(n)
                launch(k.proj_forward, B * buf.Hp.shape[2], *proj_args(t, p, n, tt, tm))

    key = None
    if may_capture(cell, reg is not None and any(reg.flags())):
        key = ("forward", cell, np.dtype(dtype).str, bool(training), bool(reverse),
               layout_key(XW, buf.States, buf.Saved, buf.HU, Y, lengths, *params.values(),
                           *((buf.Hp,) if proj else ())))
    run_loop(key, issue, make_scratch)


def _staged_forward(k, cell, params, buf, tag, values, bind):
    """``(stages, products)`` of a staged cell's forward loop: per stage its kernel and bound
    arguments, and the GEMMs ``f(tm)`` that follow it (``HM{q}[tm] = Zhat[row, tm] @
    W_q.T``, one per product of the boundary after it)."""
    layout = staged_layout(cell)
    _, Tm, B, H = buf.Zhat.shape
    views = common.product_views(cell, buf.HM, Tm, B, H)
    _, bM = common.product_weights(xp, cell, params, transposed=False)
    extra = {"bM": bM}
    for bnd in layout:
        for q, name, _, _, _ in bnd["products"]:
            extra[f"HM{q}"] = views[name]
    values.update(extra)
    stages, products = [], []
    for s in range(len(layout) + 1):
        name = f"staged_forward_{tag}" if s == len(layout) else f"staged_forward{s}"
        stages.append((getattr(k, name), bind(name)))
        products.append([] if s == len(layout) else [
            step_gemm(buf.Zhat[zrow], params[f"weight_h{pname}"], views[pname], trans_b=True,
                      c_stack=True) for _, pname, _, _, zrow in layout[s]["products"]])
    return stages, products


def _boundary_slots(T, reverse, training):
    """``(first, last)``: where the initial state goes and the final one ends up in
    ``States`` (time boundaries in training; two slots taking turns in inference)."""
    if not training:
        return 0, T & 1
    return (T, 0) if reverse else (0, T)


def _step_indices(step, T, reverse, training=True):
    """``(t, p, n)``: the step's time, and the time boundaries (inference: the slots) of its
    previous and new state."""
    if not training:
        p = step & 1
        return (T - 1 - step if reverse else step), p, 1 - p
    if reverse:
        t = T - 1 - step
        return t, t + 1, t
    return step, step, step + 1


def _fused_forward(cell, XW, P, buf, Y, lengths, reverse, training, reg, ka):
    """A cell without a recurrent matrix: one launch runs every step of every element,
    or, for a linear-in-state cell, the three launches of a parallel scan over time
    (not with zoneout, whose masks make the step's coefficients)."""
    T, B, _ = XW.shape
    H = buf.States.shape[3]
    flags = reg.flags() if reg is not None else (False, False)
    k = get_kernels(cell, XW.dtype, flags)
    tag = "train" if training else "infer"
    launch = Launcher()
    values = dict(XW=XW, P=P, States=buf.States, Saved=buf.Saved, Y=Y, lengths=lengths,
                  reverse=int(reverse), H=H, dh=H, s0=0, s1=T, **_reg_values(ka))
    if not cell.linear or T <= SCAN_CHUNK or flags[1]:
        name = f"fused_forward_{tag}"
        launch(getattr(k, name), B * H, *launch.bind(k.ARGS[name], values)())
        return
    S = cell.n_state
    NC = (T + SCAN_CHUNK - 1) // SCAN_CHUNK
    CA = xp.empty((S, NC, B, H), dtype=XW.dtype)
    CB = xp.empty_like(CA)
    Start = xp.empty_like(CA)
    Start[:, 0] = buf.States[:, _boundary_slots(T, reverse, training)[0]]
    values.update(CA=CA, CB=CB, Start=Start, T=T, NC=NC, CHUNK=SCAN_CHUNK)
    for name, n in (("scan_reduce", B * H * NC), ("scan_carry", B * H),
                    (f"scan_apply_{tag}", B * H * NC)):
        launch(getattr(k, name), n, *launch.bind(k.ARGS[name], values)())


def forward(cell, x, params, h0, lengths, reverse, training, y=None, path=None, reg=None,
            hyper=None):
    """Run one layer in one direction on the GPU; arguments are already validated.

    ``params`` maps the cell's parameter names to device arrays; ``h0`` is
    ``[S, B, H]``, ``lengths`` int64 ``[B]`` on the device; ``y`` an optional
    ``[T, B, H]`` (possibly strided) view to write the output into; ``reg`` a
    :class:`~kernrnn.regularization.RegularizationCall` or None; ``hyper`` the cell's
    hyperparameter values (:meth:`kernrnn.cell.Cell.hyper_vector`; None: the defaults).
    Returns ``(y, hn, ctx)``; ``ctx`` is None unless ``training``.
    """
    T, B, _ = x.shape
    H = h0.shape[2]
    dtype = x.dtype
    proj = common.projection_size(params)
    chosen = choose_path(path, cell, dtype, B, H, training, reg is not None, bool(proj))
    x, input_mask = common.input_dropout(xp, reg, x)
    ka = regularization.kernel_arrays(xp, reg, cell, B, H, dtype)
    XW, input_cache = common.input_projection(xp, cell, x, params)
    XW[:, :, :cell.n_gates * H] += params["bias_ih"]  # (raw_input: block G is x, no bias)
    # Training keeps the state at every time boundary (for BPTT); inference only the
    # current one, in two slots that take turns (step s reads slot s & 1), as on the CPU.
    buf = common.time_buffers(xp, cell, T, B, H, dtype, training, proj,
                              state_slots=None if training else 2)
    first, last = _boundary_slots(T, reverse, training)
    if proj:
        if not training:
            buf.Hp = xp.empty((2, B, proj), dtype=dtype)
        h0, buf.Hp[first] = common.projection_state(xp, h0, proj, B, H, dtype)
    buf.States[:, first] = h0
    if y is None:
        y = xp.empty((T, B, proj or H), dtype=dtype)
    if T > 0 and B > 0:
        P = common.param_vector(xp, cell, params, H, dtype, hyper)
        if chosen == "persistent":
            try:
                persistent_module().forward_loop(cell, XW, params["weight_hh"],
                                                  params["bias_hh"], buf.States, buf.Saved, y,
                                                  lengths, reverse, training)
            except Exception as exc:  # noqa: BLE001 - raised again where path is explicit
                persistent_failed(path, cell, dtype, B, H, training, exc)
                chosen = "gemm"  # the GEMM loop rewrites everything the kernel may have,
                buf.States[:, first] = h0  # the initial state included (two slots)
        if chosen == "persistent":
            pass
        elif not cell.has_recurrent and not cell.normalize and not cell.staged:
            _fused_forward(cell, XW, P, buf, y, lengths, reverse, training, reg, ka)
        else:
            _gemm_forward_loop(cell, XW, params, P, buf, y, lengths, reverse, training, reg, ka)
    hn = buf.States[:, last].copy()
    if proj:
        hn[0] = 0
        hn[0, :, :proj] = buf.Hp[last]
    ctx = None
    if training:
        ctx = ForwardContext(cell, x, params, input_cache, buf, lengths, reverse, "cuda", chosen,
                             reg=reg, input_mask=input_mask, path_asked=path, hyper=hyper)
    return y, hn, ctx


def _gemm_backward_loop(cell, ctx, dy, dS, dXW, dHU, acc, ka, dHp=None, dSp=None, dHM=None):
    """Per step: the fused backward (one or three kernels), the recurrent norm's
    backward if any, then ``dHrec = dHU_t @ W_hh`` (cuBLAS; per head).

    LSTMP (``dHp [T, B, P]``, ``dSp [B, P]`` given): first the projected h's
    gradient (``proj_backward``) and ``dR[t] = dHp[t] @ W_hr``, which the step
    reads as its output gradient; ``dHrec`` is then ``[1, B, P]`` and the step
    gets zeros for it."""
    params, buf = ctx.params, ctx.buffers
    T, B, _ = dXW.shape
    H = dS.shape[2]
    dtype = dXW.dtype
    k = get_kernels(cell, dtype, ctx.reg.flags() if ctx.reg is not None else (False, False))
    NH = cell.n_heads
    dh = H // NH
    rec = cell.has_recurrent
    W3 = common.recurrent_weights(cell, params, H) if rec else None
    P = common.param_vector(xp, cell, params, H, dtype, ctx.hyper)
    g_hh, Gz, Bz = common.norm_vectors(xp, cell, params, H, dtype)
    DZ = xp.empty((max(cell.n_norm, 1), B, H), dtype=dtype)
    DM = xp.empty((max(cell.n_mid, 1), B, H), dtype=dtype)
    if cell.staged:
        nz, _, nm = common.stage_totals(cell)
        DZ, DM = xp.empty((nz, B, H), dtype=dtype), xp.empty((max(nm, 1), B, H), dtype=dtype)

    proj = dHp is not None
    NP = dHp.shape[2] if proj else 0

    def make_scratch():
        if not proj:
            return (xp.empty((NH, B, dh * cell.n_recurrent_states), dtype=dtype), None, None)
        return (xp.empty((1, B, NP), dtype=dtype), xp.zeros((1, B, H), dtype=dtype),
                xp.empty((T, B, H), dtype=dtype))

    def issue(scratch):
        dHrec, zeros, dR = scratch
        dHrec.fill(0)
        launch = Launcher()
        dense = cell.recurrent == "dense"
        if dense:
            recurrent_gemm = step_gemm(dHU[0], params["weight_hh"], dHrec[0], trans_b=False)
        elif rec:  # per head: dHrec[h] = dHU[h, t] @ W3[h]
            heads_gemm = batched_step_gemm(dHU.transpose(1, 0, 2, 3), W3, dHrec[None],
                                           trans_b=False)
        proj_gemm = step_gemm(dHp, params["weight_hr"], dR, trans_b=False, c_stack=True) \
            if proj else None
        # the step reads the projection's dR as its output gradient, and zeros for dHrec
        step_dy, step_dhrec = (dR, zeros) if proj else (dy, dHrec if rec else None)
        # each kernel's arguments bound by name before the loop (each array wrapped once)
        values = dict(dY=step_dy, dS=dS, dHrec=step_dhrec, Saved=buf.Saved, States=buf.States,
                      Mid=buf.Mid, Zhat=buf.Zhat, P=P, lengths=ctx.lengths, dXW=dXW, dHU=dHU,
                      dP=acc["params"], DZ=DZ, DM=DM, Gz=Gz, Bz=Bz, dGz=acc["gz"],
                      dBz=acc["bz"], H=H, dh=dh, Rz=buf.Rz, HU=buf.HU, Rhh=buf.Rhh, g_hh=g_hh,
                      db_hh=acc["bias_hh"], dg_hh=acc["norm_hh"], **_reg_values(ka))
        names = k.ARGS

        def bind(name, **extra):
            return launch.bind(names[name], {**values, **extra}, ("t", "p"))

        nseg = buf.Rhh.shape[2]
        if cell.staged:
            stages = _staged_backward(k, cell, params, buf, dHM, DZ, values, bind)
        elif cell.normalize:
            back2, back1 = bind("step_backward2"), bind("step_backward1")
            norm_z = bind("norm_z_backward", NSEG=cell.n_norm)
        else:
            back = bind("step_backward")
        if cell.recurrent_norm is not None:
            norm_hu = bind("norm_hu_backward", NSEG=nseg)
        if proj:
            NPv = dict(dY=dy, dHrec=dHrec, dSp=dSp, dHp=dHp, NP=NP)
            proj_args, carry_args = bind("proj_backward", **NPv), bind("proj_carry", **NPv)
        elif rec:
            add_args = bind("add_recurrent", dHrec=dHrec)
        for step in range(T):
            t = step if ctx.reverse else T - 1 - step
            p = t + 1 if ctx.reverse else t
            if proj:
                launch(k.proj_backward, B * NP, *proj_args(t, p))
                proj_gemm(t)
            if cell.staged:
                for kernel, stage_args, gemms in stages:
                    launch(kernel, B * H, *stage_args(t, p))
                    for gemm in gemms:
                        gemm(t)
            elif cell.normalize:
                launch(k.step_backward2, B * H, *back2(t, p))
                launch.rows(k.norm_z_backward, B * cell.n_norm, *norm_z(t, p))
                launch(k.step_backward1, B * H, *back1(t, p))
            else:
                launch(k.step_backward, B * H, *back(t, p))
            if not rec:
                continue
            if cell.recurrent_norm is not None:
                launch.rows(k.norm_hu_backward, B * nseg, *norm_hu(t, p))
            if dense:
                recurrent_gemm(t)
            else:
                heads_gemm(t, 0)
        if proj:
            launch(k.proj_carry, B * NP, *carry_args(0, 0))
        elif rec:
            launch(k.add_recurrent, B * H, *add_args(0, 0))

    key = None
    if may_capture(cell, ctx.reg is not None and any(ctx.reg.flags())):
        key = ("backward", cell, np.dtype(dtype).str, bool(ctx.reverse),
               layout_key(dy, dS, dXW, dHU, buf.States, buf.Saved, ctx.lengths,
                           *params.values(), *((dHp, dSp) if proj else ())))
    run_loop(key, issue, make_scratch)


def _staged_backward(k, cell, params, buf, dHM, DZ, values, bind):
    """Per stage of a staged cell, last first: its BPTT kernel, bound arguments and the
    GEMMs ``f(t)`` that follow it (``DZ[row] = dHM{q}[t] @ W_q`` for the products before
    the stage)."""
    layout = staged_layout(cell)
    _, T, B, H = buf.Zhat.shape
    views = common.product_views(cell, buf.HM, T, B, H)
    dviews = common.product_views(cell, dHM, T, B, H)
    _, bM = common.product_weights(xp, cell, params, transposed=False)
    values["bM"] = bM
    for bnd in layout:
        for q, name, _, _, _ in bnd["products"]:
            values[f"HM{q}"], values[f"dHM{q}"] = views[name], dviews[name]
    out = []
    for s in range(len(layout), -1, -1):
        gemms = [] if s == 0 else [
            step_gemm(dviews[name], params[f"weight_h{name}"], DZ[zrow], trans_b=False)
            for _, name, _, _, zrow in layout[s - 1]["products"]]
        out.append((getattr(k, f"staged_backward{s}"), bind(f"staged_backward{s}"), gemms))
    return out


def _fused_backward(cell, ctx, dy, dS, dXW, acc, ka):
    """Backward of :func:`_fused_forward`: one launch, or the parallel scan's three."""
    buf = ctx.buffers
    T, B, _ = dXW.shape
    H = dS.shape[2]
    flags = ctx.reg.flags() if ctx.reg is not None else (False, False)
    k = get_kernels(cell, dXW.dtype, flags)
    P = common.param_vector(xp, cell, ctx.params, H, dXW.dtype, ctx.hyper)
    launch = Launcher()
    values = dict(dY=dy, dS=dS, Saved=buf.Saved, States=buf.States, P=P, lengths=ctx.lengths,
                  dXW=dXW, dP=acc["params"], reverse=int(ctx.reverse), H=H, dh=H, s0=0, s1=T,
                  **_reg_values(ka))
    if not cell.linear or T <= SCAN_CHUNK or flags[1]:
        launch(k.fused_backward, B * H, *launch.bind(k.ARGS["fused_backward"], values)())
        return
    S = cell.n_state
    NC = (T + SCAN_CHUNK - 1) // SCAN_CHUNK
    CA = xp.empty((S, NC, B, H), dtype=dXW.dtype)
    CB, Start = xp.empty_like(CA), xp.empty_like(CA)
    Start[:, 0] = dS
    dP = xp.zeros((NC * B, acc["params"].shape[1]), dtype=dXW.dtype)
    values.update(CA=CA, CB=CB, Start=Start, dP=dP, T=T, NC=NC, CHUNK=SCAN_CHUNK)
    for name, n in (("scan_reduce_backward", B * H * NC), ("scan_carry", B * H),
                    ("scan_apply_backward", B * H * NC)):
        launch(getattr(k, name), n, *launch.bind(k.ARGS[name], values)())
    acc["params"] += dP.reshape(NC, B, -1).sum(axis=0)


def release(ctx: ForwardContext) -> None:
    """``ctx`` will not be used again; nothing to do: CuPy's memory pool already
    reuses the device memory of freed arrays."""


def backward(ctx: ForwardContext, dy, dhn):
    """BPTT for one forward call.  Returns ``(dx, dh0, grads)``.

    ``dy`` is ``[T, B, H]`` (may be a strided view), ``dhn`` ``[S, B, H]``;
    ``grads`` has the keys of the forward call's ``params``.
    """
    cell, params, buf = ctx.cell, ctx.params, ctx.buffers
    T, B, _ = ctx.x.shape
    H = dhn.shape[2]
    dtype = ctx.x.dtype
    G, NH, Gr = cell.n_gates, cell.n_heads, cell.n_recurrent_gates
    dS = xp.array(dhn, dtype=dtype, copy=True)
    proj = common.projection_size(params)
    dHp = dSp = None
    if proj:  # dS[0] is the unprojected h's (the step adds none); dSp the projected h's
        dHp = xp.empty((T, B, proj), dtype=dtype)
        dSp = dS[0, :, :proj].copy()  # a copy: ascontiguousarray may return a view
        dS[0] = 0
    dXW = xp.empty((T, B, cell.n_input_blocks * H), dtype=dtype)  # raw_input: + dx's block
    rec = cell.has_recurrent
    dHU = xp.empty((NH, T, B, Gr * H // NH), dtype=dtype) if rec else \
        xp.empty((1, 1, 1, 1), dtype=dtype)
    # per-(b, j) accumulators, each written by the thread owning the element; summed over b
    acc = {name: xp.zeros((B, max(n, 1)), dtype=dtype) for name, n in (
        ("bias_hh", Gr * H), ("norm_hh", Gr * H), ("params", cell.n_param_scalars * H),
        ("gz", cell.n_norm * H), ("bz", cell.n_norm * H))}
    ka = regularization.kernel_arrays(xp, ctx.reg, cell, B, H, dtype)  # masks regenerated
    dHM = None
    if cell.staged:  # the gradients of the products' results, every step (flat)
        dHM = xp.zeros(T * B * common.stage_totals(cell)[1] * H, dtype=dtype)
    if T > 0 and B > 0:
        path = ctx.path
        if path == "persistent":
            dS_in = dS.copy()  # the kernel updates dS in place; the GEMM loop needs dhn
            try:
                persistent_module().backward_loop(cell, dy, dS, params["weight_hh"],
                                                   buf.States, buf.Saved, ctx.lengths,
                                                   ctx.reverse, dXW, dHU[0])
            except Exception as exc:  # noqa: BLE001 - raised again where path is explicit
                persistent_failed(ctx.path_asked, cell, dtype, B, H,
                                  True, exc)
                dS[...] = dS_in
                path = "gemm"
        if path == "persistent":
            pass
        elif not rec and not cell.normalize and not cell.staged:
            _fused_backward(cell, ctx, dy, dS, dXW, acc, ka)
        else:
            _gemm_backward_loop(cell, ctx, dy, dS, dXW, dHU, acc, ka, dHp, dSp, dHM)
    elif rec:
        dHU.fill(0)
    if proj and (T == 0 or B == 0):
        dHp.fill(0)
    if T == 0 or B == 0:
        dXW.fill(0)
    sums = {name: a.sum(axis=0) for name, a in acc.items()}
    grads = {"bias_ih": dXW[:, :, :G * H].sum(axis=(0, 1))}
    if rec:
        if cell.recurrent_norm is not None:
            grads["bias_hh"] = sums["bias_hh"]
        else:  # [NH, Gr*dh] per head -> gate-major [Gr*H]
            dh = H // NH
            grads["bias_hh"] = dHU.sum(axis=(1, 2)).reshape(NH, Gr, dh).transpose(1, 0, 2) \
                .reshape(Gr * H)
    dx, wgrads = common.weight_gradients(
        xp, cell, ctx, dXW, dHU if rec else None,
        ka.Mr if ctx.reg is not None and ctx.reg.recurrent_dropout else None, dHp)
    grads.update(wgrads)
    if cell.staged:
        grads.update(common.product_gradients(cell, buf.Zhat, dHM))
    if proj:
        dS[0] = 0
        dS[0, :, :proj] = dSp
    grads.update(common.per_unit_gradients(cell, sums["params"], sums["norm_hh"], sums["gz"],
                                           sums["bz"], H))
    return dx, dS, grads
