"""numbabn on in-memory Dask arrays (threaded scheduler), public API only.

- ``DaskStatistics.time_welford``: ``numbabn.welford`` of a Dask array (``numbabn``),
  Dask's own ``dask.compute(x.mean(axes), x.var(axes))`` on the same chunks
  (``dask-mean-var``), and ``numbabn.welford`` of the same array in memory (``in-memory``);
- ``DaskNormalize.time_normalize``: the lazy eval normalize stored into a preallocated array
  (``numbabn``) against the in-memory eval forward (``in-memory``);
- ``DaskTaskOverhead.time_welford_tiny_chunks``: statistics of 1,024 chunks of 8 KB, so the
  time is Dask's and numbabn's per-task overhead.

``setup`` checks the statistics against the in-memory ``numbabn.welford`` before timing.
"""

import importlib.util

import numpy as np

from . import LAYOUTS, QUICK, SIZES, skip

CHUNK_BYTES = 16 << 20
DASK_SIZES = ["small"] if QUICK else ["medium", "large"]


def _dask():
    if importlib.util.find_spec("dask") is None or importlib.util.find_spec("numbabn.dask") is None:
        skip("needs dask and numbabn.dask: pip install 'numbabn[dask]'")
    import dask
    import dask.array as da

    return dask, da


def _array(layout, size):
    axis, row = LAYOUTS[layout]
    batch = max(2, SIZES[size] // int(np.prod(row)))
    x = 3.0 + np.random.default_rng(0).standard_normal((batch, *row), dtype=np.float32)
    return x, axis


def _chunked(da, x):
    rows = max(1, CHUNK_BYTES // x[0].nbytes)
    return da.from_array(x, chunks=(rows, *x.shape[1:]))


class DaskStatistics:
    params = [["NCHW", "NHWC"], DASK_SIZES, ["numbabn", "dask-mean-var", "in-memory"]]
    param_names = ["layout", "size", "method"]

    def setup(self, layout, size, method):
        dask, da = _dask()
        import numbabn

        x, axis = _array(layout, size)
        dx = _chunked(da, x)
        axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        ref = numbabn.welford(x, axis=axis)
        if method == "numbabn":
            self.fn = lambda: numbabn.welford(dx, axis=axis)
            got = self.fn()
            np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-12)
            np.testing.assert_allclose(got.m2, ref.m2, rtol=1e-12)
        elif method == "dask-mean-var":
            with dask.config.set(scheduler="threads"):
                self.fn = lambda: dask.compute(dx.mean(axes), dx.var(axes))
                mean, var = self.fn()
            np.testing.assert_allclose(mean, ref.mean, rtol=1e-4)
        else:
            self.fn = lambda: numbabn.welford(x, axis=axis)
        self.dask = dask

    def time_welford(self, layout, size, method):
        with self.dask.config.set(scheduler="threads"):
            self.fn()


class DaskNormalize:
    params = [["NCHW", "NHWC"], DASK_SIZES, ["numbabn", "in-memory"]]
    param_names = ["layout", "size", "method"]

    def setup(self, layout, size, method):
        dask, da = _dask()
        import numbabn

        x, axis = _array(layout, size)
        c = x.shape[axis]
        rm, rv = np.full(c, 3.0, np.float32), np.ones(c, np.float32)
        ref = numbabn.batch_norm(x, rm, rv, axis=axis)
        if method == "numbabn":
            y = numbabn.batch_norm(_chunked(da, x), rm, rv, axis=axis)
            out = np.empty_like(x)
            self.fn = lambda: da.store(y, out, lock=False)
            with dask.config.set(scheduler="threads"):
                self.fn()
            np.testing.assert_array_equal(out, ref)
        else:
            self.fn = lambda: numbabn.batch_norm(x, rm, rv, axis=axis)
        self.dask = dask

    def time_normalize(self, layout, size, method):
        with self.dask.config.set(scheduler="threads"):
            self.fn()


class DaskTaskOverhead:
    def setup(self):
        dask, da = _dask()
        import numbabn

        x = np.random.default_rng(1).standard_normal((4096, 8, 8, 8), dtype=np.float32)
        dx = da.from_array(x, chunks=(4, 8, 8, 8))
        self.fn = lambda: numbabn.welford(dx)
        np.testing.assert_allclose(self.fn().mean, numbabn.welford(x).mean, rtol=1e-12)
        self.dask = dask

    def time_welford_tiny_chunks(self):
        with self.dask.config.set(scheduler="threads"):
            self.fn()
