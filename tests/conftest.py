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


def pytest_terminal_summary(terminalreporter):
    """Print the largest errors seen against the reference (for the issue notes)."""
    try:
        from test_layer_properties import MAX_SEEN
    except ImportError:
        return
    if MAX_SEEN:
        terminalreporter.section("largest errors seen vs the float64 reference")
        for key, value in sorted(MAX_SEEN.items()):
            terminalreporter.write_line(f"{key}: {value:.3e}")
