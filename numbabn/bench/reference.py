"""The float64 NumPy oracle: batch normalization written straight from its formulas.

Nothing here is clever: statistics take two passes (``mean``, then ``mean((x - mean)**2)``)
in float64 whatever the input dtype, and each function is the textbook formula in the
symbols of the docs' math page.  The self-check (``python -m numbabn``), the benchmarks'
result checks (the bench table, the asv suite, the GPU check) and the test suite all compare
numbabn with these functions, so there is one definition of "the right answer".
"""

import functools

import numpy as np


def _ieee(fn):
    """NaN and Inf inputs are part of what the tests feed the oracle: plain IEEE arithmetic,
    without warnings."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def _per_channel_shape(ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def _reduce_axes(ndim, axis):
    return tuple(i for i in range(ndim) if i != axis)


def _param(a, fill, num_channels):
    if a is None:
        return np.full(num_channels, fill, dtype=np.float64)
    return np.asarray(a, dtype=np.float64)


@_ieee
def stats(x, axis=1):
    """Per-channel ``(n, mean, var)`` (biased variance), float64, two passes."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    red = _reduce_axes(x.ndim, axis)
    bshape = _per_channel_shape(x.ndim, axis)
    n = x.size // x.shape[axis]
    mean = np.mean(x, axis=red)
    var = ((x - mean.reshape(bshape)) ** 2).mean(axis=red)
    return n, mean, var


@_ieee
def ema(running, value, momentum):
    """One running-statistic step, ``(1 - momentum) * running + momentum * value``, float64."""
    running = np.asarray(running, dtype=np.float64)
    return (1 - momentum) * running + momentum * np.asarray(value, dtype=np.float64)


@_ieee
def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, axis=1):
    """Batch-norm forward.

    Returns ``(y, mean, invstd, new_running_mean, new_running_var)``, all float64.  ``mean``
    and ``invstd`` are those ``y`` was normalized with (batch statistics in training, running
    statistics in eval).  The new running statistics are None when none were given, and equal
    to the given ones in eval mode; in training ``running_var`` takes the unbiased variance,
    ``var * n / (n - 1)``.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    num_channels = x.shape[axis]
    bshape = _per_channel_shape(x.ndim, axis)
    w = _param(weight, 1.0, num_channels)
    b = _param(bias, 0.0, num_channels)
    rm = None if running_mean is None else np.asarray(running_mean, dtype=np.float64).copy()
    rv = None if running_var is None else np.asarray(running_var, dtype=np.float64).copy()
    if training:
        n, mean, var = stats(x, axis)
        if rm is not None:
            rm = ema(rm, mean, momentum)
            rv = ema(rv, var * n / (n - 1), momentum)
    else:
        mean, var = rm, rv
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean.reshape(bshape)) * invstd.reshape(bshape) * w.reshape(bshape) + b.reshape(bshape)
    return y, mean, invstd, rm, rv


@_ieee
def backward(g, x, weight, mean, invstd, training, axis=1):
    """Batch-norm backward: ``(grad_input, grad_weight, grad_bias)``, float64.

    ``mean`` and ``invstd`` are those the forward pass normalized with.
    """
    g = np.asarray(g, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    num_channels = x.shape[axis]
    red = _reduce_axes(x.ndim, axis)
    bshape = _per_channel_shape(x.ndim, axis)
    n = x.size // num_channels
    w = _param(weight, 1.0, num_channels).reshape(bshape)
    mean = np.asarray(mean, dtype=np.float64).reshape(bshape)
    invstd = np.asarray(invstd, dtype=np.float64).reshape(bshape)
    xhat = (x - mean) * invstd
    grad_bias = g.sum(axis=red)
    grad_weight = (g * xhat).sum(axis=red)
    if training:
        grad_input = w * invstd / n * (n * g - grad_bias.reshape(bshape) - xhat * grad_weight.reshape(bshape))
    else:
        grad_input = g * w * invstd
    return grad_input, grad_weight, grad_bias


@_ieee
def update_threshold(g, axis=1):
    """``BatchNorm.update_threshold``: the per-channel mean of ``|g|``, float64."""
    g = np.asarray(g, dtype=np.float64)
    axis = axis % g.ndim
    return np.abs(g).mean(axis=_reduce_axes(g.ndim, axis))


def relative_error(actual, expected):
    """``max |actual - expected|`` over ``max(1, max |expected|)``: the error measure of every
    check against this oracle (0 for empty arrays)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale
