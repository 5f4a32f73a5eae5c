"""The layer's gradients survive in-place changes of ``x``; two threads on one layer are an error."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn


def _grads(layer, x, dy, mutate=None):
    layer.zero_grad()
    y, _ = layer(x)
    if mutate is not None:
        mutate(x)  # the caller reuses its buffer before backward
    dx, _ = layer.backward(dy)
    return y, dx, {k: v.copy() for k, v in layer.grads.items()}


MUTATIONS = {
    "scale": lambda x: x.__imul__(3.0),
    "zero": lambda x: x.fill(0.0),
    "shuffle": lambda x: np.random.default_rng(1).shuffle(x.reshape(-1)),
}


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 5), B=st.integers(1, 3), I=st.integers(1, 4), H=st.integers(1, 4),
       layers=st.integers(1, 2), how=st.sampled_from(sorted(MUTATIONS)),
       seed=st.integers(0, 2**16))
def test_changing_x_in_place_before_backward_does_not_change_gradients(T, B, I, H, layers, how,
                                                                       seed):
    rng = np.random.default_rng(seed)
    layer = kernrnn.RNN("rnn", I, H, num_layers=layers, dtype=np.float64, seed=seed)
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, H))
    want = _grads(layer, x.copy(), dy)
    got = _grads(layer, x.copy(), dy, MUTATIONS[how])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    for k in want[2]:
        np.testing.assert_array_equal(got[2][k], want[2][k], err_msg=k)


def test_backward_from_another_threads_forward_is_an_error():
    layer = kernrnn.RNN("rnn", 2, 3, dtype=np.float64, seed=0)
    rng = np.random.default_rng(0)
    xa, xb = rng.standard_normal((4, 2, 2)), rng.standard_normal((4, 2, 2))
    dy = rng.standard_normal((4, 2, 3))
    a_forward_done, b_forward_done = threading.Event(), threading.Event()
    result = {}

    def thread_a():
        layer(xa)
        a_forward_done.set()
        b_forward_done.wait(30)
        try:
            layer.backward(dy)
        except RuntimeError as exc:
            result["a"] = exc

    def thread_b():
        a_forward_done.wait(30)
        layer(xb)
        b_forward_done.set()

    threads = [threading.Thread(target=thread_a, name="A"), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(result.get("a"), RuntimeError)
    assert "thread 'A'" in str(result["a"]) and "own layer" in str(result["a"])
    assert not any(np.any(g) for g in layer.grads.values()), "A's backward added gradients"
    # the context is B's, and only B (here: not the main thread either) may use it
    with pytest.raises(RuntimeError):
        layer.backward(dy)


def test_same_thread_forward_backward_still_works_after_a_refusal():
    layer = kernrnn.RNN("rnn", 2, 3, dtype=np.float64, seed=0)
    x = np.ones((2, 1, 2))
    t = threading.Thread(target=layer, args=(x,))
    t.start()
    t.join()
    with pytest.raises(RuntimeError):
        layer.backward(np.ones((2, 1, 3)))
    y, _ = layer(x)
    dx, _ = layer.backward(np.ones_like(y))
    assert dx.shape == x.shape
