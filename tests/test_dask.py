"""Dask arrays (numbabn.dask): the public functions and BatchNorm on Dask inputs agree with the
NumPy path for any chunking (along the feature axis too, uneven, empty chunks), give the same
bits for a given chunking under every scheduler, a real distributed cluster and a worker
lost mid-computation, and refuse bad arguments before anything is computed or written."""

import numpy as np
import pytest
from conftest import assert_bitwise, assert_close, make_input, make_params
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


def assert_stats_equal(s, ref, rtol=1e-12):
    """Statistics equal to ``ref`` to ``rtol`` relative (the merge order differs)."""
    assert s.count == ref.count
    assert isinstance(s.mean, np.ndarray) and s.mean.dtype == np.float64
    np.testing.assert_allclose(s.mean, ref.mean, rtol=rtol, atol=0)
    np.testing.assert_allclose(s.m2, ref.m2, rtol=rtol, atol=0)


# -- statistics ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "axis", "dtype"), layout_cases())
@FEW
@given(data=st.data())
def test_welford_any_chunking(shape, axis, dtype, data):
    x = make_input(np.random.default_rng(1), shape, axis, dtype)
    chunks = data.draw(chunkings(shape))
    s = numbabn.welford(da.from_array(x, chunks=chunks), axis=axis)
    assert_stats_equal(s, numbabn.welford(x, axis=axis))


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
@FEW
@given(data=st.data())
def test_welford_float32_large_mean(shape, axis, data):
    # |mean| / std = 1e4: E[x^2] - E[x]^2 would lose every digit of the variance in float32.
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    chunks = data.draw(chunkings(shape))
    s = numbabn.welford(da.from_array(x, chunks=chunks), axis=axis)
    assert_stats_equal(s, numbabn.welford(x, axis=axis))
    other = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    np.testing.assert_allclose(s.var(), np.var(x.astype(np.float64), axis=other), rtol=1e-10)


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
    assert_stats_equal(s, numbabn.welford(x))
    np.testing.assert_allclose(total, x.sum())
    for split_every in (2, 3, 100):
        assert_stats_equal(nd.welford(dx, split_every=split_every), numbabn.welford(x))
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
    np.testing.assert_allclose(mean, mean0, rtol=1e-12)
    np.testing.assert_allclose(invstd, invstd0, rtol=1e-12)
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
