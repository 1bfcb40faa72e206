"""Forward pass: statistics (training) or running statistics (eval), then ``y = x * a + b``.

Bytes moved (s = element size): training reads ``x`` twice and writes ``y`` once (3s per
element; the byte model of docs/design.rst) or, when a channel's slice fits in L2
(channel-strided layouts, :func:`numbabn.cpu._plan.fuse_channels`), reads it from DRAM once
and again from L2 (2s); eval reads ``x`` and writes ``y`` (2s).  The EMA update of the running
statistics is fused into the O(C) finalize step between statistics and normalization.  The
elementwise pass computes in float64 and rounds once on store, so float32 outputs keep float32
precision even when ``|mean| / std`` is large (``b = bias - mean * a`` would cancel in float32).

Channel-minor layouts have no fused path (measured slower, as float32 arithmetic was), and
write outputs beyond the last-level cache with streaming stores (:mod:`._stream`), which
skip the read of each output line; docs/performance_notes.rst has the figures.

A driver that reduces blocks takes ``rows_at`` first: the address of its per-block leaf's
code (``strided_rows`` or ``minor_rows``) for its input arrays, which it calls through
(:func:`numbabn._jit.by_address`).  The channel-minor training and ``apply`` drivers take
``norm_at``, :func:`affine_rows`' address (or :func:`affine_rows_stream`'), too: their
parallel loop runs chunks of rows through it, so they do not compile the elementwise loop
again (eval inlines it, faster in cache, and takes ``apply``'s driver beyond it).
"""

import numpy as np
from numba import prange, types

from .._config import ROW_CHUNK
from .._jit import OUTPUT, addresses, by_address, indirect, leaf, stage, twin
from .._math import channel_invstd, ema, finish_channel, fold, invstd_of, unbiased
from ._half import put, value
from ._plan import expand, super_rows
from ._stream import affine_row_stream, row_chunks, store_fence, streams
from .stats import minor_rows, stats_minor, stats_strided, strided_rows, welford


@stage
def affine_row(xr, a, b, out):
    """``out = xr * a + b`` along one contiguous row (float64 arithmetic, rounded on store)."""
    for k in range(xr.shape[0]):
        put(out, k, value(xr, k) * a + b)


@stage
def normalize_strided(x3, coef, y3):
    """``y[o, c, i] = x[o, c, i] * coef[0, c] + coef[1, c]`` (elementwise: any schedule
    gives the same bits)."""
    outer, num_channels, inner = x3.shape
    for r in prange(outer * num_channels):
        o = r // num_channels
        c = r % num_channels
        affine_row(x3[o, c], coef[0, c], coef[1, c], y3[o, c])


@stage
def affine_row_minor(xr, a, b, out):
    """``out[j] = xr[j] * a[j] + b[j]`` along one channel-minor row (as :func:`affine_row`,
    with a coefficient per column)."""
    for j in range(xr.shape[0]):
        put(out, j, value(xr, j) * a[j] + b[j])


@stage
def minor_coefs(coef, inner, width):
    """The per-column ``(a, b)`` of a channel-minor view's rows of ``width`` values, from the
    per-channel ``coef`` (2, C)."""
    k = super_rows(width, coef.shape[1], inner)
    return expand(coef[0], inner, k), expand(coef[1], inner, k)


@by_address(1, OUTPUT, types.int64, types.int64, types.float64[::1], types.float64[::1])
def affine_rows(x2, y2, o0, o1, a, b):
    """``y2[o, j] = x2[o, j] * a[j] + b[j]`` for rows ``[o0, o1)``."""
    for o in range(o0, o1):
        affine_row_minor(x2[o], a, b, y2[o])


@by_address(1, OUTPUT, types.int64, types.int64, types.float64[::1], types.float64[::1])
def affine_rows_stream(x2, y2, o0, o1, a, b):
    """:func:`affine_rows` with streaming stores (outputs beyond the cache: :mod:`._stream`)."""
    for o in range(o0, o1):
        affine_row_stream(x2[o], a, b, y2[o])
    store_fence()


@stage
def normalize_minor(rows_at, x2, inner, coef, y2):
    """The same on a channel-minor view ``x2`` (outer // k, k * C * inner): each row is ``k``
    rows of ``C * inner`` values."""
    outer, width = x2.shape
    a, b = minor_coefs(coef, inner, width)
    step = max(1, ROW_CHUNK // max(width, 1))
    for t in prange((outer + step - 1) // step):
        o0 = np.int64(t) * step
        indirect(affine_rows, rows_at, (x2, y2, o0, min(outer, o0 + step), a, b))


@stage
def normalize_minor_inline(x2, inner, coef, y2):
    """:func:`normalize_minor` with the elementwise loop in the parallel loop itself: eval's,
    whose call is that loop alone (through the leaf's address it measured slower in cache,
    and a small call pays for the lookup; docs/performance_notes.rst)."""
    a, b = minor_coefs(coef, inner, x2.shape[1])
    for o in prange(x2.shape[0]):
        affine_row_minor(x2[o], a, b, y2[o])


@leaf
def finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save):
    """:func:`numbabn._math.finish_channel` of every channel (``stats`` (3, C): count, mean,
    M2).  A compiled function of its own: inlined into the driver, the same loop ran slower.
    Every ``invstd`` first, into ``save[1]``, in a loop of its own: its divisions and square
    roots then run several channels at once."""
    invstd = save[1]
    for c in range(stats.shape[1]):
        invstd[c] = channel_invstd(stats[0, c], stats[2, c], eps)
    if save.shape[0] == 2:  # the plain forward's: loops without a branch per channel
        if running_mean.shape[0] > 0:
            update_running(stats, running_mean, running_var, momentum)
        fold_channels(stats, invstd, weight, bias, coef, save[0])
        return
    for c in range(stats.shape[1]):
        n, mean, m2 = stats[0, c], stats[1, c], stats[2, c]
        finish_channel(c, n, mean, m2, invstd[c], weight, bias, running_mean, running_var, momentum, eps, coef, save)


@stage
def update_running(stats, running_mean, running_var, momentum):
    """The EMA update of every channel's running statistics, as :func:`finish_channel`
    makes it."""
    for c in range(stats.shape[1]):
        n, mean, m2 = stats[0, c], stats[1, c], stats[2, c]
        running_mean[c] = ema(np.float64(running_mean[c]), mean, momentum)
        running_var[c] = ema(np.float64(running_var[c]), unbiased(m2, n), momentum)


@stage
def fold_channels(stats, invstd, weight, bias, coef, saved_mean):
    """Every channel's fold coefficients and saved mean, as :func:`finish_channel` makes
    them without Batch Renormalization's rows."""
    a_row, b_row = coef[0], coef[1]
    for c in range(stats.shape[1]):
        mean = stats[1, c]
        a_row[c], b_row[c] = fold(mean, invstd[c], np.float64(weight[c]), np.float64(bias[c]))
        saved_mean[c] = mean


@leaf
def eval_coefs(weight, bias, mean, var, eps, coef, save):
    """The fold coefficients ``coef`` (2, C) and saved ``(mean, invstd)`` of normalizing with
    the given (running) ``mean`` and ``var``."""
    for c in range(coef.shape[1]):
        invstd = invstd_of(np.float64(var[c]), eps)
        coef[0, c], coef[1, c] = fold(np.float64(mean[c]), invstd, weight[c], bias[c])
        save[0, c] = mean[c]
        save[1, c] = invstd


@stage
def fused_channel(rows_at, x3, c, weight, bias, running_mean, running_var, momentum, eps, coef, save):
    """A fused driver's task before its normalize: channel ``c``'s statistics over all its
    rows, then its finalize into ``coef[:, c]`` and ``save[:, c]``."""
    n, mean, m2 = indirect(strided_rows, rows_at, (x3, c, np.int64(0), x3.shape[0]))
    invstd = channel_invstd(n, m2, eps)
    finish_channel(c, n, mean, m2, invstd, weight, bias, running_mean, running_var, momentum, eps, coef, save)


@twin
def train_fused(rows_at, x3, weight, bias, running_mean, running_var, momentum, eps, y3, save):
    """Driver, channel-strided training forward, one task per channel: statistics, finalize,
    then normalize the channel's rows while they are still in L2, so DRAM sees ``x`` once."""
    outer, num_channels, inner = x3.shape
    coef = np.empty((2, num_channels))
    for cc in prange(num_channels):
        c = np.int64(cc)  # int64, as in the serial twin (see stats.partials_strided)
        fused_channel(rows_at, x3, c, weight, bias, running_mean, running_var, momentum, eps, coef, save)
        for o in range(outer):
            affine_row(x3[o, c], coef[0, c], coef[1, c], y3[o, c])


@twin
def train_strided(rows_at, x3, weight, bias, running_mean, running_var, momentum, eps, y3, save):
    """Driver, channel-strided training forward: batch statistics, EMA update, normalize
    ``x3`` into ``y3``; ``save`` (2, C) float64 receives the mean and invstd used."""
    num_channels = x3.shape[1]
    stats = np.empty((3, num_channels))
    stats_strided(rows_at, x3, stats)
    coef = np.empty((2, num_channels))
    finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    normalize_strided(x3, coef, y3)


@twin
def train_minor(rows_at, norm_at, x2, inner, weight, bias, running_mean, running_var, momentum, eps, y2, save):
    """Driver, the same on a channel-minor view (:class:`numbabn.cpu._plan.Layout`)."""
    num_channels = save.shape[1]
    stats = np.empty((3, num_channels))
    stats_minor(rows_at, x2, num_channels, inner, stats)
    coef = np.empty((2, num_channels))
    finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    normalize_minor(norm_at, x2, inner, coef, y2)


@twin
def eval_strided(x3, weight, bias, mean, var, eps, y3, save):
    """Driver, eval: normalize ``x3`` into ``y3`` with the given (running) ``mean``, ``var``;
    ``save`` (2, C) float64 receives the mean and invstd used."""
    coef = np.empty((2, x3.shape[1]))
    eval_coefs(weight, bias, mean, var, eps, coef, save)
    normalize_strided(x3, coef, y3)


@twin
def eval_minor(x2, inner, weight, bias, mean, var, eps, y2, save):
    """Driver, the same on a channel-minor view."""
    coef = np.empty((2, save.shape[1]))
    eval_coefs(weight, bias, mean, var, eps, coef, save)
    normalize_minor_inline(x2, inner, coef, y2)


@twin
def apply_strided_stream(x3, coef, y3):
    """Driver, :func:`apply_strided` with streaming stores (outputs beyond the cache,
    :mod:`._stream`): chunks of rows, one fence each."""
    outer, num_channels, inner = x3.shape
    step, count = row_chunks(outer * num_channels, inner)
    for t in prange(count):
        for r in range(np.int64(t) * step, min(outer * num_channels, (np.int64(t) + 1) * step)):
            o, c = r // num_channels, r % num_channels
            affine_row_stream(x3[o, c], coef[0, c], coef[1, c], y3[o, c])
        store_fence()


@twin
def apply_strided(x3, coef, y3):
    """Driver: ``y = x * coef[0] + coef[1]`` with coefficients made elsewhere, from
    statistics merged over Dask chunks or processes (:func:`finish_channels`)."""
    normalize_strided(x3, coef, y3)


@twin
def apply_minor(norm_at, x2, inner, coef, y2):
    """Driver, the same on a channel-minor view."""
    normalize_minor(norm_at, x2, inner, coef, y2)


# -- the drivers of each stage, by layout ---------------------------------------------------
# Each compiled driver holds one layout's kernels only, so a call compiles its own path.

#: The stages the host backend runs; the GPU twins (``cuda/forward.py``) have the same names,
#: but ``apply``, which only Dask's tasks run.
DRIVERS = ("forward_train", "forward_eval", "forward_with_stats", "apply")


#: The leaves :func:`train_minor` calls, by input: with the plain or the streaming normalize.
TRAIN_MINOR_AT = addresses(minor_rows, affine_rows)
TRAIN_MINOR_STREAM_AT = addresses(minor_rows, affine_rows_stream)


def forward_train(parallel, lay, x, weight, bias, running_mean, running_var, momentum, eps, y, save):
    """Training forward of ``x``, the kernels' view of :class:`Layout` ``lay``, into ``y``."""
    if lay.strided and not lay.fused_forward and streams(y):  # beyond the cache: by stages
        stats = np.empty((3, lay.num_channels))
        welford(parallel, lay, x, stats)
        forward_with_stats(parallel, lay, x, stats, weight, bias, running_mean, running_var, momentum, eps, y, save)
    elif lay.strided:
        at = strided_rows.address(x)
        driver = train_fused if lay.fused_forward else train_strided
        driver.pick(parallel)(at, x, weight, bias, running_mean, running_var, momentum, eps, y, save)
    else:
        rows_at, norm_at = (TRAIN_MINOR_STREAM_AT if streams(y) else TRAIN_MINOR_AT)(x)
        run = train_minor.pick(parallel)
        run(rows_at, norm_at, x, lay.inner, weight, bias, running_mean, running_var, momentum, eps, y, save)


def forward_eval(parallel, lay, x, weight, bias, mean, var, eps, y, save):
    """Eval forward of ``x`` (a view of ``lay``) into ``y``."""
    if streams(y):  # beyond the cache: apply's driver, with streaming stores
        coef = np.empty((2, lay.num_channels))
        eval_coefs(weight, bias, mean, var, eps, coef, save)
        apply(parallel, lay, x, coef, y)
    elif lay.strided:
        eval_strided.pick(parallel)(x, weight, bias, mean, var, eps, y, save)
    else:
        eval_minor.pick(parallel)(x, lay.inner, weight, bias, mean, var, eps, y, save)


def forward_with_stats(parallel, lay, x, stats, weight, bias, running_mean, running_var, momentum, eps, y, save):
    """Training forward with statistics ``stats`` (3, C) merged elsewhere (SyncBatchNorm's
    global batch): finalize and EMA update as :func:`forward_train`, then normalize."""
    coef = np.empty((2, lay.num_channels))
    finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    apply(parallel, lay, x, coef, y)


def apply(parallel, lay, x, coef, y):
    """``y = x * coef[0] + coef[1]`` per channel of ``x`` (a view of ``lay``)."""
    if lay.strided:
        (apply_strided_stream if streams(y) else apply_strided)(parallel, x, coef, y)
    else:
        leaf = affine_rows_stream if streams(y) else affine_rows
        apply_minor(parallel, leaf.address(x), x, lay.inner, coef, y)
