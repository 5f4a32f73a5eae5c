"""Recurrent regularisation inside the fused kernels: variational dropout and zoneout.

* **Variational (recurrent) dropout** (Gal & Ghahramani 2016): one mask per
  sequence on the recurrent input ``h_{t-1}`` before the recurrent product,
  and optionally one on the layer input ``x_t``; the same mask at every step,
  inverted (kept units are scaled by ``1/(1-p)``) so evaluation needs no
  rescaling.  Cells without a recurrent product (``recurrent="none"``) have no
  recurrent input to drop: ``recurrent_dropout`` is refused for them, while
  ``input_dropout`` and ``zoneout`` apply as for any cell.
* **Zoneout** (Krueger et al. 2017) on each state component separately: in
  training each unit keeps its previous value with probability ``z_s``, with a
  fresh mask at every step; in evaluation the state is the expectation
  ``z_s * prev + (1 - z_s) * new``, as in the paper.

Every mask is a pure function of (seed, layer, direction, purpose, t, b, j)
through Philox-4x32-10 (:mod:`kernrnn.philox`): the kernels compute the
zoneout masks where they use them, the per-sequence dropout masks (``[B, H]``
and ``[B, I]``) are made once per call on the layer's device, backward
regenerates them, and CPU, CUDA and the float64 reference agree bit for bit.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from kernrnn import philox

__all__ = ["Regularization", "RegularizationCall", "KernelArrays", "kernel_arrays",
           "recurrent_mask", "input_mask", "zoneout_keep", "call_seed", "seed_words"]


def _rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} "
                        f"{value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class Regularization:
    """The regularisation of one layer stack; all rates in [0, 1], zoneout one per state."""

    recurrent_dropout: float = 0.0
    input_dropout: float = 0.0
    zoneout: tuple[float, ...] = ()

    @classmethod
    def build(cls, cell, recurrent_dropout=0.0, input_dropout=0.0, zoneout=0.0):
        """Check the user's values against ``cell`` (``zoneout``: a float or one per state)."""
        rd = _rate(recurrent_dropout, "recurrent_dropout")
        xd = _rate(input_dropout, "input_dropout")
        S = cell.n_state
        if isinstance(zoneout, (tuple, list)):
            if len(zoneout) != S:
                raise ValueError(f"zoneout must be one rate or {S} rates, one per state "
                                 f"{cell.state} of cell {cell.name!r}, got {len(zoneout)}: "
                                 f"{tuple(zoneout)!r}")
            zo = tuple(_rate(z, f"zoneout[{s}] ({cell.state[s]})") for s, z in enumerate(zoneout))
        else:
            zo = (_rate(zoneout, "zoneout"),) * S
        if rd > 0 and not cell.has_recurrent:
            raise ValueError(
                f"recurrent_dropout={rd} needs a recurrent product, but cell {cell.name!r} has "
                f"recurrent='none' (no W_hh h to drop from); use input_dropout or zoneout")
        if rd > 0 and not cell.reads_h_only:
            raise ValueError(
                f"recurrent_dropout={rd} masks h before W_hh, but cell {cell.name!r} feeds the "
                f"recurrent product recurrent_states={cell.recurrent_states!r}; expected "
                f"recurrent_dropout=0 for it (use input_dropout or zoneout)")
        return cls(rd, xd, zo if any(zo) else ())

    @property
    def active(self) -> bool:
        """Whether anything is regularised."""
        return bool(self.recurrent_dropout or self.input_dropout or self.zoneout)

    def flags(self) -> tuple[bool, bool]:
        """``(recurrent dropout, zoneout)``: the kernel variants that must be generated."""
        return self.recurrent_dropout > 0, bool(self.zoneout)


def seed_words(seed: int) -> tuple[int, int]:
    """The two 32-bit key words of a 64-bit seed."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def call_seed(base: int, call: int) -> int:
    """The 64-bit seed of one forward call: SplitMix64 of ``base + call``."""
    z = (int(base) + 0x9E3779B97F4A7C15 * (int(call) + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _sequence_mask(xp, seed, stream, B, N, rate, dtype):
    bits = philox.bits24(seed, stream, philox.SEQUENCE, xp.arange(B)[:, None],
                         xp.arange(N)[None, :], xp=xp)
    keep = bits >= np.uint32(philox.threshold(rate))
    scale = 0.0 if rate >= 1.0 else 1.0 / (1.0 - rate)
    return keep.astype(dtype) * dtype.type(scale)


def recurrent_mask(xp, seed: int, layer: int, direction: int, B: int, H: int, rate: float,
                   dtype):
    """``[B, H]``: 0 for a dropped unit of ``h_{t-1}``, ``1/(1-p)`` for a kept one."""
    stream = philox.stream_id(layer, direction, philox.PURPOSES["recurrent_dropout"])
    return _sequence_mask(xp, seed, stream, B, H, rate, np.dtype(dtype))


def input_mask(xp, seed: int, layer: int, direction: int, B: int, I: int, rate: float,
               dtype):
    """``[B, I]``: the per-sequence mask of the layer's input features."""
    stream = philox.stream_id(layer, direction, philox.PURPOSES["input_dropout"])
    return _sequence_mask(xp, seed, stream, B, I, rate, np.dtype(dtype))


def zoneout_keep(seed: int, layer: int, direction: int, state: int, t: int, B: int, H: int,
                 rate: float):
    """``[B, H]`` bool: the units of state component ``state`` that keep their value at step t.

    NumPy, for the reference and the tests (the kernels compute the same bits
    with :func:`kernrnn.philox.zoneout_words`): one Philox call per element and
    step serves four states, word ``state % 4`` of the stream of group ``state // 4``.
    """
    stream = philox.stream_id(layer, direction, philox.PURPOSES["zoneout"] + state // 4)
    words = philox.philox(t, np.arange(B)[:, None], np.arange(H)[None, :], stream,
                          seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    return (words[state % 4] >> np.uint32(8)) < np.uint32(philox.threshold(rate))


@dataclass(frozen=True)
class RegularizationCall:
    """The regularisation of one forward call of one layer and direction.

    ``seed`` is the call's 64-bit seed (:func:`call_seed`); ``training``
    chooses masks (True) or the evaluation rule (zoneout's expectation, no
    dropout).
    """

    settings: Regularization
    seed: int
    layer: int
    direction: int
    training: bool

    @property
    def recurrent_dropout(self) -> bool:
        """Whether this call drops units of ``h_{t-1}``."""
        return self.training and self.settings.recurrent_dropout > 0

    @property
    def input_dropout(self) -> bool:
        """Whether this call drops input features."""
        return self.training and self.settings.input_dropout > 0

    @property
    def zoneout(self) -> bool:
        """Whether this call zones out (masks in training, expectation in evaluation)."""
        return bool(self.settings.zoneout)

    def flags(self) -> tuple[bool, bool]:
        """``(recurrent dropout, zoneout)``: the kernel variant this call runs."""
        return self.recurrent_dropout, self.zoneout


@dataclass
class KernelArrays:
    """What the kernels of a regularised call take: masks, thresholds, seed words.

    One-element stand-ins where a feature is off.
    """

    Mr: object  # [B, H] recurrent-dropout mask (0 or 1/(1-p))
    Hd: object  # [B, H] scratch: the masked h_{t-1} the recurrent product reads ([B, R*H]:
    # the R states of ``recurrent_states`` side by side)
    Zthr: object  # [S] uint64 zoneout thresholds (training; compared with 24 Philox bits)
    Zp: object  # [S] zoneout rates (evaluation: the expectation)
    seed_lo: int
    seed_hi: int
    zstream: int  # stream word of zoneout state 0 (state s adds s)
    ztrain: int


def kernel_arrays(xp, call, cell, B: int, H: int, dtype) -> KernelArrays:
    """The :class:`KernelArrays` of ``call`` (None: no regularisation) on array module ``xp``."""
    dtype = np.dtype(dtype)
    one = xp.ones((1, 1), dtype=dtype)
    S = cell.n_state
    # a cell with recurrent_states reads its states side by side from Hd (no dropout then)
    Hd = one if cell.reads_h_only else xp.empty((B, cell.n_recurrent_states * H), dtype=dtype)
    if call is None:
        return KernelArrays(one, Hd, xp.zeros(S, dtype=np.uint64), xp.zeros(S, dtype=dtype),
                            0, 0, 0, 0)
    lo, hi = seed_words(call.seed)
    Mr = one
    if call.recurrent_dropout:
        Mr = recurrent_mask(xp, call.seed, call.layer, call.direction, B, H,
                            call.settings.recurrent_dropout, dtype)
        Hd = xp.empty((B, H), dtype=dtype)
    zo = call.settings.zoneout or (0.0,) * S
    Zthr = xp.asarray(np.array([philox.threshold(z) for z in zo], dtype=np.uint64))
    Zp = xp.asarray(np.array(zo, dtype=dtype))
    zstream = philox.stream_id(call.layer, call.direction, philox.PURPOSES["zoneout"])
    return KernelArrays(Mr, Hd, Zthr, Zp, lo, hi, zstream, int(call.training))
