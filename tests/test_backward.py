"""``batch_norm_backward`` against the float64 oracle (``tests/reference.py``), itself checked
against finite differences: every layout x dtype x affine x training, saved statistics in the
input's dtype, ``grad_output`` and ``input`` in different memory orders.  (``out=``:
``test_backward_out.py``; eval mode with non-finite inputs: ``test_eval_backward.py``.)"""

import numpy as np
import pytest
import reference
from conftest import (
    AFFINE,
    TRAINING,
    assert_bitwise,
    assert_close,
    by_tag,
    dtype_params,
    layout_params,
    make_case,
    make_input,
    make_params,
)

import numbabn

NCHW = by_tag("NCHW")[0]


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params())
def test_batch_norm_backward_matches_oracle(layout, dtype, affine, training, rng):
    x, weight, bias, rm, rv = make_case(rng, layout, dtype, affine)
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
    x, weight, _, rm, rv = make_case(rng, layout, dtype, True)
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
