"""``welford`` and ``merge_stats``: mergeable per-channel statistics (count, mean, M2)."""

import itertools
import warnings

import numpy as np
import pytest
import reference
from _bad_calls import raises
from conftest import assert_bitwise, dtype_params, layout_params, make_input, reduce_axes, stats_rtol

import numbabn
from numbabn import Stats


def _check_stats(stats, x, axis, rtol=None):
    rtol = stats_rtol(x.dtype) if rtol is None else rtol
    x64 = x.astype(np.float64)
    red = reduce_axes(x.ndim, axis)
    n = x.size // x.shape[axis]
    mean = np.mean(x64, axis=red)
    var = np.var(x64, axis=red)
    assert isinstance(stats, Stats)
    assert isinstance(stats.count, int) and stats.count == n
    assert stats.mean.dtype == stats.m2.dtype == np.float64
    assert stats.mean.shape == stats.m2.shape == (x.shape[axis],)
    np.testing.assert_allclose(stats.mean, mean, rtol=rtol, atol=rtol * np.abs(mean).max())
    np.testing.assert_allclose(stats.m2, var * n, rtol=rtol)
    np.testing.assert_allclose(stats.var(), var, rtol=rtol)
    np.testing.assert_allclose(stats.var(ddof=0), var, rtol=rtol)
    np.testing.assert_allclose(stats.var(ddof=1), np.var(x64, axis=red, ddof=1), rtol=rtol)
    np.testing.assert_allclose(stats.std(), np.sqrt(var), rtol=rtol)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params())
def test_welford_matches_numpy(layout, dtype, rng):
    x = make_input(rng, layout.shape, layout.axis, dtype)
    before = x.copy()
    stats = numbabn.welford(x, axis=layout.axis)
    _check_stats(stats, x, layout.axis)
    assert_bitwise(x, before)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params())
def test_welford_agrees_with_forward(layout, dtype, rng):
    """The statistics batch norm normalizes with are welford's."""
    x = make_input(rng, layout.shape, layout.axis, dtype)
    stats = numbabn.welford(x, axis=layout.axis)
    _, mean, invstd = numbabn.batch_norm_forward(x, axis=layout.axis, eps=1e-5)
    np.testing.assert_allclose(mean, stats.mean, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(stats.var() + 1e-5), rtol=1e-14)


def test_welford_default_axis_is_1(rng):
    x = make_input(rng, (4, 3, 5), 1, np.float64)
    s = numbabn.welford(x)
    _check_stats(s, x, 1)


def _batch_axis(layout):
    """The first axis that is not the feature axis."""
    return 1 if layout.ax == 0 else 0


def _split(x, split_axis, rng, pieces=4):
    """Uneven pieces along ``split_axis``, one of them empty."""
    size = x.shape[split_axis]
    cuts = np.sort(rng.integers(0, size + 1, pieces - 2))
    cuts = np.concatenate([[0], cuts, [cuts[-1] if len(cuts) else 0], [size]])
    parts = [np.take(x, np.arange(a, b), axis=split_axis) for a, b in itertools.pairwise(cuts)]
    assert sum(p.shape[split_axis] for p in parts) == size
    assert any(p.shape[split_axis] == 0 for p in parts)
    return parts


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params())
def test_merge_of_split_equals_whole(layout, dtype, rng):
    x = make_input(rng, layout.shape, layout.axis, dtype, loc=50.0)
    whole = numbabn.welford(x, axis=layout.axis)
    parts = [numbabn.welford(p, axis=layout.axis) for p in _split(x, _batch_axis(layout), rng, pieces=5)]
    assert any(p.count == 0 for p in parts)

    merged = numbabn.merge_stats(*parts)

    assert merged.count == whole.count
    rtol = 1e-12 if x.dtype == np.float64 else stats_rtol(x.dtype)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=rtol, atol=rtol * whole.std().max())
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=rtol)
    _check_stats(merged, x, layout.axis)


#: Empty batches: no rows, rows of zero width (channel-minor, one tile and two), no rows
#: channels-last.
EMPTY = [((0, 3, 4), 1), ((2, 3, 0), 1), ((2, 4096, 0), 1), ((3, 0, 3), -1)]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize(("shape", "axis"), EMPTY, ids=str)
def test_welford_of_empty_batch_is_merge_identity(dtype, shape, axis, rng):
    num_channels = shape[axis]
    empty = numbabn.welford(np.empty(shape, dtype), axis=axis)
    assert empty.count == 0
    assert empty.mean.shape == empty.m2.shape == (num_channels,)
    np.testing.assert_array_equal(empty.m2, 0.0)
    x = make_input(rng, (5, num_channels, 4), 1, dtype)
    s = numbabn.welford(x)
    for merged in (numbabn.merge_stats(empty, s), numbabn.merge_stats(s, empty), numbabn.merge_stats(s, empty, empty)):
        assert merged.count == s.count
        assert_bitwise(merged.mean, s.mean)
        assert_bitwise(merged.m2, s.m2)
    assert np.isnan(empty.var()).all()


@pytest.mark.parametrize("dtype", dtype_params())
def test_merge_is_order_insensitive(dtype, rng):
    """Every order of merging the same parts gives the same statistics up to rounding."""
    x = make_input(rng, (23, 4, 9), 1, dtype, loc=1e3)
    parts = [numbabn.welford(p) for p in np.array_split(x, [2, 3, 11, 12, 20])]
    ref = numbabn.welford(x)
    # The parts' own statistics differ from the whole's by their rounding (float32 lanes for
    # float32 data); their merges, in any order, by float64 rounding only.
    rtol = 1e-12 if x.dtype == np.float64 else stats_rtol(x.dtype)
    first = numbabn.merge_stats(*parts)
    np.testing.assert_allclose(first.mean, ref.mean, rtol=rtol, atol=rtol * ref.std().max())
    np.testing.assert_allclose(first.m2, ref.m2, rtol=rtol)
    for perm in itertools.permutations(parts):
        m = numbabn.merge_stats(*perm)
        assert m.count == ref.count
        np.testing.assert_allclose(m.mean, first.mean, rtol=1e-13)
        np.testing.assert_allclose(m.m2, first.m2, rtol=1e-12)
    # Tree order too.
    a, b, c, d, e, f = parts
    tree = numbabn.merge_stats(numbabn.merge_stats(a, b, c), numbabn.merge_stats(d, numbabn.merge_stats(e, f)))
    np.testing.assert_allclose(tree.mean, first.mean, rtol=1e-13)
    np.testing.assert_allclose(tree.m2, first.m2, rtol=1e-12)


def test_merge_formula_matches_design():
    """Chan's formula on hand-built parts: n = na + nb, mean = ma + d nb / n,
    M2 = M2a + M2b + d^2 na nb / n."""
    a = Stats(3, np.array([1.0, -2.0]), np.array([0.5, 4.0]))
    b = Stats(5, np.array([2.0, 6.0]), np.array([1.5, 0.0]))
    m = numbabn.merge_stats(a, b)
    d = b.mean - a.mean
    assert m.count == 8
    np.testing.assert_allclose(m.mean, a.mean + d * 5 / 8, rtol=1e-15)
    np.testing.assert_allclose(m.m2, a.m2 + b.m2 + d**2 * 3 * 5 / 8, rtol=1e-15)


def test_merge_accepts_plain_tuples_and_single_stats(rng):
    x = make_input(rng, (6, 3), 1, np.float64)
    s = numbabn.welford(x)
    one = numbabn.merge_stats(s)
    assert one.count == s.count
    assert_bitwise(one.mean, s.mean)
    assert_bitwise(one.m2, s.m2)
    halves = [numbabn.welford(h) for h in np.split(x, 2)]
    as_tuples = numbabn.merge_stats(*[(h.count, list(h.mean), list(h.m2)) for h in halves])
    np.testing.assert_allclose(as_tuples.mean, s.mean, rtol=1e-14)
    np.testing.assert_allclose(as_tuples.m2, s.m2, rtol=1e-13)
    assert isinstance(as_tuples, Stats)


def test_stats_var_ddof():
    s = Stats(4, np.array([1.0, 2.0]), np.array([6.0, 3.0]))
    np.testing.assert_array_equal(s.var(), [1.5, 0.75])
    np.testing.assert_array_equal(s.var(ddof=1), [2.0, 1.0])
    np.testing.assert_allclose(s.std(ddof=1), [np.sqrt(2.0), 1.0])
    assert np.isnan(Stats(1, np.array([1.0]), np.array([0.0])).var(ddof=1)).all()
    assert np.isnan(Stats(0, np.zeros(2), np.zeros(2)).var()).all()


@pytest.mark.parametrize(
    "m2", [np.zeros(4, np.int64), np.zeros(4, np.int32), np.zeros(4, bool)], ids=["int64", "int32", "bool"]
)
def test_stats_var_of_integer_fields_is_float64(m2):
    """Integer fields give a float64 variance, NaN where ``count - ddof <= 0`` as NumPy's
    (not the integer minimum that a NaN cast to int64 is)."""
    s = Stats(1, np.zeros(4, np.int64), m2)
    for v in (s.var(ddof=1), s.var(ddof=2), s.std(ddof=1)):
        assert v.dtype == np.float64 and np.isnan(v).all()
    v = Stats(3, np.zeros(2, np.int64), np.array([4, 6])).var()
    assert v.dtype == np.float64
    np.testing.assert_array_equal(v, [4 / 3, 2.0])
    assert Stats(3, np.zeros(2, np.float32), np.ones(2, np.float32)).var(ddof=1).dtype == np.float64


@pytest.mark.parametrize("field", ["mean", "m2"])
def test_complex_fields_are_refused(field):
    """Complex statistics are a TypeError naming the field, not a ComplexWarning and a
    dropped imaginary part."""
    fields = {"mean": np.zeros(3), "m2": np.ones(3)}
    fields[field] = fields[field] + 1j
    bad = Stats(4, **fields)
    good = Stats(2, np.zeros(3), np.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match=rf"stats\[1\]\.{field} must be real.*got complex128"):
            numbabn.merge_stats(good, bad)
        with pytest.raises(TypeError, match=rf"stats\[0\]\.{field} must be real.*got complex128"):
            numbabn.merge_stats(Stats(4, *(list(a) for a in fields.values())))
        with pytest.raises(TypeError, match=rf"stats\.{field} must be real.*got complex128"):
            bad.to_array()
        if field == "m2":
            with pytest.raises(TypeError, match=r"stats\.m2 must be real.*got complex128"):
                bad.var()


def test_complex_count_is_refused():
    with pytest.raises(TypeError, match=r"stats\[0\]\.count must be an integer >= 0, got complex"):
        numbabn.merge_stats(Stats(2 + 0j, np.zeros(3), np.ones(3)))
    with pytest.raises(TypeError, match=r"stats\.count must be an integer >= 0, got complex"):
        Stats(2 + 0j, np.zeros(3), np.ones(3)).var()


@pytest.mark.parametrize("dtype", dtype_params())
def test_welford_ddof1_matches_numpy(dtype, rng):
    x = make_input(rng, (7, 5, 3), 1, dtype)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(numbabn.welford(x).var(ddof=1), x64.var(axis=(0, 2), ddof=1), rtol=stats_rtol(x.dtype))
    _, _, var = reference.stats(x, 1)
    np.testing.assert_allclose(numbabn.welford(x).var(), var, rtol=stats_rtol(x.dtype))


def test_welford_large_offset_float32(rng):
    """Mean 1e6 and std 1 in float32: the variance is still right (no E[x^2] - E[x]^2)."""
    x = (1e6 + rng.standard_normal((512, 3, 20))).astype(np.float32)
    _, _, var = reference.stats(x, 1)
    np.testing.assert_allclose(numbabn.welford(x).var(), var, rtol=1e-6)


def test_merge_stats_needs_arguments():
    with pytest.raises(TypeError, match="at least one Stats, got none"):
        numbabn.merge_stats()


def test_merge_stats_channel_mismatch(rng):
    a = numbabn.welford(make_input(rng, (4, 3), 1, np.float64))
    b = numbabn.welford(make_input(rng, (4, 5), 1, np.float64))
    with pytest.raises(ValueError, match=r"stats\[1\].*3 channels.*got 5"):
        numbabn.merge_stats(a, b)
    with pytest.raises(ValueError, match=r"stats\[2\].*got 5"):
        numbabn.merge_stats(a, a, b)


@pytest.mark.parametrize(
    ("bad", "exc", "pattern"),
    [
        (3.0, TypeError, r"stats\[1\] must be a Stats.*got float"),
        ((1, np.zeros(3)), TypeError, r"stats\[1\] must be a Stats.*got tuple"),
        ((-1, np.zeros(3), np.zeros(3)), ValueError, r"stats\[1\]\.count.*got -1"),
        ((2.5, np.zeros(3), np.zeros(3)), ValueError, r"stats\[1\]\.count.*got 2\.5"),
        ((2, np.zeros(3), np.zeros(4)), ValueError, r"stats\[1\]\.mean and \.m2.*\(3,\) and \(4,\)"),
    ],
)
def test_merge_stats_rejects_bad_parts(bad, exc, pattern, rng):
    a = numbabn.welford(make_input(rng, (4, 3), 1, np.float64))
    with pytest.raises(exc, match=pattern):
        numbabn.merge_stats(a, bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4096, 8), (512, 3, 4), (300, 40)], ids=["nc", "short-rows", "nc-40"])
def test_channel_minor_blocks_whose_shift_cancels(shape, dtype):
    """Blocks whose first sweep's shift is far from their mean (a trend, an outlier in the
    first rows, a mean 1e4 standard deviations away that jumps between blocks) take the
    second sweep: the statistics match the float64 oracle to float64 rounding; constant
    channels have M2 exactly 0, and a NaN channel in the same tile stays NaN alone."""
    rng = np.random.default_rng(7)
    n = shape[0]
    x = rng.standard_normal(shape)
    x[:, 0] += np.linspace(0.0, 1e4, n).reshape((n,) + (1,) * (len(shape) - 2))  # a trend
    x[:2, 1] += 1e6  # outliers where the first block's shift is taken
    x[:, 2] = 3.25  # constant
    if shape[1] > 3:
        x[:, 3] += np.where(np.arange(n) % 128 < 64, 1e4, -1e4).reshape((n,) + (1,) * (len(shape) - 2))
    x = x.astype(dtype)
    x_nan = x.copy()
    x_nan[5, -1] = np.nan
    for arr in (x, x_nan):
        st = numbabn.welford(arr, axis=1)
        x64 = np.moveaxis(arr.astype(np.float64), 1, -1).reshape(-1, shape[1])
        mean = x64.mean(axis=0)
        m2 = ((x64 - mean) ** 2).sum(axis=0)
        ok = np.isfinite(mean)
        if dtype == np.float64:
            np.testing.assert_allclose(st.mean[ok], mean[ok], rtol=1e-13, atol=1e-13 * np.nanmax(np.abs(x64)))
            np.testing.assert_allclose(st.m2[ok], m2[ok], rtol=1e-10, atol=1e-20)
        else:  # float32 lanes: the mean within 1e-6 standard deviations, M2 within 1e-6
            tol = stats_rtol(dtype)
            std = np.sqrt(m2[ok] / x64.shape[0])
            np.testing.assert_allclose(st.mean[ok], mean[ok], rtol=0, atol=tol * std.max())
            assert (np.abs(st.mean[ok] - mean[ok]) <= tol * std).all()
            np.testing.assert_allclose(st.m2[ok], m2[ok], rtol=tol, atol=1e-20)
        assert st.m2[2] == 0.0 or arr is x_nan and shape[1] == 3  # there the NaN is channel 2's
        assert np.array_equal(np.isnan(st.m2), ~ok) and np.array_equal(np.isnan(st.mean), ~ok)


@pytest.mark.parametrize(
    ("x", "exc", "parts"),
    [
        (np.ones(5), ValueError, ("x", "at least 2 dimensions", "got 1")),
        (np.ones((3, 4), np.int64), TypeError, ("x", "got int64")),
        (np.ones((3, 4), np.complex128), TypeError, ("x", "got complex128")),
        (None, TypeError, ("x", "got NoneType")),
    ],
    ids=["1-d", "int", "complex", "None"],
)
def test_welford_bad_input(x, exc, parts):
    with raises(exc, *parts):
        numbabn.welford(x)


@pytest.mark.parametrize("axis", [2, -3])
def test_welford_axis_out_of_range(axis):
    with raises(ValueError, "axis", "[-2, 2)", f"got {axis}"):
        numbabn.welford(np.ones((3, 4)), axis=axis)
