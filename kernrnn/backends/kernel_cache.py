"""The on-disk kernel cache: generated kernel modules and Numba's cache files.

Generated modules are written to ``KERNRNN_CACHE_DIR`` (default
``~/.cache/kernrnn``) so Numba's on-disk cache applies to them.  Numba
*unpickles* its index (``.nbi``) and data (``.nbc``) files, so whoever can
write into that directory can run code in this process.  Hence:

* **Trust.**  A directory is used only when it is a real directory (not a
  symbolic link) owned by the current user and not writable by group or
  others, and every directory above it is owned by the user or root and not
  writable by others unless sticky (``/tmp``).  Anything else is refused with
  one :class:`KernelCacheWarning`, and the cache falls back to a private
  per-user directory (mode 0700) under the system temporary directory, reused
  by every later process.  Only when even that one is unsafe (say another user
  created it first) is a fresh temporary directory made, removed at exit.
  Numba's own cache directory for each kernel (the ``__pycache__`` beside the
  module, or ``NUMBA_CACHE_DIR``) is checked the same way; when it fails, that
  kernel's Numba cache is switched off.
* **No byte code.**  A generated module is compiled from the source text in
  memory and executed; Python's import system, which would read or write a
  ``.pyc`` in ``__pycache__``, is never used for it.
* **Healing.**  A cache entry that cannot be loaded (truncated, corrupt, of
  another user) is deleted and the kernel recompiled, with one warning;
  never an error.
* **Markers.**  Facts worth remembering between processes (a cell's math passed
  the compile check) are plain text files under ``markers/``: a marker counts
  only when it is ours alone (as above) and holds exactly the text expected,
  which names everything the fact depends on.  Nothing in one is executed or
  unpickled.
* **Threads.**  The first build of a module holds a lock per module name, and
  the module appears in ``sys.modules`` only after it has finished executing.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path

__all__ = ["CACHE_ENV", "KernelCacheWarning", "cache_dir", "unsafe_reason", "load_module",
           "has_marker", "write_marker"]

#: Environment variable naming the kernel cache directory.
CACHE_ENV = "KERNRNN_CACHE_DIR"


class KernelCacheWarning(UserWarning):
    """The kernel cache refused a directory or repaired a damaged entry."""


_warned: set[str] = set()
_dirs: dict[str, Path] = {}  # configured path -> directory in use
_dirs_lock = threading.Lock()
_module_locks: dict[str, threading.Lock] = {}
_module_locks_guard = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"kernrnn kernel cache: {message}", KernelCacheWarning, stacklevel=3)


# -- trust -------------------------------------------------------------------------


def _ancestors(path: Path) -> list[Path]:
    """Every directory above ``path``, as written and with symbolic links resolved."""
    seen, out = set(), []
    for p in [*path.parents, *Path(os.path.realpath(path.parent)).parents,
              Path(os.path.realpath(path.parent))]:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _others_may_write(mode: int) -> str | None:
    if mode & stat.S_IWOTH:
        return "others"
    if mode & stat.S_IWGRP:
        return "its group"
    return None


def unsafe_reason(path) -> str | None:
    """Why code must not be loaded from directory ``path``; None when only we (or root) can change it.

    Checked with ``os.lstat`` on ``path`` and each directory above it (as
    written and resolved), so no symbolic link can swap in another directory.
    """
    path = Path(os.path.abspath(path))
    uid = os.geteuid()
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path} cannot be examined ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by the current user (uid {uid})"
    who = _others_may_write(st.st_mode)
    if who:
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    for parent in _ancestors(path):
        try:
            pst = os.lstat(parent)
        except OSError as exc:
            return f"{parent} cannot be examined ({exc.strerror})"
        if pst.st_uid not in (uid, 0):
            return f"{parent} (above it) is owned by uid {pst.st_uid}, neither the current user nor root"
        if stat.S_ISLNK(pst.st_mode):
            continue  # its target is in the resolved chain; who may replace it, in its parent's
        who = _others_may_write(pst.st_mode)
        if who and not pst.st_mode & stat.S_ISVTX:
            return (f"{parent} (above it) is writable by {who} without the sticky bit "
                    f"(mode {stat.S_IMODE(pst.st_mode):04o})")
    return None


def _file_problem(path: Path) -> str | None:
    """Why the existing file ``path`` must not be read (None: absent, or ours alone)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}"
    who = _others_may_write(st.st_mode)
    return f"is writable by {who}" if who else None


def _make_private_dir(path: Path) -> str | None:
    """Create ``path`` (and missing parents) with mode 0700; then why it is unsafe, or None."""
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            os.mkdir(d, 0o700)
    except FileExistsError:
        pass  # another process made it first; checked below like any existing directory
    except OSError as exc:
        return f"{path} cannot be created ({exc.strerror})"
    reason = unsafe_reason(path)
    if reason:
        return reason
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"{path} is not writable ({exc.strerror})"
    return None


def _fallback_dir() -> Path:
    """The private per-user fallback, or (when that is unsafe) a temporary one removed at exit."""
    private = Path(tempfile.gettempdir()) / f"kernrnn-{os.geteuid()}"
    if _make_private_dir(private) is None:
        return private
    fresh = Path(tempfile.mkdtemp(prefix="kernrnn-"))
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)
    return fresh


def _configured_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    return Path(os.path.abspath(os.path.expanduser(base))) if base else \
        Path.home() / ".cache" / "kernrnn"


def cache_dir():
    """The directory (a ``pathlib.Path``) generated modules live in: the configured one if it is
    safe, else a fallback.

    Decided once per configured path and process; a refusal is reported once.
    """
    configured = _configured_dir()
    key = str(configured)
    with _dirs_lock:
        if key not in _dirs:
            problem = _make_private_dir(configured)
            if problem is None:
                _dirs[key] = configured
            else:
                _dirs[key] = _fallback_dir()
                _warn_once(f"dir {key}", f"not using {configured} ({CACHE_ENV}): {problem}; "
                                          f"kernels are cached in {_dirs[key]} instead")
        return _dirs[key]


# -- Numba's cache files -------------------------------------------------------------


def _numba_caches(module: types.ModuleType):
    """The Numba cache objects of the dispatchers defined in ``module`` (CPU and CUDA)."""
    for value in vars(module).values():
        cache = getattr(value, "_cache", None)
        if cache is not None and hasattr(getattr(cache, "_cache_file", None), "_index_path"):
            yield cache


def _entry_files(cache) -> list[Path]:
    """The index, data and marker files of one Numba cache entry (a kernel's overloads)."""
    index = Path(cache._cache_file._index_path)
    base = index.name[: -len(".nbi")]
    return [index, *index.parent.glob(f"{base}.*.nbc"), *index.parent.glob(f"{base}.lcs")]


def _remove_entry(cache) -> None:
    for f in _entry_files(cache):
        try:
            f.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            cache.disable()  # cannot repair it: never read it again in this process


def _guard(cache) -> None:
    """Make one dispatcher's Numba cache trust-checked and self-healing.

    Numba raises on a truncated or corrupt entry (``UnpicklingError``,
    ``EOFError``, ...) every time the kernel is compiled, in every process;
    here the entry is deleted and the kernel compiled afresh instead.
    """
    where = Path(cache._cache_path)
    reason = unsafe_reason(where)
    if reason:
        _warn_once(f"numba {where}", f"Numba's cache directory is unsafe ({reason}); "
                                     f"these kernels are compiled without a disk cache")
        cache.disable()
        return
    load, save = cache.load_overload, cache.save_overload

    def load_overload(sig, target_context):
        bad = [(f, p) for f in _entry_files(cache) if (p := _file_problem(f))]
        if bad:
            f, p = bad[0]
            _warn_once(f"file {f}", f"removed {f}: it {p}; compiling afresh")
            _remove_entry(cache)
            return None
        try:
            return load(sig, target_context)
        except Exception as exc:
            _warn_once(f"load {cache._cache_file._index_path}",
                       f"damaged entry {cache._cache_file._index_path} "
                       f"({type(exc).__name__}: {exc}); removed it and compiling afresh")
            _remove_entry(cache)
            return None

    def save_overload(sig, data):
        try:
            save(sig, data)
        except Exception as exc:
            _warn_once(f"save {cache._cache_file._index_path}",
                       f"could not save {cache._cache_file._index_path} "
                       f"({type(exc).__name__}: {exc}); the kernel works, uncached")
            _remove_entry(cache)

    cache.load_overload = load_overload
    cache.save_overload = save_overload


# -- modules -------------------------------------------------------------------------


def _module_lock(name: str) -> threading.Lock:
    with _module_locks_guard:
        return _module_locks.setdefault(name, threading.Lock())


def _write_source(path: Path, source: str) -> None:
    """Write ``source`` to ``path`` atomically unless the file there already holds it.

    A file that is not ours alone is replaced, not read.  Unchanged files keep
    their timestamp, which Numba's index entries are stamped with.
    """
    if _file_problem(path) is None and path.exists():
        try:
            if path.read_text() == source:
                return
        except (OSError, UnicodeDecodeError):
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: concurrent processes never see half a file
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_module(source: str, modname: str, namespace: dict) -> types.ModuleType:
    """Execute ``source`` as module ``modname`` backed by a file in :func:`cache_dir`.

    ``namespace`` is put in the module's globals first.  Thread-safe: the
    first caller builds the module under a lock per name; the others wait
    and get the same, fully executed module.
    """
    module = sys.modules.get(modname)
    if module is not None:
        return module
    with _module_lock(modname):
        module = sys.modules.get(modname)
        if module is not None:
            return module
        directory = cache_dir()
        pycache = directory / "__pycache__"  # where Numba's in-tree cache goes
        problem = _make_private_dir(pycache)
        if problem:
            _warn_once(f"dir {pycache}", f"{problem}; Numba will not cache kernels there")
        path = directory / f"{modname}.py"
        _write_source(path, source)
        module = types.ModuleType(modname)
        module.__file__ = str(path)
        module.__dict__.update(namespace)
        exec(compile(source, str(path), "exec"), module.__dict__)
        for cache in _numba_caches(module):
            _guard(cache)
        sys.modules[modname] = module
        return module


# -- markers -------------------------------------------------------------------------


def _marker_path(text: str) -> Path:
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    return cache_dir() / "markers" / f"{digest}.txt"


def has_marker(text: str) -> bool:
    """Whether :func:`write_marker` recorded ``text`` in the cache (a file of ours alone)."""
    try:
        path = _marker_path(text)
        if _file_problem(path) is not None or not path.exists():
            return False
        return path.read_text() == text
    except (OSError, UnicodeDecodeError):
        return False


def write_marker(text: str) -> None:
    """Record ``text`` (one fact and what it depends on); a failure only loses the record."""
    try:
        path = _marker_path(text)
        if _make_private_dir(path.parent) is None:
            _write_source(path, text)
    except OSError:
        pass
