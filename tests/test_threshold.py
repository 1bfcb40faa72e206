"""``BatchNorm.update_threshold``: the per-channel ``mean(|grad_output|)`` the backward
reduction pass accumulates beside ``grad_bias``, for every layout and both kernel families."""

import numba
import numpy as np
import pytest
import reference
from conftest import BIG_LAYOUTS, assert_bitwise, dtype_params, layout_params, make_input, stats_rtol

import numbabn
from numbabn import _call


def _layer(layout, dtype, rng, training):
    bn = numbabn.BatchNorm(layout.channels, axis=layout.axis, dtype=dtype)
    bn.weight[...] = rng.uniform(0.5, 1.5, layout.channels)
    bn.train(training)
    return bn


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params())
def test_update_threshold_matches_oracle(layout, dtype, training, rng):
    x = make_input(rng, layout.shape, layout.axis, dtype)
    g = (rng.standard_normal(layout.shape) * rng.uniform(0.1, 10.0)).astype(dtype)
    bn = _layer(layout, dtype, rng, training)
    assert bn.update_threshold is None
    bn(x)

    gi = bn.backward(g)

    t = bn.update_threshold
    assert t.shape == (layout.channels,) and t.dtype == np.float64
    np.testing.assert_allclose(t, reference.update_threshold(g, layout.axis), rtol=stats_rtol(np.float64), atol=0)
    # The gradients themselves are unchanged by the extra accumulator.
    gi_ref, gw_ref, gb_ref = numbabn.batch_norm_backward(
        g, x, bn.weight, *bn._saved[1:3], training=training, axis=layout.axis
    )
    assert_bitwise(gi, gi_ref)
    assert_bitwise(bn.grad_weight, gw_ref)
    assert_bitwise(bn.grad_bias, gb_ref)


def test_update_threshold_follows_last_backward_and_survives_resets(rng):
    bn = numbabn.BatchNorm(3)
    x = make_input(rng, (8, 3, 5), 1, np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    np.testing.assert_array_equal(bn.update_threshold, np.ones(3))
    bn(x)
    bn.backward(np.full_like(x, -2.0))
    np.testing.assert_array_equal(bn.update_threshold, np.full(3, 2.0))
    bn.reset_parameters()
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.update_threshold, np.full(3, 2.0))
    assert "update_threshold" not in bn.state_dict()


def test_public_backward_still_returns_three_arrays(rng):
    x = make_input(rng, (6, 4, 3), 1, np.float64)
    y, mean, invstd = numbabn.batch_norm_forward(x)
    assert len(numbabn.batch_norm_backward(y, x, None, mean, invstd)) == 3
    inp = _call.check_input(x, 1, None)
    *grads, abs_sum = _call.backward_call(inp, y, None, mean, invstd, True, None).run()
    for a, b in zip(grads, numbabn.batch_norm_backward(y, x, None, mean, invstd), strict=True):
        assert_bitwise(a, b)
    np.testing.assert_allclose(abs_sum, np.abs(y).sum(axis=(0, 2)), rtol=stats_rtol(np.float64))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", layout_params(BIG_LAYOUTS))
def test_update_threshold_bitwise_identical_for_1_and_2_threads(layout, dtype, rng):
    x = make_input(rng, layout.shape, layout.axis, dtype)
    g = rng.standard_normal(layout.shape).astype(dtype)
    results = []
    old = numba.get_num_threads()
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            bn = numbabn.BatchNorm(layout.channels, axis=layout.axis, dtype=dtype)
            bn(x)
            bn.backward(g)
            results.append(bn.update_threshold)
    finally:
        numba.set_num_threads(old)
    assert_bitwise(*results)


def test_update_threshold_of_an_empty_batch_is_nan():
    bn = numbabn.BatchNorm(3)
    x = np.zeros((0, 3, 4), np.float32)
    bn.backward(bn(x))
    assert bn.update_threshold.shape == (3,) and np.isnan(bn.update_threshold).all()
