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


@pytest.mark.parametrize("shape, axis", [((5, 3, 12), 1), ((37, 5), 1), ((3, 4, 3, 5), -1)])
def test_non_finite_input_does_not_reach_eval_grad_input_on_gpu(rng, monkeypatch, shape, axis):
    from numba import cuda

    from numbabn import _config

    # Small blocks, as in test_cuda.py, so both kernel families and many blocks run.
    monkeypatch.setattr(_config, "CUDA_THREADS", 8)
    monkeypatch.setattr(_config, "CUDA_MERGE_THREADS", 4)
    monkeypatch.setattr(_config, "CUDA_BLOCK_ELEMS", 16)
    monkeypatch.setattr(_config, "CUDA_MIN_INNER", 8)
    x = rng.normal(size=shape).astype(np.float32)
    x.flat[0] = np.nan
    g = rng.normal(size=shape).astype(np.float32)
    num_channels = shape[axis]
    mean, invstd = rng.normal(size=num_channels), rng.uniform(0.5, 2.0, num_channels)
    gi, _, _ = numbabn.batch_norm_backward(
        cuda.to_device(g),
        cuda.to_device(x),
        None,
        cuda.to_device(mean),
        cuda.to_device(invstd),
        training=False,
        axis=axis,
    )
    gi = gi.copy_to_host()
    assert np.isfinite(gi).all()
    expected, _, _ = numbabn.batch_norm_backward(g, x, None, mean, invstd, training=False, axis=axis)
    np.testing.assert_allclose(gi, expected, rtol=2e-7, atol=0)
