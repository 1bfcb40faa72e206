"""The functional API against the float64 oracle (``tests/reference.py``).

Every function over layouts x dtypes x affine x training, running-statistic updates,
``out=``, non-contiguous inputs, numerical stability, NaN and zero-variance channels and the
momentum edge values.
"""

import numpy as np
import pytest
import reference
from conftest import (
    PARALLEL_MIN,
    STATS_RTOL,
    Layout,
    assert_bitwise,
    assert_close,
    by_tag,
    channel_shape,
    dtype_params,
    layout_params,
    make_input,
    make_params,
    reduce_axes,
)

import numbabn

AFFINE = [pytest.param(True, id="affine"), pytest.param(False, id="no-affine")]
TRAINING = [pytest.param(True, id="train"), pytest.param(False, id="eval")]

# A few layouts, one per kernel family and size class, for the tests that vary something else.
SOME_LAYOUTS = by_tag("NCHW", "NHWC", "NC", "axis0", "fused", "big-NCHW", "big-NC", "big-fused-NCHW")
NCHW = by_tag("NCHW")[0]


def _case(rng, layout, dtype, affine):
    x = make_input(rng, layout.shape, layout.axis, dtype)
    weight, bias, running_mean, running_var = make_params(rng, layout.channels, dtype)
    if not affine:
        weight = bias = None
    return x, weight, bias, running_mean, running_var


# -- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params())
def test_batch_norm_forward_matches_oracle(layout, dtype, affine, training, rng):
    x, weight, bias, rm, rv = _case(rng, layout, dtype, affine)
    x_before, rm_before, rv_before = x.copy(), rm.copy(), rv.copy()
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(
        x, weight, bias, rm, rv, training, 0.1, 1e-5, layout.axis
    )

    y, save_mean, save_invstd = numbabn.batch_norm_forward(
        x, weight, bias, rm, rv, training=training, momentum=0.1, eps=1e-5, axis=layout.axis
    )

    assert y.shape == x.shape and y.dtype == dtype and y.flags.c_contiguous
    assert save_mean.dtype == np.float64 and save_invstd.dtype == np.float64
    assert save_mean.shape == save_invstd.shape == (layout.channels,)
    assert_close(y, ref_y, dtype)
    np.testing.assert_allclose(save_mean, ref_mean, rtol=STATS_RTOL, atol=STATS_RTOL)
    np.testing.assert_allclose(save_invstd, ref_invstd, rtol=STATS_RTOL)
    assert_bitwise(x, x_before)
    assert rm.dtype == rv.dtype == dtype
    if training:
        assert_close(rm, ref_rm, dtype)
        assert_close(rv, ref_rv, dtype)
        assert not np.array_equal(rv, rv_before)
    else:
        assert_bitwise(rm, rm_before)
        assert_bitwise(rv, rv_before)


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params())
def test_batch_norm_matches_oracle(layout, dtype, affine, training, rng):
    x, weight, bias, rm, rv = _case(rng, layout, dtype, affine)
    ref_y, _, _, ref_rm, ref_rv = reference.forward(x, weight, bias, rm, rv, training, 0.25, 1e-3, layout.axis)

    y = numbabn.batch_norm(x, rm, rv, weight, bias, training, 0.25, 1e-3, axis=layout.axis)

    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, ref_y, dtype)
    assert_close(rm, ref_rm, dtype)
    assert_close(rv, ref_rv, dtype)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(SOME_LAYOUTS))
def test_training_without_running_stats(layout, dtype, affine, rng):
    x, weight, bias, _, _ = _case(rng, layout, dtype, affine)
    ref_y, ref_mean, ref_invstd, _, _ = reference.forward(x, weight, bias, None, None, True, 0.1, 1e-5, layout.axis)

    y = numbabn.batch_norm(x, None, None, weight, bias, training=True, axis=layout.axis)
    y2, save_mean, save_invstd = numbabn.batch_norm_forward(x, weight, bias, axis=layout.axis)

    assert_close(y, ref_y, dtype)
    assert_bitwise(y2, y)
    np.testing.assert_allclose(save_mean, ref_mean, rtol=STATS_RTOL, atol=STATS_RTOL)
    np.testing.assert_allclose(save_invstd, ref_invstd, rtol=STATS_RTOL)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(SOME_LAYOUTS))
def test_training_output_is_normalized(layout, dtype, rng):
    """Without affine parameters each channel of the output has mean 0 and variance
    var / (var + eps)."""
    x = make_input(rng, layout.shape, layout.axis, dtype)
    eps = 1e-5
    y = numbabn.batch_norm(x, None, None, training=True, eps=eps, axis=layout.axis)
    red = reduce_axes(x.ndim, layout.axis)
    var = x.astype(np.float64).var(axis=red)
    y64 = y.astype(np.float64)
    np.testing.assert_allclose(y64.mean(axis=red), 0.0, atol=1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(y64.var(axis=red), var / (var + eps), rtol=1e-5 if dtype == np.float32 else 1e-12)


# -- running statistics ---------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(SOME_LAYOUTS))
def test_running_stats_update(layout, dtype, momentum, rng):
    """EMA with the unbiased variance: ``rv <- (1 - m) rv + m var n / (n - 1)``."""
    x = make_input(rng, layout.shape, layout.axis, dtype)
    _, _, rm, rv = make_params(rng, layout.channels, dtype)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    red = reduce_axes(x.ndim, layout.axis)
    x64 = x.astype(np.float64)
    mean, unbiased = x64.mean(axis=red), x64.var(axis=red, ddof=1)

    numbabn.batch_norm(x, rm, rv, training=True, momentum=momentum, axis=layout.axis)

    assert_close(rm, (1 - momentum) * rm0 + momentum * mean, dtype)
    assert_close(rv, (1 - momentum) * rv0 + momentum * unbiased, dtype)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(SOME_LAYOUTS))
def test_momentum_edges(layout, dtype, rng):
    """momentum=0 keeps the running statistics bitwise; momentum=1 replaces them with the
    batch mean and unbiased variance (the old values do not leak in)."""
    x = make_input(rng, layout.shape, layout.axis, dtype)
    _, _, rm, rv = make_params(rng, layout.channels, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y0 = numbabn.batch_norm(x, rm, rv, training=True, momentum=0.0, axis=layout.axis)
    assert_bitwise(rm, rm0)
    assert_bitwise(rv, rv0)

    y1 = numbabn.batch_norm(x, rm, rv, training=True, momentum=1.0, axis=layout.axis)
    red = reduce_axes(x.ndim, layout.axis)
    x64 = x.astype(np.float64)
    assert_close(rm, x64.mean(axis=red), dtype)
    assert_close(rv, x64.var(axis=red, ddof=1), dtype)
    # The output never depends on momentum.
    assert_bitwise(y0, y1)

    # From a huge old value, momentum=1 must still give the batch statistics exactly.
    rm[...], rv[...] = 1e30, 1e30
    numbabn.batch_norm(x, rm, rv, training=True, momentum=1.0, axis=layout.axis)
    assert_close(rm, x64.mean(axis=red), dtype)
    assert_close(rv, x64.var(axis=red, ddof=1), dtype)


def test_running_stats_accumulate_over_steps(rng):
    """Several training steps compose as the EMA recursion says."""
    layout = NCHW
    _, _, rm, rv = make_params(rng, layout.channels, np.float64)
    ref_rm, ref_rv = rm.copy(), rv.copy()
    for _ in range(4):
        x = make_input(rng, layout.shape, layout.axis, np.float64)
        _, _, _, ref_rm, ref_rv = reference.forward(x, None, None, ref_rm, ref_rv, True, 0.3, 1e-5, layout.axis)
        numbabn.batch_norm(x, rm, rv, training=True, momentum=0.3)
    assert_close(rm, ref_rm, np.float64)
    assert_close(rv, ref_rv, np.float64)


@pytest.mark.parametrize("dtype", dtype_params())
def test_strided_running_stats_are_updated_in_place(dtype, rng):
    """Running buffers that are views with a stride are updated through the view; the
    elements in between are untouched."""
    layout = NCHW
    C = layout.channels
    x = make_input(rng, layout.shape, layout.axis, dtype)
    buf_m = rng.normal(size=2 * C).astype(dtype)
    buf_v = rng.uniform(0.5, 2, size=2 * C).astype(dtype)
    before_m, before_v = buf_m.copy(), buf_v.copy()
    rm, rv = buf_m[::2], buf_v[::2]
    _, _, _, ref_rm, ref_rv = reference.forward(x, None, None, rm, rv, True, 0.1, 1e-5, 1)

    numbabn.batch_norm(x, rm, rv, training=True)

    assert_close(buf_m[::2], ref_rm, dtype)
    assert_close(buf_v[::2], ref_rv, dtype)
    assert_bitwise(buf_m[1::2], before_m[1::2])
    assert_bitwise(buf_v[1::2], before_v[1::2])


# -- backward -------------------------------------------------------------------------------
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params())
def test_batch_norm_backward_matches_oracle(layout, dtype, affine, training, rng):
    x, weight, bias, rm, rv = _case(rng, layout, dtype, affine)
    g = rng.standard_normal(layout.shape).astype(dtype)
    _, save_mean, save_invstd = numbabn.batch_norm_forward(x, weight, bias, rm, rv, training=training, axis=layout.axis)
    _, ref_mean, ref_invstd, _, _ = reference.forward(x, weight, bias, rm, rv, training, 0.1, 1e-5, layout.axis)
    ref_gi, ref_gw, ref_gb = reference.backward(g, x, weight, ref_mean, ref_invstd, training, layout.axis)
    g_before, x_before = g.copy(), x.copy()

    gi, gw, gb = numbabn.batch_norm_backward(g, x, weight, save_mean, save_invstd, training=training, axis=layout.axis)

    assert gi.shape == x.shape and gi.dtype == dtype
    assert gw.shape == gb.shape == (layout.channels,)
    assert gw.dtype == gb.dtype == dtype
    assert_close(gi, ref_gi, dtype)
    assert_close(gw, ref_gw, dtype)
    assert_close(gb, ref_gb, dtype)
    assert_bitwise(g, g_before)
    assert_bitwise(x, x_before)


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", dtype_params())
def test_backward_accepts_stats_in_input_dtype(dtype, training, rng):
    layout = NCHW
    x, weight, _, rm, rv = _case(rng, layout, dtype, True)
    g = rng.standard_normal(layout.shape).astype(dtype)
    _, mean, invstd = numbabn.batch_norm_forward(x, weight, None, rm, rv, training=training)
    mean, invstd = mean.astype(dtype), invstd.astype(dtype)
    ref = reference.backward(g, x, weight, mean, invstd, training, 1)
    got = numbabn.batch_norm_backward(g, x, weight, mean, invstd, training=training)
    for a, e in zip(got, ref, strict=True):
        assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", dtype_params())
def test_backward_matches_finite_differences(dtype, rng):
    """The oracle's backward is itself checked against central differences of its forward
    (float64), so the two cannot share a mistake."""
    shape, axis = (4, 3, 5), 1
    x = make_input(rng, shape, axis, np.float64)
    w = rng.normal(size=3)
    b = rng.normal(size=3)
    g = rng.standard_normal(shape)
    for training in (True, False):
        rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, 3)

        def loss(x, w, b, training=training, rm=rm, rv=rv):
            return float((reference.forward(x, w, b, rm, rv, training, 0.1, 1e-5, axis)[0] * g).sum())

        _, mean, invstd, _, _ = reference.forward(x, w, b, rm, rv, training, 0.1, 1e-5, axis)
        gi, gw, gb = reference.backward(g, x, w, mean, invstd, training, axis)
        h = 1e-6
        num_gi = np.zeros(shape)
        for idx in np.ndindex(shape):
            e = np.zeros(shape)
            e[idx] = h
            num_gi[idx] = (loss(x + e, w, b) - loss(x - e, w, b)) / (2 * h)
        num_gw = np.array([(loss(x, w + h * ei, b) - loss(x, w - h * ei, b)) / (2 * h) for ei in np.eye(3)])
        num_gb = np.array([(loss(x, w, b + h * ei) - loss(x, w, b - h * ei)) / (2 * h) for ei in np.eye(3)])
        np.testing.assert_allclose(gi, num_gi, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gw, num_gw, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gb, num_gb, rtol=1e-5, atol=1e-6)
        # numbabn agrees with the checked oracle.
        xd, gd = x.astype(dtype), g.astype(dtype)
        _, m, s = numbabn.batch_norm_forward(
            xd, w.astype(dtype), b.astype(dtype), rm.astype(dtype), rv.astype(dtype), training=training
        )
        got = numbabn.batch_norm_backward(gd, xd, w.astype(dtype), m, s, training=training)
        _, rmean, rinv, _, _ = reference.forward(
            xd, w.astype(dtype), b, rm.astype(dtype), rv.astype(dtype), training, 0.1, 1e-5
        )
        ref = reference.backward(gd, xd, w.astype(dtype), rmean, rinv, training)
        for a, e in zip(got, ref, strict=True):
            assert_close(a, e, dtype)


# -- out= -------------------------------------------------------------------------------------
OUT_LAYOUTS = by_tag("NCHW", "NHWC", "NC", "fused", "big-NCHW", "big-NHWC", "big-fused-NCHW")


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(OUT_LAYOUTS))
def test_out_fresh_array(layout, dtype, training, rng):
    x, weight, bias, rm, rv = _case(rng, layout, dtype, True)
    expected = numbabn.batch_norm(x, rm.copy(), rv.copy(), weight, bias, training, axis=layout.axis)
    out = np.full_like(x, np.nan)

    y = numbabn.batch_norm(x, rm, rv, weight, bias, training, axis=layout.axis, out=out)

    assert y is out
    assert_bitwise(out, expected)


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(OUT_LAYOUTS))
def test_out_is_input(layout, dtype, training, rng):
    """``out=input`` normalizes in place, with the statistics of the original values."""
    x, weight, bias, rm, rv = _case(rng, layout, dtype, True)
    rm2, rv2 = rm.copy(), rv.copy()
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(
        x, weight, bias, rm, rv, training, 0.1, 1e-5, layout.axis
    )
    expected = numbabn.batch_norm(x, rm2, rv2, weight, bias, training, axis=layout.axis)

    y, save_mean, save_invstd = numbabn.batch_norm_forward(
        x, weight, bias, rm, rv, training=training, axis=layout.axis, out=x
    )

    assert y is x
    assert_bitwise(x, expected)
    assert_close(x, ref_y, dtype)
    np.testing.assert_allclose(save_mean, ref_mean, rtol=STATS_RTOL, atol=STATS_RTOL)
    np.testing.assert_allclose(save_invstd, ref_invstd, rtol=STATS_RTOL)
    assert_bitwise(rm, rm2)
    assert_bitwise(rv, rv2)


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(OUT_LAYOUTS))
def test_out_in_other_memory_order(layout, dtype, order, rng):
    """``out`` in the other memory order than ``input`` (F for C, C for F) receives the right
    values in its own order."""
    x, weight, bias, rm, rv = _case(rng, layout, dtype, True)
    if order == "C":
        x = np.asfortranarray(x)
    ref_y = reference.forward(x, weight, bias, rm, rv, True, 0.1, 1e-5, layout.axis)[0]
    out = np.empty(x.shape, dtype=dtype, order=order)
    out[...] = np.nan

    y = numbabn.batch_norm(x, rm, rv, weight, bias, True, axis=layout.axis, out=out)

    assert y is out
    assert out.flags.f_contiguous if order == "F" else out.flags.c_contiguous
    assert_close(out, ref_y, dtype)


@pytest.mark.parametrize("shift", [0, 1, -1, 7, -7])
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(by_tag("NCHW", "NC", "fused", "big-NCHW", "big-NC")))
def test_out_overlapping_input(layout, dtype, training, shift, rng):
    """An ``out`` that is another view of the input's memory (the same elements, or shifted
    by a few) still receives the normalization of the original values."""
    x0, weight, bias, rm, rv = _case(rng, layout, dtype, True)
    ref_y = reference.forward(x0, weight, bias, rm, rv, training, 0.1, 1e-5, layout.axis)[0]
    buf = np.empty(x0.size + abs(shift), dtype)
    x = buf[max(-shift, 0) :][: x0.size].reshape(x0.shape)
    out = buf[max(shift, 0) :][: x0.size].reshape(x0.shape)
    x[...] = x0
    assert np.shares_memory(x, out) and out is not x

    y = numbabn.batch_norm(x, rm, rv, weight, bias, training, axis=layout.axis, out=out)

    assert y is out
    assert_close(out, ref_y, dtype)


# -- non-contiguous inputs ------------------------------------------------------------------
def _variants(rng, dtype):
    """``(name, x, axis)``: inputs that are not C-contiguous, with a feature axis."""
    base = make_input(rng, (6, 5, 8, 7), 1, dtype)
    nhwc = make_input(rng, (6, 5, 4, 7), 1, dtype).transpose(0, 2, 3, 1)
    big = make_input(rng, by_tag("big-NCHW")[0].shape, 1, dtype)
    bignc = make_input(rng, by_tag("big-NC")[0].shape, 1, dtype)
    fused = make_input(rng, by_tag("big-fused-NCHW")[0].shape, 1, dtype)
    return [
        ("strided-batch", base[:, ::2], 1),
        ("strided-channels", base[:, ::2, :, 1:], 1),
        ("strided-inner", base[..., ::3], 1),
        ("fortran", np.asfortranarray(base), 1),
        ("fortran-axis-last", np.asfortranarray(base), -1),
        ("transposed", base.T, 2),
        ("negative-strides", base[::-1], 1),
        ("negative-channels", base[:, ::-1, ::-1], 1),
        ("nhwc-view-of-nchw", nhwc, -1),
        ("nc-fortran", np.asfortranarray(base[:, :, 0, 0]), 1),
        ("nc-column-slice", base[:, 1, :, :].reshape(6, -1)[:, ::2], 1),
        ("big-fortran", np.asfortranarray(big), 1),
        ("big-strided", big[:, :, ::2], 1),
        ("big-nc-negative", bignc[::-1], 1),
        ("big-nc-fortran", np.asfortranarray(bignc), 1),
        ("big-fused-fortran", np.asfortranarray(fused), 1),
        ("big-fused-negative", fused[:, ::-1], 1),
    ]


VARIANT_NAMES = [v[0] for v in _variants(np.random.default_rng(0), np.float64)]


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_non_contiguous_inputs(variant, dtype, training, rng):
    x, axis = next((v[1], v[2]) for v in _variants(rng, dtype) if v[0] == variant)
    assert not x.flags.c_contiguous
    C = x.shape[axis]
    weight, bias, rm, rv = make_params(rng, C, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    g = rng.standard_normal(x.shape).astype(dtype)
    x_before = x.copy()
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(x, weight, bias, rm, rv, training, 0.1, 1e-5, axis)
    ref_grads = reference.backward(g, x, weight, ref_mean, ref_invstd, training, axis)

    y, save_mean, save_invstd = numbabn.batch_norm_forward(x, weight, bias, rm, rv, training=training, axis=axis)
    grads = numbabn.batch_norm_backward(g, x, weight, save_mean, save_invstd, training=training, axis=axis)
    stats = numbabn.welford(x, axis=axis)

    assert_close(y, ref_y, dtype)
    np.testing.assert_allclose(save_mean, ref_mean, rtol=STATS_RTOL, atol=STATS_RTOL)
    np.testing.assert_allclose(save_invstd, ref_invstd, rtol=STATS_RTOL)
    assert_close(rm, ref_rm, dtype)
    assert_close(rv, ref_rv, dtype)
    for a, e in zip(grads, ref_grads, strict=True):
        assert_close(a, e, dtype)
    _, mean, var = reference.stats(x, axis)
    np.testing.assert_allclose(stats.mean, mean, rtol=STATS_RTOL, atol=STATS_RTOL)
    np.testing.assert_allclose(stats.var(), var, rtol=STATS_RTOL)
    assert_bitwise(x, x_before)
    # The same values, contiguous, give the same answer.
    y_c = numbabn.batch_norm(np.ascontiguousarray(x), rm2, rv2, weight, bias, training, axis=axis)
    assert_close(y, y_c, dtype)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("g_order", ["C", "F", "strided"])
@pytest.mark.parametrize("x_order", ["C", "F", "strided"])
def test_backward_mixed_memory_orders(x_order, g_order, dtype, rng):
    """``grad_output`` and ``input`` in different memory orders."""

    def arrange(a, order):
        if order == "F":
            return np.asfortranarray(a)
        if order == "strided":
            big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
            big[..., ::2] = a
            return big[..., ::2]
        return np.ascontiguousarray(a)

    shape = (4, 3, 5, 6)
    x = make_input(rng, shape, 1, dtype)
    g = rng.standard_normal(shape).astype(dtype)
    weight = make_params(rng, 3, dtype)[0]
    _, mean, invstd = numbabn.batch_norm_forward(x, weight)
    ref = reference.backward(g, x, weight, mean, invstd, True, 1)
    got = numbabn.batch_norm_backward(arrange(g, g_order), arrange(x, x_order), weight, mean, invstd)
    for a, e in zip(got, ref, strict=True):
        assert_close(a, e, dtype)


# -- numerical behaviour ---------------------------------------------------------------------
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
    eps64, eps = np.finfo(np.float64).eps, np.finfo(dtype).eps
    stats_tol = eps64 * offset
    out_tol = 2 * eps + 16 * eps64 * offset
    stats = numbabn.welford(x, axis=layout.axis)
    np.testing.assert_allclose(stats.var(), ref_var, rtol=stats_tol)
    np.testing.assert_allclose(stats.mean, ref_mean, rtol=64 * eps64)  # a rounding per merge level

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
    for a, e in zip(got, ref, strict=True):
        assert_close(a, e, dtype, rtol=out_tol)


NAN_LAYOUTS = by_tag(
    "NCHW", "NHWC", "NC", "rows-over-block", "NC-many-rows", "fused", "big-NCHW", "big-NC", "big-fused-NCHW"
)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(NAN_LAYOUTS))
def test_nan_stays_in_its_channel(layout, dtype, rng):
    x, weight, bias, rm, rv = _case(rng, layout, dtype, True)
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
    x, weight, bias, rm, rv = _case(rng, layout, dtype, True)
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


@pytest.mark.parametrize("dtype", dtype_params())
def test_eps_enters_invstd(dtype, rng):
    layout = NCHW
    x = make_input(rng, layout.shape, 1, dtype)
    _, rm, rv = make_params(rng, layout.channels, dtype)[1:]
    for eps in (0.0, 1e-5, 0.5, 10.0):
        y, _, invstd = numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False, eps=eps)
        ref_y, _, ref_invstd, _, _ = reference.forward(x, None, None, rm, rv, False, 0.1, eps)
        np.testing.assert_allclose(invstd, ref_invstd, rtol=1e-12)
        assert_close(y, ref_y, dtype)


def test_eval_is_affine_map_of_input(rng):
    """Eval mode is elementwise: each output depends only on its own input element."""
    x = make_input(rng, (5, 3, 4, 4), 1, np.float64)
    w, b, rm, rv = make_params(rng, 3, np.float64)
    y = numbabn.batch_norm(x, rm, rv, w, b, training=False)
    x2 = x.copy()
    x2[0, 1, 2, 3] += 10.0
    y2 = numbabn.batch_norm(x2, rm, rv, w, b, training=False)
    changed = y2 != y
    assert changed.sum() == 1 and changed[0, 1, 2, 3]
    cs = channel_shape(4, 1)
    np.testing.assert_allclose(y2 - y, np.where(changed, 10.0 * (w / np.sqrt(rv + 1e-5)).reshape(cs), 0), atol=1e-12)


@pytest.mark.parametrize("dtype", dtype_params())
def test_out_fortran_for_fortran_input(dtype, rng):
    """An F-ordered ``out`` for an F-ordered input is written directly."""
    x, weight, bias, rm, rv = _case(rng, NCHW, dtype, True)
    x = np.asfortranarray(x)
    ref_y = reference.forward(x, weight, bias, rm, rv, True, 0.1, 1e-5, 1)[0]
    out = np.asfortranarray(np.full(x.shape, np.nan, dtype))
    y = numbabn.batch_norm(x, rm, rv, weight, bias, True, out=out)
    assert y is out and out.flags.f_contiguous
    assert_close(out, ref_y, dtype)


@pytest.mark.parametrize("dtype", dtype_params())
def test_result_memory_order_follows_input(dtype, rng):
    """The output is in the input's memory order (F for F), and so is grad_input."""
    x = np.asfortranarray(make_input(rng, (4, 3, 5, 6), 1, dtype))
    y, mean, invstd = numbabn.batch_norm_forward(x)
    assert y.flags.f_contiguous
    gi, _, _ = numbabn.batch_norm_backward(np.asfortranarray(y), x, None, mean, invstd)
    assert gi.flags.f_contiguous
    yc, _, _ = numbabn.batch_norm_forward(np.ascontiguousarray(x))
    assert yc.flags.c_contiguous
    assert_close(y, yc, dtype)


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


def test_numpy_scalar_arguments(rng):
    """NumPy scalars are accepted wherever Python numbers are, with the same result."""
    x = make_input(rng, NCHW.shape, 1, np.float32)
    _, _, rm, rv = make_params(rng, NCHW.channels, np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    y = numbabn.batch_norm(x, rm, rv, None, None, True, 0.2, 1e-3, axis=1)
    y2 = numbabn.batch_norm(
        x, rm2, rv2, None, None, np.bool_(True), np.float64(0.2), np.float64(1e-3), axis=np.int64(1)
    )
    assert_bitwise(y, y2)
    assert_bitwise(rm, rm2)
    assert_bitwise(rv, rv2)


@pytest.mark.parametrize("dtype", dtype_params())
def test_read_only_and_broadcast_inputs(dtype, rng):
    """Inputs are only read: read-only arrays (memory maps, ``broadcast_to`` views with zero
    strides) work, in training and eval, forward and backward."""
    x = make_input(rng, (5, 3, 4), 1, dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    w, b, rm, rv = make_params(rng, 3, dtype)
    x.flags.writeable = False
    g.flags.writeable = False
    for training in (True, False):
        ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(x, w, b, rm, rv, training, 0.1, 1e-5)
        y, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, training=training)
        assert_close(y, ref_y, dtype)
        assert_close(rm, ref_rm, dtype)
        assert_close(rv, ref_rv, dtype)
        got = numbabn.batch_norm_backward(g, x, w, mean, invstd, training=training)
        for a, e in zip(got, reference.backward(g, x, w, ref_mean, ref_invstd, training), strict=True):
            assert_close(a, e, dtype)
    np.testing.assert_allclose(numbabn.welford(x).mean, reference.stats(x)[1], rtol=STATS_RTOL)

    xb = np.broadcast_to(make_input(rng, (1, 3, 4), 1, dtype), (6, 3, 4))
    assert not xb.flags.writeable
    y = numbabn.batch_norm(xb, rm, rv, w, b, training=False)
    assert_close(y, reference.forward(xb, w, b, rm, rv, False, 0.1, 1e-5)[0], dtype)
    y = numbabn.batch_norm(xb, None, None, w, b, training=True)
    assert_close(y, reference.forward(xb, w, b, None, None, True, 0.1, 1e-5)[0], dtype)


@pytest.mark.parametrize("dtype", dtype_params())
def test_strided_per_channel_parameters(dtype, rng):
    """weight and bias may be strided views."""
    x = make_input(rng, NCHW.shape, 1, dtype)
    C = NCHW.channels
    wbuf = rng.normal(size=2 * C).astype(dtype)
    bbuf = rng.normal(size=2 * C).astype(dtype)
    w, b = wbuf[::2], bbuf[1::2]
    g = rng.standard_normal(x.shape).astype(dtype)
    y, mean, invstd = numbabn.batch_norm_forward(x, w, b)
    ref_y, ref_mean, ref_invstd, _, _ = reference.forward(x, w, b, None, None, True, 0.1, 1e-5)
    assert_close(y, ref_y, dtype)
    got = numbabn.batch_norm_backward(g, x, w, mean, invstd)
    for a, e in zip(got, reference.backward(g, x, w, ref_mean, ref_invstd, True), strict=True):
        assert_close(a, e, dtype)


@pytest.mark.parametrize("layout", layout_params(by_tag("NCHW", "NC", "fused", "big-NC")))
def test_inf_stays_in_its_channel(layout, rng):
    x, w, b, rm, rv = _case(rng, layout, np.float64, True)
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
    np.testing.assert_allclose(s.var(), ref_var, rtol=STATS_RTOL)
    y = numbabn.batch_norm(x, None, None, training=True, axis=layout.axis)
    assert np.isfinite(y).all()
    assert_close(y, reference.forward(x, None, None, None, None, True, 0.1, 1e-5, layout.axis)[0], np.float32)


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
    np.testing.assert_allclose(s.mean, np.mean(x, axis=red), rtol=STATS_RTOL, atol=STATS_RTOL * 1e160)
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
