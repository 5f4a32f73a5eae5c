"""Checkpoints: one ``.npz`` file of arrays plus JSON metadata, written atomically.

Layout inside the ``.npz`` (a zip of ``.npy`` members, each CRC-checked):

* ``__meta__``: the JSON metadata as UTF-8 bytes (a uint8 array);
* ``param/<name>``: model parameters;
* ``optim/<slot>/<name>``: optimizer state;
* anything else the caller adds (``history/...``, ``data/...``).

Writing goes to a temporary file in the target directory, is flushed and
fsynced, then renamed over the target with ``os.replace``: a crash leaves
either the old or the new checkpoint, never half of one.  Loading uses
``allow_pickle=False`` and turns every failure (not a zip, truncated, CRC
mismatch, missing metadata, wrong format) into a ``ValueError`` that names the
file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "save_checkpoint", "load_checkpoint"]

FORMAT = "kernrnn-checkpoint"
FORMAT_VERSION = 1
META_KEY = "__meta__"


@dataclass
class Checkpoint:
    meta: dict
    arrays: dict = field(default_factory=dict)

    def group(self, prefix: str) -> dict:
        """Arrays under ``prefix/`` with the prefix removed."""
        p = prefix.rstrip("/") + "/"
        return {k[len(p):]: v for k, v in self.arrays.items() if k.startswith(p)}


def save_checkpoint(path, meta: dict, arrays: dict) -> str:
    """Write ``meta`` (JSON-serialisable) and host ``arrays`` to ``path`` atomically."""
    path = os.fspath(path)
    if META_KEY in arrays:
        raise ValueError(f"array name {META_KEY!r} is reserved for the metadata")
    for k, v in arrays.items():
        if not isinstance(v, np.ndarray):
            raise TypeError(f"checkpoint array {k!r} must be a NumPy array, got {type(v).__name__}")
        if v.dtype == object:
            raise TypeError(f"checkpoint array {k!r} has dtype object (would need pickle)")
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    blob = json.dumps(full, sort_keys=True, allow_nan=False).encode("utf-8")
    payload = {META_KEY: np.frombuffer(blob, dtype=np.uint8), **arrays}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickle)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory, expected a .npz file")

    def bad(why):
        return ValueError(f"checkpoint {path!r} is not a valid kernrnn checkpoint: {why}")

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise bad("not an .npz archive (a bare .npy array)")
        with loaded as npz:
            names = list(npz.files)
            if META_KEY not in names:
                raise bad(f"no {META_KEY!r} member (not written by kernrnn, or truncated)")
            arrays = {k: npz[k] for k in names}
    except ValueError as e:
        if str(e).startswith(f"checkpoint {path!r}"):
            raise
        raise bad(f"corrupt or truncated ({type(e).__name__}: {e})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise bad(f"corrupt or truncated ({type(e).__name__}: {e})") from None
    blob = arrays.pop(META_KEY)
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise bad(f"{META_KEY!r} must be a uint8 byte array, got {blob.dtype} {list(blob.shape)}")
    try:
        meta = json.loads(blob.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"metadata has no 'format': {FORMAT!r} entry")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise bad(f"format version {version!r}; this kernrnn reads version {FORMAT_VERSION}")
    return Checkpoint(meta, arrays)
