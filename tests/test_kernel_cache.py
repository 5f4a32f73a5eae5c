"""The kernel cache heals damaged entries and trusts no directory another user can write.

Real files: a generated module with one cached ``@njit`` function is built in
a fresh process (as every later kernrnn process would), its Numba index and
data files are truncated, overwritten or replaced by a malicious pickle, and
the directory is given the permissions a second user would need to plant
them.  Real threads race for the first build of a module.
"""

from __future__ import annotations

import json
import os
import pickle
import py_compile
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kernrnn.backends import kernel_cache
from kernrnn.backends.codegen import load_module

SOURCE = "import numba\n@numba.njit(cache=True)\ndef f(x):\n    return x + 1\n"
SCRIPT = f"""
import json, warnings
warnings.simplefilter("always")
from kernrnn.backends.codegen import load_module
with warnings.catch_warnings(record=True) as w:
    m = load_module({SOURCE!r}, "cachetest", {{}})
    value = m.f(41)
print(json.dumps({{"value": value, "file": m.__file__,
                  "hits": sum(m.f.stats.cache_hits.values()),
                  "warnings": [str(x.message) for x in w]}}))
"""
OTHER_UID = 54321  # "another user": we run as root in CI containers, so chown simulates one


def run_build(cache, tmpdir, **env):
    """Build the test module in a new process; its JSON report."""
    full = {**os.environ, "KERNRNN_CACHE_DIR": str(cache), "TMPDIR": str(tmpdir), **env}
    if "NUMBA_CACHE_DIR" not in env:
        full.pop("NUMBA_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=full, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def numba_files(cache: Path, suffix: str) -> list[Path]:
    return sorted(cache.glob(f"__pycache__/kernrnn_gen_cachetest_*{suffix}"))


@pytest.fixture
def dirs(tmp_path):
    cache, tmpdir = tmp_path / "cache", tmp_path / "tmp"
    tmpdir.mkdir()
    return cache, tmpdir


def malicious_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps(Payload())


# -- damaged entries -----------------------------------------------------------------


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _garbage(p: Path):
    p.write_bytes(os.urandom(64))


def _empty(p: Path):
    p.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty], ids=["truncated", "garbage",
                                                                       "empty"])
@pytest.mark.parametrize("which", [".nbi", ".nbc"])
def test_damaged_entry_is_rebuilt_and_cached_again(dirs, damage, which):
    cache, tmpdir = dirs
    first = run_build(cache, tmpdir)
    assert first["value"] == 42 and first["hits"] == 0
    (victim,) = numba_files(cache, which)
    damage(victim)
    healed = run_build(cache, tmpdir)
    assert healed["value"] == 42
    assert any("compiling afresh" in w for w in healed["warnings"]), healed
    # the entry was written anew: the next process loads it from the cache
    again = run_build(cache, tmpdir)
    assert again == {**again, "value": 42, "hits": 1, "warnings": []}


# -- untrusted directories -------------------------------------------------------------


def _group_writable(d: Path):
    d.chmod(d.stat().st_mode | stat.S_IWGRP)


def _world_writable(d: Path):
    d.chmod(d.stat().st_mode | stat.S_IWOTH)


def _other_owner(d: Path):
    os.chown(d, OTHER_UID, -1)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("loosen", [_group_writable, _world_writable, _other_owner],
                         ids=["g+w", "o+w", "other-owner"])
@pytest.mark.parametrize("level", ["cache", "parent"])
def test_planted_index_in_untrusted_dir_is_never_unpickled(tmp_path, loosen, level):
    parent, tmpdir = tmp_path / "shared", tmp_path / "tmp"
    cache = parent / "cache"
    tmpdir.mkdir()
    run_build(cache, tmpdir)
    marker = tmp_path / "pwned"
    for index in numba_files(cache, ".nbi"):
        index.write_bytes(malicious_pickle(marker))
    loosen(cache if level == "cache" else parent)
    report = run_build(cache, tmpdir)
    assert not marker.exists(), "a pickle planted in an untrusted cache directory was loaded"
    assert report["value"] == 42
    fallback = tmpdir / f"kernrnn-{os.geteuid()}"
    assert Path(report["file"]).parent == fallback
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700
    assert len([w for w in report["warnings"] if str(cache) in w]) == 1, report["warnings"]


def test_planted_bytecode_is_never_imported(dirs):
    """Even in our own directory a .pyc beside the module is ignored: modules run from source."""
    cache, tmpdir = dirs
    first = run_build(cache, tmpdir)
    module = Path(first["file"])
    marker = cache.parent / "pwned"
    evil = cache.parent / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                    f"def f(x):\n    return -1\n")
    pyc = cache / "__pycache__" / f"{module.stem}.{sys.implementation.cache_tag}.pyc"
    # an unchecked-hash .pyc is run by the import system without looking at the source
    py_compile.compile(str(evil), cfile=str(pyc),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    report = run_build(cache, tmpdir)
    assert report["value"] == 42 and not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_unsafe_numba_cache_dir_disables_numba_cache(tmp_path):
    cache, tmpdir, numba_dir = tmp_path / "cache", tmp_path / "tmp", tmp_path / "numba"
    tmpdir.mkdir()
    numba_dir.mkdir(mode=0o700)
    run_build(cache, tmpdir, NUMBA_CACHE_DIR=str(numba_dir))
    indexes = list(numba_dir.rglob("*.nbi"))
    assert indexes, "NUMBA_CACHE_DIR was not used"
    marker = tmp_path / "pwned"
    for index in indexes:
        index.write_bytes(malicious_pickle(marker))
    _world_writable(numba_dir)
    report = run_build(cache, tmpdir, NUMBA_CACHE_DIR=str(numba_dir))
    assert report["value"] == 42 and report["hits"] == 0 and not marker.exists()
    assert any("compiled without a disk cache" in w for w in report["warnings"])


def test_uncreatable_cache_dir_reuses_one_private_fallback(tmp_path):
    """A cache dir that cannot be created (here: below a file) falls back to one reused directory."""
    blocker, tmpdir = tmp_path / "file", tmp_path / "tmp"
    blocker.write_text("not a directory")
    tmpdir.mkdir()
    reports = [run_build(blocker / "cache", tmpdir) for _ in range(2)]
    assert [r["value"] for r in reports] == [42, 42]
    assert reports[1]["hits"] == 1, "the fallback was not reused"
    assert [p.name for p in tmpdir.iterdir()] == [f"kernrnn-{os.geteuid()}"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_squatted_fallback_uses_a_temporary_dir_removed_at_exit(tmp_path):
    blocker, tmpdir = tmp_path / "file", tmp_path / "tmp"
    blocker.write_text("")
    tmpdir.mkdir()
    squatted = tmpdir / f"kernrnn-{os.geteuid()}"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, OTHER_UID, -1)
    report = run_build(blocker / "cache", tmpdir)
    assert report["value"] == 42
    assert Path(report["file"]).parent.parent == tmpdir
    assert Path(report["file"]).parent != squatted
    assert sorted(p.name for p in tmpdir.iterdir()) == [squatted.name], "temporary dir left behind"
    assert list(squatted.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_file_of_another_user_in_own_dir_is_removed_not_read(dirs):
    cache, tmpdir = dirs
    run_build(cache, tmpdir)
    marker = cache.parent / "pwned"
    for index in numba_files(cache, ".nbi"):
        index.write_bytes(malicious_pickle(marker))
        os.chown(index, OTHER_UID, -1)
    report = run_build(cache, tmpdir)
    assert report["value"] == 42 and not marker.exists()
    assert all(p.stat().st_uid == os.geteuid() for p in numba_files(cache, ".nbi"))


def test_symlinked_cache_dir_is_refused(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert "symbolic link" in kernel_cache.unsafe_reason(link)
    assert kernel_cache.unsafe_reason(real) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_unsafe_reason_checks_every_directory_above(tmp_path):
    a = tmp_path / "a"
    b = a / "b"
    b.mkdir(parents=True, mode=0o700)
    a.chmod(0o700)
    assert kernel_cache.unsafe_reason(b) is None
    a.chmod(0o1777)  # sticky, like /tmp: others cannot rename b away
    assert kernel_cache.unsafe_reason(b) is None
    a.chmod(0o777)
    assert "above it" in kernel_cache.unsafe_reason(b)
    a.chmod(0o755)
    os.chown(a, OTHER_UID, -1)
    assert "above it" in kernel_cache.unsafe_reason(b)


# -- threads -------------------------------------------------------------------------


def test_first_build_from_many_threads_runs_the_module_once(tmp_path, monkeypatch):
    """The module is published only once it has finished executing (it sleeps midway here)."""
    monkeypatch.setenv("KERNRNN_CACHE_DIR", str(tmp_path / "cache"))
    runs = []
    source = (f"# {time.time_ns()}\nimport time\nruns.append(1)\ntime.sleep(0.3)\n"
              f"def forward_train():\n    return 7\n")
    n = 8
    barrier = threading.Barrier(n)
    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(load_module(source, "threads", {"runs": runs}).forward_train())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [7] * n and runs == [1]


# -- markers (the remembered compile check) --------------------------------------------


def test_marker_counts_only_with_its_exact_text_in_a_file_of_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNRNN_CACHE_DIR", str(tmp_path / "cache"))
    text = "check passed: math abc\n"
    assert not kernel_cache.has_marker(text)
    kernel_cache.write_marker(text)
    assert kernel_cache.has_marker(text)
    assert not kernel_cache.has_marker(text + "x")  # another fact, another file
    path = kernel_cache._marker_path(text)
    path.write_text(text[:-3])  # truncated
    assert not kernel_cache.has_marker(text)
    path.write_text(text)
    path.chmod(0o666)  # others could have written it
    assert not kernel_cache.has_marker(text)


def test_compile_check_is_remembered_only_when_it_passes(tmp_path, monkeypatch):
    """A second process with the same math skips the check's compile; a changed cell does not."""
    import dataclasses
    import math

    import numpy as np

    from kernrnn import scalar
    from kernrnn.plugins import get_registry

    monkeypatch.setenv("KERNRNN_CACHE_DIR", str(tmp_path / "cache"))
    runs = []
    inner = scalar._check_cell_compiles
    monkeypatch.setattr(scalar, "_check_cell_compiles",
                        lambda cell, dtype: (runs.append(cell.name), inner(cell, dtype)))
    check = scalar.check_cell_compiles.__wrapped__  # past the per-process lru_cache
    rnn = get_registry().get("rnn")
    check(rnn, np.float32)
    check(rnn, np.float32)
    assert runs == ["rnn"]
    check(rnn, np.float64)  # another precision is another fact
    assert runs == ["rnn", "rnn"]

    def broken(xw, hu, prev):
        act = getattr(math, "tanh")  # noqa: B009  (fine in Python, not in Numba)
        h = act(xw[0] + hu[0])
        return (h,), (h,)

    def backward(saved, prev, dstate):
        d = dstate[0] * (1 - saved[0] * saved[0])
        return (d,), (d,), (0.0,)

    # a hand-written step: runs in Python (validation passes), does not compile with Numba
    def reference(xw, hu, prev):
        return (np.tanh(xw[0] + hu[0]),)

    bad = dataclasses.replace(rnn, forward=broken, backward=backward, reference=reference)
    for _ in range(2):
        with pytest.raises(Exception, match="does not compile"):
            check(bad, np.float32)
    assert runs == ["rnn", "rnn", "rnn", "rnn"]
