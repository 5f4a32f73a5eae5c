"""Where the test-suite's time goes: each Numba CPU compile or cache load (from 0.05 s), per test.

A pytest plugin and a summary.  Run the suite with an empty kernel cache and the plugin
(``PYTEST_PLUGINS`` reaches the simulator subprocesses too)::

    KERNRNN_CACHE_DIR=$(mktemp -d) KERNRNN_COMPILE_LOG=/tmp/compiles.tsv \\
        PYTEST_PLUGINS=benchmarks.compile_log python -m pytest -n auto --dist loadfile
    python -m benchmarks.compile_log /tmp/compiles.tsv

Each line of the log is ``pid, test, module, function, seconds, kind`` (kind: ``compile``,
Numba compiled it, whether it caches the result or not; ``load``, from the kernel cache).
Both are timed under Numba's compiler lock, so threads waiting for one compile (the
simulator's) count once; a compile nested in another (the register tiles in a fused
kernel) counts in the outer one.  The summary
gives the seconds by test file and by kernel module, and any cached kernel compiled
more than once (two processes at once, or a second signature).  ``numba.cuda.compile_ptx``
is timed as well (kind ``ptx``), with the same tables.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import threading
import time

_LOG_ENV = "KERNRNN_COMPILE_LOG"
_state = threading.local()
_current = ["<collection>"]


def _install(path: str) -> None:
    from numba.core import caching, dispatcher

    log = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
    compile_, load = dispatcher._FunctionCompiler.compile, caching.Cache.load_overload

    def timed(kind, py_func, call):
        # Both run under Numba's compiler lock, so a thread waiting for another's compile
        # (the simulator runs many) is not counted; nested ones count in the outer one.
        if getattr(_state, "depth", 0):
            return call()
        _state.depth, t0 = 1, time.perf_counter()
        try:
            return call()
        finally:
            _state.depth, dt = 0, time.perf_counter() - t0
            if dt >= 0.05:
                log.write(f"{os.getpid()}\t{_current[0]}\t{py_func.__module__}\t"
                          f"{py_func.__qualname__}\t{dt:.3f}\t{kind}\n")

    def compile(self, args, return_type):
        return timed("compile", self.py_func, lambda: compile_(self, args, return_type))

    def load_overload(self, sig, target_context):
        return timed("load", self._py_func, lambda: load(self, sig, target_context))

    dispatcher._FunctionCompiler.compile = compile
    caching.Cache.load_overload = load_overload
    _install_ptx(log)


def _install_ptx(log) -> None:
    """Time each ``numba.cuda.compile_ptx`` too (kind ``ptx``; the function's name carries
    the signature, so the summary finds a kernel compiled to PTX twice)."""
    try:
        from numba import cuda
    except Exception:  # noqa: BLE001 - no numba-cuda here: CPU compiles only
        return
    if getattr(cuda, "_kernrnn_logged", False) or not hasattr(cuda, "compile_ptx"):
        return
    compile_ptx = cuda.compile_ptx

    def logged(pyfunc, sig, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return compile_ptx(pyfunc, sig, *args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            func = getattr(pyfunc, "py_func", pyfunc)
            name = f"{func.__qualname__}[{sig}]{'+lineinfo' if kwargs.get('lineinfo') else ''}"
            log.write(f"{os.getpid()}\t{_current[0]}\t{func.__module__}\t"
                      f"{' '.join(name.split())}\t{dt:.3f}\tptx\n")

    cuda.compile_ptx = logged
    cuda._kernrnn_logged = True


if os.environ.get(_LOG_ENV):
    _install(os.environ[_LOG_ENV])


def pytest_runtest_logstart(nodeid, location):
    _current[0] = nodeid


def summarize(path: str, top: int = 15) -> str:
    """The log at ``path`` as text: totals, by test file, by module, repeated modules, and
    the PTX compiles the same way."""
    rows = []
    with open(path) as f:
        for line in f:
            pid, test, module, name, seconds, kind = line.rstrip("\n").split("\t")
            rows.append((pid, test.split("::")[0], str(module), name, float(seconds), kind))
    fresh = [r for r in rows if r[5] == "compile"]
    loads = [r for r in rows if r[5] == "load"]
    ptx = [r for r in rows if r[5] == "ptx"]
    out = [f"{len(fresh)} compiles, {sum(r[4] for r in fresh):.1f} s; "
           f"{len(loads)} cache loads, {sum(r[4] for r in loads):.1f} s; "
           f"{len(ptx)} PTX compiles, {sum(r[4] for r in ptx):.1f} s; "
           f"{len({r[0] for r in rows})} processes"]
    out += _tables("CPU", fresh, top, lambda m: m.startswith("kernrnn_gen_"))
    if ptx:
        out += _tables("PTX", ptx, top, lambda m: True)
    return "\n".join(out)


def _tables(what, rows, top, cached) -> list:
    """Seconds by test file and by module, and what was compiled more than once (in
    several processes, or twice in one)."""
    by_file = collections.Counter()
    by_module = collections.Counter()
    seen = collections.defaultdict(list)
    for pid, test_file, module, name, seconds, _ in rows:
        by_file[test_file] += seconds
        by_module[re.sub(r"^kernrnn_gen_|_[0-9a-f]{12,16}$", "", module)] += seconds
        if cached(module):
            seen[(module, name)].append((pid, seconds))
    out = [f"\n{what} compile seconds by test file:"]
    out += [f"{s:7.1f}  {k}" for k, s in by_file.most_common(top)]
    out.append(f"\n{what} by module (digest left out):")
    out += [f"{s:7.1f}  {k}" for k, s in by_module.most_common(top)]
    again = sorted(((sum(t for _, t in v[1:]), k, len(v), len({p for p, _ in v}))
                    for k, v in seen.items() if len(v) > 1), reverse=True)
    out.append(f"\n{what}: compiled more than once: {len(again)}, "
               f"{sum(a[0] for a in again):.1f} s after the first")
    out += [f"  {s:6.1f} s  {m} {n} ({c} times, {p} processes)"
            for s, (m, n), c, p in again[:top]]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="the file KERNRNN_COMPILE_LOG named")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(summarize(args.log, args.top))


if __name__ == "__main__":
    main()
