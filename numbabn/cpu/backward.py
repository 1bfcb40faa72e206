"""Backward pass: one reduction pass (``sum g``, ``sum g * (x - mean)`` and ``sum |g|``, the
last for :attr:`numbabn.BatchNorm.update_threshold`) and one elementwise pass
``grad_input = g * A + x * B + D`` with per-channel float64 coefficients.

Bytes moved: the reduction reads ``g`` and ``x`` (2s per element), the elementwise pass reads
both again and writes ``grad_input`` (3s): 5s, the streaming floor (docs/design.rst).
When a channel's ``g`` and ``x`` slices fit in L2 (channel-strided layouts,
:func:`numbabn.cpu._plan.fuse_channels`) one task per channel reduces and then applies while
they are cached: 3s from DRAM.  Sums run in float64, per task, merged in a fixed order:
bitwise identical for any number of threads.

A driver that reduces blocks takes ``rows_at`` first: the address of its per-task leaf's
code (``strided_grad_rows``, or ``grad_partial`` on channel-minor views) for its input
arrays, which it calls through (:func:`numbabn._jit.by_address`); a channel-minor driver
that applies takes ``apply_at``, :func:`grad_rows`' address, too.

Beyond the last-level cache (:mod:`._stream`) the unfused channel-strided backward runs as
its stages, the reduction, the coefficients and an elementwise pass that writes
``grad_input`` with streaming stores.  The fused one reads ``g`` and ``x`` from L2, and the
channel-minor pass is bound by its three rows of coefficients, not by memory: both keep
plain stores (docs/performance_notes.rst).
"""

import numpy as np
from numba import prange, types

from .._config import ROW_CHUNK
from .._jit import OUTPUT, addresses, by_address, indirect, leaf, stage, twin
from .._math import grad_coef
from ._half import put, value
from ._plan import expand, minor_task, plan, rows, scratch_behind, sum_inner, super_rows
from ._stream import grad_row_stream, row_chunks, store_fence, streams


@by_address(2, types.int64, types.float64, types.int64, types.int64)
def strided_grad_rows(g3, x3, c, m, r0, r1):
    """``(sum g, sum g * (x - m), sum |g|)`` of channel ``c`` over outer rows ``[r0, r1)``."""
    inner = x3.shape[2]
    sg = 0.0
    sgx = 0.0
    sag = 0.0
    for o in range(r0, r1):
        gr = g3[o, c]
        xr = x3[o, c]
        for k in range(inner):
            g = np.float64(value(gr, k))
            sg += g
            sgx += g * (value(xr, k) - m)
            sag += abs(g)
    return sg, sgx, sag


@stage
def apply_row(gr, xr, a, b, d, out):
    """``out = gr * a + xr * b + d`` along one contiguous row; ``gr * a`` when ``b`` and ``d``
    are zero (eval), where ``grad_input`` does not depend on ``x``: a NaN in ``x`` must not
    reach it through ``NaN * 0``."""
    if b == 0.0 and d == 0.0:
        for k in range(xr.shape[0]):
            put(out, k, value(gr, k) * a)
    else:
        for k in range(xr.shape[0]):
            put(out, k, value(gr, k) * a + value(xr, k) * b + d)


@leaf
def grad_columns(g2, x2, o0, o1, j0, centre, acc_g, acc_gx, acc_ga):
    """``acc_g[j] += sum(g)``, ``acc_gx[j] += sum(g * (x - centre[j]))``,
    ``acc_ga[j] += sum(|g|)`` over rows
    ``[o0, o1)`` of columns ``j0 + j``, four rows per sweep of the accumulators (as
    ``stats.column_sums``)."""
    o = o0
    while o + 4 <= o1:
        g0, g1, g2_, g3 = g2[o, j0:], g2[o + 1, j0:], g2[o + 2, j0:], g2[o + 3, j0:]
        x0, x1, x2_, x3 = x2[o, j0:], x2[o + 1, j0:], x2[o + 2, j0:], x2[o + 3, j0:]
        for j in range(acc_g.shape[0]):
            m = centre[j]
            a0 = np.float64(value(g0, j))
            a1 = np.float64(value(g1, j))
            a2 = np.float64(value(g2_, j))
            a3 = np.float64(value(g3, j))
            acc_g[j] += (a0 + a1) + (a2 + a3)
            acc_gx[j] += (a0 * (value(x0, j) - m) + a1 * (value(x1, j) - m)) + (
                a2 * (value(x2_, j) - m) + a3 * (value(x3, j) - m)
            )
            acc_ga[j] += (abs(a0) + abs(a1)) + (abs(a2) + abs(a3))
        o += 4
    for r in range(o, o1):
        gr = g2[r, j0:]
        xr = x2[r, j0:]
        for j in range(acc_g.shape[0]):
            g = np.float64(value(gr, j))
            acc_g[j] += g
            acc_gx[j] += g * (value(xr, j) - centre[j])
            acc_ga[j] += abs(g)


@stage
def sums_strided(rows_at, g3, x3, mean, sums):
    """``sums[:, c] = (sum g, sum g * (x - mean[c]), sum |g|)`` over every element of
    channel ``c`` of the channel-strided ``g3`` and ``x3``."""
    outer, num_channels, inner = x3.shape
    nsplit = plan(outer, num_channels, inner)[2]
    part = np.empty((3, nsplit, num_channels))
    for t in prange(nsplit * num_channels):
        task = np.int64(t)  # int64, as in the serial twin (see stats.partials_strided)
        split = task // num_channels
        c = task % num_channels
        r0, r1 = rows(split, nsplit, outer)
        sg, sgx, sag = indirect(strided_grad_rows, rows_at, (g3, x3, c, mean[c], r0, r1))
        part[0, split, c] = sg
        part[1, split, c] = sgx
        part[2, split, c] = sag
    add_partials(part, np.int64(1), sums)  # not a literal: one compile for both callers


@by_address(2, *(types.int64,) * 2, types.float64[::1], *(types.int64,) * 4, types.float64[:, :, ::1])
def grad_partial(g2, x2, num_channels, inner, centre, nsplit, ct, ntiles, task, part):
    """Task ``task``, ``(split, tile)``, of :func:`sums_minor` (``num_channels`` counted in
    pseudo-channels, ``centre`` the mean along a super-row): ``ct`` whole channels over a
    row range (:func:`grad_columns`) into ``part[:, split]``."""
    split, r0, r1, c0, nc = minor_task(task, nsplit, ntiles, ct, x2.shape[0], num_channels)
    j0 = c0 * inner
    width = nc * inner
    # One allocation (small calls pay for each), its stores clear of the rows it sums.
    acc = scratch_behind(3 * width, g2, r0 if r1 > r0 else g2.shape[0], j0, 0, True)
    acc_g = acc[:width]
    acc_gx = acc[width : 2 * width]
    acc_ga = acc[2 * width :]
    grad_columns(g2, x2, r0, r1, j0, centre[j0 : j0 + width], acc_g, acc_gx, acc_ga)
    sum_inner(acc_g, inner, part[0, split, c0 : c0 + nc])
    sum_inner(acc_gx, inner, part[1, split, c0 : c0 + nc])
    sum_inner(acc_ga, inner, part[2, split, c0 : c0 + nc])


@stage
def sums_minor(rows_at, g2, x2, inner, mean, sums):
    """The same on channel-minor views ``g2`` and ``x2`` (outer // k, k * C * inner)."""
    num_channels = mean.shape[0]
    k = super_rows(x2.shape[1], num_channels, inner)
    rows_k, chans_k = x2.shape[0], k * num_channels
    ct, ntiles, nsplit = plan(rows_k, chans_k, inner)
    part = np.empty((3, nsplit, chans_k))
    centre = expand(mean, inner, k)
    for t in prange(nsplit * ntiles):
        task = np.int64(t)  # int64, as in the serial twin (see stats.partials_strided)
        indirect(grad_partial, rows_at, (g2, x2, chans_k, inner, centre, nsplit, ct, ntiles, task, part))
    add_partials(part, k, sums)


@leaf
def add_partials(part, k, sums):
    """``sums[:, c]`` = the partials ``part`` (3, nsplit, k * C) of channel ``c`` added split
    by split, the ``k`` pseudo-channels of a super-row in turn (an order fixed by the shape);
    channels innermost, so each step is one contiguous, vectorized row."""
    num_channels = sums.shape[1]
    for r in range(3):
        for c in range(num_channels):
            sums[r, c] = 0.0
        for split in range(part.shape[1]):
            for m in range(k):
                j0 = m * num_channels
                for c in range(num_channels):
                    sums[r, c] += part[r, split, j0 + c]


@stage
def apply_strided(g3, x3, coef, gi3):
    """``grad_input[o, c, i] = g * coef[0, c] + x * coef[1, c] + coef[2, c]``."""
    outer, num_channels, inner = x3.shape
    for r in prange(outer * num_channels):
        o = r // num_channels
        c = r % num_channels
        apply_row(g3[o, c], x3[o, c], coef[0, c], coef[1, c], coef[2, c], gi3[o, c])


@by_address(2, OUTPUT, *(types.int64,) * 2, *(types.float64[::1],) * 3, types.boolean)
def grad_rows(g2, x2, gi2, o0, o1, a, b, d, depends_on_x):
    """``gi2[o, j] = g2[o, j] * a[j] + x2[o, j] * b[j] + d[j]`` for rows ``[o0, o1)``, or
    ``g2[o, j] * a[j]`` where not ``depends_on_x`` (as :func:`apply_row`)."""
    width = x2.shape[1]
    for o in range(o0, o1):
        gr, xr, out = g2[o], x2[o], gi2[o]
        if depends_on_x:
            for j in range(width):
                put(out, j, value(gr, j) * a[j] + value(xr, j) * b[j] + d[j])
        else:
            for j in range(width):
                put(out, j, value(gr, j) * a[j])


@stage
def apply_minor(rows_at, g2, x2, inner, coef, gi2):
    """The same on channel-minor views (outer // k, k * C * inner)."""
    num_channels = coef.shape[1]
    outer, width = x2.shape
    k = super_rows(width, num_channels, inner)
    a = expand(coef[0], inner, k)
    b = expand(coef[1], inner, k)
    d = expand(coef[2], inner, k)
    depends_on_x = False  # False in eval (as in apply_row): x is then not read
    for c in range(num_channels):
        if coef[1, c] != 0.0 or coef[2, c] != 0.0:
            depends_on_x = True
    step = max(1, ROW_CHUNK // max(width, 1))
    for t in prange((outer + step - 1) // step):
        o0 = np.int64(t) * step
        indirect(grad_rows, rows_at, (g2, x2, gi2, o0, min(outer, o0 + step), a, b, d, depends_on_x))


@leaf
def grad_coefs(sums, n, weight, mean, invstd, training, coef, grads):
    """:func:`numbabn._math.grad_coef` of every channel from the reduction ``sums`` (3, C)
    over ``n`` values per channel: ``grads`` (3, C) and the ``coef`` (3, C) of the
    elementwise pass (the drivers' one coefficient loop)."""
    for c in range(sums.shape[1]):
        grad_coef(c, sums[0, c], sums[1, c], sums[2, c], n, weight, mean, invstd, training, coef, grads)


@twin
def backward_fused(rows_at, g3, x3, weight, mean, invstd, training, gi3, grads):
    """Driver, channel-strided backward, one task per channel: reduce, then apply while the
    channel's ``g`` and ``x`` slices are still in L2, so DRAM sees them once."""
    outer, num_channels, inner = x3.shape
    n = float(outer * inner)
    coef = np.empty((3, num_channels))
    for cc in prange(num_channels):
        c = np.int64(cc)  # int64, as in the serial twin (see stats.partials_strided)
        sg, sgx, sag = indirect(strided_grad_rows, rows_at, (g3, x3, c, mean[c], np.int64(0), outer))
        grad_coef(c, sg, sgx, sag, n, weight, mean, invstd, training, coef, grads)
        for o in range(outer):
            apply_row(g3[o, c], x3[o, c], coef[0, c], coef[1, c], coef[2, c], gi3[o, c])


@twin
def backward_strided(rows_at, g3, x3, weight, mean, invstd, training, gi3, grads):
    """Driver: ``grads`` (3, C) float64 receives ``(grad_weight, grad_bias, sum |g|)``,
    ``gi3`` the input gradient.  Training (batch statistics, ``n`` values per channel)::

        grad_input = weight * invstd * (g - grad_bias / n - xhat * grad_weight / n)

    eval (running statistics): ``grad_input = g * weight * invstd``.
    """
    outer, num_channels, inner = x3.shape
    sums = np.empty((3, num_channels))
    sums_strided(rows_at, g3, x3, mean, sums)
    coef = np.empty((3, num_channels))
    grad_coefs(sums, float(outer * inner), weight, mean, invstd, training, coef, grads)
    apply_strided(g3, x3, coef, gi3)


@twin
def backward_minor(rows_at, apply_at, g2, x2, inner, weight, mean, invstd, training, gi2, grads):
    """Driver, the same on channel-minor views (:class:`numbabn.cpu._plan.Layout`)."""
    num_channels = mean.shape[0]
    sums = np.empty((3, num_channels))
    sums_minor(rows_at, g2, x2, inner, mean, sums)
    coef = np.empty((3, num_channels))
    n = float(x2.shape[0] * x2.shape[1] // num_channels) if num_channels > 0 else 0.0
    grad_coefs(sums, n, weight, mean, invstd, training, coef, grads)
    apply_minor(apply_at, g2, x2, inner, coef, gi2)


@twin
def reduce_strided(rows_at, g3, x3, mean, sums):
    """Driver, the reduction pass alone: ``sums`` (3, C) float64 receives ``(sum g,
    sum g * (x - mean), sum |g|)`` per channel, to be summed with other parts' (Dask chunks,
    processes) before :func:`grad_coefs`."""
    sums_strided(rows_at, g3, x3, mean, sums)


@twin
def reduce_minor(rows_at, g2, x2, inner, mean, sums):
    """Driver, the same on channel-minor views."""
    sums_minor(rows_at, g2, x2, inner, mean, sums)


@twin
def grad_apply_strided(g3, x3, coef, gi3):
    """Driver, the elementwise pass alone: ``grad_input = g * coef[0] + x * coef[1] + coef[2]``."""
    apply_strided(g3, x3, coef, gi3)


@twin
def grad_apply_strided_stream(g3, x3, coef, gi3):
    """Driver, :func:`grad_apply_strided` with streaming stores (:mod:`._stream`): chunks
    of rows, one fence each."""
    outer, num_channels, inner = x3.shape
    step, count = row_chunks(outer * num_channels, inner)
    for t in prange(count):
        for r in range(np.int64(t) * step, min(outer * num_channels, (np.int64(t) + 1) * step)):
            o, c = r // num_channels, r % num_channels
            with_x = coef[1, c] != 0.0 or coef[2, c] != 0.0  # as apply_row
            grad_row_stream(g3[o, c], x3[o, c], coef[0, c], coef[1, c], coef[2, c], gi3[o, c], with_x)
        store_fence()


@twin
def grad_apply_minor(apply_at, g2, x2, inner, coef, gi2):
    """Driver, the same on channel-minor views."""
    apply_minor(apply_at, g2, x2, inner, coef, gi2)


# -- the drivers of each stage, by layout ---------------------------------------------------
# Each compiled driver holds one layout's kernels only, so a call compiles its own path.

#: The stages the host backend runs; the GPU twins (``cuda/backward.py``) have the same names.
DRIVERS = ("backward", "backward_with_sums", "grad_reduce", "grad_apply")


#: The leaves :func:`backward_minor` calls, by input.
BACKWARD_MINOR_AT = addresses(grad_partial, grad_rows)


def backward(parallel, lay, g, x, weight, mean, invstd, training, gi, grads):
    """Backward of ``g`` and ``x``, the kernels' views of :class:`Layout` ``lay``: ``gi``
    receives the input gradient, ``grads`` (3, C) ``(grad_weight, grad_bias, sum |g|)``."""
    if lay.strided and not lay.fused_backward and streams(gi):  # beyond the cache
        sums = np.empty((3, lay.num_channels))
        grad_reduce(parallel, lay, g, x, mean, sums)
        coef = np.empty((3, lay.num_channels))
        grad_coefs(sums, float(x.size // lay.num_channels), weight, mean, invstd, training, coef, grads)
        grad_apply(parallel, lay, g, x, coef, gi)
    elif lay.strided:
        driver = backward_fused if lay.fused_backward else backward_strided
        at = strided_grad_rows.address(g, x)
        driver.pick(parallel)(at, g, x, weight, mean, invstd, training, gi, grads)
    else:
        rows_at, apply_at = BACKWARD_MINOR_AT(g, x)
        backward_minor.pick(parallel)(rows_at, apply_at, g, x, lay.inner, weight, mean, invstd, training, gi, grads)


def backward_with_sums(parallel, lay, g, x, weight, mean, invstd, training, sums, n, gi, grads):
    """:func:`backward` with the reduction ``sums`` (3, C) over ``n`` values per channel made
    elsewhere (SyncBatchNorm's parts, added): coefficients, then the elementwise pass."""
    coef = np.empty((3, lay.num_channels))
    grad_coefs(sums, n, weight, mean, invstd, training, coef, grads)
    grad_apply(parallel, lay, g, x, coef, gi)


def grad_reduce(parallel, lay, g, x, mean, sums):
    """The reduction pass alone into ``sums`` (3, C) (:func:`reduce_strided`)."""
    if lay.strided:
        reduce_strided(parallel, strided_grad_rows.address(g, x), g, x, mean, sums)
    else:
        reduce_minor(parallel, grad_partial.address(g, x), g, x, lay.inner, mean, sums)


def grad_apply(parallel, lay, g, x, coef, gi):
    """The elementwise pass alone: ``gi = g * coef[0] + x * coef[1] + coef[2]``."""
    if lay.strided:
        (grad_apply_strided_stream if streams(gi) else grad_apply_strided)(parallel, g, x, coef, gi)
    else:
        grad_apply_minor(parallel, grad_rows.address(g, x), g, x, lay.inner, coef, gi)
