"""Property tests (hypothesis): random shapes, axes, dtypes and values against the oracle."""

import numpy as np
import reference
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import numbabn
from numbabn._config import MIN_INNER

SETTINGS = settings(max_examples=25, deadline=None)
EPS = 1e-5
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
BOUND = 1e3


@st.composite
def cases(draw, min_per_channel=2):
    """``(x, axis)``: ndim 2-4, dims 1..7 but the last, which may reach past MIN_INNER (so
    both kernel families run), at least ``min_per_channel`` values per channel."""
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    ndim = draw(st.integers(2, 4))
    shape = draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim))
    shape[-1] = draw(st.one_of(st.integers(1, 7), st.integers(MIN_INNER - 4, 3 * MIN_INNER)))
    axis = draw(st.integers(-ndim, ndim - 1))
    per_channel = int(np.prod(shape)) // shape[axis]
    if per_channel < min_per_channel:
        other = (axis % ndim + 1) % ndim
        shape[other] = max(shape[other], min_per_channel)
    elements = st.floats(-BOUND, BOUND, allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
    x = draw(hnp.arrays(dtype, tuple(shape), elements=elements))
    return x, axis


def per_channel(draw_fn, C, dtype, lo, hi):
    return np.asarray(draw_fn(st.lists(st.floats(lo, hi), min_size=C, max_size=C)), dtype=dtype)


def _close(actual, expected, dtype, scale):
    """Agreement to the dtype's tolerance; ``scale`` (per element or overall) is the size of
    the terms the result is computed from, so cancellation does not make the test flaky."""
    tol = TOL[np.dtype(dtype)]
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape
    bound = tol * (np.maximum(scale, 1.0) + np.abs(expected))
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} differ: worst error {np.max(err - bound)} over the bound; "
        f"actual {actual[bad][:5]}, expected {expected[bad][:5]}"
    )


def _bshape(x, axis):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return tuple(shape)


def _red(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis % x.ndim)


@SETTINGS
@given(case=cases(), training=st.booleans(), affine=st.booleans(), data=st.data())
def test_forward_matches_oracle(case, training, affine, data):
    x, axis = case
    C = x.shape[axis]
    w = per_channel(data.draw, C, x.dtype, -2, 2) if affine else None
    b = per_channel(data.draw, C, x.dtype, -2, 2) if affine else None
    rm = per_channel(data.draw, C, x.dtype, -10, 10)
    rv = per_channel(data.draw, C, x.dtype, 0.01, 10)
    momentum = data.draw(st.floats(0, 1))
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(x, w, b, rm, rv, training, momentum, EPS, axis)

    y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, training=training, momentum=momentum, axis=axis)

    # y = x * a + b with a = weight * invstd, b = bias - mean * a (docs/math.rst).
    a = (np.ones(C) if w is None else w.astype(np.float64)) * ref_invstd
    fold_b = (np.zeros(C) if b is None else b.astype(np.float64)) - ref_mean * a
    y_scale = np.abs(x.astype(np.float64)) * np.abs(a).reshape(_bshape(x, axis)) + np.abs(fold_b).reshape(
        _bshape(x, axis)
    )
    _close(y, ref_y, x.dtype, y_scale)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-13 * BOUND)
    np.testing.assert_allclose(invstd, ref_invstd, rtol=1e-9)
    _close(rm, ref_rm, x.dtype, BOUND)
    _close(rv, ref_rv, x.dtype, BOUND**2)


@SETTINGS
@given(case=cases())
def test_output_is_normalized(case):
    """Per channel, the training output has mean 0 and variance var / (var + eps)."""
    x, axis = case
    y = numbabn.batch_norm(x, None, None, training=True, eps=EPS, axis=axis)
    red = _red(x, axis)
    var = x.astype(np.float64).var(axis=red)
    y64 = y.astype(np.float64)
    # Rounding of y = x * a + b is relative to |x * a| (a = invstd <= 1 / sqrt(eps)).
    tol = TOL[x.dtype] * max(1.0, float(np.abs(x).max()) / np.sqrt(EPS))
    np.testing.assert_allclose(y64.mean(axis=red), 0.0, atol=tol)
    np.testing.assert_allclose(
        y64.var(axis=red), var / (var + EPS), rtol=1e-4 if x.dtype == np.float32 else 1e-9, atol=tol
    )


@SETTINGS
@given(case=cases(min_per_channel=1))
def test_welford_matches_oracle(case):
    x, axis = case
    n, mean, var = reference.stats(x, axis)
    s = numbabn.welford(x, axis=axis)
    assert s.count == n
    np.testing.assert_allclose(s.mean, mean, rtol=1e-12, atol=1e-13 * BOUND)
    np.testing.assert_allclose(s.m2, var * n, rtol=1e-10, atol=1e-14 * n * BOUND**2)
    assert (s.m2 >= 0).all()


@SETTINGS
@given(case=cases(min_per_channel=1), data=st.data())
def test_merge_of_random_split_equals_whole(case, data):
    """Split along any non-feature axis at random cut points (empty pieces allowed)."""
    x, axis = case
    ax = axis % x.ndim
    split_axis = data.draw(st.sampled_from([i for i in range(x.ndim) if i != ax]))
    size = x.shape[split_axis]
    cuts = sorted(data.draw(st.lists(st.integers(0, size), max_size=4)))
    pieces = np.split(x, cuts, axis=split_axis)
    whole = numbabn.welford(x, axis=axis)

    merged = numbabn.merge_stats(*[numbabn.welford(p, axis=axis) for p in pieces])

    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-13 * BOUND)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-10, atol=1e-14 * whole.count * BOUND**2)


@SETTINGS
@given(case=cases(), training=st.booleans(), affine=st.booleans(), data=st.data())
def test_backward_matches_oracle(case, training, affine, data):
    x, axis = case
    C = x.shape[axis]
    g = data.draw(hnp.arrays(x.dtype, x.shape, elements=st.floats(-10, 10, width=x.dtype.itemsize * 8)))
    w = per_channel(data.draw, C, x.dtype, -2, 2) if affine else None
    rm = per_channel(data.draw, C, x.dtype, -10, 10)
    rv = per_channel(data.draw, C, x.dtype, 0.01, 10)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, None, rm, rv, training=training, axis=axis)
    _, ref_mean, ref_invstd, _, _ = reference.forward(x, w, None, rm, rv, training, 0.1, EPS, axis)
    ref_gi, ref_gw, ref_gb = reference.backward(g, x, w, ref_mean, ref_invstd, training, axis)

    gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, training=training, axis=axis)

    # Scales: the sums of absolute terms each result is made of.
    red, bs = _red(x, axis), _bshape(x, axis)
    n = x.size // C
    g64 = np.abs(g.astype(np.float64))
    # xhat = (x - mean) * invstd cancels when a channel is (nearly) constant: its terms are
    # |x| * invstd and |mean| * invstd, and the oracle's own rounding of mean is amplified too.
    xhat = (np.abs(x.astype(np.float64)) + np.abs(ref_mean).reshape(bs)) * ref_invstd.reshape(bs)
    sum_g, sum_gx = g64.sum(axis=red), (g64 * xhat).sum(axis=red)
    w_abs = np.ones(C) if w is None else np.abs(w.astype(np.float64))
    gi_scale = (w_abs * ref_invstd).reshape(bs) * (g64 + (sum_g / n).reshape(bs) + xhat * (sum_gx / n).reshape(bs))
    _close(gi, ref_gi, x.dtype, gi_scale)
    _close(gw, ref_gw, x.dtype, sum_gx)
    _close(gb, ref_gb, x.dtype, sum_g)
