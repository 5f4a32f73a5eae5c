"""``kernrnn.warmup``: wait for the compiled kernels instead of the NumPy first tier.

On the CPU a new cell's first calls run the NumPy first tier while its
kernels compile in the background (:mod:`kernrnn.backends.cpu.tiers`).  A
benchmark, or a run that wants kernel speed from its first step, calls
:func:`warmup` first.
"""

from __future__ import annotations

__all__ = ["warmup"]


def warmup(layer=None, *, batch_size: int = 1, training: bool | None = None,
           timeout: float | None = None) -> bool:
    """Have the CPU kernels ready; returns True when they are.

    Without ``layer``: wait (up to ``timeout`` seconds) for every background
    build under way.  With a :class:`kernrnn.RNN` (or an object with its
    ``cell``, ``dtype``, ``input_size``, ``hidden_size``): build, in this
    thread, the kernels its calls of ``batch_size`` rows run, for training or
    inference (default: the layer's mode).  Variants with dropout, zoneout or
    a projection compile at their first call, as without tiers.  A failed
    build raises its error here.
    """
    import numpy as np

    from kernrnn.backends.cpu import host, tiers

    if layer is None:
        return tiers.wait(timeout=timeout)
    if getattr(layer, "device", "cpu") != "cpu":
        return True
    mode = getattr(layer, "training", True) if training is None else training
    tiers.compile_now(host.build, layer.cell, np.dtype(layer.dtype), bool(mode), int(batch_size),
                      int(layer.input_size), int(layer.hidden_size))
    return True
