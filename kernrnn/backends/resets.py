"""State resets inside a sequence (episode starts), written once above the backends.

A reset mask ``resets [T, B]`` (bool) flags the steps at which a row starts a
new episode: the state entering a flagged step is the layer's initial state
``h0`` of that row (zeros when none is given) instead of the previous step's
state, and no gradient crosses the flag (the gradient reaching that entering
state goes to ``dh0``).  A flag separates step ``t - 1`` from step ``t``; the
reverse direction of a bidirectional layer therefore restarts from ``h0`` when
it enters step ``t - 1`` coming from step ``t``.  Flags at padded steps
(``t >= lengths[b]``) and at ``t = 0`` change nothing and are dropped.

No kernel knows about resets: the time axis is cut into chunks at the steps
where any row resets, and the backend runs once per chunk (lengths clipped to
the chunk) with the entering state of each chunk the carried state with the
flagged rows replaced by their ``h0`` rows (``xp.where``, on the layer's
device, no host synchronisation).  Backward runs the chunks in reverse order
and routes the flagged rows' state gradient to ``dh0``.  So the CPU and the
CUDA backends, every path of theirs and every cell get resets unchanged; the
price is one backend call per chunk: measured at T = 100, B = 32, H = 128
(LSTM, one CPU thread), a training step takes 1.7x as long with a reset
probability of 0.01 per (t, b) and 3.1x with 0.05 (docs: benchmarks,
"Resets").  A mask without an effective flag gives no plan (:func:`plan`
returns None) and the caller runs the backend exactly as without resets.

Zoneout in training draws its masks from the step index inside the kernel, so
a chunk would redraw the masks of its first steps; the layer refuses that
combination.  Recurrent and input dropout use one mask per sequence, the same
in every chunk, and work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernrnn.backends import common

__all__ = ["ResetPlan", "ChunkedContext", "plan", "forward", "backward", "release"]


@dataclass(frozen=True)
class ResetPlan:
    """Where one call's time axis is cut, shared by every layer and direction of the call.

    Chunk ``k`` covers steps ``starts[k]:ends[k]``; ``lengths[k]`` are the
    sequence lengths clipped to it (as the backend takes them); ``flags[k]``
    (``k >= 1``, a device bool array ``[1, B, 1]``) the rows whose state
    restarts from ``h0`` at step ``starts[k]``.
    """

    starts: tuple
    ends: tuple
    lengths: list
    flags: list

    def __len__(self) -> int:
        return len(self.starts)


def effective(resets: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The flags that change something: ``resets`` at active steps (``t < lengths[b]``),
    without step 0 (the state entering it is ``h0`` anyway)."""
    T = resets.shape[0]
    eff = resets & (np.arange(T)[:, None] < lens[None, :])
    if T:
        eff[0] = False
    return eff


def plan(backend, resets: np.ndarray | None, lens: np.ndarray) -> ResetPlan | None:
    """The chunks of a call with host bool ``resets [T, B]`` and int64 ``lens [B]``;
    None when no flag has an effect (the caller then runs the backend as without resets)."""
    if resets is None:
        return None
    eff = effective(resets, lens)
    cuts = np.flatnonzero(eff.any(axis=1))
    if cuts.size == 0:
        return None
    T = resets.shape[0]
    starts = (0, *(int(t) for t in cuts))
    ends = (*starts[1:], T)
    xp = backend.xp
    return ResetPlan(
        starts, ends,
        [backend.lengths(np.clip(lens - t0, 0, t1 - t0)) for t0, t1 in zip(starts, ends)],
        [None] + [xp.asarray(eff[t][None, :, None]) for t in starts[1:]],
    )


@dataclass
class ChunkedContext:
    """What backward needs from a forward call cut into chunks: one backend context per
    chunk, and the attributes of a :class:`~kernrnn.backends.common.ForwardContext` that
    the callers read (``cell``, ``x``, ``device``, ``hidden_size``, ``proj_size``,
    ``released``)."""

    plan: ResetPlan
    chunks: list
    x: object
    reverse: bool

    @property
    def cell(self):
        return self.chunks[0].cell

    @property
    def device(self) -> str:
        return self.chunks[0].device

    @property
    def hidden_size(self) -> int:
        return self.chunks[0].hidden_size

    @property
    def proj_size(self) -> int:
        return self.chunks[0].proj_size

    @property
    def released(self) -> bool:
        return any(c.released for c in self.chunks)


def _boundary(k: int, reverse: bool) -> int:
    """The chunk whose start separates chunk ``k`` from the chunk run just before it."""
    return k + 1 if reverse else k


def forward(backend, rplan: ResetPlan, cell, x, params, h0, reverse, training, y=None, **kw):
    """The backend's ``forward`` with the resets of ``rplan``: ``(y, hn, ctx)``, ``ctx`` a
    :class:`ChunkedContext` (None unless ``training``).  ``kw``: the backend's own
    keyword arguments (``reg``), passed to every chunk."""
    xp = backend.xp
    T, B, _ = x.shape
    if y is None:
        y = xp.empty((T, B, common.projection_size(params) or h0.shape[2]), dtype=x.dtype)
    n = len(rplan)
    order = range(n - 1, -1, -1) if reverse else range(n)
    chunks = [None] * n
    state = h0
    for i, k in enumerate(order):
        if i:
            state = xp.where(rplan.flags[_boundary(k, reverse)], h0, state)
        t0, t1 = rplan.starts[k], rplan.ends[k]
        _, state, chunks[k] = backend.forward(cell, x[t0:t1], params, state, rplan.lengths[k],
                                              reverse, training, y=y[t0:t1], **kw)
    ctx = ChunkedContext(rplan, chunks, x, bool(reverse)) if training else None
    return y, state, ctx


def backward(backend, ctx, dy, dhn):
    """The backend's ``backward`` for a context of either kind: ``(dx, dh0, grads)``."""
    if not isinstance(ctx, ChunkedContext):
        return backend.backward(ctx, dy, dhn)
    xp = backend.xp
    rplan, reverse = ctx.plan, ctx.reverse
    T, B, I = ctx.x.shape
    dx = xp.empty((T, B, I), dtype=ctx.x.dtype)
    dh0 = xp.zeros_like(dhn)
    grads = None
    n = len(rplan)
    order = range(n) if reverse else range(n - 1, -1, -1)  # the forward's order, reversed
    dstate = dhn
    for i, k in enumerate(order):
        t0, t1 = rplan.starts[k], rplan.ends[k]
        dx[t0:t1], dentry, g = backend.backward(ctx.chunks[k], dy[t0:t1], dstate)
        if grads is None:
            grads = {name: v.copy() for name, v in g.items()}
        else:
            for name, v in g.items():
                grads[name] += v
        if i == n - 1:  # the chunk the forward ran first: it started from h0
            dh0 += dentry
        else:  # flagged rows started from h0; the others from the chunk run before
            flags = rplan.flags[_boundary(k, reverse)]
            dh0 += xp.where(flags, dentry, 0)
            dstate = xp.where(flags, 0, dentry)
    return dx, dh0, grads


def release(backend, ctx) -> None:
    """The backend's ``release`` for a context of either kind."""
    if isinstance(ctx, ChunkedContext):
        for c in ctx.chunks:
            backend.release(c)
    else:
        backend.release(ctx)
