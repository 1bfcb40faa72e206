"""Forward pass: statistics (training) or running statistics (eval), then ``y = x * a + b``.

Bytes moved (s = element size): training reads ``x`` twice and writes ``y`` once (3s per
element; the byte model of docs/design.rst) or, when a channel's slice fits in L2
(channel-strided layouts, :func:`numbabn.cpu._plan.fuse_channels`), reads it from DRAM once
and again from L2 (2s); eval reads ``x`` and writes ``y`` (2s).  The EMA update of the running
statistics is fused into the O(C) finalize step between statistics and normalization.  The
elementwise pass computes in float64 and rounds once on store, so float32 outputs keep float32
precision even when ``|mean| / std`` is large (``b = bias - mean * a`` would cancel in float32).

Channel-minor layouts have no fused path, and outputs use plain stores: the alternatives
(float32 arithmetic, a fused channel-minor path, non-temporal stores) were measured slower
where it matters; docs/performance_notes.rst has the figures.
"""

import numpy as np
from numba import prange

from .._config import MIN_INNER
from .._jit import leaf, stage, twin
from .._math import finish_channel, fold, invstd_of
from ._plan import expand, fuse_channels, widen
from .stats import channel_stats, strided_rows


@stage
def affine_row(xr, a, b, out):
    """``out = xr * a + b`` along one contiguous row (float64 arithmetic, rounded on store)."""
    for k in range(xr.shape[0]):
        out[k] = xr[k] * a + b


@stage
def normalize(x3, coef, y3):
    """``y[o, c, i] = x[o, c, i] * coef[0, c] + coef[1, c]`` (elementwise: any schedule
    gives the same bits)."""
    outer, num_channels, inner = x3.shape
    if inner >= MIN_INNER:
        for r in prange(outer * num_channels):
            o = r // num_channels
            c = r % num_channels
            affine_row(x3[o, c], coef[0, c], coef[1, c], y3[o, c])
    else:
        k = widen(outer, num_channels * inner)
        width = k * num_channels * inner
        if k * inner == 1:  # (N, C): the coefficients are the rows already
            a = coef[0]
            b = coef[1]
        else:
            a = expand(coef[0], inner, k)
            b = expand(coef[1], inner, k)
        x2 = x3.reshape(outer // k, width)
        y2 = y3.reshape(outer // k, width)
        for o in prange(outer // k):
            for j in range(width):
                y2[o, j] = x2[o, j] * a[j] + b[j]


@leaf
def finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save):
    """:func:`numbabn._math.finish_channel` of every channel (``stats`` (3, C): count, mean,
    M2).  A compiled function of its own: inlined into the driver, the same loop took
    1.3 us instead of 0.7 us for 64 channels."""
    for c in range(stats.shape[1]):
        finish_channel(
            c, stats[0, c], stats[1, c], stats[2, c], weight, bias, running_mean, running_var, momentum, eps, coef, save
        )


@stage
def train_fused(x3, weight, bias, running_mean, running_var, momentum, eps, y3, save):
    """Channel-strided training forward, one task per channel: statistics, finalize, then
    normalize the channel's rows while they are still in L2, so DRAM sees ``x`` once."""
    outer, num_channels, inner = x3.shape
    coef = np.empty((2, num_channels))
    for c in prange(num_channels):
        n, mean, m2 = strided_rows(x3, c, 0, outer)
        finish_channel(c, n, mean, m2, weight, bias, running_mean, running_var, momentum, eps, coef, save)
        for o in range(outer):
            affine_row(x3[o, c], coef[0, c], coef[1, c], y3[o, c])


@twin
def forward_train(x3, weight, bias, running_mean, running_var, momentum, eps, y3, save):
    """Driver, training: batch statistics, EMA update, normalize ``x3`` into ``y3``;
    ``save`` (2, C) float64 receives the mean and invstd used."""
    outer, num_channels, inner = x3.shape
    if fuse_channels(outer, num_channels, inner, x3.itemsize):
        train_fused(x3, weight, bias, running_mean, running_var, momentum, eps, y3, save)
        return
    stats = np.empty((3, num_channels))
    channel_stats(x3, stats)
    coef = np.empty((2, num_channels))
    finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    normalize(x3, coef, y3)


@twin
def forward_eval(x3, weight, bias, mean, var, eps, y3, save):
    """Driver, eval: normalize ``x3`` into ``y3`` with the given (running) ``mean``, ``var``;
    ``save`` (2, C) float64 receives the mean and invstd used."""
    num_channels = x3.shape[1]
    coef = np.empty((2, num_channels))
    for c in range(num_channels):
        invstd = invstd_of(np.float64(var[c]), eps)
        coef[0, c], coef[1, c] = fold(np.float64(mean[c]), invstd, weight[c], bias[c])
        save[0, c] = mean[c]
        save[1, c] = invstd
    normalize(x3, coef, y3)


@twin
def forward_stats(x3, stats, weight, bias, running_mean, running_var, momentum, eps, y3, save):
    """Driver, training with statistics ``stats`` (3, C) merged elsewhere (SyncBatchNorm's
    global batch): finalize and EMA update as :func:`forward_train`, then normalize."""
    coef = np.empty((2, x3.shape[1]))
    finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    normalize(x3, coef, y3)


@twin
def apply(x3, coef, y3):
    """Driver: ``y = x * coef[0] + coef[1]`` with coefficients made elsewhere, from
    statistics merged over Dask chunks or processes (:func:`finish_channels`)."""
    normalize(x3, coef, y3)
