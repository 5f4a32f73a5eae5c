"""Checkpoints: one ``.npz`` file of arrays plus JSON metadata, written atomically.

Layout inside the ``.npz`` (a zip of ``.npy`` members, each CRC-checked):

* ``__meta__``: the JSON metadata as UTF-8 bytes (a uint8 array);
* ``param/<name>``: model parameters;
* ``optim/<slot>/<name>``: optimizer state;
* anything else the caller adds (``history/...``, ``data/...``).

Writing goes to a temporary file in the target directory, is flushed and
fsynced, then renamed over the target with ``os.replace``: a crash leaves
either the old or the new checkpoint, never half of one.  The temporary name
holds the writer's process id, so the next save removes those of writers that
died midway (killed, power loss) instead of letting them pile up.

Loading trusts nothing in the file: every member must be a ``.npy`` array
whose header (read with :mod:`numpy.lib.format` before anything is allocated)
describes a plain dtype and exactly the bytes the member holds, so no claimed
size can exceed the file itself; no pickle is ever loaded.  Every failure is a
``ValueError`` that names the file and what is wrong, and
:meth:`Checkpoint.section` does the same for missing metadata.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np
from numpy.lib import format as npy_format

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "save_checkpoint", "load_checkpoint",
           "remove_stale_temporaries"]

FORMAT = "kernrnn-checkpoint"
FORMAT_VERSION = 1
META_KEY = "__meta__"


@dataclass
class Checkpoint:
    """A loaded checkpoint: its metadata, its arrays by member name, and the file it came from."""

    meta: dict
    arrays: dict = field(default_factory=dict)
    path: str = "<memory>"

    def group(self, prefix: str) -> dict:
        """Arrays under ``prefix/`` with the prefix removed."""
        p = prefix.rstrip("/") + "/"
        return {k[len(p):]: v for k, v in self.arrays.items() if k.startswith(p)}

    def error(self, what: str) -> ValueError:
        """A ``ValueError`` naming this checkpoint's file and ``what`` is wrong with it."""
        return ValueError(f"checkpoint {self.path!r}: {what}")

    def section(self, name: str, keys=()) -> dict:
        """The metadata section ``name`` (a dict holding every key in ``keys``).

        A missing section or key is a ``ValueError`` naming the file and what is
        missing, instead of a ``KeyError`` from deep inside the caller.
        """
        value = self.meta.get(name)
        if not isinstance(value, dict):
            found = "missing" if value is None else f"a {type(value).__name__}, not a mapping"
            raise self.error(f"the metadata has no {name!r} section ({found}); "
                             f"it was not written by this kernrnn or was edited")
        missing = [k for k in keys if k not in value]
        if missing:
            raise self.error(f"the metadata section {name!r} lacks {missing}")
        return value


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
    problem = _json_problem(full)
    if problem:
        raise ValueError(f"checkpoint {path!r}: cannot store the metadata: {problem}")
    blob = json.dumps(full, sort_keys=True, allow_nan=False).encode("utf-8")
    payload = {META_KEY: np.frombuffer(blob, dtype=np.uint8), **arrays}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=".tmp", dir=directory)
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


def _json_problem(value, where="metadata") -> str | None:
    """Where ``value`` holds something JSON cannot store exactly (None: nothing)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has a key {k!r} of type {type(k).__name__} (keys must be str)"
            problem = _json_problem(v, f"{where}.{k}")
            if problem:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            problem = _json_problem(v, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value} (JSON holds finite numbers only)"
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    return f"{where} is a {type(value).__name__} ({value!r}), not a JSON value"


def _temporary_pattern(path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(os.path.basename(path))}\.(\d+)\.\w+\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a pid we cannot ask about): leave its file
    return True


def remove_stale_temporaries(path) -> list[str]:
    """Delete temporary files of saves to ``path`` whose writing process no longer runs.

    A save killed midway (``SIGKILL``, out of memory) leaves its temporary file
    behind; each one holds the writer's pid, so only those of dead writers are
    removed and a concurrent save is never disturbed.  Returns the removed paths.
    """
    directory = os.path.dirname(os.path.abspath(path))
    pattern = _temporary_pattern(path)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _process_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except OSError:
                pass
    return removed


#: Largest uncompressed/compressed size ratio a deflated member may claim (deflate's limit
#: is about 1032:1); anything beyond is a forged size, refused before reading.
MAX_DEFLATE_RATIO = 1100


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, file_size: int, bad):
    """``(shape, fortran_order, dtype)`` of one member, checked against its byte count."""
    name = info.filename
    if not name.endswith(".npy"):
        raise bad(f"member {name!r} is not a .npy array")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size > file_size or info.file_size != info.compress_size:
            raise bad(f"member {name!r} claims {info.file_size} bytes in a file of {file_size}")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
            raise bad(f"member {name!r} claims {info.file_size} bytes from "
                      f"{info.compress_size} compressed ones (a forged size)")
    else:
        raise bad(f"member {name!r} uses zip compression method {info.compress_type}; "
                  f"only stored and deflated members are read")
    with zf.open(info) as f:
        try:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} (expected 1.0 or 2.0)")
        except (ValueError, EOFError, SyntaxError, TypeError) as e:
            raise bad(f"member {name!r} is not a .npy array ({e})") from None
        header_len = f.tell()
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise bad(f"member {name!r} has dtype {dtype} (only plain numeric arrays are read; "
                  f"object arrays would need pickle)")
    nbytes = math.prod(shape) * dtype.itemsize
    if header_len + nbytes != info.file_size:
        raise bad(f"member {name!r}: its header describes {dtype} {list(shape)} "
                  f"({nbytes} bytes) but it holds {info.file_size - header_len} bytes")
    return shape, fortran, dtype


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickle)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory, expected a .npz file")

    def bad(why):
        return ValueError(f"checkpoint {path!r} is not a valid kernrnn checkpoint: {why}")

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} is not a regular file, expected a .npz file")
    try:
        with open(path, "rb") as f:
            if f.read(len(npy_format.MAGIC_PREFIX)) == npy_format.MAGIC_PREFIX:
                raise bad("not an .npz archive (a bare .npy array)")
        file_size = os.path.getsize(path)
        arrays = {}
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            headers = [_member_header(zf, info, file_size, bad) for info in infos]
            names = [i.filename[: -len(".npy")] for i in infos]
            if len(set(names)) != len(names):
                raise bad("a member name occurs twice")
            if META_KEY not in names:
                raise bad(f"no {META_KEY!r} member (not written by kernrnn, or truncated)")
            for name, info, (shape, _, dtype) in zip(names, infos, headers):
                with zf.open(info) as f:
                    arr = npy_format.read_array(f, allow_pickle=False)
                if arr.shape != tuple(shape) or arr.dtype != dtype:
                    raise bad(f"member {name!r} does not match its header")
                arrays[name] = arr
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
    return Checkpoint(meta, arrays, path)
