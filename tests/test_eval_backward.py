"""Eval-mode backward: ``grad_input = g * weight * invstd`` does not depend on ``x``, so a
non-finite ``x`` must not reach it (through ``NaN * 0`` in ``g * A + x * B + D``)."""

import numpy as np
import pytest

import numbabn

# Serial and parallel kernels, channel-strided (fused and not) and channel-minor rows.
SHAPES = [
    ((1, 2), 0),
    ((1, 2), 1),
    ((64, 8), 1),
    ((4, 3, 100), 1),
    ((8, 32, 64, 64), 1),
    ((4096, 64), 1),
    ((16, 9, 9, 32), -1),
]


@pytest.mark.parametrize("shape, axis", SHAPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_does_not_reach_eval_grad_input(rng, shape, axis, bad):
    x = rng.normal(size=shape).astype(np.float32)
    x.flat[0] = bad
    g = rng.normal(size=shape).astype(np.float32)
    num_channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, num_channels).astype(np.float32)
    mean, invstd = rng.normal(size=num_channels), rng.uniform(0.5, 2.0, num_channels)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, weight, mean, invstd, training=False, axis=axis)
    shape_c = [1] * len(shape)
    shape_c[axis] = num_channels
    expected = g * (weight * invstd).reshape(shape_c)
    assert np.isfinite(gi).all()
    np.testing.assert_allclose(gi, expected, rtol=2e-7, atol=0)
    reduce = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    # grad_bias sums in float64 and rounds once to float32: within an ulp of sum |g|.
    np.testing.assert_allclose(gb, g.astype(np.float64).sum(axis=reduce), rtol=0, atol=1e-6 * np.abs(g).sum())
