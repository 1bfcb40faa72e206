"""Backward pass: one reduction pass (``sum g``, ``sum g * (x - mean)``) and one elementwise
pass ``grad_input = g * A + x * B + D`` with per-channel float64 coefficients.

Bytes moved: the reduction reads ``g`` and ``x`` (2s per element), the elementwise pass reads
both again and writes ``grad_input`` (3s): 5s, the streaming floor of DESIGN.md section 5.
Sums run in float64, per task, merged in a fixed order: bitwise identical for any number of
threads.
"""

import numpy as np
from numba import prange

from .._config import MIN_INNER
from .._jit import stage, twin
from ._plan import expand, fuse_channels, plan, rows


@stage
def strided_grad_rows(g3, x3, c, m, r0, r1):
    """``(sum g, sum g * (x - m))`` of channel ``c`` over outer rows ``[r0, r1)``."""
    inner = x3.shape[2]
    sg = 0.0
    sgx = 0.0
    for o in range(r0, r1):
        gr = g3[o, c]
        xr = x3[o, c]
        for k in range(inner):
            g = np.float64(gr[k])
            sg += g
            sgx += g * (xr[k] - m)
    return sg, sgx


@stage
def grad_coef(c, sg, sgx, n, weight, mean, invstd, training, coef, grads):
    """Channel ``c``'s ``(grad_weight, grad_bias)`` into ``grads[:, c]`` and the coefficients
    of ``grad_input = g * A + x * B + D`` into ``coef[:, c]``:
    ``A = weight * invstd``, ``B = -A * invstd * grad_weight / n``,
    ``D = -A * grad_bias / n - B * mean`` (``B = D = 0`` in eval)."""
    grad_weight = sgx * invstd[c]
    grads[0, c] = grad_weight
    grads[1, c] = sg
    a = weight[c] * invstd[c]
    coef[0, c] = a
    coef[1, c] = 0.0
    coef[2, c] = 0.0
    if training:
        b = -a * invstd[c] * grad_weight / n
        coef[1, c] = b
        coef[2, c] = -a * sg / n - b * mean[c]


@stage
def apply_row(gr, xr, a, b, d, out):
    """``out = gr * a + xr * b + d`` along one contiguous row."""
    for k in range(xr.shape[0]):
        out[k] = gr[k] * a + xr[k] * b + d


@stage
def backward_fused(g3, x3, weight, mean, invstd, training, gi3, grads):
    """Channel-strided backward, one task per channel: reduce, then apply while the
    channel's ``g`` and ``x`` slices are still in L2 (2s from DRAM instead of 4s)."""
    outer, num_channels, inner = x3.shape
    n = float(outer * inner)
    coef = np.empty((3, num_channels))
    for c in prange(num_channels):
        sg, sgx = strided_grad_rows(g3, x3, c, mean[c], 0, outer)
        grad_coef(c, sg, sgx, n, weight, mean, invstd, training, coef, grads)
        for o in range(outer):
            apply_row(g3[o, c], x3[o, c], coef[0, c], coef[1, c], coef[2, c], gi3[o, c])


@stage
def grad_sums(g3, x3, mean, sums):
    """``sums[:, c] = (sum g, sum g * (x - mean[c]))`` over every element of channel ``c``."""
    outer, num_channels, inner = x3.shape
    strided, ct, ntiles, nsplit = plan(outer, num_channels, inner)
    part = np.zeros((2, nsplit, num_channels))
    if strided:
        for task in prange(nsplit * num_channels):
            split = task // num_channels
            c = task % num_channels
            r0, r1 = rows(split, nsplit, outer)
            sg, sgx = strided_grad_rows(g3, x3, c, mean[c], r0, r1)
            part[0, split, c] = sg
            part[1, split, c] = sgx
    else:
        width_all = num_channels * inner
        centre = expand(mean, inner)
        g2 = g3.reshape(outer, width_all)
        x2 = x3.reshape(outer, width_all)
        for task in prange(nsplit * ntiles):
            split = task // ntiles
            tile = task % ntiles
            r0, r1 = rows(split, nsplit, outer)
            c0 = tile * ct
            j0 = c0 * inner
            width = (min(num_channels, c0 + ct) - c0) * inner
            acc_g = np.zeros(width)
            acc_gx = np.zeros(width)
            ctr = centre[j0 : j0 + width]
            for o in range(r0, r1):
                gr = g2[o, j0 : j0 + width]
                xr = x2[o, j0 : j0 + width]
                for j in range(width):
                    g = np.float64(gr[j])
                    acc_g[j] += g
                    acc_gx[j] += g * (xr[j] - ctr[j])
            for c in range(width // inner):
                for i in range(inner):
                    part[0, split, c0 + c] += acc_g[c * inner + i]
                    part[1, split, c0 + c] += acc_gx[c * inner + i]
    for c in prange(num_channels):
        sg = 0.0
        sgx = 0.0
        for split in range(nsplit):
            sg += part[0, split, c]
            sgx += part[1, split, c]
        sums[0, c] = sg
        sums[1, c] = sgx


@stage
def apply_grad(g3, x3, coef, gi3):
    """``grad_input[o, c, i] = g * coef[0, c] + x * coef[1, c] + coef[2, c]``."""
    outer, num_channels, inner = x3.shape
    if inner >= MIN_INNER:
        for r in prange(outer * num_channels):
            o = r // num_channels
            c = r % num_channels
            apply_row(g3[o, c], x3[o, c], coef[0, c], coef[1, c], coef[2, c], gi3[o, c])
    else:
        width = num_channels * inner
        a = expand(coef[0], inner)
        b = expand(coef[1], inner)
        d = expand(coef[2], inner)
        g2 = g3.reshape(outer, width)
        x2 = x3.reshape(outer, width)
        gi2 = gi3.reshape(outer, width)
        for o in prange(outer):
            for j in range(width):
                gi2[o, j] = g2[o, j] * a[j] + x2[o, j] * b[j] + d[j]


@twin
def backward(g3, x3, weight, mean, invstd, training, gi3, grads):
    """Driver: ``grads`` (2, C) float64 receives ``(grad_weight, grad_bias)``, ``gi3`` the
    input gradient.  Training (batch statistics, ``n`` values per channel)::

        grad_input = weight * invstd * (g - grad_bias / n - xhat * grad_weight / n)

    eval (running statistics): ``grad_input = g * weight * invstd``.
    """
    outer, num_channels, inner = x3.shape
    if fuse_channels(outer, num_channels, inner, 2 * x3.itemsize):
        backward_fused(g3, x3, weight, mean, invstd, training, gi3, grads)
        return
    n = float(outer * inner)
    sums = np.empty((2, num_channels))
    grad_sums(g3, x3, mean, sums)
    coef = np.empty((3, num_channels))
    for c in range(num_channels):
        grad_coef(c, sums[0, c], sums[1, c], n, weight, mean, invstd, training, coef, grads)
    apply_grad(g3, x3, coef, gi3)
