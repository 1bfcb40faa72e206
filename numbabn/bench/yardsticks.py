"""The yardsticks every ratio is taken against: a streaming copy and a triad, as numba kernels
compiled like numbabn's own (parallel, vectorized), so a ratio compares memory traffic, not
compilers."""

import numba
import numpy as np
from numba import prange

_OPTIONS = {"fastmath": {"reassoc", "contract"}, "error_model": "numpy", "cache": True}

#: Below this many elements the copy runs on one thread, as numbabn's channel-minor kernels
#: do (its channel-strided ones start their threads from half this size): there, starting
#: the threads costs more than the copy (up to 30x a 256 KB copy on a busy 2-core machine).
SERIAL_BELOW = 1 << 17


@numba.njit(parallel=True, **_OPTIONS)
def parallel_copy(src, dst):
    """``dst[:] = src`` over flat arrays, on every numba thread: on several cores it beats
    ``np.copyto``'s single thread."""
    for i in prange(src.size):
        dst[i] = src[i]


@numba.njit(parallel=True, **_OPTIONS)
def triad(a, b, k, out):
    """``out = a + k * b`` over flat arrays: it reads two arrays and writes one, as a backward
    pass's elementwise sweep does."""
    for i in prange(a.shape[0]):
        out[i] = a[i] + k * b[i]


def copy_of(x, y):
    """A zero-argument callable copying ``x`` into ``y`` (same shape, C-contiguous): serial
    below :data:`SERIAL_BELOW` elements, :func:`parallel_copy` above."""
    if x.size < SERIAL_BELOW:
        return lambda: np.copyto(y, x)
    fx, fy = x.reshape(-1), y.reshape(-1)
    return lambda: parallel_copy(fx, fy)
