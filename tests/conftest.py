"""Test configuration: hypothesis profiles and a fresh plugin registry per test."""

import os

import pytest
from hypothesis import HealthCheck, settings

# Deterministic in CI (same examples every run); broader locally.
settings.register_profile(
    "ci", max_examples=15, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
# The project's own tests run with strict plugins: a broken installed plugin fails loudly.
os.environ.setdefault("KERNRNN_STRICT_PLUGINS", "1")
# The tests check the compiled kernels: no call runs the NumPy first tier while they compile
# (tests/test_tiers.py turns tiers on where it tests them).
os.environ.setdefault("KERNRNN_TIERS", "0")

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def _simulator_block_manager_yields() -> None:
    """Under Numba's CUDA simulator, let its block manager give up the GIL while it polls.

    The simulator runs each GPU thread of a block as a Python thread, and its
    ``BlockManager.run`` polls them in a busy loop (``is_alive`` and the barrier
    flags) that holds the GIL against the very threads it waits for: a simulated
    kernel ran 5-10x slower than its threads' own work (``tests/cudasim``: 162 tests in
    about 40 s with this, about 200 s without).  ``time.sleep(0)`` in the polled ``is_alive``
    hands the GIL over at each poll; what the threads compute, and when the barrier
    releases them, is unchanged.  Only the manager calls ``is_alive`` on these threads.
    """
    import threading
    import time

    try:
        from numba.cuda.simulator import kernel
    except ImportError:  # no numba-cuda: the simulator tests skip themselves
        return

    def is_alive(thread):
        time.sleep(0)
        return threading.Thread.is_alive(thread)

    kernel.BlockThread.is_alive = is_alive


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _simulator_block_manager_yields()


@pytest.fixture
def fresh_registry(monkeypatch):
    """Reset the process registry before and after a test that changes plugins."""
    from kernrnn import plugins

    plugins.reset_registry()
    yield
    plugins.reset_registry()


def _max_seen() -> dict:
    try:
        from test_layer_properties import MAX_SEEN
    except ImportError:
        return {}
    return MAX_SEEN


def pytest_sessionfinish(session):
    """Under pytest-xdist, a worker hands its largest errors to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["kernrnn_max_seen"] = dict(_max_seen())


_WORKERS_MAX_SEEN: dict = {}  # the controller's merge of its workers' MAX_SEEN


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controller merges each worker's largest errors (pytest-xdist's hook)."""
    for key, value in getattr(node, "workeroutput", {}).get("kernrnn_max_seen", {}).items():
        _WORKERS_MAX_SEEN[key] = max(_WORKERS_MAX_SEEN.get(key, 0.0), value)


def pytest_terminal_summary(terminalreporter):
    """Print the largest errors seen against the reference (for the issue notes)."""
    seen = {**_max_seen(), **_WORKERS_MAX_SEEN}
    if seen:
        terminalreporter.section("largest errors seen vs the float64 reference")
        for key, value in sorted(seen.items()):
            terminalreporter.write_line(f"{key}: {value:.3e}")


def _cell_of(item) -> str:
    """The cell a test runs (its ``cell_name`` or ``cell`` parameter), else ''."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return str(params.get("cell_name", params.get("cell", "")))


#: Tests that spend tens of seconds in a simulator subprocess: each is its own pytest-xdist
#: work unit under ``--dist loadfile`` (not its file's).
OWN_UNIT = ("tests/test_cuda_sim.py::test_cuda_backend_under_simulator",
            "tests/test_cuda_persistent.py::test_persistent_kernels_under_simulator")
#: Files of at least this many tests go out before the simulator runs.
BIG_FILE = 20


def _own_unit(nodeid: str) -> bool:
    return nodeid.startswith(OWN_UNIT)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the simulator runs split off, handed out in collection order.

    pytest-xdist hands out files by their number of tests, so the one-test simulator file
    started last and one worker ran it alone at the end.  Here each simulator run is its own
    unit, and the units go out in the order that
    :func:`pytest_collection_modifyitems` gives a worker's collection (:func:`_xdist_order`).
    """
    if config.getvalue("dist") != "loadfile":
        return None
    try:  # pytest-xdist 3.x; another layout falls back to its own loadfile scheduler
        from xdist.scheduler import LoadFileScheduling
    except ImportError:
        return None
    if not hasattr(LoadFileScheduling, "_split_scope"):
        return None

    class Scheduler(LoadFileScheduling):
        def _split_scope(self, nodeid):
            return nodeid if _own_unit(nodeid) else super()._split_scope(nodeid)

    config.option.loadscopereorder = False
    return Scheduler(config, log)


def _xdist_order(items):
    """Files of many tests first (most first, as pytest-xdist orders them), then the
    simulator runs, then the other files.

    The big files compile most CPU kernels that the simulator runs compare against, so those
    find them in the kernel cache (run first, cold, two of them compiled the same kernels at
    once); the small files after them fill the workers' ends.  Files stay together.
    """
    files = [item.nodeid.split("::")[0] for item in items]
    count = {path: files.count(path) for path in set(files)}
    first = {path: files.index(path) for path in count}

    def key(item):
        path = item.nodeid.split("::")[0]
        if _own_unit(item.nodeid):
            return (1, 0, 0)  # stable: in collection order
        return (0 if count[path] >= BIG_FILE else 2, -count[path], first[path])

    items.sort(key=key)


def pytest_collection_modifyitems(config, items):
    """Select tests by cell, for the device check (benchmarks/devicecheck.py), which runs
    the GPU tests in parallel processes, for loading kernels is their cost.

    ``KERNRNN_TEST_CELLS=lstm,gru``: only the tests of these cells; the name ``none``
    stands for the tests that take no cell.  ``KERNRNN_TEST_SHARD=i/n``: keep the i-th
    of n shards, all tests of one cell in one shard, so each shard compiles its own cells.
    """
    keep = list(items)
    cells = os.environ.get("KERNRNN_TEST_CELLS", "").strip()
    if cells:
        wanted = {c.strip() for c in cells.split(",") if c.strip()}
        keep = [item for item in keep if (_cell_of(item) or "none") in wanted]
    shard = os.environ.get("KERNRNN_TEST_SHARD")
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            i, n = -1, 0
        if not 0 <= i < n:
            raise pytest.UsageError(
                f"KERNRNN_TEST_SHARD must be i/n with 0 <= i < n, got {shard!r}")
        keys = sorted({_cell_of(item) for item in keep})
        mine = {k for j, k in enumerate(keys) if j % n == i}
        keep = [item for item in keep if _cell_of(item) in mine]
    if len(keep) < len(items):
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (its option dist reads "no")
        _xdist_order(items)  # the order in which the controller hands out the work units
