"""The forward functions (``batch_norm``, ``batch_norm_forward``) against the float64 oracle
(``tests/reference.py``): every layout x dtype x affine x training, the running-statistics
update and the momentum edge values, ``eps`` and ``out=``."""

import numpy as np
import pytest
import reference
from conftest import (
    AFFINE,
    TRAINING,
    assert_bitwise,
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

# A few layouts, one per kernel family and size class, for the tests that vary something else.
SOME_LAYOUTS = by_tag("NCHW", "NHWC", "NC", "axis0", "fused", "big-NCHW", "big-NC", "big-fused-NCHW")
NCHW = by_tag("NCHW")[0]


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params())
def test_batch_norm_forward_matches_oracle(layout, dtype, affine, training, rng):
    x, weight, bias, rm, rv = make_case(rng, layout, dtype, affine)
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
    np.testing.assert_allclose(save_mean, ref_mean, rtol=stats_rtol(x.dtype), atol=stats_rtol(x.dtype))
    np.testing.assert_allclose(save_invstd, ref_invstd, rtol=stats_rtol(x.dtype))
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
    x, weight, bias, rm, rv = make_case(rng, layout, dtype, affine)
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
    x, weight, bias, _, _ = make_case(rng, layout, dtype, affine)
    ref_y, ref_mean, ref_invstd, _, _ = reference.forward(x, weight, bias, None, None, True, 0.1, 1e-5, layout.axis)

    y = numbabn.batch_norm(x, None, None, weight, bias, training=True, axis=layout.axis)
    y2, save_mean, save_invstd = numbabn.batch_norm_forward(x, weight, bias, axis=layout.axis)

    assert_close(y, ref_y, dtype)
    assert_bitwise(y2, y)
    np.testing.assert_allclose(save_mean, ref_mean, rtol=stats_rtol(x.dtype), atol=stats_rtol(x.dtype))
    np.testing.assert_allclose(save_invstd, ref_invstd, rtol=stats_rtol(x.dtype))


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


# -- out= -------------------------------------------------------------------------------------
OUT_LAYOUTS = by_tag("NCHW", "NHWC", "NC", "fused", "big-NCHW", "big-NHWC", "big-fused-NCHW")


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(OUT_LAYOUTS))
def test_out_fresh_array(layout, dtype, training, rng):
    x, weight, bias, rm, rv = make_case(rng, layout, dtype, True)
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
    x, weight, bias, rm, rv = make_case(rng, layout, dtype, True)
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
    np.testing.assert_allclose(save_mean, ref_mean, rtol=stats_rtol(x.dtype), atol=stats_rtol(x.dtype))
    np.testing.assert_allclose(save_invstd, ref_invstd, rtol=stats_rtol(x.dtype))
    assert_bitwise(rm, rm2)
    assert_bitwise(rv, rv2)


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(OUT_LAYOUTS))
def test_out_in_other_memory_order(layout, dtype, order, rng):
    """``out`` in the other memory order than ``input`` (F for C, C for F) receives the right
    values in its own order."""
    x, weight, bias, rm, rv = make_case(rng, layout, dtype, True)
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
    x0, weight, bias, rm, rv = make_case(rng, layout, dtype, True)
    ref_y = reference.forward(x0, weight, bias, rm, rv, training, 0.1, 1e-5, layout.axis)[0]
    buf = np.empty(x0.size + abs(shift), dtype)
    x = buf[max(-shift, 0) :][: x0.size].reshape(x0.shape)
    out = buf[max(shift, 0) :][: x0.size].reshape(x0.shape)
    x[...] = x0
    assert np.shares_memory(x, out) and out is not x

    y = numbabn.batch_norm(x, rm, rv, weight, bias, training, axis=layout.axis, out=out)

    assert y is out
    assert_close(out, ref_y, dtype)


@pytest.mark.parametrize("dtype", dtype_params())
def test_out_fortran_for_fortran_input(dtype, rng):
    """An F-ordered ``out`` for an F-ordered input is written directly."""
    x, weight, bias, rm, rv = make_case(rng, NCHW, dtype, True)
    x = np.asfortranarray(x)
    ref_y = reference.forward(x, weight, bias, rm, rv, True, 0.1, 1e-5, 1)[0]
    out = np.asfortranarray(np.full(x.shape, np.nan, dtype))
    y = numbabn.batch_norm(x, rm, rv, weight, bias, True, out=out)
    assert y is out and out.flags.f_contiguous
    assert_close(out, ref_y, dtype)
