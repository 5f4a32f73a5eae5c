"""Losses with their gradients, masked by sequence lengths.

Each loss returns ``(loss, grad)``: ``loss`` a 0-d array on the inputs' device
(convert it to a Python float only when logging: on a GPU that is the one
host synchronisation per step), ``grad`` the gradient of ``loss`` with respect
to the predictions / logits.  Masked-out elements contribute nothing to the
loss and get a zero gradient.

The loss is a mean over the unmasked elements.  ``denom`` replaces the count
of unmasked elements (callers that know it on the host pass it, which keeps
every operation on the device and lets truncated-BPTT chunks be normalised
consistently).
"""

from __future__ import annotations

import numpy as np

__all__ = ["mse_loss", "cross_entropy_loss", "length_mask", "array_module"]


def array_module(a):
    """NumPy for host arrays, CuPy for CuPy arrays (without importing CuPy)."""
    if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__"):
        return np
    import cupy  # only reached for device arrays, so CuPy is installed

    return cupy


def length_mask(lengths, T: int, xp=np, dtype=np.float32):
    """``[T, B]`` mask: 1 where ``t < lengths[b]``, else 0."""
    lengths = np.asarray(lengths)
    mask = np.arange(T)[:, None] < lengths[None, :]
    return xp.asarray(mask.astype(dtype))


def _check_pair(pred, target, name):
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"{name}: target must have the predictions' shape {list(pred.shape)}, "
            f"got {list(target.shape)}"
        )


def _check_mask(mask, lead_shape, name):
    if mask is not None and tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(
            f"{name}: mask must have shape {list(lead_shape)} (the predictions' leading "
            f"dimensions), got {list(mask.shape)}"
        )


def _inverse(xp, denom, mask, lead_shape, dtype):
    """1/denom as a device scalar; an empty selection (denom 0) gives loss 0, not NaN."""
    if denom is None:
        if mask is None:
            denom = float(np.prod(lead_shape))
        else:
            return 1.0 / xp.maximum(mask.sum(dtype=dtype), 1)
    denom = float(denom)
    if denom < 0:
        raise ValueError(f"denom must be >= 0, got {denom}")
    return xp.asarray(1.0 / denom if denom > 0 else 0.0, dtype=dtype)


def mse_loss(pred, target, mask=None, denom=None):
    """Mean squared error over unmasked elements and output features.

    ``pred`` and ``target`` ``[..., O]``, ``mask`` ``[...]`` (1 keep, 0 drop).
    The mean divides by ``denom * O`` (``denom`` defaults to the number of
    unmasked positions), as PyTorch's ``MSELoss`` divides by all elements.
    """
    _check_pair(pred, target, "mse_loss")
    _check_mask(mask, pred.shape[:-1], "mse_loss")
    xp = array_module(pred)
    diff = pred - target
    if mask is not None:
        diff = diff * mask[..., None].astype(diff.dtype, copy=False)
    n_out = pred.shape[-1]
    scale = _inverse(xp, denom, mask, pred.shape[:-1], pred.dtype) / n_out
    loss = (diff * diff).sum() * scale
    grad = diff * (2 * scale)
    return loss, grad.astype(pred.dtype, copy=False)


def cross_entropy_loss(logits, target, mask=None, denom=None):
    """Softmax cross-entropy (natural log) over unmasked positions.

    ``logits`` ``[..., C]``, ``target`` integer class ids ``[...]``.  Computed
    from log-sum-exp with the maximum subtracted (no overflow for large logits,
    no log of zero), and the gradient ``softmax - onehot`` comes out of the same
    pass: the softmax Jacobian is never formed.  Chained with the output layer
    ``logits = h W^T + b`` this is the fused output-layer-plus-loss step.
    """
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"cross_entropy_loss: target must have shape {list(logits.shape[:-1])} (logits "
            f"without the class axis), got {list(target.shape)}"
        )
    if not np.issubdtype(np.dtype(str(target.dtype)), np.integer):
        raise TypeError(
            f"cross_entropy_loss: target must hold integer class ids, got {target.dtype}")
    _check_mask(mask, logits.shape[:-1], "cross_entropy_loss")
    xp = array_module(logits)
    C = logits.shape[-1]
    lead = logits.shape[:-1]
    n = int(np.prod(lead))
    flat = logits.reshape(n, C)
    shifted = flat - flat.max(axis=1, keepdims=True)
    expd = xp.exp(shifted)
    sumexp = expd.sum(axis=1)
    rows = xp.arange(n)
    ids = target.reshape(n)
    nll = xp.log(sumexp) - shifted[rows, ids]
    grad = expd / sumexp[:, None]
    grad[rows, ids] -= 1
    scale = _inverse(xp, denom, mask, lead, logits.dtype)
    if mask is not None:
        m = mask.reshape(n).astype(logits.dtype, copy=False)
        nll = nll * m
        grad *= m[:, None]
    grad *= scale
    return nll.sum() * scale, grad.reshape(logits.shape).astype(logits.dtype, copy=False)
