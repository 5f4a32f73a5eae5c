"""Philox-4x32-10, the counter-based generator of the regularisation masks.

Salmon et al. (2011, "Parallel random numbers: as easy as 1, 2, 3"): ten
rounds of a bijection keyed by the seed turn a 128-bit counter into 128
random bits.  Every mask value is a pure function of (seed, stream, t, b, j),
so the kernels compute the masks where they use them, backward regenerates
the same ones, no mask array of size T*B*H is ever stored, and the CPU, the
CUDA kernels and the float64 reference agree bit for bit.

Two implementations of the same function: :func:`philox_scalar`, plain
integer arithmetic on explicit ``uint64`` values that Numba compiles into the
CPU and CUDA kernels (:func:`below_scalar`), and :func:`philox`, a vectorised
NumPy version for the reference and the tests.  ``stream`` separates the
uses: (layer, direction, purpose) packed by :func:`stream_id`.
"""

from __future__ import annotations

import numba
import numpy as np

from kernrnn.numba_inline import register

__all__ = ["philox", "philox_scalar", "philox_words", "zoneout_words", "bits24", "threshold",
           "uniform", "below_scalar",
           "stream_id", "PURPOSES", "SEQUENCE"]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
#: The time counter of the per-sequence masks of variational dropout, the same at every step.
SEQUENCE = _MASK32
#: The purpose word of each kind of mask (recurrent dropout on h_{t-1}, input dropout on
#: x_t); zoneout of state s uses ``PURPOSES["zoneout"] + s``.
PURPOSES = {"recurrent_dropout": 0, "input_dropout": 1, "zoneout": 2}


def stream_id(layer: int, direction: int, purpose: int) -> int:
    """The 32-bit stream word of one use: 16 bits of layer, 1 of direction, 15 of purpose."""
    return ((layer & 0xFFFF) << 16) | ((direction & 1) << 15) | (purpose & 0x7FFF)


def philox(c0, c1, c2, c3, k0, k1, xp=np):
    """Philox-4x32-10 on arrays of counters (broadcast), returns four ``uint32`` arrays.

    ``xp`` is the array module (NumPy, or CuPy for masks made on the GPU).
    """
    c = [xp.asarray(v, dtype=xp.uint64) & np.uint64(_MASK32) for v in (c0, c1, c2, c3)]
    c = xp.broadcast_arrays(*c)
    c0, c1, c2, c3 = (v.copy() for v in c)
    k0, k1 = np.uint64(k0 & _MASK32), np.uint64(k1 & _MASK32)
    m0, m1, m32 = np.uint64(_M0), np.uint64(_M1), np.uint64(_MASK32)
    s32 = np.uint64(32)
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(_W0)) & m32
            k1 = (k1 + np.uint64(_W1)) & m32
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = ((p1 >> s32) ^ c1 ^ k0, p1 & m32, (p0 >> s32) ^ c3 ^ k1, p0 & m32)
    return tuple(v.astype(xp.uint32) for v in (c0, c1, c2, c3))


def bits24(seed: int, stream: int, t, b, j, xp=np):
    """The 24 random bits of element (t, b, j) of ``stream`` (the first Philox word >> 8).

    ``t``, ``b``, ``j`` broadcast (use :data:`SEQUENCE` for ``t`` of a
    per-sequence mask).  A mask with rate p drops the elements whose bits are
    below :func:`threshold` (p): exact integer arithmetic, the same in every
    kernel and in the reference.
    """
    x = philox(t, b, j, stream, seed & _MASK32, (seed >> 32) & _MASK32, xp=xp)[0]
    return x >> np.uint32(8)


def threshold(rate: float) -> int:
    """The integer threshold of a rate: ``round(rate * 2**24)`` (rate 1 drops every element)."""
    return int(round(float(rate) * (1 << 24)))


def uniform(seed: int, stream: int, t, b, j, xp=np):
    """Uniform float64 in [0, 1) with 24 random bits (see :func:`bits24`)."""
    return bits24(seed, stream, t, b, j, xp=xp).astype(xp.float64) * (1.0 / (1 << 24))


@register
@numba.njit(inline="always")
def philox_words(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on one counter; every value a ``uint64`` holding 32 bits.

    Returns the four output words (zoneout uses word ``s % 4`` for state ``s``).
    """
    m32 = np.uint64(0xFFFFFFFF)
    s32 = np.uint64(32)
    for r in range(10):
        if r > 0:
            k0 = (k0 + np.uint64(0x9E3779B9)) & m32
            k1 = (k1 + np.uint64(0xBB67AE85)) & m32
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        n0 = (p1 >> s32) ^ c1 ^ k0
        n1 = p1 & m32
        n2 = (p0 >> s32) ^ c3 ^ k1
        n3 = p0 & m32
        c0, c1, c2, c3 = n0, n1, n2, n3
    return c0, c1, c2, c3


@register
@numba.njit(inline="always")
def philox_scalar(c0, c1, c2, c3, k0, k1):
    """The first output word of :func:`philox_words` (the dropout masks use one per element)."""
    return philox_words(c0, c1, c2, c3, k0, k1)[0]


@register
@numba.njit(inline="always")
def zoneout_words(seed_lo, seed_hi, stream, t, b, j):
    """The four 24-bit draws of element (t, b, j): zoneout of states ``4g .. 4g+3`` where
    ``stream`` is the zoneout stream of group g (one Philox call for up to four states)."""
    w = philox_words(np.uint64(t) & np.uint64(0xFFFFFFFF), np.uint64(b), np.uint64(j),
                     np.uint64(stream), np.uint64(seed_lo), np.uint64(seed_hi))
    s8 = np.uint64(8)
    return w[0] >> s8, w[1] >> s8, w[2] >> s8, w[3] >> s8


@register
@numba.njit(inline="always")
def below_scalar(seed_lo, seed_hi, stream, t, b, j, thresh):
    """True when element (t, b, j) of ``stream`` falls below ``thresh`` (see :func:`bits24`).

    For zoneout: the unit keeps its previous value.  All arguments are
    integers; the comparison is exact.
    """
    x = philox_scalar(np.uint64(t) & np.uint64(0xFFFFFFFF), np.uint64(b), np.uint64(j),
                      np.uint64(stream), np.uint64(seed_lo), np.uint64(seed_hi))
    return (x >> np.uint64(8)) < np.uint64(thresh)
