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
from ._plan import expand, plan, rows


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
            m = mean[c]
            sg = 0.0
            sgx = 0.0
            for o in range(r0, r1):
                gr = g3[o, c]
                xr = x3[o, c]
                for k in range(inner):
                    g = float(gr[k])
                    sg += g
                    sgx += g * (xr[k] - m)
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
                    g = float(gr[j])
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
            a = coef[0, c]
            b = coef[1, c]
            d = coef[2, c]
            gr = g3[o, c]
            xr = x3[o, c]
            out = gi3[o, c]
            for k in range(inner):
                out[k] = gr[k] * a + xr[k] * b + d
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
    n = float(outer * inner)
    sums = np.empty((2, num_channels))
    grad_sums(g3, x3, mean, sums)
    coef = np.zeros((3, num_channels))
    for c in range(num_channels):
        grad_bias = sums[0, c]
        grad_weight = sums[1, c] * invstd[c]
        grads[0, c] = grad_weight
        grads[1, c] = grad_bias
        a = weight[c] * invstd[c]
        coef[0, c] = a
        if training:
            b = -a * invstd[c] * grad_weight / n
            coef[1, c] = b
            coef[2, c] = -a * grad_bias / n - b * mean[c]
    apply_grad(g3, x3, coef, gi3)
