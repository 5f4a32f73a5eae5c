"""The CPU backend's host side: ``forward``, ``backward`` and ``release`` of one layer direction.

Each call validates nothing (the layer did), takes its scratch arrays from
the :mod:`~kernrnn.backends.cpu.workspace`, names every kernel argument in
a dict (packed into the kernel's order by
:mod:`~kernrnn.backends.cpu.kernel_args`) and hands the kernels to the
threads (:mod:`~kernrnn.backends.cpu.threads`).  Dense cells go the packed
road (``_forward_fused``), the others BLAS per step.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from kernrnn import regularization
from kernrnn.backends import common
from kernrnn.backends.cpu import first_tier, tiers, timing, tuning
from kernrnn.backends.cpu import microkernel as mk
from kernrnn.backends.cpu.build import FusedKernels, get_kernels, precompile
from kernrnn.backends.cpu.kernel_args import BACKWARD, BACKWARD_STAGED, FORWARD, FORWARD_STAGED
from kernrnn.backends.cpu.packed import inference_panels, training_panels
from kernrnn.backends.cpu.threads import (
    Part,
    launch_timed,
    n_chunks,
    run_chunks,
    run_fused,
    thread_parts,
    threaded_matmul,
)
from kernrnn.backends.cpu.workspace import workspace
from kernrnn.scalar import check_cell_compiles

__all__ = ["xp", "asarray", "lengths", "ForwardContext", "forward", "backward", "release",
           "build"]

xp = np  # the array module of this backend

ForwardContext = common.ForwardContext


def asarray(a) -> np.ndarray:
    """A C-contiguous NumPy array (no dtype change: callers checked it)."""
    return np.ascontiguousarray(a)


def lengths(lens: np.ndarray) -> np.ndarray:
    """The lengths as the kernels take them: the int64 host array itself."""
    return lens


def _reg_args(ka) -> dict:
    """The regularisation arguments of the forward kernels (masks, thresholds, seed)."""
    return dict(Mr=ka.Mr, Hd=ka.Hd, Zthr=ka.Zthr, Zp=ka.Zp, seed_lo=ka.seed_lo,
                seed_hi=ka.seed_hi, zstream=ka.zstream, ztrain=ka.ztrain)


@timing.timed("backend forward")
def forward(cell, x, params, h0, lengths, reverse, training, y=None, reg=None, hyper=None):
    """Run one layer in one direction; arguments are already validated.

    A strided ``y`` (one direction's half of a bidirectional output) is written through a
    contiguous buffer: the kernels then have one signature, the one the background build
    compiled, instead of a second compile for a strided output.

    ``params`` maps the cell's parameter names (``weight_ih``, ...; see
    :meth:`kernrnn.cell.Cell.param_shapes`) to arrays; ``h0`` is ``[S, B, H]``,
    ``lengths`` int64 ``[B]``; ``y`` an optional ``[T, B, H]`` (possibly
    strided) view to write the output into; ``reg`` a
    :class:`~kernrnn.regularization.RegularizationCall` or None; ``hyper`` the cell's
    hyperparameter values (:meth:`kernrnn.cell.Cell.hyper_vector`; None: the defaults).  Returns
    ``(y, hn, ctx)``; ``ctx`` is None unless ``training``.  With a projection
    (``params["weight_hr"]`` ``[proj, H]``, LSTMP) ``y`` is ``[T, B, proj]`` and the
    projected h travels in the first ``proj`` columns of ``h0[0]``/``hn[0]``.
    """
    if y is not None and not y.flags.c_contiguous:
        y_c, hn, ctx = forward(cell, x, params, h0, lengths, reverse, training, None, reg, hyper)
        y[...] = y_c
        return y, hn, ctx
    T, B, I = x.shape
    H = h0.shape[2]
    dtype = x.dtype
    proj = common.projection_size(params)
    if tiers.first_tier_call(build, cell, dtype, training, reg, bool(proj), B, I, H):
        return first_tier.forward(cell, x, params, h0, lengths, reverse, training, y, hyper)
    if tiers.enabled():  # the layer may have left the check of the math to this point
        _check_math(cell, dtype)
    k = get_kernels(cell, dtype, reg.flags() if reg is not None else (False, False), bool(proj))
    x, input_mask = common.input_dropout(np, reg, x)
    ka = regularization.kernel_arrays(np, reg, cell, B, H, dtype)
    if reg is not None and reg.recurrent_dropout:  # the first step's recurrent input: h0, masked
        ka.Hd[...] = h0[0] * ka.Mr
    if k.fused is not None:
        return _forward_fused(k.fused, cell, x, params, h0, lengths, reverse, training, y,
                              reg, ka, input_mask, hyper)
    XW, input_cache = common.input_projection(np, cell, x, params, take=workspace.take)
    buf = common.time_buffers(np, cell, T, B, H, dtype, training, proj, take=workspace.take)
    one = np.ones(1, dtype=dtype)
    WrT, Hp = one.reshape(1, 1), one.reshape(1, 1, 1)
    if proj:
        h0, buf.Hp[T if reverse else 0] = common.projection_state(np, h0, proj, B, H, dtype)
        WrT, Hp = np.ascontiguousarray(params["weight_hr"].T), buf.Hp
    buf.States[:, T if reverse else 0] = h0
    if y is None:
        y = np.empty((T, B, proj or H), dtype=dtype)
    W3 = common.recurrent_weights(cell, params, H)
    WT = np.ascontiguousarray(W3.transpose(0, 2, 1)) if W3 is not None else one.reshape(1, 1, 1)
    b_hh = params["bias_hh"] if cell.has_recurrent else one
    unit_params = common.param_vector(np, cell, params, H, dtype, hyper)
    g_hh, Gz, Bz = common.norm_vectors(np, cell, params, H, dtype)
    kernel = k.forward_train if training else k.forward_infer
    staged = {}
    if cell.staged:  # the recurrent products between the stages
        WMT, bM = common.product_weights(np, cell, params, transposed=True)
        staged = dict(WMT=WMT, bM=bM, HM=buf.HM)
    if T > 0:
        run_chunks(kernel, dict(
            XW=XW, b_ih=params["bias_ih"], WT=WT, b_hh=b_hh, g_hh=g_hh, unit_params=unit_params,
            Gz=Gz, Bz=Bz, States=buf.States, Saved=buf.Saved, Mid=buf.Mid, Zhat=buf.Zhat,
            Rz=buf.Rz, HU=buf.HU, Rhh=buf.Rhh, Y=y, lengths=lengths, reverse=reverse,
            **_reg_args(ka), WrT=WrT, Hp=Hp, **staged), B,
            FORWARD_STAGED if cell.staged else FORWARD)
    hn = buf.States[:, 0 if reverse else T].copy()
    if proj:
        hn[0] = 0
        hn[0, :, :proj] = buf.Hp[0 if reverse else T]
    ctx = None
    if training:
        ctx = ForwardContext(cell, x, params, input_cache, buf, lengths, reverse, reg=reg,
                             input_mask=input_mask, hyper=hyper)
    else:
        workspace.give(*buf.arrays())
    workspace.give(XW)  # the input projection (or its normalised copy): backward needs neither
    return y, hn, ctx


def _forward_fused(f: FusedKernels, cell, x, params, h0, lengths, reverse, training, y, reg,
                   ka, input_mask, hyper=None):
    """:func:`forward` of a dense cell on packed weights (see
    :func:`~kernrnn.backends.cpu.fused_source.fused_path`)."""
    T, B, _ = x.shape
    H = h0.shape[2]
    dtype = x.dtype
    buf = common.time_buffers(np, cell, T, B, H, dtype, training, take=workspace.take,
                              state_slots=None if training else 2)
    first, last = (T if reverse else 0, 0 if reverse else T) if training else (0, T & 1)
    buf.States[:, first] = h0
    if y is None:
        y = np.empty((T, B, H), dtype=dtype)
    prepare, Wb = None, None
    if training:  # fresh weights: packed on the kernel threads
        Wp, Wxp, Wb, prepare = training_panels(f, cell, params, H, dtype)
    else:  # inference: the panels of unchanged weights are reused
        Wp, Wxp = inference_panels(f, cell, params, H)
    unit_params = common.param_vector(np, cell, params, H, dtype, hyper)
    if T > 0:
        run_fused(f.forward_train if training else f.forward_infer, dict(
            X=np.ascontiguousarray(x), Wxp=Wxp, b_ih=params["bias_ih"], Wp=Wp,
            b_hh=params["bias_hh"], unit_params=unit_params, States=buf.States, Saved=buf.Saved,
            Y=y, lengths=lengths, reverse=reverse, **_reg_args(ka)),
            B, Wp.shape[0], f.input_projection, prepare)
    hn = buf.States[:, last].copy()
    ctx = None
    if training:
        workspace.give(Wp, Wxp)
        if T == 0:  # nothing ran, so nothing was packed
            workspace.give(Wb)
            Wb = None
        ctx = ForwardContext(cell, x, params, None, buf, lengths, reverse, reg=reg,
                             input_mask=input_mask, panels=Wb, hyper=hyper)
    else:
        workspace.give(*buf.arrays())
    return y, hn, ctx


@lru_cache(maxsize=None)
def _check_math(cell, dtype) -> None:
    check_cell_compiles(cell, dtype)


def build(cell, dtype, training: bool, B: int, I: int, H: int) -> None:
    """Compile (or load from the kernel cache) the kernels a call of these sizes runs, by
    running them once on two steps of zeros (the background build of
    :mod:`~kernrnn.backends.cpu.tiers`)."""
    _check_math(cell, np.dtype(dtype))  # a broken plugin is named as without tiers
    params = {k: np.zeros(s, dtype=dtype) for k, s in cell.param_shapes(I, H).items()}
    x = np.zeros((2, B, I), dtype=dtype)
    h0 = np.zeros((cell.n_state, B, H), dtype=dtype)
    y, hn, ctx = forward(cell, x, params, h0, np.full(B, 2, dtype=np.int64), False, training)
    if ctx is not None:
        backward(ctx, np.zeros_like(y), np.zeros_like(hn))
        release(ctx)


def release(ctx: ForwardContext) -> None:
    """``ctx`` will not be used again (its layer's backward consumed it): its buffers
    go back to the workspace for the next call."""
    if ctx.path == first_tier.PATH:  # NumPy's own arrays, not the workspace's
        ctx.buffers = None
        return
    workspace.give(*ctx.buffers.arrays())
    if ctx.panels is not None:
        workspace.give(ctx.panels)
    ctx.buffers = ctx.panels = None


@timing.timed("GEMM (BLAS threads)")
def _blas_matmul(a, b):
    """``a @ b`` on BLAS's own threads (the weight gradients of short batches)."""
    return a @ b


@timing.timed("backend backward")
def backward(ctx: ForwardContext, dy, dhn):
    """BPTT for one forward call.  Returns ``(dx, dh0, grads)``.

    ``dy`` is ``[T, B, H]`` (may be a strided view), ``dhn`` ``[S, B, H]``;
    ``grads`` has the keys of the forward call's ``params``.
    """
    if ctx.path == first_tier.PATH:
        return first_tier.backward(ctx, dy, dhn)
    dy = np.ascontiguousarray(dy)  # one kernel signature (a strided dy compiled a second)
    cell, x, params, buf = ctx.cell, ctx.x, ctx.params, ctx.buffers
    T, B, _ = x.shape
    H = dhn.shape[2]
    dtype = x.dtype
    G, NH = cell.n_gates, cell.n_heads
    GrH = cell.n_recurrent_gates * H
    reg = ctx.reg
    proj = common.projection_size(params)
    k = get_kernels(cell, dtype, reg.flags() if reg is not None else (False, False), bool(proj))
    ka = regularization.kernel_arrays(np, reg, cell, B, H, dtype)  # masks regenerated
    dS = np.array(dhn, dtype=dtype, copy=True)
    stand_in = np.ones((1, 1), dtype=dtype)
    Wr, dHp, dSp, dR = stand_in, stand_in.reshape(1, 1, 1), stand_in, stand_in
    if proj:  # dS[0] is the unprojected h's (the step adds none); dSp the projected h's
        Wr = np.ascontiguousarray(params["weight_hr"])
        dHp = workspace.take((T, B, proj), dtype)
        dSp = dS[0, :, :proj].copy()  # a copy: ascontiguousarray may return a view
        dR = np.empty((B, H), dtype=dtype)
        dS[0] = 0
    dXW = workspace.take((T, B, cell.n_input_blocks * H), dtype)  # raw_input: + dx's block
    one = np.ones(1, dtype=dtype)
    if not cell.has_recurrent:
        dHU = one.reshape(1, 1, 1, 1)
    elif k.same_grads:
        dHU = dXW.reshape(1, T, B, G * H)
    else:
        dHU = workspace.take((NH, T, B, GrH // NH), dtype)
    dH = workspace.take((NH, B, proj or H // NH * cell.n_recurrent_states) if k.fused is None else
                        (1, B, -(-H // k.fused.nu) * k.fused.nu), dtype)
    DZ = np.empty((max(cell.n_norm, 1), B, H), dtype=dtype)
    DM = np.empty((max(cell.n_mid, 1), B, H), dtype=dtype)
    staged, dHM = {}, None
    if cell.staged:  # the products' operands' and mid values' gradients, the products'
        nz, nzin, nm = common.stage_totals(cell)
        DZ = np.empty((nz, B, H), dtype=dtype)
        DM = np.empty((max(nm, 1), B, H), dtype=dtype)
        dHM = workspace.take((T * B * nzin * H,), dtype)
        WMb, bM = common.product_weights(np, cell, params, transposed=False)
        staged = dict(WMb=WMb, bM=bM, HM=buf.HM, dHM=dHM)
    loop = k.backward_loop
    if k.fused is not None:
        loop = k.fused.backward_loop
        # the panels the forward packed, or (a context without them) packed now
        W = ctx.panels if ctx.panels is not None else \
            k.fused.pack_backward(params["weight_hh"], H)
    else:
        W = common.recurrent_weights(cell, params, H)
        W = np.ascontiguousarray(W) if W is not None else one.reshape(1, 1, 1)
    unit_params = common.param_vector(np, cell, params, H, dtype, ctx.hyper)
    g_hh, Gz, Bz = common.norm_vectors(np, cell, params, H, dtype)
    nchunk = n_chunks(B)
    # one gradient row per batch chunk, summed after: no two threads add to one
    # element, and the order of the additions is fixed (deterministic, no
    # atomics), the same under either thread split (``chunk[b]``: b's row)
    acc = {name: np.zeros((nchunk, max(n, 1)), dtype=dtype) for name, n in (
        ("db_ih", G * H), ("db_hh", GrH), ("dg_hh", GrH),
        ("d_unit_params", cell.n_param_scalars * H), ("dGz", cell.n_norm * H),
        ("dBz", cell.n_norm * H))}
    rows = [(c * B // nchunk, (c + 1) * B // nchunk) for c in range(nchunk)]
    chunk = np.empty(B, dtype=np.int64)
    for c, (b0, b1) in enumerate(rows):
        chunk[b0:b1] = c
    if T > 0:
        args = dict(
            dY=dy, dS=dS, W=W, States=buf.States, Saved=buf.Saved, Mid=buf.Mid, Zhat=buf.Zhat,
            Rz=buf.Rz, HU=buf.HU, Rhh=buf.Rhh, g_hh=g_hh, unit_params=unit_params, Gz=Gz, Bz=Bz,
            lengths=ctx.lengths, reverse=ctx.reverse, dXW=dXW, dHU=dHU, dH=dH, DZ=DZ, DM=DM,
            Mr=ka.Mr, Zthr=ka.Zthr, Zp=ka.Zp, seed_lo=ka.seed_lo, seed_hi=ka.seed_hi,
            zstream=ka.zstream, ztrain=ka.ztrain, Wr=Wr, dHp=dHp, dSp=dSp, dR=dR, **acc,
            chunk=chunk, **staged)
        spec = BACKWARD_STAGED if cell.staged else BACKWARD
        if k.fused is not None:
            key, parts = thread_parts(loop, dy.shape, B, W.shape[0])
        else:
            key, parts = None, [Part(1, 0, b0, b1, 0, 0) for b0, b1 in rows]
        flags = np.zeros(parts[0].nthr * mk.FLAG_STRIDE, dtype=np.int64)
        work = [[(loop, spec.pack(args, flags=flags, **part._asdict()))] for part in parts]
        if k.fused is not None:
            precompile(loop, work[0][0][1])
        launch_timed(work, key, parts)
    sums = {name: a.sum(axis=0) for name, a in acc.items()}
    with timing.span("weight gradients"):
        dx, grads = common.weight_gradients(
            np, cell, ctx, dXW, dHU if cell.has_recurrent else None,
            ka.Mr if reg is not None and reg.recurrent_dropout else None,
            dHp if proj else None,
            matmul=threaded_matmul if T * B >= tuning.THREADED_GEMM_MIN_ROWS else _blas_matmul)
    if cell.staged:
        if T == 0:
            dHM[...] = 0
        grads.update(common.product_gradients(cell, buf.Zhat, dHM, matmul=_blas_matmul))
        workspace.give(dHM)
    if proj:
        dS[0] = 0
        dS[0, :, :proj] = dSp
    grads["bias_ih"] = sums["db_ih"]
    if cell.has_recurrent:
        grads["bias_hh"] = sums["db_ih"].copy() if k.same_grads else sums["db_hh"]
    grads.update(common.per_unit_gradients(cell, sums["d_unit_params"], sums["dg_hh"], sums["dGz"],
                                           sums["dBz"], H))
    workspace.give(dXW, dHU, dH, dHp)  # views (dHU of an LSTM is dXW's) and stand-ins stay out
    return dx, dS, grads
