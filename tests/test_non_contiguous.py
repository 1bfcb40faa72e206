"""Arrays that are not plain C-contiguous ones, through every function: strided, F-ordered,
transposed and negative-stride inputs, read-only and broadcast (zero-stride) inputs, strided
per-channel parameters; results come back in the input's memory order."""

import numpy as np
import pytest
import reference
from conftest import TRAINING, assert_bitwise, assert_close, by_tag, dtype_params, make_input, make_params, stats_rtol

import numbabn

NCHW = by_tag("NCHW")[0]


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
    np.testing.assert_allclose(save_mean, ref_mean, rtol=stats_rtol(x.dtype), atol=stats_rtol(x.dtype))
    np.testing.assert_allclose(save_invstd, ref_invstd, rtol=stats_rtol(x.dtype))
    assert_close(rm, ref_rm, dtype)
    assert_close(rv, ref_rv, dtype)
    for a, e in zip(grads, ref_grads, strict=True):
        assert_close(a, e, dtype)
    _, mean, var = reference.stats(x, axis)
    np.testing.assert_allclose(stats.mean, mean, rtol=stats_rtol(x.dtype), atol=stats_rtol(x.dtype))
    np.testing.assert_allclose(stats.var(), var, rtol=stats_rtol(x.dtype))
    assert_bitwise(x, x_before)
    # The same values, contiguous, give the same answer.
    y_c = numbabn.batch_norm(np.ascontiguousarray(x), rm2, rv2, weight, bias, training, axis=axis)
    assert_close(y, y_c, dtype)


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
    np.testing.assert_allclose(numbabn.welford(x).mean, reference.stats(x)[1], rtol=stats_rtol(x.dtype))

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
