"""Argument checks shared by the public entry points.

Every failure says which argument, what was expected and what was given.
Nothing is cast or broadcast silently.
"""

from __future__ import annotations

import numbers

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_dtype(dtype, name: str = "dtype") -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_dropout(p) -> float:
    """PyTorch's rule: a probability in [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout must be a number in [0, 1] (the probability of zeroing an "
                         f"element), got {p!r}")
    return float(p)


def to_host(a) -> np.ndarray:
    """A NumPy array of a host or device array (``a`` itself when it is one already)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):  # CuPy
        return a.get()
    return np.asarray(a)


def array_attrs(a, name: str):
    """(shape, dtype) of anything array-like, without copying device arrays."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    return tuple(a.shape), np.dtype(str(a.dtype).replace("torch.", ""))


def check_array(a, name: str, shape: tuple, dtype: np.dtype, finite: bool = False):
    """Check rank, sizes (None = any) and dtype of ``a``."""
    got_shape, got_dtype = array_attrs(a, name)
    want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
    if len(got_shape) != len(shape):
        raise ValueError(
            f"{name} must have {len(shape)} dimensions {want}, got shape {list(got_shape)}"
        )
    for got, exp in zip(got_shape, shape):
        if exp is not None and got != exp:
            raise ValueError(f"{name} must have shape {want}, got {list(got_shape)}")
    if got_dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {dtype} (the layer's dtype; no silent cast), got {got_dtype}"
        )
    if finite and isinstance(a, np.ndarray) and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return a


def check_lengths(lengths, batch: int, T: int):
    """``lengths`` as int64 [B] NumPy array with 0 <= L <= T."""
    if lengths is None:
        return np.full(batch, T, dtype=np.int64)
    if hasattr(lengths, "get") and not isinstance(lengths, (np.ndarray, dict)):
        lengths = lengths.get()  # CuPy array: lengths are small, read them once
    arr = np.asarray(lengths)
    if arr.ndim != 1 or arr.shape[0] != batch:
        raise ValueError(f"lengths must have shape [{batch}] (one per sequence), got {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > T):
        raise ValueError(
            f"lengths must lie in [0, {T}] (T = x.shape[0]), got min {arr.min()} max {arr.max()}"
        )
    return arr.astype(np.int64)


def check_resets(resets, shape: tuple, layout: str = "[T, B]"):
    """``resets`` as a bool NumPy array of ``shape`` (read to the host once: the chunking
    of the time axis is decided there), or None.  ``layout`` names the axes in messages."""
    if resets is None:
        return None
    want = f"{layout} = [{', '.join(str(s) for s in shape)}]"
    if not hasattr(resets, "shape") or not hasattr(resets, "dtype"):
        raise TypeError(f"resets must be a bool array {want} (True where a step starts a new "
                        f"episode), got {type(resets).__name__}")
    got_shape = tuple(resets.shape)
    got_dtype = str(resets.dtype).replace("torch.", "")
    if got_shape != tuple(shape):
        raise ValueError(f"resets must have shape {want} (True where a step starts a new "
                         f"episode), got {list(got_shape)}")
    if got_dtype != "bool":
        raise TypeError(f"resets must have dtype bool (no silent cast), got {got_dtype}")
    if hasattr(resets, "get") and not isinstance(resets, np.ndarray):
        resets = resets.get()  # CuPy array: read once, like the lengths
    elif hasattr(resets, "detach"):  # a torch tensor
        resets = resets.detach().cpu().numpy()
    return np.asarray(resets, dtype=bool)
