"""Compile numbabn's CPU kernels ahead of use, into numba's on-disk cache
(``python -m numbabn compile``): for container images, CI caches and cluster images, so that
no process built from them pays the first call's compile.

Each kernel family (fused and row-wise channel-strided, channel-minor) runs its serial and
parallel twins on a small array of each dtype through the public API: the training forward
and backward (also with a mask, with the fused ReLU and residual, and for the channel-minor
family as ghost batches), the eval forward and backward, the forwards and the backward as
arrays beyond the cache run them (streaming stores), ``welford``, and the stages
Dask's tasks and SyncBatchNorm call (``apply``, ``grad_reduce``, ``grad_apply``).
"""

import time

import numpy as np

from . import _checks, _config

#: ``(name, shape, axis)`` of the arrays that reach every (family, twin) pair: serial below
#: ``PARALLEL_MIN_STRIDED`` / ``PARALLEL_MIN`` elements, parallel above.
LAYOUTS = [
    ("channel-minor, serial", (32, 64), 1),
    ("channel-minor, parallel", (_config.PARALLEL_MIN // 64, 64), 1),
    ("channel-strided, serial", (2, 2, _config.MIN_INNER), 1),
    ("channel-strided, parallel", (2, 2, _config.PARALLEL_MIN_STRIDED // 4), 1),
    ("fused channel-strided, serial", (2, _config.FUSE_CHANNELS, _config.MIN_INNER), 1),
    ("fused channel-strided, parallel", (2, _config.FUSE_CHANNELS, _config.PARALLEL_MIN_STRIDED // 32), 1),
]


def signatures(dtypes=("float32", "float64")):
    """The ``(dtype, layout name, shape, axis)`` cases :func:`compile_all` runs."""
    return [(np.dtype(d), name, shape, axis) for d in dtypes for name, shape, axis in LAYOUTS]


def compile_all(dtypes=("float32", "float64"), progress=None):
    """Run every case of :func:`signatures`, so numba compiles (or loads from its cache) each
    kernel it needs; ``progress(done, total, label, seconds)`` is told after each case.
    Returns the seconds each case took."""
    cases = signatures(dtypes)
    took = {}
    for i, (dtype, name, shape, axis) in enumerate(cases):
        t = time.perf_counter()
        _run_case(shape, axis, dtype)
        label = f"{dtype.name} {name} {shape}"
        took[label] = time.perf_counter() - t
        if progress is not None:
            progress(i + 1, len(cases), label, took[label])
    return took


def _run_case(shape, axis, dtype):
    from . import BatchNorm, welford
    from .cpu import api

    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    bn = BatchNorm(shape[axis], axis=axis, dtype=dtype)
    y = bn(x)
    bn.backward(y)
    bn.eval()(x)
    bn.backward(y)
    mask = np.ones(tuple(1 if a == axis else n for a, n in enumerate(shape)), bool)
    bn.train()
    bn.backward(bn(x, mask=mask))  # the masked kernels (a Dask task's too: the serial cases)
    relu = BatchNorm(shape[axis], axis=axis, dtype=dtype, activation="relu")
    relu.backward(relu(x, x))  # the activated kernels: every mode runs the same ones
    relu.eval()(x, x)
    if _checks.shape3(shape, axis)[2] < _config.MIN_INNER:  # channel-minor: ghost batches' drivers
        ghosts = BatchNorm(shape[axis], axis=axis, dtype=dtype, virtual_batch_size=shape[0] // 2)
        ghosts.backward(ghosts(x))
    welford(x, axis=axis)
    _streaming_calls(x, axis, dtype)
    coef = np.ones((2, shape[axis]))
    for parallel in (None, False):  # the size's twin, and the serial one Dask's tasks run
        api.apply(x, axis, coef, parallel=parallel)
        api.apply(x, axis, coef, parallel=parallel, residual=x, mode=3)
        sums = api.grad_reduce(y, x, axis, np.zeros(shape[axis]), parallel=parallel)
        api.grad_apply(y, x, axis, np.ones((3, shape[axis])), parallel=parallel)
    return sums


def _streaming_calls(x, axis, dtype):
    """The training and eval forwards (plain and activated) and the backward of arrays
    beyond the cache, which write with streaming stores (``numbabn.cpu._stream``): run on
    ``x`` with the size limit lifted."""
    from . import BatchNorm
    from .cpu import _stream

    limit = _stream.STREAM_BYTES
    _stream.STREAM_BYTES = 0
    try:
        bn = BatchNorm(x.shape[axis], axis=axis, dtype=dtype)
        bn.backward(bn(x))
        bn.eval()(x)
        relu = BatchNorm(x.shape[axis], axis=axis, dtype=dtype, activation="relu")
        relu(x, x)
        relu.eval()(x, x)
    finally:
        _stream.STREAM_BYTES = limit


def cache_note():
    """Where numba keeps the compiled kernels, in a sentence."""
    import numba

    if numba.config.CACHE_DIR:
        return f"numba's cache: NUMBA_CACHE_DIR={numba.config.CACHE_DIR}"
    return (
        "numba's cache: __pycache__ beside numbabn's sources when that directory is writable, else the "
        "user-wide cache (~/.cache/numba, or NUMBA_CACHE_DIR where set)"
    )
