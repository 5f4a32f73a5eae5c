"""What every backend does the same way around its time loops.

Written once against an array module ``xp`` (NumPy on the CPU and under the
CUDA simulator, CuPy on a GPU): the input projection with its optional
normalisation, the layouts the loops read the parameters in, the
normalisation backward over whole rows and the weight gradients as large
GEMMs after the loop.  The backends own only the sequential part, the time
loop.

Layouts (time-major): ``XW [T, B, G*H]`` is ``W_ih x`` (normalised and scaled
by its gain when the cell has an input norm; ``b_ih`` is added in the loop);
``W3 [NH, Gr*dh, dh]`` the recurrent weights per head (a dense cell has one
head of ``dh = H`` units); the recurrent pre-activations of head ``k`` are
``HU[t, k, b, r*dh + i]`` for recurrent gate ``r`` of unit ``k*dh + i`` (one
step's products of every head are contiguous), their gradients
``dHU[k, t, b, r*dh + i]`` (one head's over all steps are contiguous, for the
weight gradient), so a dense cell's ``dHU[0]`` is ``[T, B, Gr*H]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernrnn import regularization
from kernrnn.scalar_math import NORM_EPS

__all__ = ["ForwardContext", "TimeBuffers", "time_buffers", "input_dropout", "n_segments",
           "normalize_rows", "normalize_rows_backward", "input_projection", "recurrent_weights",
           "projection_size", "projection_state", "param_vector", "norm_vectors",
           "weight_gradients", "per_unit_gradients", "stage_totals", "product_views",
           "product_weights", "product_gradients"]


@dataclass
class TimeBuffers:
    """The arrays one direction's time loop fills, in the layouts of the module docstring.

    ``States [S, T+1, B, H]`` (time boundaries; ``[S, 2, B, H]``, two slots
    taking turns, in the CPU's fused inference), ``Saved [K, T, B, H]``; for a
    two-stage step ``Mid [NM, T', B, H]``, ``Zhat [NZ, T', B, H]`` and
    ``Rz [NZ, T', B]``; ``HU [T'', NH, B, Gr*dh]`` and ``Rhh [T'', B, nseg]``
    (the normalised recurrent products and their reciprocal deviations).  T'
    is T when training, else 1 (scratch for the current step); T'' is T only
    when training a cell with a recurrent norm.  Unused arrays have one element.
    With a projection (LSTMP, ``weight_hr [P, H]``), ``States[0]`` holds the
    unprojected ``h`` and ``Hp [T+1, B, P]`` the projected one, which the
    recurrent product and the output read.
    """

    States: object
    Saved: object
    Mid: object
    Zhat: object
    Rz: object
    HU: object
    Rhh: object
    Hp: object = None
    HM: object = None  # a staged cell's products, flat (see :func:`product_views`)

    def arrays(self) -> list:
        """Every array of the set (for handing them back to a workspace)."""
        return [a for a in (self.States, self.Saved, self.Mid, self.Zhat, self.Rz, self.HU,
                            self.Rhh, self.Hp, self.HM) if a is not None]


def time_buffers(xp, cell, T: int, B: int, H: int, dtype, training: bool,
                 proj: int = 0, take=None, state_slots=None) -> TimeBuffers:
    """Allocate :class:`TimeBuffers` for one direction (``proj``: the projection size P).

    ``take(shape, dtype)``: where the arrays come from (default ``xp.empty``;
    the CPU backend reuses its own, see :mod:`kernrnn.backends.cpu.workspace`).
    ``state_slots``: time slots of ``States`` when not ``T + 1`` (a kernel that
    keeps only the current state: the CPU's fused inference, two).
    """
    S, K = cell.n_state, cell.n_saved
    Tm = T if training else 1
    take = take if take is not None else (lambda shape, dt: xp.empty(shape, dtype=dt))

    def empty(*shape):
        return take(shape, dtype)

    one = empty(1, 1, 1, 1)
    HM = None
    if cell.normalize:
        Mid, Zhat = empty(cell.n_mid, Tm, B, H), empty(cell.n_norm, Tm, B, H)
        Rz = empty(cell.n_norm, Tm, B)
    elif cell.staged:
        nz, nzin, nm = stage_totals(cell)
        Mid, Zhat, Rz = empty(max(nm, 1), Tm, B, H), empty(nz, Tm, B, H), empty(1, 1, 1)
        HM = empty(Tm * B * nzin * H)
    else:
        Mid, Zhat, Rz = one, one, empty(1, 1, 1)
    if cell.has_recurrent:
        NH = cell.n_heads
        Th = T if (training and cell.recurrent_norm is not None) else 1
        HU = empty(Th, NH, B, cell.n_recurrent_gates * (H // NH))
        nseg = n_segments(cell.recurrent_norm, cell.n_recurrent_gates) \
            if cell.recurrent_norm is not None else 1
        Rhh = empty(Th, B, nseg)
    else:
        HU, Rhh = one, empty(1, 1, 1)
    return TimeBuffers(empty(S, state_slots or T + 1, B, H), empty(K if training else 0, T, B, H),
                       Mid, Zhat, Rz, HU, Rhh, empty(T + 1, B, proj) if proj else None, HM)


def stage_totals(cell) -> tuple[int, int, int]:
    """A staged cell's ``(NZ, NZIN, NM)`` over all boundaries: products' operands, their
    pre-activations (``sum G_q``) and the values passed between stages."""
    from kernrnn.backends.codegen import stage_sizes

    sizes = stage_sizes(cell)
    return tuple(sum(v[k] for v in sizes) for k in range(3))


def product_views(cell, flat, T: int, B: int, H: int) -> dict:
    """Product name -> its ``[T, B, G_q*H]`` view of a flat ``HM``/``dHM`` (product q after
    the products before it, see :func:`kernrnn.backends.codegen.staged_layout`)."""
    from kernrnn.backends.codegen import staged_layout

    out = {}
    for bnd in staged_layout(cell):
        for _, name, G, gq, _ in bnd["products"]:
            out[name] = flat[T * B * H * gq:T * B * H * (gq + G)].reshape(T, B, G * H)
    return out


def product_weights(xp, cell, params, transposed: bool):
    """``(W, b)``: the products' matrices, flat, product after product (``W_q.T`` when
    ``transposed``, as the forward multiplies), and their biases, flat."""
    Ws = [params[f"weight_h{p.name}"] for p in _products_in_order(cell)]
    bs = [params[f"bias_h{p.name}"] for p in _products_in_order(cell)]
    W = xp.concatenate([(w.T if transposed else w).reshape(-1) for w in Ws])
    return xp.ascontiguousarray(W), xp.ascontiguousarray(xp.concatenate(bs))


def _products_in_order(cell):
    """The products in the kernels' order: by boundary, then as declared."""
    from kernrnn.backends.codegen import staged_layout

    by_name = {p.name: p for p in cell.products}
    return [by_name[name] for bnd in staged_layout(cell) for _, name, _, _, _ in bnd["products"]]


def product_gradients(cell, Zhat, dHM, matmul=None) -> dict:
    """``weight_h{name}`` and ``bias_h{name}`` gradients of a staged cell after BPTT: per
    product ``dW = sum_t dhm_t^T m_t`` (one GEMM over all ``T*B`` rows) and the sum of
    ``dhm``.  ``Zhat [NZ, T, B, H]`` holds the operands ``m`` (zero at finished steps),
    ``dHM`` the flat gradients of the products' results."""
    from kernrnn.backends.codegen import staged_layout

    mm = matmul if matmul is not None else _matmul
    _, T, B, H = Zhat.shape
    views = product_views(cell, dHM, T, B, H)
    grads = {}
    for bnd in staged_layout(cell):
        for _, name, G, _, zrow in bnd["products"]:
            d = views[name].reshape(T * B, G * H)
            grads[f"weight_h{name}"] = mm(d.T, Zhat[zrow].reshape(T * B, H))
            grads[f"bias_h{name}"] = d.sum(axis=0)
    return grads


@dataclass
class ForwardContext:
    """What backward needs from one forward call (one layer, one direction)."""

    cell: object
    x: object
    params: dict
    input_cache: object  # (xhat, rstd) of the input norm, or None
    buffers: TimeBuffers
    lengths: object
    reverse: bool
    device: str = "cpu"
    path: str = "gemm"
    reg: object = None  # the call's RegularizationCall, or None
    input_mask: object = None  # [B, I] input-dropout mask applied to x, or None
    panels: object = None  # CPU fused path: W_hh packed for the backward by the forward
    path_asked: str | None = None  # CUDA: the path argument of the forward call
    hyper: tuple | None = None  # the call's hyperparameter values (None: the cell's defaults)
    #: For a parametrised W_hh (kernrnn.cell.RecurrentWeight), the stored weight_hh and the
    #: hyperparameter values the forward's effective one came from, for chaining its gradient
    #: (the backend itself sees only the effective weight, in ``params``).
    stored_weight_hh: tuple | None = None

    @property
    def States(self):
        """``[S, T+1, B, H]``: the states at every time boundary."""
        return self.buffers.States

    @property
    def hidden_size(self) -> int:
        """H, the units of the (unprojected) state."""
        return self.buffers.States.shape[3]

    @property
    def proj_size(self) -> int:
        """P of an LSTMP projection (``weight_hr [P, H]``), 0 without one."""
        return self.buffers.Hp.shape[2] if self.buffers.Hp is not None else 0

    @property
    def released(self) -> bool:
        """True once the backend took the buffers back (``release``): no backward can use it."""
        return self.buffers is None


def input_dropout(xp, call, x):
    """``(x, mask)``: the layer input with variational input dropout applied (one mask per
    sequence, ``[B, I]``), or ``x`` unchanged and None."""
    if call is None or not call.input_dropout:
        return x, None
    T, B, I = x.shape
    M = regularization.input_mask(xp, call.seed, call.layer, call.direction, B, I,
                                  call.settings.input_dropout, x.dtype)
    return x * M[None], M


def n_segments(norm, n_blocks: int) -> int:
    """Normalisation segments per row: one per gate block (``over="gate"``) or one."""
    return n_blocks if norm.over == "gate" else 1


def normalize_rows(xp, X, nseg: int, kind: str):
    """``(xhat, rstd)`` of ``X [N, nseg*L]`` normalised over each of its ``nseg`` segments."""
    N = X.shape[0]
    Xs = X.reshape(N, nseg, -1)
    if kind == "layer":
        Xs = Xs - Xs.mean(axis=2, keepdims=True)
    rstd = 1 / xp.sqrt((Xs * Xs).mean(axis=2) + X.dtype.type(NORM_EPS))
    return (Xs * rstd[:, :, None]).reshape(X.shape), rstd


def normalize_rows_backward(xp, dxhat, xhat, rstd, kind: str):
    """Gradient of the raw rows from the gradient of ``xhat`` (see :func:`normalize_rows`)."""
    N, nseg = rstd.shape
    g = dxhat.reshape(N, nseg, -1)
    xh = xhat.reshape(N, nseg, -1)
    m2 = (g * xh).mean(axis=2, keepdims=True)
    d = g - xh * m2
    if kind == "layer":
        d = d - g.mean(axis=2, keepdims=True)
    return (d * rstd[:, :, None]).reshape(dxhat.shape)


def input_projection(xp, cell, x, params, take=None):
    """``(XW [T, B, G*H], cache)``: ``W_ih x`` for all steps in one GEMM, normalised if asked.

    ``cache`` is ``(xhat, rstd)`` for the normalisation's backward, or None.
    ``take(shape, dtype)`` gives the product's array (see :func:`time_buffers`).
    A cell with ``raw_input`` gets ``XW [T, B, (G+1)*H]``: block G is ``x``
    itself (``I == H``), which the step reads element-wise (no weights, no
    bias, never normalised).
    """
    if cell.raw_input:
        return _raw_input_projection(xp, cell, x, params, take)
    T, B, I = x.shape
    W_ih = params["weight_ih"]
    if take is None:
        XW = xp.matmul(x.reshape(T * B, I), W_ih.T)
    else:
        out = take((T, B, W_ih.shape[0]), x.dtype)
        XW = xp.matmul(x.reshape(T * B, I), W_ih.T, out=out.reshape(T * B, W_ih.shape[0]))
        if cell.input_norm is None:
            return out, None
    cache = None
    if cell.input_norm is not None:
        xhat, rstd = normalize_rows(xp, XW, n_segments(cell.input_norm, cell.n_gates),
                                    cell.input_norm.kind)
        XW = xhat * params["norm_ih_weight"]
        cache = (xhat, rstd)
    return XW.reshape(T, B, W_ih.shape[0]), cache


def _raw_input_projection(xp, cell, x, params, take):
    """:func:`input_projection` of a ``raw_input`` cell: the G blocks of ``W_ih x`` and a
    copy of ``x`` after them, in one ``[T, B, (G+1)*H]`` array."""
    T, B, I = x.shape
    W_ih = params["weight_ih"]
    GH = W_ih.shape[0]
    shape = (T, B, GH + I)
    out = take(shape, x.dtype) if take is not None else xp.empty(shape, dtype=x.dtype)
    rows, x2 = out.reshape(T * B, GH + I), x.reshape(T * B, I)
    cache = None
    if cell.input_norm is None and isinstance(rows, np.ndarray):
        np.matmul(x2, W_ih.T, out=rows[:, :GH])  # BLAS writes the strided rows directly
    elif cell.input_norm is None:
        rows[:, :GH] = xp.matmul(x2, W_ih.T)
    else:
        xhat, rstd = normalize_rows(xp, xp.matmul(x2, W_ih.T),
                                    n_segments(cell.input_norm, cell.n_gates),
                                    cell.input_norm.kind)
        rows[:, :GH] = xhat * params["norm_ih_weight"]
        cache = (xhat, rstd)
    rows[:, GH:] = x2
    return out, cache


def recurrent_weights(cell, params, hidden_size: int):
    """``W_hh`` as ``[NH, Gr*dh, dh]`` (a view; a dense cell's is ``[1, Gr*H, H]``, or
    ``[1, Gr*H, P]`` with a projection), or None."""
    if not cell.has_recurrent:
        return None
    W = params["weight_hh"]
    if cell.recurrent == "dense":
        return W[None]
    return W


def projection_size(params) -> int:
    """P of an LSTMP layer direction (``weight_hr [P, H]`` in ``params``), else 0."""
    W = params.get("weight_hr")
    return 0 if W is None else int(W.shape[0])


def projection_state(xp, h0, proj: int, B: int, H: int, dtype):
    """``(h0 for the kernels, Hp0)``: with a projection, the caller's ``h0[0]`` carries the
    projected h in its first P columns; the kernels' unprojected ``h_0`` is zero (the step
    does not read it, see :meth:`kernrnn.cell.Cell.check_projection`)."""
    hp0 = h0[0, :, :proj].copy()
    h0 = h0.copy()
    h0[0] = 0
    return h0, hp0


def param_vector(xp, cell, params, hidden_size: int, dtype, hyper=None):
    """The per-unit parameters, concatenated in declaration order, then each hyperparameter
    repeated over the H units (``[n_unit_scalars*H]``; a one-element stand-in when the cell
    has neither).  ``hyper``: the values as :meth:`kernrnn.cell.Cell.hyper_vector` gives
    them (None: the defaults), cast to ``dtype`` here, so a new value is new data for the
    same kernels."""
    parts = [params[p.name] for p in cell.params]
    if cell.hyper:
        values = cell.hyper_vector() if hyper is None else hyper
        parts.append(xp.asarray(np.repeat(np.asarray(values, dtype=dtype), hidden_size)))
    if not parts:
        return xp.zeros(1, dtype=dtype)
    return xp.ascontiguousarray(xp.concatenate(parts))


def norm_vectors(xp, cell, params, hidden_size: int, dtype):
    """``(g_hh, Gz, Bz)``: the recurrent-norm gain and the mid-step norms' gains and biases.

    Arrays of one element stand in for the ones the cell does not have.
    """
    one = xp.ones(1, dtype=dtype)
    g_hh = params["norm_hh_weight"] if cell.recurrent_norm is not None else one
    if cell.normalize:
        Gz = xp.concatenate([params[f"norm_{v}_weight"] for v in cell.normalize])
        Bz = xp.concatenate([params[f"norm_{v}_bias"] for v in cell.normalize])
    else:
        Gz = Bz = one
    return g_hh, Gz, Bz


def _matmul(a, b):
    return a @ b


def weight_gradients(xp, cell, ctx, dXW, dHU, recurrent_mask=None, dHp=None, matmul=None):
    """``(dx, grads)`` after the BPTT loop: input, ``W_ih``, ``W_hh`` and the input norm's gain.

    ``dXW [T, B, G*H]`` is the gradient of the input pre-activations (before
    ``b_ih``; ``[T, B, (G+1)*H]`` with ``raw_input``, block G the raw input's
    gradient, added to ``dx``), ``dHU [NH, T, B, Gr*dh]`` that of the raw recurrent products
    (None without them); ``recurrent_mask [B, H]`` the recurrent-dropout mask
    the products read ``h`` through (None without); ``dHp [T, B, P]`` the
    gradient of the projected h of each step (LSTMP; None without), which
    gives ``weight_hr``'s.  Large GEMMs over all ``T*B`` rows; ``@``
    dispatches to NumPy's or CuPy's BLAS, or ``matmul(a, b)`` when given (the
    CPU backend's, which runs them on its own threads).
    """
    mm = matmul if matmul is not None else _matmul
    x = ctx.x
    T, B, I = x.shape
    GH = ctx.params["weight_ih"].shape[0]
    dXW2 = dXW.reshape(T * B, dXW.shape[2])
    draw = None
    if cell.raw_input:  # dXW's block G: the gradient of the raw input the step read
        dXW2, draw = dXW2[:, :GH], dXW2[:, GH:]
    grads = {}
    if cell.input_norm is not None:
        xhat, rstd = ctx.input_cache
        g_ih = ctx.params["norm_ih_weight"]
        grads["norm_ih_weight"] = (dXW2 * xhat).sum(axis=0)
        dXW2 = normalize_rows_backward(xp, dXW2 * g_ih, xhat, rstd, cell.input_norm.kind)
    W_ih = ctx.params["weight_ih"]
    dx = mm(dXW2, W_ih).reshape(T, B, I)
    if draw is not None:
        dx += draw.reshape(T, B, I)
    if ctx.input_mask is not None:  # x is the masked input: d(x * M) / dx = M
        dx *= ctx.input_mask[None]
    grads["weight_ih"] = mm(dXW2.T, x.reshape(T * B, I))
    if dHU is not None:
        H = ctx.States.shape[3]
        # the state each step started from: time boundary t (forward) or t+1 (reverse)
        hs = ctx.States[0] if ctx.buffers.Hp is None else ctx.buffers.Hp
        Hprev = hs[1:] if ctx.reverse else hs[:T]
        if recurrent_mask is not None:  # the product read the masked h
            Hprev = Hprev * recurrent_mask[None]
        if not cell.reads_h_only:  # the states of recurrent_states side by side
            Hprev = xp.concatenate([ctx.States[s, 1:] if ctx.reverse else ctx.States[s, :T]
                                    for s in cell.recurrent_state_indices], axis=2)
        Hprev = Hprev.reshape(T * B, Hprev.shape[2])
        NH = dHU.shape[0]
        dh = H // NH
        if NH == 1:
            dW = mm(dHU[0].reshape(T * B, dHU.shape[3]).T, Hprev)
            grads["weight_hh"] = dW if cell.recurrent == "dense" else dW[None]
        else:
            grads["weight_hh"] = xp.stack([
                dHU[k].reshape(T * B, dHU.shape[3]).T @ Hprev[:, k * dh:(k + 1) * dh]
                for k in range(NH)
            ])
    if dHp is not None:  # h_t = W_hr r_t with r_t the unprojected h, at boundary t+1 or t
        R = ctx.States[0, :T] if ctx.reverse else ctx.States[0, 1:]
        proj = dHp.shape[2]
        grads["weight_hr"] = mm(dHp.reshape(T * B, proj).T, R.reshape(T * B, R.shape[2]))
    return dx, grads


def per_unit_gradients(cell, dP, dg_hh, dGz, dBz, H: int) -> dict:
    """The gradients of the per-unit parameters and mid-step norms, split by name.

    Inputs are the kernels' sums over time and batch (flat, in declaration order).
    """
    grads, i = {}, 0
    for p in cell.params:
        grads[p.name] = dP[i * H:(i + p.blocks) * H]
        i += p.blocks
    if cell.recurrent_norm is not None:
        grads["norm_hh_weight"] = dg_hh
    for k, v in enumerate(cell.normalize):
        grads[f"norm_{v}_weight"] = dGz[k * H:(k + 1) * H]
        grads[f"norm_{v}_bias"] = dBz[k * H:(k + 1) * H]
    return grads

