"""Fused activation and residual add: ``y = act(x * a + b + z)`` in the normalize pass, and
the ReLU's gradient from the saved output.

``mode`` says what the elementwise pass adds to batch normalization: ``RELU``, ``RESIDUAL`` or
both (``RELU | RESIDUAL``).  Without a residual the kernels receive ``x`` in its place, never
read, so every mode runs the same compiled driver.  These drivers compile only for calls that
use an activation or a residual: the plain drivers of :mod:`numbabn.cpu.forward` stay as they
are.  Channel-strided outputs beyond the last-level cache are written with streaming
stores, as there (:mod:`._stream`), but for the fused training forward's; the channel-minor
pass keeps plain ones, where streaming ones gained in some runs and lost in others
(docs/performance_notes.rst).

Bytes moved (s = element size): the forward moves what the plain forward does, plus one read
of the residual when given (``s`` per element); the ReLU costs no memory traffic.  The
backward masks ``grad_output`` by ``y > 0`` in one pass (read ``g`` and ``y``, write the masked
gradient: 3s), which is the residual's gradient when the forward had one, then runs the plain
backward on it (5s).
"""

import numpy as np
from numba import prange

from .._jit import stage, twin
from ._half import put, value
from ._stream import (
    row_chunks,
    store_fence,
    stream_relu,
    stream_residual,
    stream_residual_relu,
    streams,
    vector_span,
)
from .forward import eval_coefs, finish_channels, fused_channel, minor_coefs
from .stats import minor_rows, stats_minor, stats_strided, strided_rows, welford

#: ``mode`` bits: a ReLU after the normalization, a residual added before the ReLU.
RELU = 1
RESIDUAL = 2

#: Elements per task of the flat elementwise passes (a multiple of every vector width).
_CHUNK = 1 << 14


@stage
def relu(v):
    """``max(v, 0)``; NaN stays NaN, as in ``torch.relu`` and ``numpy.maximum``."""
    return 0.0 if v < 0.0 else v


@stage
def act_row(xr, zr, a, b, mode, out):
    """``out = act(xr * a + b [+ zr])`` along one contiguous row, in float64, rounded on
    store: one loop per mode, so each vectorizes."""
    n = xr.shape[0]
    if mode == RELU:
        for k in range(n):
            put(out, k, relu(value(xr, k) * a + b))
    elif mode == RESIDUAL:
        for k in range(n):
            put(out, k, value(xr, k) * a + b + value(zr, k))
    else:
        for k in range(n):
            put(out, k, relu(value(xr, k) * a + b + value(zr, k)))


@stage
def act_strided(x3, z3, mode, coef, y3):
    """``y[o, c, i] = act(x[o, c, i] * coef[0, c] + coef[1, c] [+ z[o, c, i]])``."""
    outer, num_channels, inner = x3.shape
    for r in prange(outer * num_channels):
        o = r // num_channels
        c = r % num_channels
        act_row(x3[o, c], z3[o, c], coef[0, c], coef[1, c], mode, y3[o, c])


@stage
def act_minor(x2, z2, inner, mode, coef, y2):
    """The same on channel-minor views (outer // k, k * C * inner)."""
    width = x2.shape[1]
    a, b = minor_coefs(coef, inner, width)
    for o in prange(x2.shape[0]):
        xr, zr, yr = x2[o], z2[o], y2[o]
        if mode == RELU:
            for j in range(width):
                put(yr, j, relu(value(xr, j) * a[j] + b[j]))
        elif mode == RESIDUAL:
            for j in range(width):
                put(yr, j, value(xr, j) * a[j] + b[j] + value(zr, j))
        else:
            for j in range(width):
                put(yr, j, relu(value(xr, j) * a[j] + b[j] + value(zr, j)))


@stage
def act_put(xr, zr, a, b, mode, out, k):
    """``out[k]`` of :func:`act_row`, plain store."""
    v = value(xr, k) * a + b
    if mode == RELU:
        put(out, k, relu(v))
    elif mode == RESIDUAL:
        put(out, k, v + value(zr, k))
    else:
        put(out, k, relu(v + value(zr, k)))


@stage
def act_row_stream(xr, zr, a, b, mode, out):
    """:func:`act_row` along one row with streaming stores (outputs beyond the cache,
    :mod:`._stream`): plain stores before ``out``'s first 16-byte boundary and after its
    last."""
    step, head, end = vector_span(out)
    for k in range(head):
        act_put(xr, zr, a, b, mode, out, k)
    if mode == RELU:
        for j in range(head, end, step):
            stream_relu(xr, zr, a, b, out, j)
    elif mode == RESIDUAL:
        for j in range(head, end, step):
            stream_residual(xr, zr, a, b, out, j)
    else:
        for j in range(head, end, step):
            stream_residual_relu(xr, zr, a, b, out, j)
    for k in range(end, out.shape[0]):
        act_put(xr, zr, a, b, mode, out, k)


@twin
def train_act_fused(rows_at, x3, z3, mode, weight, bias, running_mean, running_var, momentum, eps, y3, save):
    """Driver, channel-strided training forward, one task per channel (as
    :func:`numbabn.cpu.forward.train_fused`): statistics, finalize, then the activated
    normalize of the channel's rows while they are still in L2."""
    outer, num_channels, inner = x3.shape
    coef = np.empty((2, num_channels))
    for cc in prange(num_channels):
        c = np.int64(cc)  # int64, as in the serial twin (see stats.partials_strided)
        fused_channel(rows_at, x3, c, weight, bias, running_mean, running_var, momentum, eps, coef, save)
        for o in range(outer):
            act_row(x3[o, c], z3[o, c], coef[0, c], coef[1, c], mode, y3[o, c])


@twin
def train_act_strided(rows_at, x3, z3, mode, weight, bias, running_mean, running_var, momentum, eps, y3, save):
    """Driver, channel-strided training forward (as :func:`numbabn.cpu.forward.train_strided`)
    with the activated normalize."""
    num_channels = x3.shape[1]
    stats = np.empty((3, num_channels))
    stats_strided(rows_at, x3, stats)
    coef = np.empty((2, num_channels))
    finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    act_strided(x3, z3, mode, coef, y3)


@twin
def train_act_minor(rows_at, x2, z2, inner, mode, weight, bias, running_mean, running_var, momentum, eps, y2, save):
    """Driver, the same on a channel-minor view (as :func:`numbabn.cpu.forward.train_minor`)."""
    num_channels = save.shape[1]
    stats = np.empty((3, num_channels))
    stats_minor(rows_at, x2, num_channels, inner, stats)
    coef = np.empty((2, num_channels))
    finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    act_minor(x2, z2, inner, mode, coef, y2)


@twin
def apply_act_strided(x3, z3, mode, coef, y3):
    """Driver: ``y = act(x * coef[0] + coef[1] [+ z])`` with coefficients made elsewhere."""
    act_strided(x3, z3, mode, coef, y3)


@twin
def apply_act_minor(x2, z2, inner, mode, coef, y2):
    """Driver, the same on channel-minor views."""
    act_minor(x2, z2, inner, mode, coef, y2)


@twin
def apply_act_strided_stream(x3, z3, mode, coef, y3):
    """Driver, :func:`apply_act_strided` with streaming stores: chunks of rows, one fence
    each."""
    outer, num_channels, inner = x3.shape
    step, count = row_chunks(outer * num_channels, inner)
    for t in prange(count):
        for r in range(np.int64(t) * step, min(outer * num_channels, (np.int64(t) + 1) * step)):
            o, c = r // num_channels, r % num_channels
            act_row_stream(x3[o, c], z3[o, c], coef[0, c], coef[1, c], mode, y3[o, c])
        store_fence()


@twin
def relu_grad_flat(g, y, out):
    """Driver: ``out = g where y > 0, else 0`` over flat arrays (NaN in ``y`` passes ``g``, as
    ``torch.relu``'s backward does), in chunks of ``_CHUNK`` elements."""
    n = g.shape[0]
    for t in prange((n + _CHUNK - 1) // _CHUNK):
        k0 = t * _CHUNK
        k1 = min(n, k0 + _CHUNK)
        # Loops over slices from 0: a range(k0, k1) loop ran at a quarter of the speed.
        gs, ys, os = g[k0:k1], y[k0:k1], out[k0:k1]
        for k in range(gs.shape[0]):
            put(os, k, 0.0 if value(ys, k) <= 0.0 else value(gs, k))


# -- the drivers of each stage, by layout ---------------------------------------------------

#: The stages the host backend runs; the GPU twins (``cuda/activation.py``) have the same names,
#: but ``apply``, which only Dask's tasks run.
DRIVERS = ("forward_train", "forward_eval", "forward_with_stats", "apply", "relu_grad")


def forward_train(parallel, lay, x, z, mode, weight, bias, running_mean, running_var, momentum, eps, y, save):
    """Training forward of ``x`` (a view of :class:`Layout` ``lay``) with the activation of
    ``mode`` (``z`` the residual's view, or ``x``), into ``y``: the layout's driver, as
    :func:`numbabn.cpu.forward.forward_train` picks it."""
    settings = (weight, bias, running_mean, running_var, momentum, eps, y, save)
    if lay.strided and not lay.fused_forward and streams(y):  # beyond the cache: by stages
        stats = np.empty((3, lay.num_channels))
        welford(parallel, lay, x, stats)
        forward_with_stats(parallel, lay, x, z, mode, stats, *settings)
    elif lay.strided:
        driver = train_act_fused if lay.fused_forward else train_act_strided
        driver(parallel, strided_rows.address(x), x, z, mode, *settings)
    else:
        train_act_minor(parallel, minor_rows.address(x), x, z, lay.inner, mode, *settings)


def forward_with_stats(
    parallel, lay, x, z, mode, stats, weight, bias, running_mean, running_var, momentum, eps, y, save
):
    """Training forward with statistics ``stats`` (3, C) made elsewhere (SyncBatchNorm's
    global batch, masked statistics): finalize and EMA update, then the activated normalize."""
    coef = np.empty((2, lay.num_channels))
    finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    apply(parallel, lay, x, z, mode, coef, y)


def forward_eval(parallel, lay, x, z, mode, weight, bias, mean, var, eps, y, save):
    """Eval forward with the given (running) ``mean`` and ``var``, activated."""
    coef = np.empty((2, lay.num_channels))
    eval_coefs(weight, bias, mean, var, eps, coef, save)
    apply(parallel, lay, x, z, mode, coef, y)


def apply(parallel, lay, x, z, mode, coef, y):
    """``y = act(x * coef[0] + coef[1] [+ z])`` per channel of ``x`` (a view of ``lay``)."""
    if lay.strided:
        (apply_act_strided_stream if streams(y) else apply_act_strided)(parallel, x, z, mode, coef, y)
    else:
        apply_act_minor(parallel, x, z, lay.inner, mode, coef, y)


def relu_grad(parallel, g, y, out):
    """``out = g where y > 0, else 0``; ``g``, ``y`` and ``out`` flat and contiguous."""
    relu_grad_flat(parallel, g, y, out)
