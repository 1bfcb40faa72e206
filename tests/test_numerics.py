"""Numerical behaviour of every function: a large mean against the spread (where
``E[x^2] - E[x]^2`` fails), NaN and Inf kept in their channel, zero-variance channels, values
whose squares overflow, and shapes with no channels or no values."""

import numpy as np
import pytest
import reference
from conftest import (
    PARALLEL_MIN,
    TRAINING,
    Layout,
    assert_close,
    by_tag,
    channel_shape,
    dtype_params,
    layout_params,
    make_case,
    make_input,
    make_params,
    reduce_axes,
    stats_rtol,
)

import numbabn


@pytest.mark.parametrize(
    ("dtype", "offset"), [pytest.param(np.float32, 1e4, id="float32"), pytest.param(np.float64, 1e8, id="float64")]
)
@pytest.mark.parametrize(
    "layout",
    layout_params(
        [
            Layout((64, 4, 256), 1, "NCL"),
            Layout((4096, 8), 1, "NC"),
            Layout((16, 8, 8, 4), -1, "NHWC"),
            Layout((8, 16, 128), 1, "fused"),
            Layout((64, 2, 2048), 1, "big-NCL"),
        ]
    ),
)
def test_large_mean_is_stable(layout, dtype, offset, rng):
    """|mean| / std = 1e4 in float32 (1e8 in float64): the statistics still agree with the
    float64 two-pass oracle on the same values, where ``E[x^2] - E[x]^2`` in the input's
    dtype is far off."""
    x = (offset + rng.standard_normal(layout.shape)).astype(dtype)
    red = reduce_axes(x.ndim, layout.axis)
    _, ref_mean, ref_var = reference.stats(x, layout.axis)

    # The naive one-pass formula in the input's dtype is wrong on this data: the test can tell.
    naive = np.mean(x * x, axis=red, dtype=dtype) - np.mean(x, axis=red, dtype=dtype) ** 2
    assert np.max(np.abs(naive - ref_var) / ref_var) > 1e-1

    # What a correct computation gives here: float64 statistics of values offset by |mean|/std
    # lose about eps64 * |mean| / std (centring each value rounds at |mean|); results in the
    # input's dtype add its own rounding, and x * a + b with b = -mean * a cancels at |mean|.
    # float32 data is summed in float32 lanes around a float32 shift (docs/math.rst): the
    # statistics are within stats_rtol of the oracle's, the mean in standard deviations.
    eps64, eps = np.finfo(np.float64).eps, np.finfo(dtype).eps
    lanes = 0.0 if dtype == np.float64 else stats_rtol(dtype)
    stats_tol = eps64 * offset + lanes
    out_tol = 2 * eps + 16 * eps64 * offset + 4 * lanes
    stats = numbabn.welford(x, axis=layout.axis)
    np.testing.assert_allclose(stats.var(), ref_var, rtol=stats_tol)
    # A rounding per merge level.
    np.testing.assert_allclose(stats.mean, ref_mean, rtol=64 * eps64, atol=lanes * np.sqrt(ref_var).max())

    C = layout.channels
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y, save_mean, save_invstd = numbabn.batch_norm_forward(x, None, None, rm, rv, momentum=1.0, axis=layout.axis)
    np.testing.assert_allclose(save_invstd, 1 / np.sqrt(ref_var + 1e-5), rtol=stats_tol)
    n = layout.n
    np.testing.assert_allclose(rv, ref_var * n / (n - 1), rtol=eps + stats_tol)
    ref_y = reference.forward(x, None, None, None, None, True, 0.1, 1e-5, layout.axis)[0]
    assert_close(y, ref_y, dtype, rtol=out_tol)
    y64 = y.astype(np.float64)
    np.testing.assert_allclose(y64.mean(axis=red), 0.0, atol=4 * out_tol)
    np.testing.assert_allclose(y64.var(axis=red), ref_var / (ref_var + 1e-5), rtol=8 * out_tol)

    g = rng.standard_normal(layout.shape).astype(dtype)
    got = numbabn.batch_norm_backward(g, x, None, save_mean, save_invstd, axis=layout.axis)
    _, rmean, rinv, _, _ = reference.forward(x, None, None, None, None, True, 0.1, 1e-5, layout.axis)
    ref = reference.backward(g, x, None, rmean, rinv, True, layout.axis)
    (gi, gw, gb), (ref_gi, ref_gw, ref_gb) = got, ref
    assert_close(gi, ref_gi, dtype, rtol=out_tol)
    assert_close(gb, ref_gb, dtype, rtol=out_tol)
    # grad_weight = invstd * (sum(g * x) - mean * sum(g)): a mean off by delta_mean (up to
    # 64 eps64 |mean|, as asserted above; the oracle's mean rounds too) moves it by
    # |sum g| * delta_mean * invstd, an error set by |mean| and |sum g|, not relative to
    # grad_weight itself.  (grad_input takes it divided by n: within out_tol.)
    mean_err = 64 * eps64 * offset
    gw_atol = float(np.max(np.abs(g.astype(np.float64).sum(axis=red)) * save_invstd)) * mean_err
    scale = max(1.0, float(np.max(np.abs(ref_gw))))
    np.testing.assert_allclose(gw.astype(np.float64), ref_gw, rtol=out_tol, atol=out_tol * scale + gw_atol)


NAN_LAYOUTS = by_tag(
    "NCHW", "NHWC", "NC", "rows-over-block", "NC-many-rows", "fused", "big-NCHW", "big-NC", "big-fused-NCHW"
)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(NAN_LAYOUTS))
def test_nan_stays_in_its_channel(layout, dtype, rng):
    x, weight, bias, rm, rv = make_case(rng, layout, dtype, True)
    ax, C = layout.ax, layout.channels
    bad = C // 2
    idx = [s // 2 for s in layout.shape]
    idx[ax] = bad
    x[tuple(idx)] = np.nan
    g = rng.standard_normal(layout.shape).astype(dtype)
    good = np.arange(C) != bad
    take = lambda a: np.moveaxis(a, ax, 0)  # noqa: E731

    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(x, weight, bias, rm, rv, True, 0.1, 1e-5, ax)
    ref_grads = reference.backward(g, x, weight, ref_mean, ref_invstd, True, ax)
    y, mean, invstd = numbabn.batch_norm_forward(x, weight, bias, rm, rv, axis=layout.axis)
    grads = numbabn.batch_norm_backward(g, x, weight, mean, invstd, axis=layout.axis)
    stats = numbabn.welford(x, axis=layout.axis)

    assert np.isnan(take(y)[bad]).all()
    assert np.isfinite(take(y)[good]).all()
    assert_close(take(y)[good], take(ref_y)[good], dtype)
    assert np.isnan(mean[bad]) and np.isnan(rm[bad]) and np.isnan(rv[bad])
    assert np.isfinite(mean[good]).all() and np.isfinite(invstd[good]).all()
    assert_close(rm[good], ref_rm[good], dtype)
    assert_close(rv[good], ref_rv[good], dtype)
    assert np.isnan(stats.mean[bad]) and np.isfinite(stats.mean[good]).all() and np.isfinite(stats.m2[good]).all()
    gi, gw, gb = grads
    assert np.isnan(take(gi)[bad]).all() and np.isnan(gw[bad])
    assert_close(take(gi)[good], take(ref_grads[0])[good], dtype)
    assert_close(gw[good], ref_grads[1][good], dtype)
    assert_close(gb, ref_grads[2], dtype)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(NAN_LAYOUTS))
def test_constant_channel(layout, dtype, rng):
    """A zero-variance channel normalizes to ``bias`` exactly enough, with finite gradients."""
    x, weight, bias, rm, rv = make_case(rng, layout, dtype, True)
    ax, C = layout.ax, layout.channels
    const = C - 1
    take = lambda a: np.moveaxis(a, ax, 0)  # noqa: E731
    take(x)[const] = dtype.type(0.7)
    g = rng.standard_normal(layout.shape).astype(dtype)
    rv_before = rv.astype(np.float64)

    y, mean, invstd = numbabn.batch_norm_forward(x, weight, bias, rm, rv, momentum=0.5, axis=layout.axis)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, weight, mean, invstd, axis=layout.axis)
    ref_y, ref_mean, ref_invstd, _, _ = reference.forward(x, weight, bias, None, None, True, 0.1, 1e-5, ax)
    ref_gi, ref_gw, ref_gb = reference.backward(g, x, weight, ref_mean, ref_invstd, True, ax)

    assert np.isfinite(y).all() and np.isfinite(gi).all() and np.isfinite(gw).all()
    np.testing.assert_allclose(take(y)[const], bias[const], rtol=0, atol=1e-6 if dtype == np.float32 else 1e-12)
    assert_close(y, ref_y, dtype)
    np.testing.assert_allclose(invstd[const], 1 / np.sqrt(1e-5), rtol=1e-6)
    assert_close(rv[const], 0.5 * rv_before[const], dtype)
    assert_close(gi, ref_gi, dtype)
    # d(loss)/d(weight) of a constant channel is exactly 0 (xhat = 0); the oracle's own
    # rounding of the mean is larger than numbabn's there, so compare with 0 instead.
    others = np.arange(C) != const
    assert_close(gw[others], ref_gw[others], dtype)
    np.testing.assert_allclose(gw[const], 0.0, atol=1e-6)
    assert_close(gb, ref_gb, dtype)
    np.testing.assert_allclose(numbabn.welford(x, axis=layout.axis).m2[const], 0.0, atol=1e-20)


@pytest.mark.parametrize("layout", layout_params(by_tag("NCHW", "NC", "fused", "big-NC")))
def test_inf_stays_in_its_channel(layout, rng):
    x, w, b, rm, rv = make_case(rng, layout, np.float64, True)
    take = lambda a: np.moveaxis(a, layout.ax, 0)  # noqa: E731
    take(x)[0].flat[1] = np.inf
    ref_y, _, _, ref_rm, ref_rv = reference.forward(x, w, b, rm, rv, True, 0.1, 1e-5, layout.axis)
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, axis=layout.axis)
    assert not np.isfinite(mean[0]) and not np.isfinite(rv[0])
    assert np.isfinite(mean[1:]).all() and np.isfinite(invstd[1:]).all()
    assert not np.isfinite(take(y)[0]).any()
    assert_close(take(y)[1:], take(ref_y)[1:], np.float64)
    assert_close(rm[1:], ref_rm[1:], np.float64)
    assert_close(rv[1:], ref_rv[1:], np.float64)


@pytest.mark.parametrize("layout", layout_params(by_tag("NCHW", "NC", "fused", "big-NCHW", "big-NC")))
def test_float32_values_whose_squares_overflow_float32(layout, rng):
    """Statistics run in float64: float32 inputs around 1e25 (squares beyond float32's range)
    still normalize correctly."""
    x = (1e25 * make_input(rng, layout.shape, layout.axis, np.float64)).astype(np.float32)
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(1e25) * np.float32(1e25))
    _, ref_mean, ref_var = reference.stats(x, layout.axis)
    s = numbabn.welford(x, axis=layout.axis)
    np.testing.assert_allclose(s.var(), ref_var, rtol=stats_rtol(x.dtype))
    y = numbabn.batch_norm(x, None, None, training=True, axis=layout.axis)
    assert np.isfinite(y).all()
    assert_close(y, reference.forward(x, None, None, None, None, True, 0.1, 1e-5, layout.axis)[0], np.float32)


#: Shapes for float32 lanes: every size class of a channel-minor block (a remainder of rows
#: under four, one short block, whole blocks and a partial one, super-rows, parallel splits,
#: channel-minor rows of several values per channel) and the channel-strided kernels.
LANE_SHAPES = [
    ((3, 7), 1),
    ((21, 5), 1),
    ((64, 40), 1),
    ((1000, 3), 1),
    ((4099, 3), 1),
    ((517, 96), 1),
    ((4096, 64), 1),
    ((40, 6, 9), 1),
    ((16, 5, 5, 32), -1),
    ((8, 4, 80), 1),
]


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1e2, 1e4])
@pytest.mark.parametrize(("shape", "axis"), LANE_SHAPES, ids=[f"{s}@{a}" for s, a in LANE_SHAPES])
def test_float32_lanes_stay_within_their_bound(shape, axis, ratio, rng):
    """float32 data with |mean| / std from 0 to 1e4: the statistics within 1e-6 of the
    float64 oracle (the mean in standard deviations, the variance relative), whatever the
    block's size class; float16 data gives its float32 copy's statistics bit for bit."""
    std = rng.uniform(0.5, 4.0, shape[axis])
    cs = channel_shape(len(shape), axis)
    x = (rng.standard_normal(shape) * std.reshape(cs) + (ratio * std).reshape(cs)).astype(np.float32)
    s = numbabn.welford(x, axis=axis)
    _, mean, var = reference.stats(x, axis)
    tol = stats_rtol(np.float32)
    assert (np.abs(s.mean - mean) <= tol * np.sqrt(var)).all()
    assert (np.abs(s.var() - var) <= tol * var).all()
    h = x.astype(np.float16)
    sh, s32 = numbabn.welford(h, axis=axis), numbabn.welford(h.astype(np.float32), axis=axis)
    assert np.array_equal(sh.mean, s32.mean) and np.array_equal(sh.m2, s32.m2)


@pytest.mark.parametrize("scale", [1e-22, 1e-30], ids=["1e-22", "1e-30"])
@pytest.mark.parametrize(("shape", "axis"), [((300, 40), 1), ((64, 6, 9), 1)], ids=["nc", "short-rows"])
def test_float32_values_whose_squares_underflow_float32(shape, axis, scale, rng):
    """float32 data whose deviations' squares are below float32's normal range: those blocks
    are summed in float64, so the variance keeps its precision (not 0 or a few bits)."""
    x = (scale * (1 + rng.standard_normal(shape))).astype(np.float32)
    with np.errstate(under="ignore"):
        assert np.float32(scale) * np.float32(scale) < np.finfo(np.float32).tiny
    _, mean, var = reference.stats(x, axis)
    s = numbabn.welford(x, axis=axis)
    np.testing.assert_allclose(s.var(), var, rtol=stats_rtol(np.float32))
    np.testing.assert_allclose(s.mean, mean, rtol=0, atol=stats_rtol(np.float32) * np.sqrt(var).max())


#: Every kernel family, serial and parallel sizes, for float64 values whose squares overflow:
#: (layout, memory order).  F-ordered arrays are seen with their axes reversed: (6, 5, 4) and
#: (4, 8, 4097) have short channel-minor rows, (70, 3, 5) long channel-strided ones.
OVERFLOW_CASES = [
    *((lay, "C") for lay in by_tag("rows-over-block", "fused", "NCHW", "NC", "NC-many-rows", "NHWC-many-rows")),
    *((lay, "C") for lay in by_tag("big-NCHW", "big-fused-NCHW", "big-NC", "big-NHWC", "big-NC-super-rows")),
    (Layout((-(-PARALLEL_MIN // 128) + 1, 8, 4, 4), 1, "big-NCHW-short-rows"), "C"),
    (Layout((6, 5, 4), 1, "F"), "F"),
    (Layout((70, 3, 5), 1, "F-long-rows"), "F"),
    (Layout((4, 8, -(-PARALLEL_MIN // 32) + 1), 1, "big-F"), "F"),
]


@pytest.mark.parametrize(
    "layout,order", [pytest.param(lay, order, id=f"{lay.id}-{order}") for lay, order in OVERFLOW_CASES]
)
def test_float64_values_whose_squares_overflow(layout, order, rng):
    """Values around 1e160 (squares beyond float64's range), as NumPy and PyTorch compute them
    on every layout: a finite mean, ``m2 = var = inf``, ``invstd = 0``, outputs ``bias``
    (``0 * weight + bias``), zero ``grad_input`` and ``grad_weight``; nothing NaN."""
    x = 1e160 * make_input(rng, layout.shape, layout.axis, np.float64)
    x = np.asfortranarray(x) if order == "F" else x
    w, b, rm, rv = make_params(rng, layout.channels, np.float64)
    red, cs = reduce_axes(x.ndim, layout.axis), channel_shape(x.ndim, layout.axis)
    with np.errstate(over="ignore"):
        assert np.isinf(np.var(x, axis=red)).all()  # NumPy's variance overflows too

    s = numbabn.welford(x, axis=layout.axis)
    np.testing.assert_allclose(s.mean, np.mean(x, axis=red), rtol=stats_rtol(x.dtype), atol=stats_rtol(x.dtype) * 1e160)
    assert (s.m2 == np.inf).all()

    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, axis=layout.axis)
    np.testing.assert_array_equal(y, np.broadcast_to(b.reshape(cs), x.shape))
    np.testing.assert_array_equal(mean, s.mean)
    assert (invstd == 0.0).all() and np.isfinite(rm).all() and (rv == np.inf).all()
    y_eval = numbabn.batch_norm(x, rm, rv, w, b, training=False, axis=layout.axis)
    np.testing.assert_array_equal(y_eval, np.broadcast_to(b.reshape(cs), x.shape))

    g = rng.standard_normal(x.shape)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=layout.axis)
    assert (gi == 0.0).all() and (gw == 0.0).all()
    np.testing.assert_allclose(gb, g.sum(axis=red), rtol=1e-12, atol=1e-12 * np.abs(g).sum())


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", dtype_params())
def test_zero_channels(dtype, training, rng):
    """An input with no channels gives empty results and no error."""
    x = np.empty((4, 0, 5), dtype)
    rm, rv = np.empty(0, dtype), np.empty(0, dtype)
    y, mean, invstd = numbabn.batch_norm_forward(x, None, None, rm, rv, training=training)
    assert y.shape == x.shape and y.dtype == dtype
    assert mean.shape == invstd.shape == (0,)
    gi, gw, gb = numbabn.batch_norm_backward(x, x, None, mean, invstd, training=training)
    assert gi.shape == x.shape and gw.shape == gb.shape == (0,)
    s = numbabn.welford(x)
    assert s.count == 20 and s.mean.shape == s.m2.shape == (0,)


@pytest.mark.parametrize("dtype", dtype_params())
def test_eval_with_empty_batch(dtype, rng):
    _, _, rm, rv = make_params(rng, 3, dtype)
    y = numbabn.batch_norm(np.empty((0, 3, 4), dtype), rm, rv, training=False)
    assert y.shape == (0, 3, 4) and y.dtype == dtype
