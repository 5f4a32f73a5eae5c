"""kernrnn.numba_gc: the garbage collector is paused while Numba compiles, and only then.

A typing hook (``@overload``) runs inside the compile and records whether the collector
is on there; around the compile the collector's state is the caller's.
"""

import gc
import os
import subprocess
import sys
import threading

import numba
import pytest
from numba.extending import overload

import kernrnn  # noqa: F401 - installs the listener
from kernrnn import numba_gc

pytestmark = pytest.mark.skipif(not numba_gc.enabled(),
                                reason="KERNRNN_PAUSE_GC=0: the collector is left alone")

_seen: list = []


def _new_probe():
    """A function whose typing (``@overload``) records whether the collector is on: it runs
    inside the compile of its caller.  New each time: Numba keeps a typing's result."""
    def probe():
        pass

    @overload(probe)
    def typing():
        _seen.append(gc.isenabled())
        return lambda: None

    return probe


def _fresh_function():
    """A new jitted function (so each call compiles) that runs a new probe."""
    probe = _new_probe()

    def f(x):
        probe()
        return x + 1
    return numba.njit(f)


def test_collector_is_paused_inside_a_compile_and_back_on_after():
    _seen.clear()
    assert gc.isenabled()
    assert _fresh_function()(1) == 2
    assert _seen == [False]
    assert gc.isenabled()


def test_a_collector_switched_off_by_the_caller_stays_off():
    _seen.clear()
    gc.disable()
    try:
        _fresh_function()(1)
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert _seen == [False]


def test_a_failed_compile_switches_it_back_on():
    probe = _new_probe()

    def bad(x):
        probe()
        return x + "text"  # no int + str: a typing error after the probe ran

    _seen.clear()
    with pytest.raises(numba.core.errors.TypingError):
        numba.njit(bad)(1)
    assert _seen == [False]
    assert gc.isenabled()


def test_compiles_in_two_threads_leave_it_on():
    _seen.clear()
    errors = []

    def work():
        try:
            for _ in range(3):
                _fresh_function()(1)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _seen == [False] * 6
    assert gc.isenabled()


def test_numba_cuda_compiles_are_paused_too():
    from kernrnn.testing.compiles import ptx_unavailable_reason

    reason = ptx_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from numba import cuda
    from numba.cuda.core import event

    from kernrnn.backends.cuda import arrays  # noqa: F401 - installs numba-cuda's listener

    states = []

    class Record(event.Listener):  # registered after kernrnn's, so it sees its effect
        def on_start(self, e):
            states.append(gc.isenabled())

        def on_end(self, e):
            pass

    rec = Record()
    event.register("numba-cuda:compiler_lock", rec)
    try:
        def kernel(a):
            a[0] = 1.0
        cuda.compile_ptx(kernel, "void(float32[:])", cc=(9, 0))
    finally:
        event.unregister("numba-cuda:compiler_lock", rec)
    assert states and not any(states)
    assert gc.isenabled()


def test_kernrnn_pause_gc_0_leaves_the_collector_alone():
    code = ("import gc, numba, kernrnn\n"
            "from numba.extending import overload\n"
            "seen = []\n"
            "def probe(): pass\n"
            "@overload(probe)\n"
            "def typing():\n"
            "    seen.append(gc.isenabled())\n"
            "    return lambda: None\n"
            "numba.njit(lambda: probe())()\n"
            "print(seen)\n")
    env = {**os.environ, "KERNRNN_PAUSE_GC": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True]"
