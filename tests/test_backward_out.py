"""``batch_norm_backward(..., out=)``: where ``grad_input`` goes, and what ``out`` may be."""

import numpy as np
import pytest
import reference
from conftest import (
    TRAINING,
    assert_bitwise,
    assert_close,
    by_tag,
    dtype_params,
    layout_params,
    make_input,
    make_params,
)

import numbabn

LAYOUTS = by_tag("NCHW", "NHWC", "NC", "fused", "big-NCHW", "big-NHWC", "big-fused-NCHW", "NC-super-rows")


def _case(rng, layout, dtype, training):
    x = make_input(rng, layout.shape, layout.axis, dtype)
    g = rng.standard_normal(layout.shape).astype(dtype)
    weight, bias, rm, rv = make_params(rng, layout.channels, dtype)
    _, mean, invstd = numbabn.batch_norm_forward(x, weight, bias, rm, rv, training=training, axis=layout.axis)
    _, ref_mean, ref_invstd, _, _ = reference.forward(x, weight, bias, rm, rv, training, 0.1, 1e-5, layout.axis)
    ref = reference.backward(g, x, weight, ref_mean, ref_invstd, training, layout.axis)
    return x, g, weight, mean, invstd, ref


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(LAYOUTS))
def test_out_receives_grad_input(layout, dtype, training, rng):
    x, g, weight, mean, invstd, (ref_gi, ref_gw, ref_gb) = _case(rng, layout, dtype, training)
    out = np.full_like(x, np.nan)

    gi, gw, gb = numbabn.batch_norm_backward(g, x, weight, mean, invstd, training=training, axis=layout.axis, out=out)

    assert gi is out
    assert_close(out, ref_gi, dtype)
    assert_close(gw, ref_gw, dtype)
    assert_close(gb, ref_gb, dtype)


@pytest.mark.parametrize("which", ["grad_output", "input"])
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(LAYOUTS))
def test_out_may_be_an_operand(layout, dtype, training, which, rng):
    """In place over ``grad_output`` or ``input``: the reductions see the original values."""
    x, g, weight, mean, invstd, (ref_gi, ref_gw, ref_gb) = _case(rng, layout, dtype, training)
    expected = numbabn.batch_norm_backward(g, x, weight, mean, invstd, training=training, axis=layout.axis)
    out = g if which == "grad_output" else x

    gi, gw, gb = numbabn.batch_norm_backward(g, x, weight, mean, invstd, training=training, axis=layout.axis, out=out)

    assert gi is out
    assert_bitwise(gi, expected[0])
    assert_bitwise(gw, expected[1])
    assert_bitwise(gb, expected[2])
    assert_close(gi, ref_gi, dtype)


@pytest.mark.parametrize("dtype", dtype_params())
def test_out_overlapping_grad_output_and_other_order(dtype, rng):
    """An ``out`` that overlaps an operand without being it, or has another memory order,
    still receives the exact result (through a scratch array)."""
    layout = by_tag("NCHW")[0]
    x, g, weight, mean, invstd, (ref_gi, _, _) = _case(rng, layout, dtype, True)
    expected = numbabn.batch_norm_backward(g, x, weight, mean, invstd, axis=layout.axis)[0]

    buf = np.concatenate([g.ravel(), np.zeros(1, dtype)])
    g_view = buf[:-1].reshape(g.shape)
    out_view = buf[1:].reshape(g.shape)
    gi = numbabn.batch_norm_backward(g_view, x, weight, mean, invstd, axis=layout.axis, out=out_view)[0]
    assert gi is out_view
    assert_bitwise(out_view, expected)

    out_f = np.asfortranarray(np.zeros_like(x))
    gi = numbabn.batch_norm_backward(g, x, weight, mean, invstd, axis=layout.axis, out=out_f)[0]
    assert gi is out_f
    assert_bitwise(out_f, expected)


@pytest.mark.parametrize(
    ("out", "error", "match"),
    [
        (np.zeros((3, 5, 4, 5), np.float32), ValueError, r"out must have shape \(3, 5, 4, 4\).*got \(3, 5, 4, 5\)"),
        (np.zeros((3, 5, 4, 4), np.float64), TypeError, "out must have dtype float32.*got float64"),
        (np.zeros((3, 5, 4, 4), np.int32), TypeError, "out must have dtype float32.*got int32"),
        ([[0.0]], TypeError, "out must be a numpy.ndarray, got list"),
    ],
)
def test_bad_out_is_rejected_untouched(out, error, match, rng):
    x = make_input(rng, (3, 5, 4, 4), 1, np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, invstd = numbabn.batch_norm_forward(x)
    before = np.array(out, copy=True)
    with pytest.raises(error, match=match):
        numbabn.batch_norm_backward(g, x, None, mean, invstd, out=out)
    assert_bitwise(np.asarray(out), before)


def test_read_only_out_is_rejected(rng):
    x = make_input(rng, (3, 5, 4, 4), 1, np.float32)
    _, mean, invstd = numbabn.batch_norm_forward(x)
    out = np.zeros_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        numbabn.batch_norm_backward(x, x, None, mean, invstd, out=out)
