"""Masked statistics: per-channel ``(count, mean, M2)`` over the positions a boolean mask
keeps, read alongside the input in the same pass, and the masked elementwise backward.

The mask has the input's shape with 1 on the feature axis (the same for every channel); the
kernels see it as ``(outer, inner)`` beside the channel-strided view ``(outer, C, inner)``,
or as ``(outer // k, k * inner)`` beside the channel-minor super-row view ``(outer // k,
k * C * inner)`` (:class:`numbabn.cpu._plan.Layout`).  Statistics are blocked Welford as in
:mod:`numbabn.cpu.stats`: each block's kept values get their exact mean from a first sweep
and their centred ``M2`` from a second sweep while the block is in cache, then Chan's merge;
a value the mask drops is never read into a sum (a NaN there changes nothing).  Every
channel of a split has the same count, as the mask is the same for every channel, so the
partials merge as the unmasked ones do (:func:`numbabn.cpu.stats.merge_partials`).
"""

import numpy as np
from numba import prange

from .._config import BLOCK
from .._jit import leaf, stage, twin
from .._math import chan_merge, chan_merge_channels, channel_invstd, finish_channel
from . import backward as _bwd
from . import forward as _fwd
from ._half import put, value
from ._plan import expand, plan, rows, super_rows
from .forward import affine_row
from .stats import merge_partials


@leaf
def masked_strided_rows(x3, mk, c, r0, r1):
    """``(n, mean, M2)`` of channel ``c`` over outer rows ``[r0, r1)``, counting the values
    where ``mk`` (outer, inner) is True; rows are cut into blocks of ``BLOCK`` values."""
    inner = x3.shape[2]
    n, mean, m2 = 0.0, 0.0, 0.0
    for o in range(r0, r1):
        for k0 in range(0, inner, BLOCK):
            xb = x3[o, c, k0 : min(inner, k0 + BLOCK)]
            mb = mk[o, k0 : min(inner, k0 + BLOCK)]
            s = 0.0
            cnt = 0.0
            for k in range(xb.shape[0]):
                if mb[k]:
                    s += value(xb, k)
                    cnt += 1.0
            if cnt == 0.0:
                continue
            bm = s / cnt
            q = 0.0
            for k in range(xb.shape[0]):
                d = value(xb, k) - bm if mb[k] else 0.0
                q += d * d
            n, mean, m2 = chan_merge(n, mean, m2, cnt, bm, q)
    return n, mean, m2


@leaf
def masked_minor_rows(x2, mk, r0, r1, num_channels, inner, out_n, out_mean, out_m2):
    """``(count, mean, M2)`` of every pseudo-channel (``k * C`` of them, ``k`` super-rows)
    of the channel-minor view ``x2`` over rows ``[r0, r1)``, counting the values where
    ``mk`` (rows, k * inner) is True, into ``out_*`` (length ``k * C``): blocks of rows about
    ``BLOCK`` values large, two sweeps each."""
    width = x2.shape[1]
    k = mk.shape[1] // max(inner, 1)
    pseudo = k * num_channels
    rb = max(1, BLOCK // max(width, 1))
    work = np.empty(2 * pseudo + k)
    s = work[:pseudo]
    bm = work[pseudo : 2 * pseudo]
    cnt = work[2 * pseudo :]
    n = np.zeros(k)
    out_mean[:] = 0.0
    out_m2[:] = 0.0
    for b0 in range(r0, r1, rb):
        b1 = min(r1, b0 + rb)
        s[:] = 0.0
        cnt[:] = 0.0
        # Channels innermost: one mask value per (row, super-row, inner position), then a
        # loop over channels (contiguous when inner == 1, so it vectorizes).
        for o in range(b0, b1):
            xr = x2[o]
            for g in range(k):
                base = g * num_channels
                for i in range(inner):
                    if mk[o, g * inner + i]:
                        cnt[g] += 1.0
                        for c in range(num_channels):
                            s[base + c] += value(xr, (base + c) * inner + i)
        for p in range(pseudo):
            c_g = cnt[p // num_channels]
            bm[p] = s[p] / c_g if c_g > 0.0 else 0.0
            s[p] = 0.0  # now the centred squares
        for o in range(b0, b1):
            xr = x2[o]
            for g in range(k):
                base = g * num_channels
                for i in range(inner):
                    if mk[o, g * inner + i]:
                        for c in range(num_channels):
                            d = value(xr, (base + c) * inner + i) - bm[base + c]
                            s[base + c] += d * d
        for g in range(k):
            j0 = g * num_channels
            n[g] = chan_merge_channels(
                n[g],
                out_mean[j0 : j0 + num_channels],
                out_m2[j0 : j0 + num_channels],
                cnt[g],
                bm[j0 : j0 + num_channels],
                s[j0 : j0 + num_channels],
            )
    for p in range(pseudo):
        out_n[p] = n[p // num_channels]


@stage
def masked_stats_strided(x3, mk, stats):
    """``stats[:, c] = (count, mean, M2)`` of the kept values of channel ``c``."""
    outer, num_channels, inner = x3.shape
    nsplit = plan(outer, num_channels, inner)[2]
    part = np.empty((3, nsplit, num_channels))
    for t in prange(nsplit * num_channels):
        task = np.int64(t)  # int64, as in the serial twin (see stats.partials_strided)
        split = task // num_channels
        c = task % num_channels
        r0, r1 = rows(split, nsplit, outer)
        n, mean, m2 = masked_strided_rows(x3, mk, c, r0, r1)
        part[0, split, c] = n
        part[1, split, c] = mean
        part[2, split, c] = m2
    merge_partials(part, np.int64(1), stats)


@stage
def masked_stats_minor(x2, mk, inner, stats):
    """The same on the channel-minor view: one task per row range, every pseudo-channel."""
    num_channels = stats.shape[1]
    k = super_rows(x2.shape[1], num_channels, inner)
    nsplit = plan(x2.shape[0], k * num_channels, inner)[2]
    part = np.empty((3, nsplit, k * num_channels))
    for t in prange(nsplit):
        split = np.int64(t)
        r0, r1 = rows(split, nsplit, x2.shape[0])
        masked_minor_rows(x2, mk, r0, r1, num_channels, inner, part[0, split], part[1, split], part[2, split])
    merge_partials(part, k, stats)


@twin
def welford_masked_strided(x3, mk, stats):
    """Driver: masked per-channel ``(count, mean, M2)`` of the channel-strided ``x3``."""
    masked_stats_strided(x3, mk, stats)


@twin
def welford_masked_minor(x2, mk, inner, stats):
    """Driver: the same on the channel-minor view ``x2``."""
    masked_stats_minor(x2, mk, inner, stats)


@twin
def train_masked_fused(x3, mk, weight, bias, running_mean, running_var, momentum, eps, y3, save):
    """Driver, channel-strided masked training forward, one task per channel: masked
    statistics, finalize, then normalize every value of the channel while its rows are in
    L2, so DRAM sees ``x`` once (as ``forward.train_fused``)."""
    outer, num_channels, inner = x3.shape
    coef = np.empty((2, num_channels))
    for cc in prange(num_channels):
        c = np.int64(cc)
        n, mean, m2 = masked_strided_rows(x3, mk, c, np.int64(0), outer)
        invstd = channel_invstd(n, m2, eps)
        finish_channel(c, n, mean, m2, invstd, weight, bias, running_mean, running_var, momentum, eps, coef, save)
        for o in range(outer):
            affine_row(x3[o, c], coef[0, c], coef[1, c], y3[o, c])


@twin
def grad_apply_masked_strided(g3, x3, mk, coef, gi3):
    """Driver: ``grad_input = g * coef[0] + (x * coef[1] + coef[2] where kept, else 0)``:
    a dropped value reaches the statistics of no one, so only the normalization's own
    gradient flows back to it."""
    outer, num_channels, inner = x3.shape
    for r in prange(outer * num_channels):
        o = r // num_channels
        c = r % num_channels
        a = coef[0, c]
        b = coef[1, c]
        d = coef[2, c]
        gr = g3[o, c]
        xr = x3[o, c]
        mr = mk[o]
        out = gi3[o, c]
        for i in range(inner):
            put(out, i, value(gr, i) * a + ((value(xr, i) * b + d) if mr[i] else 0.0))


@twin
def grad_apply_masked_minor(g2, x2, mk, inner, coef, gi2):
    """Driver, the same on channel-minor views (the mask ``(rows, k * inner)``)."""
    num_channels = coef.shape[1]
    width = x2.shape[1]
    k = super_rows(width, num_channels, inner)
    a = expand(coef[0], inner, k)
    b = expand(coef[1], inner, k)
    d = expand(coef[2], inner, k)
    for o in prange(x2.shape[0]):
        gr, xr, out = g2[o], x2[o], gi2[o]
        for g in range(k):
            base = g * num_channels
            for i in range(inner):
                if mk[o, g * inner + i]:
                    for c in range(num_channels):
                        j = (base + c) * inner + i
                        put(out, j, value(gr, j) * a[j] + value(xr, j) * b[j] + d[j])
                else:
                    for c in range(num_channels):
                        j = (base + c) * inner + i
                        put(out, j, value(gr, j) * a[j])


#: The stages the host backend runs for masked calls (their GPU twins: ``cuda/masked.py``).
DRIVERS = ("welford_masked", "forward_train_masked", "grad_apply_masked", "backward_masked")


def welford_masked(parallel, lay, x, mk, stats):
    """Masked per-channel ``(count, mean, M2)`` of ``x`` (the kernels' view of ``lay``) into
    ``stats`` (3, C) float64; ``mk`` the mask's view beside it."""
    if lay.strided:
        welford_masked_strided(parallel, x, mk, stats)
    else:
        welford_masked_minor(parallel, x, mk, lay.inner, stats)


def forward_train_masked(parallel, lay, x, mk, weight, bias, running_mean, running_var, momentum, eps, y, save):
    """Masked training forward of ``x`` into ``y``: one pass per channel where the channel
    fits in L2 (:func:`train_masked_fused`), else the masked statistics, then the finalize
    and normalize of :func:`numbabn.cpu.forward.forward_with_stats`."""
    if lay.fused_forward:
        train_masked_fused(parallel, x, mk, weight, bias, running_mean, running_var, momentum, eps, y, save)
        return
    stats = np.empty((3, lay.num_channels))
    welford_masked(parallel, lay, x, mk, stats)
    _fwd.forward_with_stats(parallel, lay, x, stats, weight, bias, running_mean, running_var, momentum, eps, y, save)


def grad_apply_masked(parallel, lay, g, x, mk, coef, gi):
    """The masked elementwise backward (see :func:`grad_apply_masked_strided`)."""
    if lay.strided:
        grad_apply_masked_strided(parallel, g, x, mk, coef, gi)
    else:
        grad_apply_masked_minor(parallel, g, x, mk, lay.inner, coef, gi)


def backward_masked(parallel, lay, g, x, mk, weight, mean, invstd, sums, n, gi, grads):
    """The backward of a masked training forward from ``sums`` (3, C) float64, the
    reduction over every value (:func:`numbabn.cpu.backward.grad_reduce`, added over the
    parts of a global batch), and ``n`` the kept count: ``grads`` (3, C) receives
    ``(grad_weight, grad_bias, sum |g|)``, ``gi`` the input gradient
    (:func:`grad_apply_masked`)."""
    coef = np.empty((3, sums.shape[1]))
    _bwd.grad_coefs(sums, n, weight, mean, invstd, True, coef, grads)
    grad_apply_masked(parallel, lay, g, x, mk, coef, gi)
