"""Property tests (hypothesis): random shapes, axes, dtypes, memory layouts and values against
the float64 oracle.

Two sizes: small arrays drawn element by element (every shape boundary of the serial kernels,
values anywhere in [-1e3, 1e3]), and arrays past ``PARALLEL_MIN`` (the parallel, fused and
multi-range kernels) drawn as per-channel offsets and scales of seeded normal values, under
``PARALLEL_PROPERTIES`` (fewer examples).  Inputs may be non-contiguous (Fortran order,
reversed, every other element) and carry NaN or Inf in one channel; outputs may go to ``out=``.
Profiles (``conftest.py``): random per run, derandomized under ``CI``.

Tolerances are what a correct computation gives: statistics accumulate in float64 and the
elementwise passes compute ``y = x * a + b`` in float64 and round once on store, so a result
is within 2 ulps of its dtype of the exact value, plus float64 rounding (``K`` units of
2**-53, ``K`` growing with log2 n) of the terms it is computed from.  The last test shows
these bounds refuse the usual wrong formulas (unbiased variance to normalize, biased
``running_var``, ``1 - momentum`` as the weight of the new batch), which the former bounds
(``1e-5`` of ``max|x| / sqrt(eps)``, of ``1e3`` and of ``1e6``) let through in float32.
"""

import math

import numpy as np
import pytest
import reference
from conftest import BLOCK, FUSE_CHANNELS, MIN_INNER, PARALLEL_MIN, PARALLEL_PROPERTIES, TILE
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import numbabn
from numbabn._config import MINOR_ROWS, SHIFT_CANCEL_32

EPS = 1e-5
BOUND = 1e3
U64 = 2.0**-53
SUB = float(np.finfo(np.float64).smallest_subnormal)  # squares below it round to absolute steps


def _u(dtype):
    """Unit roundoff of ``dtype``: results are rounded once to it."""
    return 2.0**-24 if np.dtype(dtype) == np.float32 else U64


def _k(n):
    """Units of float64 roundoff a sum over ``n`` values may collect: the blocks of up to
    ``BLOCK`` values are summed in order (a few vector lanes), then merged in a tree."""
    return 256.0 + 16.0 * math.log2(n + 1) + min(n, BLOCK) / 2


#: float32 and float16 data are summed in float32 lanes within each block of MINOR_ROWS rows
#: (docs/math.rst): each block's sums of ``d = x - shift`` are off by at most G32 of their
#: absolute terms, and a block's M2 is kept only where it cancels less than SHIFT_CANCEL_32.
G32 = (MINOR_ROWS // 4 + 4) * 2.0**-24
#: So the mean is off by at most 2 * G32 standard deviations more, and M2 by LANE_REL of it.
LANE_REL = SHIFT_CANCEL_32 * 3 * G32


def _lanes(dtype):
    """1 where statistics of ``dtype`` data may run in float32 lanes, else 0."""
    return 0.0 if np.dtype(dtype) == np.float64 else 1.0


def _lane_y(x, axis, a, mean, std):
    """What float32 lanes' statistics add to the error of ``y = x * a + b``: the mean's error
    times ``|a|``, and the relative error of ``invstd`` times ``|(x - mean) * a|``."""
    bs = _bshape(x, axis)
    with np.errstate(invalid="ignore"):  # inf - inf where the input holds infinities
        dev = np.abs(x.astype(np.float64) - mean.reshape(bs))
    return _lanes(x.dtype) * np.abs(a).reshape(bs) * ((2 * G32 * std).reshape(bs) + LANE_REL * dev)


# -- strategies ----------------------------------------------------------------------------------


@st.composite
def small_cases(draw, min_per_channel=2):
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


#: Families of arrays past PARALLEL_MIN: (shape maker from drawn sizes, feature axis).
def _big_shape(draw):
    family = draw(st.sampled_from(["NCHW", "NCL-long-rows", "fused", "NC", "NHWC"]))
    if family == "NCHW":
        c, h, w = draw(st.integers(1, 6)), draw(st.integers(2, 9)), draw(st.integers(MIN_INNER // 8, MIN_INNER // 2))
        inner, shape_of, axis = h * w, (lambda n: (n, c, h, w)), 1
    elif family == "NCL-long-rows":
        c, inner = draw(st.integers(1, 3)), draw(st.integers(4096, 6000))
        shape_of, axis = (lambda n: (n, c, inner)), 1
    elif family == "fused":
        c, inner = draw(st.integers(FUSE_CHANNELS, FUSE_CHANNELS + 8)), draw(st.integers(MIN_INNER, 2 * MIN_INNER))
        shape_of, axis = (lambda n: (n, c, inner)), 1
    elif family == "NC":
        c, inner = draw(st.sampled_from([1, 7, 70, TILE + 52])), 1
        shape_of, axis = (lambda n: (n, c)), 1
    else:
        c, h, w, inner = draw(st.integers(2, 40)), draw(st.integers(1, 8)), draw(st.integers(1, 8)), 1
        inner = h * w  # values per channel in one batch row
        shape_of, axis = (lambda n: (n, h, w, c)), -1
    per_row = c * inner
    rows = -(-PARALLEL_MIN // per_row) + draw(st.integers(0, 3))
    return shape_of(rows), axis


@st.composite
def big_cases(draw):
    """``(x, axis)`` past PARALLEL_MIN: per-channel offsets (up to 1e3 times the spread, so the
    statistics cancel) and scales of seeded normal values."""
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    shape, axis = _big_shape(draw)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    loc = draw(st.sampled_from([0.0, 3.0, 1e3]))
    mu = rng.uniform(-loc, loc, c).reshape(bshape)
    sd = rng.uniform(0.5, 2.0, c).reshape(bshape)
    return (mu + sd * rng.standard_normal(shape)).astype(dtype), axis


@st.composite
def arranged(draw, cases):
    """A case, then maybe NaN or +-Inf at a few places of one channel, then maybe another
    memory layout holding the same values: ``(x, axis, poisoned channel or None)``."""
    x, axis = draw(cases)
    ax = axis % x.ndim
    poison = draw(st.sampled_from([None, None, np.nan, np.inf, -np.inf]))
    bad = None
    if poison is not None:
        bad = draw(st.integers(0, x.shape[ax] - 1))
        chan = np.moveaxis(x, ax, 0)[bad].reshape(-1)
        for i in draw(st.lists(st.integers(0, chan.size - 1), min_size=1, max_size=3)):
            chan[i] = poison
        np.moveaxis(x, ax, 0)[bad] = chan.reshape(np.moveaxis(x, ax, 0)[bad].shape)
    order = draw(st.sampled_from(["C", "F", "reversed", "every-other"]))
    if order == "F":
        x = np.asfortranarray(x)
    elif order == "reversed":  # a negative stride: the reversed copy seen backwards
        x = np.ascontiguousarray(x[::-1])[::-1]
    elif order == "every-other":
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    return x, axis, bad


def per_channel(draw_fn, C, dtype, lo, hi):
    return np.asarray(draw_fn(st.lists(st.floats(lo, hi), min_size=C, max_size=C)), dtype=dtype)


# -- checks -------------------------------------------------------------------------------------------


def _bshape(x, axis):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return tuple(shape)


def _red(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis % x.ndim)


def _close(actual, expected, bound, what):
    """Where ``expected`` is finite (and its bound is), ``|actual - expected| <= bound``;
    elsewhere ``actual`` is not finite either."""
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual)
    # Below float64's normal range (1e4 times its smallest normal) float64 work rounds to
    # absolute steps, and so do subnormal results of the output dtype: not checked finer.
    out_dtype = actual.dtype if actual.dtype.kind == "f" else np.float64
    tiny = max(4 * float(np.finfo(out_dtype).smallest_subnormal), 1e4 * float(np.finfo(np.float64).tiny))
    bound = np.broadcast_to(bound + tiny, expected.shape)
    actual = actual.astype(np.float64)
    assert actual.shape == expected.shape, what
    finite = np.isfinite(expected) & np.isfinite(bound)
    assert np.array_equal(np.isfinite(actual), np.isfinite(expected)), f"{what}: non-finite values elsewhere"
    with np.errstate(invalid="ignore"):  # inf - inf outside ``finite``
        err = np.abs(actual - expected)
    bad = finite & ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} differ, worst {np.max(np.where(bad, err / bound, 0))} x the bound; "
        f"actual {actual[bad][:4]}, expected {expected[bad][:4]}, bound {bound[bad][:4]}"
    )


def _stat_scales(x, axis):
    """Per channel: values per channel, ``max|x|`` (finite values) and the spread ``std``."""
    red = _red(x, axis)
    x64 = x.astype(np.float64)
    n = x.size // x.shape[axis]
    with np.errstate(invalid="ignore"):
        big = np.max(np.where(np.isfinite(x64), np.abs(x64), 0.0), axis=red) if n else np.zeros(x.shape[axis])
        std = np.sqrt(np.var(x64, axis=red)) if n else np.zeros(x.shape[axis])
    return n, big, std


def _y_bound(x, axis, ref_y, a, b, big, n, lane=0.0):
    """``y = x * a + b`` rounded once to the output dtype, ``a`` and ``b`` from float64
    statistics: 2 ulps of ``y`` plus float64 rounding of ``|x * a| + |b|`` and of the mean
    (``|a| * max|x|``)."""
    bs = _bshape(x, axis)
    terms = np.abs(x.astype(np.float64)) * np.abs(a).reshape(bs) + (np.abs(b) + np.abs(a) * big).reshape(bs)
    # a and b are float64: when subnormal (a tiny weight), their rounding is absolute, times |x|.
    sub = 2 * float(np.finfo(np.float64).smallest_subnormal) * (np.abs(x.astype(np.float64)) + 1)
    return 2 * _u(x.dtype) * np.abs(ref_y) + _k(n) * U64 * terms + sub + lane


def _ema_bounds(dtype, momentum, rm, rv, mean, var_u, big, std, n):
    """Bounds of the running statistics after one EMA step (float64 arithmetic, rounded once):
    the unbiased variance carries the float64 rounding of ``M2`` (``max|x| * std`` terms)."""
    m, keep = momentum, 1.0 - momentum
    new_rm = keep * rm + m * mean
    new_rv = keep * rv + m * var_u
    k = _k(n) * U64
    rm_bound = 2 * _u(dtype) * np.abs(new_rm) + k * (keep * np.abs(rm) + m * np.abs(mean) + m * big)
    rv_bound = 2 * _u(dtype) * np.abs(new_rv) + k * (
        keep * np.abs(rv) + m * (var_u + 2 * big * std) * n / max(n - 1, 1)
    )
    return rm_bound, rv_bound


def _check_forward(x, axis, bad, training, momentum, w, b, rm, rv, out):
    C = x.shape[axis]
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(x, w, b, rm, rv, training, momentum, EPS, axis)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd = numbabn.batch_norm_forward(
        x, w, b, rm, rv, training=training, momentum=momentum, axis=axis, out=out
    )
    if out is not None:
        assert y is out
    n, big, std = _stat_scales(x, axis)
    if not training:
        big = np.abs(rm0)
    a = (np.ones(C) if w is None else w.astype(np.float64)) * ref_invstd
    fold_b = (np.zeros(C) if b is None else b.astype(np.float64)) - ref_mean * a
    lanes = _lanes(x.dtype) if training else 0.0
    lane_y = _lane_y(x, axis, a, ref_mean, std) if training else 0.0
    _close(y, ref_y, _y_bound(x, axis, ref_y, a, fold_b, big, n, lane_y), "y")
    k = _k(n) * U64
    mean_bound = k * big + lanes * 2 * G32 * std + (0 if training else 2 * _u(x.dtype) * np.abs(ref_mean))
    _close(mean, ref_mean, mean_bound, "save_mean")
    spread = 1.0 + big * (std if training else 0.0) / (ref_invstd**-2)
    _close(invstd, ref_invstd, (k * spread + lanes * LANE_REL) * ref_invstd, "save_invstd")
    if training:
        var_u = (1.0 / ref_invstd**2 - EPS) * n / max(n - 1, 1)
        rm_bound, rv_bound = _ema_bounds(x.dtype, momentum, rm0, rv0, ref_mean, var_u, big, std, n)
        rm_bound = rm_bound + momentum * 2 * G32 * std * lanes
        rv_bound = rv_bound + momentum * LANE_REL * var_u * lanes
        _close(rm, ref_rm, rm_bound, "running_mean")
        _close(rv, ref_rv, rv_bound, "running_var")
    if bad is not None:  # NaN / Inf stays in its channel
        good = np.arange(C) != bad
        assert np.isfinite(np.moveaxis(y, axis % x.ndim, 0)[good]).all()
        assert np.isfinite(mean[good]).all() and np.isfinite(invstd[good]).all()
        if training:
            assert not np.isfinite(mean[bad]) and np.isfinite(rm[good]).all() and np.isfinite(rv[good]).all()


def _check_backward(x, axis, g, w, training, rm, rv, out):
    C = x.shape[axis]
    _, mean, invstd = numbabn.batch_norm_forward(x, w, None, rm, rv, training=training, axis=axis)
    _, ref_mean, ref_invstd, _, _ = reference.forward(x, w, None, rm, rv, training, 0.1, EPS, axis)
    ref_gi, ref_gw, ref_gb = reference.backward(g, x, w, ref_mean, ref_invstd, training, axis)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, training=training, axis=axis, out=out)
    if out is not None:
        assert gi is out
    # Scales: the sums of absolute terms each result is made of.
    red, bs = _red(x, axis), _bshape(x, axis)
    n = x.size // C
    g64 = np.abs(g.astype(np.float64))
    # xhat = (x - mean) * invstd cancels when |mean| / std is large: its terms are |x| * invstd
    # and |mean| * invstd (the saved statistics' own rounding is amplified by them too).
    xhat = (np.abs(x.astype(np.float64)) + np.abs(ref_mean).reshape(bs)) * ref_invstd.reshape(bs)
    sum_g, sum_gx = g64.sum(axis=red), (g64 * xhat).sum(axis=red)
    w_abs = np.ones(C) if w is None else np.abs(w.astype(np.float64))
    with np.errstate(invalid="ignore"):  # inf * 0 where the input holds infinities
        gi_scale = (w_abs * ref_invstd).reshape(bs) * (g64 + (sum_g / n).reshape(bs) + xhat * (sum_gx / n).reshape(bs))
    k, u = _k(n) * U64, _u(x.dtype)
    sub = 4 * n * SUB  # sums of subnormal terms round absolutely
    # float32 lanes' statistics: xhat is off by LANE_REL of itself plus 2 * G32 (its unit).
    lane = _lanes(x.dtype) * 2 * (LANE_REL + 2 * G32) if training else 0.0
    _close(gi, ref_gi, 2 * u * np.abs(ref_gi) + (k + lane) * gi_scale + sub, "grad_input")
    _close(gw, ref_gw, 2 * u * np.abs(ref_gw) + (k + lane) * sum_gx + lane * sum_g + sub, "grad_weight")
    _close(gb, ref_gb, 2 * u * np.abs(ref_gb) + k * sum_g + sub, "grad_bias")


# -- small arrays: the serial kernels --------------------------------------------------------------


@given(case=arranged(small_cases()), training=st.booleans(), affine=st.booleans(), to_out=st.booleans(), data=st.data())
def test_forward_matches_oracle(case, training, affine, to_out, data):
    x, axis, bad = case
    C = x.shape[axis]
    w = per_channel(data.draw, C, x.dtype, -2, 2) if affine else None
    b = per_channel(data.draw, C, x.dtype, -2, 2) if affine else None
    rm = per_channel(data.draw, C, x.dtype, -10, 10)
    rv = per_channel(data.draw, C, x.dtype, 0.01, 10)
    momentum = data.draw(st.floats(0, 1))
    out = np.empty_like(x) if to_out else None
    _check_forward(x, axis, bad, training, momentum, w, b, rm, rv, out)


@given(case=small_cases())
def test_output_is_normalized(case):
    """Per channel, the training output has mean 0 and variance var / (var + eps), to the
    rounding of each ``y`` (2 ulps of its dtype) and of ``x * a + b`` in float64."""
    x, axis = case
    y = numbabn.batch_norm(x, None, None, training=True, eps=EPS, axis=axis)
    red, bs = _red(x, axis), _bshape(x, axis)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    var = x64.var(axis=red)
    n, big, _ = _stat_scales(x, axis)
    a = 1.0 / np.sqrt(var + EPS)
    e = 2 * _u(x.dtype) * np.abs(y64) + _k(n) * U64 * (np.abs(x64) + big.reshape(bs)) * a.reshape(bs)
    e = e + _lane_y(x, axis, a, x64.mean(axis=red), np.sqrt(var))
    e = e + 2 * float(np.finfo(x.dtype).smallest_subnormal)  # subnormal outputs round absolutely
    np.testing.assert_array_less(np.abs(y64.mean(axis=red)), e.mean(axis=red) + 1e-300)
    # var(y) moves by at most 2 mean(|y| e) + mean(e)^2 under errors e.
    spread = 2 * (np.abs(y64) * e).mean(axis=red) + e.mean(axis=red) ** 2
    np.testing.assert_array_less(np.abs(y64.var(axis=red) - var / (var + EPS)), spread * 1.01 + 1e-300)


@given(case=arranged(small_cases(min_per_channel=1)))
def test_welford_matches_oracle(case):
    x, axis, bad = case
    n, mean, var = reference.stats(x, axis)
    s = numbabn.welford(x, axis=axis)
    assert s.count == n
    _, big, std = _stat_scales(x, axis)
    k, lanes = _k(n) * U64, _lanes(x.dtype)
    _close(s.mean, mean, k * big + lanes * 2 * G32 * std, "mean")
    m2_bound = k * n * (var + 2 * big * std) + n * ((k * big) ** 2 + 4 * SUB) + lanes * LANE_REL * n * var
    _close(s.m2, var * n, m2_bound, "m2")
    assert (s.m2[np.isfinite(s.m2)] >= 0).all()
    if bad is not None:
        good = np.arange(x.shape[axis]) != bad
        assert np.isfinite(s.mean[good]).all() and np.isfinite(s.m2[good]).all() and not np.isfinite(s.mean[bad])


@given(case=small_cases(min_per_channel=1), data=st.data())
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
    n, big, std = _stat_scales(x, axis)
    k, lanes = _k(n) * U64, _lanes(x.dtype)
    _close(merged.mean, whole.mean, 2 * k * big + lanes * 4 * G32 * std, "mean")
    m2_bound = 2 * k * n * (whole.m2 / max(n, 1) + 2 * big * std) + n * ((2 * k * big) ** 2 + 4 * SUB)
    m2_bound = m2_bound + lanes * 2 * LANE_REL * whole.m2
    _close(merged.m2, whole.m2, m2_bound, "m2")


@given(case=arranged(small_cases()), training=st.booleans(), affine=st.booleans(), to_out=st.booleans(), data=st.data())
def test_backward_matches_oracle(case, training, affine, to_out, data):
    x, axis, bad = case
    C = x.shape[axis]
    g = data.draw(hnp.arrays(x.dtype, x.shape, elements=st.floats(-10, 10, width=x.dtype.itemsize * 8)))
    w = per_channel(data.draw, C, x.dtype, -2, 2) if affine else None
    rm = per_channel(data.draw, C, x.dtype, -10, 10)
    rv = per_channel(data.draw, C, x.dtype, 0.01, 10)
    _check_backward(x, axis, g, w, training, rm, rv, np.empty(x.shape, x.dtype) if to_out else None)


def test_eval_backward_does_not_read_x():
    x = np.array([[np.nan, 1.0], [np.inf, 2.0]])
    g = np.ones_like(x)
    rm, rv = np.zeros(2), np.ones(2)
    gi, _, _ = numbabn.batch_norm_backward(g, x, None, rm, 1 / np.sqrt(rv + EPS), training=False)
    np.testing.assert_array_equal(gi, reference.backward(g, x, None, rm, 1 / np.sqrt(rv + EPS), False, 1)[0])


# -- past PARALLEL_MIN: the parallel, fused and multi-range kernels ------------------------------------


def _params(rng, C, dtype):
    return (
        rng.uniform(-2, 2, C).astype(dtype),
        rng.uniform(-2, 2, C).astype(dtype),
        rng.uniform(-10, 10, C).astype(dtype),
        rng.uniform(0.01, 10, C).astype(dtype),
    )


@PARALLEL_PROPERTIES
@given(case=arranged(big_cases()), training=st.booleans(), to_out=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_parallel_forward_matches_oracle(case, training, to_out, seed):
    x, axis, bad = case
    assert x.size >= PARALLEL_MIN
    w, b, rm, rv = _params(np.random.default_rng(seed), x.shape[axis], x.dtype)
    _check_forward(x, axis, bad, training, 0.3, w, b, rm, rv, np.empty_like(x) if to_out else None)


@PARALLEL_PROPERTIES
@given(case=arranged(big_cases()), training=st.booleans(), to_out=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_parallel_backward_and_welford_match_oracle(case, training, to_out, seed):
    x, axis, bad = case
    rng = np.random.default_rng(seed)
    w, _, rm, rv = _params(rng, x.shape[axis], x.dtype)
    g = rng.standard_normal(x.shape).astype(x.dtype)
    _check_backward(x, axis, g, w, training, rm, rv, np.empty(x.shape, x.dtype) if to_out else None)
    n, mean, var = reference.stats(x, axis)
    s = numbabn.welford(x, axis=axis)
    _, big, std = _stat_scales(x, axis)
    assert s.count == n
    k, lanes = _k(n) * U64, _lanes(x.dtype)
    _close(s.mean, mean, k * big + lanes * 2 * G32 * std, "mean")
    m2_bound = k * n * (var + 2 * big * std) + n * ((k * big) ** 2 + 4 * SUB) + lanes * LANE_REL * n * var
    _close(s.m2, var * n, m2_bound, "m2")


# -- the bounds can tell ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("loc", [0.0, 1e3], ids=["centred", "offset-1e3"])
def test_bounds_refuse_wrong_formulas(dtype, loc):
    """The bounds above accept numbabn and refuse, on the same data, an output normalized
    with the unbiased variance, a running_var updated with the biased one, and the EMA with
    ``1 - momentum`` as the weight of the new batch (Keras's convention read as PyTorch's)."""
    rng = np.random.default_rng(3)
    x = (loc + rng.standard_normal((200, 3, 70))).astype(dtype)
    w, b, rm, rv = _params(rng, 3, dtype)
    m = 0.1
    _check_forward(x, 1, None, True, m, w, b, rm.copy(), rv.copy(), None)

    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(x, w, b, rm, rv, True, m, EPS, 1)
    n, big, std = _stat_scales(x, 1)
    var = 1 / ref_invstd**2 - EPS
    a = w.astype(np.float64) * ref_invstd
    fold_b = b - ref_mean * a
    y_bound = _y_bound(x, 1, ref_y, a, fold_b, big, n)
    unbiased_invstd = 1 / np.sqrt(var * n / (n - 1) + EPS)
    wrong_y = ((x - ref_mean.reshape(1, 3, 1)) * (w * unbiased_invstd).reshape(1, 3, 1) + b.reshape(1, 3, 1)).astype(
        dtype
    )
    with pytest.raises(AssertionError, match="y: "):
        _close(wrong_y, ref_y, y_bound, "y")

    var_u = var * n / (n - 1)
    rm_bound, rv_bound = _ema_bounds(
        dtype, m, rm.astype(np.float64), rv.astype(np.float64), ref_mean, var_u, big, std, n
    )
    biased_rv = ((1 - m) * rv + m * var).astype(dtype)
    with pytest.raises(AssertionError, match="running_var: "):
        _close(biased_rv, ref_rv, rv_bound, "running_var")
    swapped_rm = (m * rm + (1 - m) * ref_mean).astype(dtype)
    swapped_rv = (m * rv + (1 - m) * var_u).astype(dtype)
    with pytest.raises(AssertionError, match="running_mean: "):
        _close(swapped_rm, ref_rm, rm_bound, "running_mean")
    with pytest.raises(AssertionError, match="running_var: "):
        _close(swapped_rv, ref_rv, rv_bound, "running_var")
