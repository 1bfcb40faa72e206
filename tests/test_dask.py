"""Dask arrays (numbabn.dask): the public functions and BatchNorm on Dask inputs agree with the
NumPy path for any chunking (along the feature axis too, uneven, empty chunks), give the same
bits for a given chunking under every scheduler, a real distributed cluster and a worker
lost mid-computation, and refuse bad arguments before anything is computed or written."""

import logging
import os
import re

import numpy as np
import pytest
from conftest import assert_bitwise, assert_close, make_input, make_params, stats_rtol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbabn

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
nd = pytest.importorskip("numbabn.dask")
Delayed = pytest.importorskip("dask.delayed").Delayed

#: (shape, axis): NCHW, channels-last NHWC, (N, C).
LAYOUTS = [((6, 5, 7, 9), 1), ((6, 7, 9, 5), -1), ((40, 5), 1)]
LAYOUT_IDS = ["nchw", "nhwc", "nc"]
DTYPES = [np.float32, np.float64]
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def chunkings(draw, shape):
    """Chunks for each axis of ``shape``: cuts anywhere, repeated cuts making empty chunks."""
    chunks = []
    for n in shape:
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
        bounds = [0, *cuts, n]
        chunks.append(tuple(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)))
    return tuple(chunks)


def layout_cases():
    return [
        pytest.param(shape, axis, np.dtype(dtype), id=f"{tag}-{np.dtype(dtype).name}")
        for (shape, axis), tag in zip(LAYOUTS, LAYOUT_IDS, strict=True)
        for dtype in DTYPES
    ]


def assert_stats_equal(s, ref, dtype=np.float64):
    """Statistics of ``dtype`` data equal to ``ref`` (the merge order differs): to float64
    rounding for float64 data; for float32 data, whose chunks are summed in float32 lanes by
    block, to :func:`conftest.stats_rtol` (the mean in standard deviations)."""
    assert s.count == ref.count
    assert isinstance(s.mean, np.ndarray) and s.mean.dtype == np.float64
    rtol = 1e-12 if np.dtype(dtype) == np.float64 else stats_rtol(dtype)
    atol = 0.0 if np.dtype(dtype) == np.float64 else rtol * float(np.sqrt(ref.m2 / ref.count).max())
    np.testing.assert_allclose(s.mean, ref.mean, rtol=rtol, atol=atol)
    np.testing.assert_allclose(s.m2, ref.m2, rtol=rtol, atol=0)


# -- statistics ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "axis", "dtype"), layout_cases())
@FEW
@given(data=st.data())
def test_welford_any_chunking(shape, axis, dtype, data):
    x = make_input(np.random.default_rng(1), shape, axis, dtype)
    chunks = data.draw(chunkings(shape))
    s = numbabn.welford(da.from_array(x, chunks=chunks), axis=axis)
    assert_stats_equal(s, numbabn.welford(x, axis=axis), x.dtype)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
@FEW
@given(data=st.data())
def test_welford_float32_large_mean(shape, axis, data):
    # |mean| / std = 1e4: E[x^2] - E[x]^2 would lose every digit of the variance in float32.
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    chunks = data.draw(chunkings(shape))
    s = numbabn.welford(da.from_array(x, chunks=chunks), axis=axis)
    assert_stats_equal(s, numbabn.welford(x, axis=axis), x.dtype)
    other = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    np.testing.assert_allclose(s.var(), np.var(x.astype(np.float64), axis=other), rtol=stats_rtol(x.dtype))


@pytest.mark.parametrize(("shape", "axis", "dtype"), layout_cases())
def test_one_chunk_is_bitwise_the_numpy_path(shape, axis, dtype, rng):
    """A one-chunk Dask array runs the same kernels as the NumPy path: the same bits in
    statistics, outputs, running statistics and gradients."""
    x = make_input(rng, shape, axis, dtype)
    dx = da.from_array(x, chunks=-1)
    c = x.shape[axis]
    w, b, rm, rv = make_params(rng, c, dtype)
    s, ref = numbabn.welford(dx, axis=axis), numbabn.welford(x, axis=axis)
    assert s.count == ref.count
    assert_bitwise(s.mean, ref.mean)
    assert_bitwise(s.m2, ref.m2)
    rm_d, rv_d = rm.copy(), rv.copy()
    y, mean, invstd = numbabn.batch_norm_forward(dx, w, b, rm_d, rv_d, axis=axis)
    y0, mean0, invstd0 = numbabn.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    for a, e in [(y.compute(), y0), (mean, mean0), (invstd, invstd0), (rm_d, rm), (rv_d, rv)]:
        assert_bitwise(a, e)
    g = rng.standard_normal(shape).astype(dtype)
    for training in (True, False):
        dg = da.from_array(g, chunks=-1)
        got = numbabn.batch_norm_backward(dg, dx, w, mean, invstd, training=training, axis=axis)
        want = numbabn.batch_norm_backward(g, x, w, mean0, invstd0, training=training, axis=axis)
        assert_bitwise(got[0].compute(), want[0])
        assert_bitwise(got[1], want[1])
        assert_bitwise(got[2], want[2])


def test_welford_delayed_and_split_every(rng):
    x = make_input(rng, (30, 4, 6), 1, np.float64)
    dx = da.from_array(x, chunks=(3, 2, 6))
    d = nd.welford(dx, compute=False)
    assert isinstance(d, Delayed)
    s, total = dask.compute(d, dx.sum())
    assert isinstance(s, numbabn.Stats)
    assert_stats_equal(s, numbabn.welford(x), x.dtype)
    np.testing.assert_allclose(total, x.sum())
    for split_every in (2, 3, 100):
        assert_stats_equal(nd.welford(dx, split_every=split_every), numbabn.welford(x), x.dtype)
    # The tree is fixed by the chunks and split_every: the same call gives the same bits.
    a, b = nd.welford(dx, split_every=3), nd.welford(dx, split_every=3)
    assert_bitwise(a.mean, b.mean)
    assert_bitwise(a.m2, b.m2)


def test_welford_empty_and_no_channels():
    x = np.zeros((0, 3, 4))
    s = numbabn.welford(da.from_array(x, chunks=(1, 2, 2)))
    ref = numbabn.welford(x)
    assert s.count == ref.count == 0
    assert_bitwise(s.mean, ref.mean)
    s = numbabn.welford(da.from_array(np.zeros((4, 0, 5)), chunks=(2, 1, 3)))
    assert s.count == 20 and s.mean.shape == (0,) and s.m2.shape == (0,)


def test_nan_stays_in_its_channel(rng):
    x = make_input(rng, (8, 6, 10), 1, np.float64)
    x[5, 2, 7] = np.nan
    dx = da.from_array(x, chunks=(3, 4, 4))
    s = numbabn.welford(dx)
    assert np.isnan(s.mean[2]) and np.isnan(s.m2[2])
    others = [c for c in range(6) if c != 2]
    assert np.all(np.isfinite(s.mean[others])) and np.all(np.isfinite(s.m2[others]))
    y = numbabn.batch_norm(dx, None, None, training=True).compute()
    assert np.all(np.isnan(y[:, 2])) and np.all(np.isfinite(y[:, others]))


# -- forward, backward, the layer -------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "axis", "dtype"), layout_cases())
@FEW
@given(data=st.data())
def test_forward_backward_any_chunking(shape, axis, dtype, data):
    rng = np.random.default_rng(3)
    x = make_input(rng, shape, axis, dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w, b, rm, rv = make_params(rng, x.shape[axis], dtype)
    chunks = data.draw(chunkings(shape))
    gchunks = data.draw(chunkings(shape))  # grad_output is rechunked to the input's chunks
    dx, dg = da.from_array(x, chunks=chunks), da.from_array(g, chunks=gchunks)
    training = data.draw(st.booleans())
    rm_d, rv_d = rm.copy(), rv.copy()
    y, mean, invstd = numbabn.batch_norm_forward(dx, w, b, rm_d, rv_d, training=training, axis=axis)
    y0, mean0, invstd0 = numbabn.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis)
    assert isinstance(y, da.Array) and y.chunks == dx.chunks and y.dtype == dtype
    assert mean.dtype == invstd.dtype == np.float64
    assert_close(y.compute(), y0, dtype)
    tol = 1e-12 if dtype == np.float64 else stats_rtol(dtype)
    np.testing.assert_allclose(mean, mean0, rtol=tol, atol=0 if dtype == np.float64 else tol / invstd0.min())
    np.testing.assert_allclose(invstd, invstd0, rtol=tol)
    assert_close(rm_d, rm, dtype)
    assert_close(rv_d, rv, dtype)
    gi, gw, gb = numbabn.batch_norm_backward(dg, dx, w, mean, invstd, training=training, axis=axis)
    gi0, gw0, gb0 = numbabn.batch_norm_backward(g, x, w, mean0, invstd0, training=training, axis=axis)
    assert isinstance(gi, da.Array) and gi.chunks == dx.chunks
    assert gw.dtype == gb.dtype == dtype
    assert_close(gi.compute(), gi0, dtype)
    assert_close(gw, gw0, dtype)
    assert_close(gb, gb0, dtype)


def test_eval_reads_nothing_at_call_time(rng):
    """Eval mode builds the map only: an input whose chunks cannot be computed still gives
    a lazy result (the error comes when it is computed)."""
    x = make_input(rng, (6, 3, 4), 1, np.float32)
    _, _, rm, rv = make_params(rng, 3, np.float32)

    def boom(block):
        raise RuntimeError("read")

    dx = da.from_array(x, chunks=2).map_blocks(boom, dtype=x.dtype)
    y = numbabn.batch_norm(dx, rm, rv, training=False)
    with pytest.raises(RuntimeError, match="read"):
        y.compute()


def test_training_updates_running_stats_only_after_the_statistics(rng):
    x = make_input(rng, (6, 3, 4), 1, np.float32)
    _, _, rm, rv = make_params(rng, 3, np.float32)
    before = rm.copy(), rv.copy()

    def boom(block):
        raise RuntimeError("lost")

    dx = da.from_array(x, chunks=2).map_blocks(boom, dtype=x.dtype)
    with pytest.raises(RuntimeError, match="lost"):
        numbabn.batch_norm(dx, rm, rv, training=True)
    assert_bitwise(rm, before[0])
    assert_bitwise(rv, before[1])


@pytest.mark.parametrize(
    ("fn", "shown"),
    [(lambda b: b[:1], "shape (1, 3, 4)"), (lambda b: b.astype(np.float64), "dtype float64")],
    ids=["fewer rows", "other dtype"],
)
def test_chunks_that_compute_to_other_than_declared_are_refused(fn, shown, rng):
    """A graph whose chunks compute to another shape or dtype than the array declares (a
    ``map_blocks`` with a wrong ``meta``) raises in the statistics and gradient passes,
    before the running statistics or gradients move."""
    x = make_input(rng, (6, 3, 4), 1, np.float32)
    _, _, rm, rv = make_params(rng, 3, np.float32)
    before = rm.copy(), rv.copy()
    dx = da.from_array(x, chunks=(2, 3, 4)).map_blocks(fn, dtype=x.dtype, meta=np.empty((0, 0, 0), x.dtype))
    for call in (
        lambda: numbabn.batch_norm(dx, rm, rv, training=True),
        lambda: numbabn.welford(dx),
        lambda: numbabn.batch_norm_backward(dx, da.from_array(x, chunks=(2, 3, 4)), None, np.zeros(3), np.ones(3)),
    ):
        with pytest.raises(ValueError, match=r"chunk \(\d, 0, 0\) computed to .*" + re.escape(shown) + ".*declares"):
            call()
    assert_bitwise(rm, before[0])
    assert_bitwise(rv, before[1])


LIES = [
    pytest.param(lambda b: (b * 10).astype("i4"), "dtype int32", id="int32"),
    pytest.param(lambda b: b[1:], "shape (7, 5, 6)", id="fewer rows"),
]


@pytest.mark.parametrize(("fn", "shown"), LIES)
def test_eval_chunks_that_compute_to_other_than_declared_raise(fn, shown, rng):
    """Eval mode reads nothing at call time, so its lazy output checks each chunk when it is
    computed, as the statistics pass does: no truncated int32 values, no (35, 5, 6) output for
    a declared (40, 5, 6); the running statistics are left as they were."""
    x = make_input(rng, (40, 5, 6), 1, np.float32)
    w, b, rm, rv = make_params(rng, 5, np.float32)
    before = rm.copy(), rv.copy()
    dx = da.from_array(x, chunks=(8, 5, 6)).map_blocks(fn, dtype="f4")
    assert dx.dtype == np.float32 and dx.shape == (40, 5, 6)
    layer = numbabn.BatchNorm(5).eval()
    for y in (numbabn.batch_norm(dx, rm, rv, w, b, training=False), layer(dx)):
        with pytest.raises(
            ValueError, match=r"input chunk \(\d, 0, 0\) computed to .*" + re.escape(shown) + ".*declares"
        ):
            y.compute()
    assert_bitwise(rm, before[0])
    assert_bitwise(rv, before[1])


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("lying", ["input", "grad_output"])
@pytest.mark.parametrize(("fn", "shown"), LIES)
def test_lazy_maps_check_chunks_when_computed(fn, shown, lying, training, rng):
    """A chunk read again by a lazy map (the output's normalization, grad_input) may compute
    to something else than when the statistics and gradient sums were taken (a store changed
    under the graph): the maps check it too, naming the argument."""
    x = make_input(rng, (40, 5, 6), 1, np.float32)
    g = make_input(rng, x.shape, 1, np.float32)
    lie = []

    def read(block):
        return fn(block) if lie else block

    meta = np.empty((0, 0, 0), np.float32)
    dx, dg = (da.from_array(a, chunks=(8, 5, 6)) for a in (x, g))
    if lying == "input":
        dx = dx.map_blocks(read, dtype=x.dtype, meta=meta)
    else:
        dg = dg.map_blocks(read, dtype=x.dtype, meta=meta)
    layer = numbabn.BatchNorm(5).train(training)
    y = layer(dx)
    gi = layer.backward(dg)
    lie.append(True)
    lazy = [gi] if lying == "grad_output" else [y, gi]
    for a in lazy:
        with pytest.raises(
            ValueError, match=re.escape(lying) + r" chunk \(\d, 0, 0\) computed to .*" + re.escape(shown)
        ):
            a.compute()


def test_training_empty_batch(rng):
    x = np.zeros((0, 3, 4), np.float32)
    _, _, rm, rv = make_params(rng, 3, np.float32)
    before = rm.copy()
    y, mean, invstd = numbabn.batch_norm_forward(da.from_array(x, chunks=1), None, None, rm, rv)
    y0, mean0, _ = numbabn.batch_norm_forward(x, None, None, rm.copy(), rv.copy())
    assert y.compute().shape == x.shape
    assert_bitwise(mean, mean0)
    assert_bitwise(rm, before)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("shape", "axis"), [LAYOUTS[0], LAYOUTS[1]], ids=LAYOUT_IDS[:2])
def test_layer_several_steps(shape, axis, momentum, rng):
    dtype = np.float64
    host = numbabn.BatchNorm(shape[axis], axis=axis, momentum=momentum, dtype=dtype)
    lazy = numbabn.BatchNorm(shape[axis], axis=axis, momentum=momentum, dtype=dtype)
    for layer in (host, lazy):
        layer.weight[...] = np.linspace(0.5, 1.5, shape[axis])
    for step in range(3):
        x = make_input(rng, shape, axis, dtype, loc=step + 1.0)
        g = rng.standard_normal(shape)
        chunks = (2,) + tuple(-(-s // 2) for s in shape[1:])
        y = lazy(da.from_array(x, chunks=chunks))
        y0 = host(x)
        assert isinstance(y, da.Array)
        assert_close(y.compute(), y0, dtype)
        gi = lazy.backward(da.from_array(g, chunks=3))
        gi0 = host.backward(g)
        assert_close(gi.compute(), gi0, dtype)
        for name in ("grad_weight", "grad_bias", "update_threshold", "running_mean", "running_var"):
            assert_close(getattr(lazy, name), getattr(host, name), dtype, err_msg=name)
        assert lazy.num_batches_tracked == host.num_batches_tracked == step + 1
    lazy.eval()
    host.eval()
    x = make_input(rng, shape, axis, dtype)
    assert_close(lazy(da.from_array(x, chunks=3)).compute(), host(x), dtype)


# -- bad input: checked before anything is computed or written -------------------------------------
class FakeGpuArray:
    """Looks like a GPU array to numbabn (exports ``__cuda_array_interface__``)."""

    shape, dtype = (3,), np.dtype(np.float32)

    @property
    def __cuda_array_interface__(self):
        return {"shape": (3,), "typestr": "<f4", "data": (0, False), "version": 3}


def _never(block):
    raise AssertionError("computed although the call should fail its checks")


class Args:
    """A forward call on a Dask input that must not be computed, and a snapshot of the
    NumPy buffers to check that a failed call wrote nothing."""

    def __init__(self, rng, shape=(4, 3, 5), dtype=np.float32):
        self.x = da.from_array(make_input(rng, shape, 1, dtype), chunks=2).map_blocks(_never, dtype=dtype)
        self.weight, self.bias, self.running_mean, self.running_var = make_params(rng, shape[1], dtype)
        self._snap = {k: v.copy() for k, v in vars(self).items() if isinstance(v, np.ndarray)}

    def forward(self, **override):
        kw = dict(weight=self.weight, bias=self.bias, running_mean=self.running_mean, running_var=self.running_var)
        kw.update(override)
        return numbabn.batch_norm_forward(kw.pop("input", self.x), **kw)

    def assert_unchanged(self):
        for name, before in self._snap.items():
            assert_bitwise(getattr(self, name), before, err_msg=name)


def _bad_forward_cases():
    def ro(a):
        a = a.copy()
        a.flags.writeable = False
        return a

    int_x = da.zeros((4, 3, 5), dtype=np.int32, chunks=2)
    one = da.zeros((1, 3), dtype=np.float32, chunks=1)
    masked = da.ma.masked_array(da.zeros((4, 3, 5), dtype=np.float32, chunks=2))
    return [
        # The NumPy path's checks, through the Dask backend.
        ("dtype", lambda a: {"input": int_x}, TypeError, "input must have dtype float32, float64 or float16"),
        ("1-d", lambda a: {"input": da.zeros(5, chunks=2)}, ValueError, "at least 2 dimensions"),
        ("axis", lambda a: {"axis": 3}, ValueError, "axis must be in [-3, 3)"),
        ("stream", lambda a: {"stream": 0}, ValueError, "stream applies to GPU arrays only"),
        ("one value", lambda a: {"input": one, "weight": None, "bias": None}, ValueError, "more than 1 value"),
        ("eval", lambda a: {"training": False, "running_mean": None, "running_var": None}, ValueError, "required"),
        ("momentum", lambda a: {"momentum": 2.0}, ValueError, "momentum must be in [0, 1]"),
        ("eps", lambda a: {"eps": -1.0}, ValueError, "eps must be a finite float >= 0"),
        ("weight shape", lambda a: {"weight": np.ones(4, np.float32)}, ValueError, "weight must have shape (3,)"),
        ("weight dtype", lambda a: {"weight": np.ones(3)}, TypeError, "weight must have dtype float32"),
        ("read-only", lambda a: {"running_var": ro(a.running_var)}, ValueError, "running_var must be writable"),
        # Dask's own.
        ("dask weight", lambda a: {"weight": da.ones(3, dtype=np.float32)}, TypeError, "weight must be a NumPy"),
        ("dask running", lambda a: {"running_mean": da.zeros(3, dtype=np.float32)}, TypeError, "Dask array"),
        ("gpu bias", lambda a: {"bias": FakeGpuArray()}, TypeError, "bias must be a NumPy array, got a GPU array"),
        ("out", lambda a: {"out": np.empty((4, 3, 5), np.float32)}, TypeError, "out= is not supported for Dask"),
        ("masked", lambda a: {"input": masked}, TypeError, "Dask array of NumPy chunks"),
    ]


@pytest.mark.parametrize(("override", "exc", "message"), [c[1:] for c in _bad_forward_cases()],
                         ids=[c[0] for c in _bad_forward_cases()])  # fmt: skip
def test_bad_forward_arguments(override, exc, message, rng):
    args = Args(rng)
    with pytest.raises(exc, match=re.escape(message)):
        args.forward(**override(args))
    args.assert_unchanged()


def test_unknown_chunk_sizes(rng):
    x = da.from_array(make_input(rng, (8, 3), 1, np.float64), chunks=2)
    x = x[x[:, 0] > -100]
    with pytest.raises(ValueError, match="known chunk sizes.*compute_chunk_sizes"):
        numbabn.welford(x)


def test_bad_backward_arguments(rng):
    args = Args(rng)
    mean, invstd = np.zeros(3), np.ones(3)
    g = np.ones((4, 3, 5), np.float32)
    with pytest.raises(TypeError, match="grad_output must be a Dask array"):
        numbabn.batch_norm_backward(g, args.x, None, mean, invstd)
    with pytest.raises(ValueError, match=re.escape("grad_output must have shape (4, 3, 5)")):
        numbabn.batch_norm_backward(da.ones((4, 3, 6), np.float32), args.x, None, mean, invstd)
    with pytest.raises(TypeError, match="save_mean must be a NumPy array, got a Dask"):
        numbabn.batch_norm_backward(da.from_array(g), args.x, None, da.from_array(mean), invstd)
    with pytest.raises(TypeError, match="out= is not supported"):
        numbabn.batch_norm_backward(da.from_array(g), args.x, None, mean, invstd, out=g)


def test_bad_welford_arguments(rng):
    x = make_input(rng, (4, 3), 1, np.float64)
    with pytest.raises(TypeError, match="x must be a dask.array.Array, got ndarray"):
        nd.welford(x)
    dx = da.from_array(x, chunks=2)
    with pytest.raises(ValueError, match="split_every must be an int >= 2 or None, got 1"):
        nd.welford(dx, split_every=1)
    with pytest.raises(TypeError, match="split_every must be an int >= 2 or None, got float"):
        nd.welford(dx, split_every=2.0)
    with pytest.raises(TypeError, match="compute must be a bool"):
        nd.welford(dx, compute="yes")


def test_layer_refuses_wrong_channels_unchanged(rng):
    layer = numbabn.BatchNorm(4)
    before = layer.running_mean.copy()
    with pytest.raises(ValueError, match="input must have 4 channels"):
        layer(Args(rng).x)
    assert_bitwise(layer.running_mean, before)
    assert layer.num_batches_tracked == 0


# -- the out-of-core pipeline ----------------------------------------------------------------------
def test_normalize_pass_maps_chunks_independently(tmp_path, rng):
    """Statistics first, then a map over concrete coefficients: each output chunk depends on
    its own input chunk only (nothing holds the whole array), and no statistic is lazy."""
    zarr = pytest.importorskip("zarr")
    x = make_input(rng, (12, 3, 4, 4), 1, np.float32)
    src = str(tmp_path / "x.zarr")
    da.to_zarr(da.from_array(x, chunks=(4, 2, 4, 4)), src)
    z = da.from_zarr(src)
    y = numbabn.batch_norm(z, None, None, training=True)
    graph = y.__dask_graph__()
    assert not any("welford" in str(name) for name in graph.layers)
    deps = graph.get_all_dependencies()
    for key in (k for k in dict(graph) if k[0] == y.name):
        seen, todo = set(), [key]
        while todo:
            for d in deps[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        assert len([d for d in seen if isinstance(d, tuple) and d[0] == z.name]) == 1, key
    dst = str(tmp_path / "y.zarr")
    da.to_zarr(y, dst)
    out = zarr.open_array(dst, mode="r")
    assert out.chunks == (4, 2, 4, 4)
    in_memory = numbabn.batch_norm(da.from_array(x, chunks=(4, 2, 4, 4)), None, None, training=True)
    assert_bitwise(out[...], in_memory.compute())


# -- the same bits on every scheduler, cluster and rerun -------------------------------------------
#: One chunking with everything at once: uneven chunks, an empty chunk, chunks along the
#: channel axis, several merge levels (split_every 16).
SHAPE = (40, 6, 5, 70)
CHUNKS = ((3, 0, 17, 20), (2, 4), (5,), (30, 40))
SMALL_CHUNKS = ((2,) * 20, (2, 4), (5,), (70,))  # 20 chunks per column: two merge levels


def _run(x, g, chunks, scheduler):
    """Everything a Dask input computes, under ``scheduler``: statistics, a training forward
    (output and running statistics), a backward (grad_input and the per-channel gradients)."""
    rng = np.random.default_rng(7)
    w, b, rm, rv = make_params(rng, x.shape[1], x.dtype)
    with dask.config.set(scheduler=scheduler):
        dx = da.from_array(x, chunks=chunks)
        s = numbabn.welford(dx)
        y, mean, invstd = numbabn.batch_norm_forward(dx, w, b, rm, rv)
        gi, gw, gb = numbabn.batch_norm_backward(da.from_array(g, chunks=chunks), dx, w, mean, invstd)
        y, gi = dask.compute(y, gi)
    return {"mean": s.mean, "m2": s.m2, "y": y, "rm": rm, "rv": rv, "gi": gi, "gw": gw, "gb": gb}


def _assert_same_bits(a, b):
    for name in a:
        assert_bitwise(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    return make_input(rng, SHAPE, 1, np.float32), rng.standard_normal(SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def threaded(data):
    """The reference: the threaded scheduler, per chunking."""
    return {c: _run(*data, c, "threads") for c in (CHUNKS, SMALL_CHUNKS)}


def _warm_numba_cache():
    """Compile (or load) every serial kernel a task runs, in this process, so the on-disk
    cache is there for worker processes to load instead of compiling for seconds each."""
    for dtype in (np.float32, np.float64):
        for shape, axis in LAYOUTS:
            x = make_input(np.random.default_rng(0), shape, axis, np.dtype(dtype))
            dx = da.from_array(x, chunks=3)
            with dask.config.set(scheduler="sync"):
                y, mean, invstd = numbabn.batch_norm_forward(dx, axis=axis)
                gi = numbabn.batch_norm_backward(dx, dx, None, mean, invstd, axis=axis)[0]
                dask.compute(y, gi)


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread each, numba's threads limited to one inside them."""
    distributed = pytest.importorskip("distributed")
    _warm_numba_cache()
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        env={"NUMBA_NUM_THREADS": "1"},
        silence_logs=logging.CRITICAL,  # the killed worker's traceback is expected
    ) as cluster, distributed.Client(cluster, set_as_default=False) as client:  # fmt: skip
        yield cluster, client


@pytest.mark.parametrize("scheduler", ["sync", "processes"])
def test_same_bits_on_local_schedulers(scheduler, data, threaded):
    if scheduler == "processes":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _warm_numba_cache()
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            with dask.config.set(pool=pool):
                for chunks, ref in threaded.items():
                    _assert_same_bits(_run(*data, chunks, "processes"), ref)
        return
    for chunks, ref in threaded.items():
        _assert_same_bits(_run(*data, chunks, scheduler), ref)


def test_same_bits_on_a_cluster(cluster, data, threaded):
    _, client = cluster
    assert len(client.scheduler_info()["workers"]) == 2
    threads = client.run(lambda: os.environ.get("NUMBA_NUM_THREADS"))
    assert set(threads.values()) == {"1"}
    for chunks, ref in threaded.items():
        _assert_same_bits(_run(*data, chunks, client), ref)


def test_same_bits_on_a_one_worker_cluster(data, threaded):
    distributed = pytest.importorskip("distributed")
    _warm_numba_cache()
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", env={"NUMBA_NUM_THREADS": "1"}
    ) as one, distributed.Client(one, set_as_default=False) as client:  # fmt: skip
        _assert_same_bits(_run(*data, CHUNKS, client), threaded[CHUNKS])


def test_zarr_round_trip_on_a_cluster(cluster, tmp_path, rng):
    """Statistics from a Zarr array, the normalized array stored to another Zarr store with
    the same chunks (no lock), on the cluster: the same bits as in memory on threads."""
    zarr = pytest.importorskip("zarr")
    _, client = cluster
    x = make_input(rng, (24, 4, 6, 8), 1, np.float32)
    chunks = (5, 2, 6, 8)
    src, dst = str(tmp_path / "x.zarr"), str(tmp_path / "y.zarr")
    da.to_zarr(da.from_array(x, chunks=chunks), src)
    _, _, rm, rv = make_params(rng, 4, np.float32)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    with dask.config.set(scheduler=client):
        z = da.from_zarr(src)
        s = nd.welford(z)
        y = numbabn.batch_norm(z, rm, rv, training=True)
        da.to_zarr(y, dst)
    with dask.config.set(scheduler="threads"):
        dx = da.from_array(x, chunks=chunks)
        s_ref = nd.welford(dx)
        y_ref = numbabn.batch_norm(dx, rm_ref, rv_ref, training=True).compute()
    out = zarr.open_array(dst, mode="r")
    assert out.chunks == chunks and out.dtype == np.float32
    assert_bitwise(out[...], y_ref)
    assert_bitwise(s.mean, s_ref.mean)
    assert_bitwise(s.m2, s_ref.m2)
    assert_bitwise(rm, rm_ref)
    assert_bitwise(rv, rv_ref)
    assert_stats_equal(s, numbabn.welford(x), x.dtype)


def test_batch_renorm_on_a_cluster(cluster, rng):
    """BatchRenorm on a Dask array, on the cluster's worker processes: the same bits as on
    threads, and the host layer's results to rounding (its statistics are not chunked)."""
    _, client = cluster
    shape, chunks = (24, 4, 6, 8), (5, 2, 6, 8)
    x = make_input(rng, shape, 1, np.float64)
    g = rng.standard_normal(shape)
    w, b, rm, rv = make_params(rng, 4, np.float64)
    state = {"weight": w, "bias": b, "running_mean": rm, "running_var": 3 * rv, "num_batches_tracked": 0}
    layers = [numbabn.BatchRenorm(4, dtype=np.float64, rmax=1.3, dmax=0.4) for _ in range(3)]
    for bn in layers:
        bn.load_state_dict(state)
    results = []
    for bn, scheduler in zip(layers[:2], (client, "threads"), strict=True):
        with dask.config.set(scheduler=scheduler):
            dx = da.from_array(x, chunks=chunks)
            y = bn(dx).compute()
            gi = bn.backward(da.from_array(g, chunks=chunks)).compute()
        results.append((y, gi, bn.grad_weight, bn.grad_bias, bn.running_mean, bn.running_var, bn.r, bn.d))
    for a, b_ in zip(*results, strict=True):
        assert_bitwise(a, b_)
    host = layers[2]
    expected = (host(x), host.backward(g), host.grad_weight, host.grad_bias, host.running_mean, host.running_var)
    for a, e in zip(results[0], expected, strict=False):
        assert_close(a, e, np.float64, rtol=1e-12)
    assert np.any(host.r != 1) and np.any(host.d != 0)


def test_masked_statistics_on_a_cluster(cluster, rng):
    """A mask as a Dask array (any chunks: rechunked to the input's) or a NumPy one, on the
    cluster's worker processes: the same bits as on threads, the host's results to rounding."""
    _, client = cluster
    shape, chunks = (24, 4, 6, 8), (5, 2, 6, 8)
    x = make_input(rng, shape, 1, np.float64)
    g = rng.standard_normal(shape)
    mask = rng.random((24, 1, 6, 8)) < 0.6
    results = []
    for scheduler, m in ((client, da.from_array(mask, chunks=(7, 1, 3, 8))), ("threads", mask)):
        rm, rv = np.zeros(4), np.ones(4)
        with dask.config.set(scheduler=scheduler):
            dx = da.from_array(x, chunks=chunks)
            y, mean, invstd = numbabn.batch_norm_forward(dx, None, None, rm, rv, mask=m)
            gi, gw, gb = numbabn.batch_norm_backward(da.from_array(g, chunks=chunks), dx, None, mean, invstd, mask=m)
            results.append((y.compute(), mean, invstd, rm, rv, gi.compute(), gw, gb))
    for a, b in zip(*results, strict=True):
        assert_bitwise(a, b)
    rm, rv = np.zeros(4), np.ones(4)
    y, mean, invstd = numbabn.batch_norm_forward(x, None, None, rm, rv, mask=mask)
    expected = (y, mean, invstd, rm, rv, *numbabn.batch_norm_backward(g, x, None, mean, invstd, mask=mask))
    for a, e in zip(results[0], expected, strict=True):
        assert_close(a, e, np.float64, rtol=1e-12)


def test_same_bits_after_a_worker_is_killed(cluster, data, threaded, tmp_path):
    """A task kills its worker process mid-computation (the first time only, remembered in a
    file): the scheduler reruns the lost tasks on the other worker and the bits do not
    change.  (Last of the cluster tests: the cluster keeps one worker afterwards.)"""
    _, client = cluster
    x, _ = data
    flag = str(tmp_path / "killed")
    pids = set(client.run(os.getpid).values())

    def kill_once(block, block_id=None):
        if block_id == (2, 1, 0, 1) and not os.path.exists(flag):
            import time

            time.sleep(0.3)  # other tasks finish on this worker first: their results are lost too
            open(flag, "w").close()
            os._exit(1)
        return block

    killing = da.from_array(x, chunks=CHUNKS).map_blocks(kill_once, dtype=x.dtype)
    with dask.config.set(scheduler=client):
        # The statistics pass of the call loses a worker; the map runs on the survivor.
        y = numbabn.batch_norm(killing, None, None, training=True).compute()
        s = numbabn.welford(killing)
    assert os.path.exists(flag)
    assert len(pids - set(client.run(os.getpid).values())) == 1  # really gone
    assert_bitwise(s.mean, threaded[CHUNKS]["mean"])
    assert_bitwise(s.m2, threaded[CHUNKS]["m2"])
    with dask.config.set(scheduler="threads"):
        y_ref = numbabn.batch_norm(da.from_array(x, chunks=CHUNKS), None, None, training=True).compute()
    assert_bitwise(y, y_ref)
