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

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


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


def pytest_collection_modifyitems(config, items):
    """``KERNRNN_TEST_SHARD=i/n``: keep the i-th of n shards (the device check runs
    the GPU tests in parallel processes, for compilation is their cost).  All
    tests of one cell go to one shard, so each shard compiles its own cells."""
    shard = os.environ.get("KERNRNN_TEST_SHARD")
    if not shard:
        return
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise pytest.UsageError(f"KERNRNN_TEST_SHARD must be i/n with 0 <= i < n, got {shard!r}")

    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        return str(params.get("cell_name", params.get("cell", "")))

    keys = sorted({key(item) for item in items})
    mine = {k for j, k in enumerate(keys) if j % n == i}
    keep = [item for item in items if key(item) in mine]
    config.hook.pytest_deselected(items=[item for item in items if key(item) not in mine])
    items[:] = keep
