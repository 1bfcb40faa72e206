"""The compile-time floor of a numba batch norm on this machine: the plainest ``(N, C)``
training forward, backward and eval that numba's ``prange`` allows, with none of numbabn's
kernels (no blocks, no float32 lanes, no layouts, no checks): five parallel loops in three
drivers, numbabn's jit options; ``welford``, the statistics alone; and ``plus_one``, numba by
itself.  ``tools/cold_start.py``
times their first calls beside numbabn's, each in a fresh process with an empty cache.

    .venv/bin/python tools/compile_floor.py [float32|float64]
"""

import sys
import time

import numba
import numpy as np
from numba import prange

OPTIONS = {"fastmath": {"reassoc", "contract"}, "error_model": "numpy", "nogil": True, "cache": True}
SPLITS = 8


@numba.njit(parallel=True, **OPTIONS)
def train(x, w, b, rm, rv, momentum, eps, y, save):
    """Welford per row range, Chan merge, EMA update, normalize."""
    n, c = x.shape
    part = np.zeros((SPLITS, 3, c))
    step = (n + SPLITS - 1) // SPLITS
    for s in prange(SPLITS):
        for r in range(s * step, min(n, (s + 1) * step)):
            for j in range(c):
                part[s, 0, j] += 1.0
                d = x[r, j] - part[s, 1, j]
                part[s, 1, j] += d / part[s, 0, j]
                part[s, 2, j] += d * (x[r, j] - part[s, 1, j])
    a = np.empty(c)
    d0 = np.empty(c)
    for j in range(c):
        count, mean, m2 = 0.0, 0.0, 0.0
        for s in range(SPLITS):
            nb = part[s, 0, j]
            if nb > 0.0:
                total = count + nb
                delta = part[s, 1, j] - mean
                mean += delta * nb / total
                m2 += part[s, 2, j] + delta * delta * count * nb / total
                count = total
        invstd = 1.0 / np.sqrt(m2 / count + eps)
        a[j] = w[j] * invstd
        d0[j] = b[j] - mean * a[j]
        save[0, j], save[1, j] = mean, invstd
        rm[j] = (1.0 - momentum) * rm[j] + momentum * mean
        rv[j] = (1.0 - momentum) * rv[j] + momentum * m2 / (count - 1.0)
    for r in prange(n):
        for j in range(c):
            y[r, j] = x[r, j] * a[j] + d0[j]


@numba.njit(parallel=True, **OPTIONS)
def backward(g, x, w, save, gi, grads):
    """The reduction, the coefficients, the elementwise pass."""
    n, c = x.shape
    part = np.zeros((SPLITS, 2, c))
    step = (n + SPLITS - 1) // SPLITS
    for s in prange(SPLITS):
        for r in range(s * step, min(n, (s + 1) * step)):
            for j in range(c):
                part[s, 0, j] += g[r, j]
                part[s, 1, j] += g[r, j] * (x[r, j] - save[0, j])
    ca = np.empty(c)
    cb = np.empty(c)
    cd = np.empty(c)
    for j in range(c):
        sg, sgx = 0.0, 0.0
        for s in range(SPLITS):
            sg += part[s, 0, j]
            sgx += part[s, 1, j]
        invstd = save[1, j]
        grads[0, j], grads[1, j] = sgx * invstd, sg
        ca[j] = w[j] * invstd
        cb[j] = -w[j] * invstd**3 * sgx / n
        cd[j] = -ca[j] * sg / n - cb[j] * save[0, j]
    for r in prange(n):
        for j in range(c):
            gi[r, j] = g[r, j] * ca[j] + x[r, j] * cb[j] + cd[j]


@numba.njit(parallel=True, **OPTIONS)
def evaluate(x, w, b, rm, rv, eps, y):
    """Normalize with the running statistics."""
    n, c = x.shape
    a = np.empty(c)
    d0 = np.empty(c)
    for j in range(c):
        a[j] = w[j] / np.sqrt(rv[j] + eps)
        d0[j] = b[j] - rm[j] * a[j]
    for r in prange(n):
        for j in range(c):
            y[r, j] = x[r, j] * a[j] + d0[j]


@numba.njit(parallel=True, **OPTIONS)
def welford(x, stats):
    """Welford per row range and Chan merge: ``(count, mean, M2)`` per channel."""
    n, c = x.shape
    part = np.zeros((SPLITS, 3, c))
    step = (n + SPLITS - 1) // SPLITS
    for s in prange(SPLITS):
        for r in range(s * step, min(n, (s + 1) * step)):
            for j in range(c):
                part[s, 0, j] += 1.0
                d = x[r, j] - part[s, 1, j]
                part[s, 1, j] += d / part[s, 0, j]
                part[s, 2, j] += d * (x[r, j] - part[s, 1, j])
    for j in range(c):
        count, mean, m2 = 0.0, 0.0, 0.0
        for s in range(SPLITS):
            nb = part[s, 0, j]
            if nb > 0.0:
                total = count + nb
                delta = part[s, 1, j] - mean
                mean += delta * nb / total
                m2 += part[s, 2, j] + delta * delta * count * nb / total
                count = total
        stats[0, j], stats[1, j], stats[2, j] = count, mean, m2


@numba.njit(cache=True)
def plus_one(x):
    """numba by itself: a one-line function (its warm first call is numba's own start)."""
    return x + 1


def first_calls(x):
    """A training forward, backward and eval of ``x`` (N, C)."""
    c, dt = x.shape[1], x.dtype
    w, b, rm, rv = np.ones(c, dt), np.zeros(c, dt), np.zeros(c, dt), np.ones(c, dt)
    y, gi, save, grads = np.empty_like(x), np.empty_like(x), np.empty((2, c)), np.empty((2, c))
    train(x, w, b, rm, rv, 0.1, 1e-5, y, save)
    backward(y, x, w, save, gi, grads)
    evaluate(x, w, b, rm, rv, 1e-5, y)


if __name__ == "__main__":
    t = time.perf_counter()
    first_calls(np.random.default_rng(0).standard_normal((256, 512)).astype(sys.argv[1] if sys.argv[1:] else "float32"))
    print(f"first training forward, backward and eval: {time.perf_counter() - t:.2f} s")
