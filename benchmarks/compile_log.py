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
more than once (two processes at once, or a second signature).  CUDA's ``compile_ptx``
does not pass through here.
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


if os.environ.get(_LOG_ENV):
    _install(os.environ[_LOG_ENV])


def pytest_runtest_logstart(nodeid, location):
    _current[0] = nodeid


def summarize(path: str, top: int = 15) -> str:
    """The log at ``path`` as text: totals, by test file, by module, repeated modules."""
    rows = []
    with open(path) as f:
        for line in f:
            pid, test, module, name, seconds, kind = line.rstrip("\n").split("\t")
            rows.append((pid, test.split("::")[0], str(module), name, float(seconds),
                         kind == "compile"))
    fresh = [r for r in rows if r[5]]
    out = [f"{len(fresh)} compiles, {sum(r[4] for r in fresh):.1f} s; "
           f"{len(rows) - len(fresh)} cache loads, "
           f"{sum(r[4] for r in rows if not r[5]):.1f} s; {len({r[0] for r in rows})} processes"]
    by_file = collections.Counter()
    by_module = collections.Counter()
    seen = collections.defaultdict(set)
    for pid, test_file, module, name, seconds, is_fresh in fresh:
        by_file[test_file] += seconds
        by_module[re.sub(r"^kernrnn_gen_|_[0-9a-f]{16}$", "", module)] += seconds
        if module.startswith("kernrnn_gen_"):  # the cached kernel modules
            seen[(module, name)].add(pid)
    out.append("\ncompile seconds by test file:")
    out += [f"{s:7.1f}  {k}" for k, s in by_file.most_common(top)]
    out.append("\nby kernel module (digest left out):")
    out += [f"{s:7.1f}  {k}" for k, s in by_module.most_common(top)]
    again = [(k, len(v)) for k, v in seen.items() if len(v) > 1]
    out.append(f"\ncached kernels compiled in more than one process: {len(again)}")
    out += [f"  {m} {n} ({c} processes)" for (m, n), c in again[:top]]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="the file KERNRNN_COMPILE_LOG named")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(summarize(args.log, args.top))


if __name__ == "__main__":
    main()
