"""Where the test-suite's time goes: every Numba CPU compile, per test, fresh or from the cache.

A pytest plugin and a summary.  Run the suite with an empty kernel cache and the plugin
(``PYTEST_PLUGINS`` reaches the simulator subprocesses too)::

    KERNRNN_CACHE_DIR=$(mktemp -d) KERNRNN_COMPILE_LOG=/tmp/compiles.tsv \\
        PYTEST_PLUGINS=benchmarks.compile_log python -m pytest -n auto --dist loadfile
    python -m benchmarks.compile_log /tmp/compiles.tsv

Each line of the log is ``pid, test, module, function, seconds, fresh`` (fresh: Numba
wrote a cache entry, so it compiled; otherwise it loaded one, or compiled something
that is never cached, such as the compile check's drivers).  A compile nested in
another (the register tiles in a fused kernel) counts in the outer one.  The summary
gives the seconds by test file and by kernel module, and any module compiled afresh
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
    save, compile_ = caching.Cache.save_overload, dispatcher.Dispatcher.compile

    def save_overload(self, sig, data):
        _state.saved = True
        return save(self, sig, data)

    def compile(self, sig):
        if getattr(_state, "depth", 0):
            return compile_(self, sig)
        _state.depth, _state.saved, t0 = 1, False, time.perf_counter()
        try:
            return compile_(self, sig)
        finally:
            _state.depth, dt = 0, time.perf_counter() - t0
            if dt >= 0.05:
                log.write(f"{os.getpid()}\t{_current[0]}\t{self.py_func.__module__}\t"
                          f"{self.py_func.__qualname__}\t{dt:.3f}\t{int(_state.saved)}\n")

    caching.Cache.save_overload = save_overload
    dispatcher.Dispatcher.compile = compile


if os.environ.get(_LOG_ENV):
    _install(os.environ[_LOG_ENV])


def pytest_runtest_logstart(nodeid, location):
    _current[0] = nodeid


def summarize(path: str, top: int = 15) -> str:
    """The log at ``path`` as text: totals, by test file, by module, repeated modules."""
    rows = []
    with open(path) as f:
        for line in f:
            pid, test, module, name, seconds, fresh = line.rstrip("\n").split("\t")
            rows.append((pid, test.split("::")[0], str(module), name, float(seconds),
                         fresh == "1"))
    fresh = [r for r in rows if r[5]]
    out = [f"{len(fresh)} fresh compiles, {sum(r[4] for r in fresh):.1f} s; "
           f"{len(rows) - len(fresh)} other compiles and cache loads, "
           f"{sum(r[4] for r in rows if not r[5]):.1f} s; {len({r[0] for r in rows})} processes"]
    by_file = collections.Counter()
    by_module = collections.Counter()
    seen = collections.defaultdict(set)
    for pid, test_file, module, name, seconds, is_fresh in fresh:
        by_file[test_file] += seconds
        by_module[re.sub(r"^kernrnn_gen_|_[0-9a-f]{16}$", "", module)] += seconds
        seen[(module, name)].add(pid)
    out.append("\nfresh compile seconds by test file:")
    out += [f"{s:7.1f}  {k}" for k, s in by_file.most_common(top)]
    out.append("\nby kernel module (digest left out):")
    out += [f"{s:7.1f}  {k}" for k, s in by_module.most_common(top)]
    again = [(k, len(v)) for k, v in seen.items() if len(v) > 1]
    out.append(f"\ncompiled afresh in more than one process: {len(again)}")
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
