"""The device check's one-line kernel (``env`` phase), in a module of its own so that
``numba.cuda`` is a global of the function (the simulator swaps such globals for its
own module; a closure would keep the real one) and the runner never imports Numba."""

from numba import cuda


def add_one(a):
    """Add 1 to every element of a 1-D array, one thread each."""
    i = cuda.grid(1)
    if i < a.size:
        a[i] += 1
