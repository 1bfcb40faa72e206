"""Math shared by every backend: Chan's merge, the EMA step, the scale/shift fold, and the
per-channel finalize and backward-coefficient steps built on them.

Plain ``@njit`` functions (numbabn's ``leaf`` and ``stage``), so CPU kernels call them and
``numba.cuda`` kernels compile them for the device.  Symbols follow docs/math.rst.
"""

import math

import numpy as np

from ._jit import leaf as _jit
from ._jit import stage


@_jit
def chan_merge(na, mean_a, m2_a, nb, mean_b, m2_b):
    """Merge two partial statistics ``(n, mean, M2)`` exactly (Chan et al.).

    ``n = na + nb``, ``d = mean_b - mean_a``, ``mean = mean_a + d * nb / n``,
    ``M2 = M2_a + M2_b + d**2 * na * nb / n``.  An empty side returns the other unchanged.
    """
    if nb == 0:
        return na, mean_a, m2_a
    if na == 0:
        return nb, mean_b, m2_b
    n = na + nb
    d = mean_b - mean_a
    mean = mean_a + d * (nb / n)
    m2 = m2_a + m2_b + d * d * (na * (nb / n))
    return n, mean, m2


@_jit
def chan_merge_channels(na, mean_a, m2_a, nb, mean_b, m2_b):
    """:func:`chan_merge` of many channels that share the counts ``na`` and ``nb``: updates
    ``mean_a`` and ``m2_a`` in place (same formula and rounding, as one vectorizable loop)
    and returns ``na + nb``."""
    if nb == 0:
        return na
    if na == 0:
        for c in range(mean_a.shape[0]):
            mean_a[c] = mean_b[c]
            m2_a[c] = m2_b[c]
        return nb
    n = na + nb
    f = nb / n
    g = na * f
    for c in range(mean_a.shape[0]):
        d = mean_b[c] - mean_a[c]
        mean_a[c] = mean_a[c] + d * f
        m2_a[c] = m2_a[c] + m2_b[c] + d * d * g
    return n


@stage
def ema(running, value, momentum):
    """One exponential-moving-average step: ``(1 - momentum) * running + momentum * value``."""
    return (1.0 - momentum) * running + momentum * value


@stage
def unbiased(m2, n):
    """The unbiased variance ``M2 / (n - 1)`` that feeds ``running_var`` (NaN when n < 2)."""
    if n < 2:
        return math.nan
    return m2 / (n - 1)


@stage
def invstd_of(var, eps):
    """``1 / sqrt(var + eps)``."""
    return 1.0 / math.sqrt(var + eps)


@stage
def fold(mean, invstd, weight, bias):
    """Fold normalization and affine into ``y = x * a + b``: ``a = weight * invstd``,
    ``b = bias - mean * a`` (float64: the elementwise passes compute in float64, see
    ``cpu/forward.py``)."""
    a = weight * invstd
    return a, bias - mean * a


# -- per-channel steps between a reduction and an elementwise pass ------------------------------
# Inlined into the CPU drivers and compiled into the CUDA kernels, so both backends finish
# every channel with the same arithmetic.


@stage
def renorm(mean, invstd, running_mean, running_var, eps, rmax, dmax):
    """Batch Renormalization's ``(r, d)`` of a channel (docs/math.rst) from its batch
    ``mean`` and ``invstd`` and its running statistics before their update: ``s_B / s`` is
    ``invstd_of(running_var) / invstd``."""
    inv_s = invstd_of(running_var, eps)
    r = min(max(inv_s / invstd, 1.0 / rmax), rmax)
    d = min(max((mean - running_mean) * inv_s, -dmax), dmax)
    return r, d


@stage
def channel_invstd(n, m2, eps):
    """``invstd`` of statistics ``(n, M2)``: ``1 / sqrt(M2 / n + eps)``, the biased variance's."""
    return invstd_of(m2 / n, eps)


@stage
def finish_channel(c, n, mean, m2, invstd, weight, bias, running_mean, running_var, momentum, eps, coef, save):
    """Channel ``c``'s statistics ``(n, mean, M2)`` to its fold coefficients ``coef[:, c]``,
    saved ``(mean, invstd)`` and, when running buffers are given (non-empty), their EMA
    update: the biased variance normalizes, the unbiased one feeds ``running_var``.  More
    rows of ``save`` ask for ``M2`` and Batch Renormalization's ``(r, d)``
    (:func:`save_rows`).  ``invstd`` is :func:`channel_invstd` of the statistics, which the
    caller computes: the CPU's for every channel in a loop of its own, which vectorizes.

    The running buffers are read and written in one branch: a CPU loop over channels that
    inlines this step counted references to them in each of its iterations when they
    appeared in two (Batch Renormalization's ``r`` and ``d``, then the update).  Per-channel
    values are widened to float64 first, so float16 ones (GPU layers) compute as the others
    do and the simulator's host calls of these stages never see a float16."""
    w = np.float64(weight[c])
    b = np.float64(bias[c])
    rows = save.shape[0]
    if running_mean.shape[0] > 0:
        rm = np.float64(running_mean[c])
        rv = np.float64(running_var[c])
        if rows >= 4:
            # Batch Renormalization (which has running buffers): the last two rows bring
            # (rmax, dmax) and take (r, d), from the running statistics before the update.
            r, d = renorm(mean, invstd, rm, rv, eps, save[rows - 2, c], save[rows - 1, c])
            save[rows - 2, c] = r
            save[rows - 1, c] = d
            b = b + w * d
            w = w * r
        running_mean[c] = ema(rm, mean, momentum)
        running_var[c] = ema(rv, unbiased(m2, n), momentum)
    if rows % 2 == 1:
        save[2, c] = m2  # asked for by ghost batches, which merge their statistics
    coef[0, c], coef[1, c] = fold(mean, invstd, w, b)
    save[0, c] = mean
    save[1, c] = invstd


@stage
def grad_coef(c, sg, sgx, sag, n, weight, mean, invstd, training, coef, grads):
    """Channel ``c``'s ``(grad_weight, grad_bias, sum |g|)`` into ``grads[:, c]`` and the
    coefficients of ``grad_input = g * A + x * B + D`` into ``coef[:, c]``:
    ``A = weight * invstd``, ``B = -A * invstd * grad_weight / n``,
    ``D = -A * grad_bias / n - B * mean`` (``B = D = 0`` in eval).  Returns ``(grad_weight,
    grad_bias)``, for callers that store them again without reading ``grads`` back."""
    grad_weight = sgx * invstd[c]
    grads[0, c] = grad_weight
    grads[1, c] = sg
    grads[2, c] = sag
    a = np.float64(weight[c]) * invstd[c]
    coef[0, c] = a
    coef[1, c] = 0.0
    coef[2, c] = 0.0
    if training:
        b = -a * invstd[c] * grad_weight / n
        coef[1, c] = b
        coef[2, c] = -a * sg / n - b * mean[c]
    return grad_weight, sg


def save_rows(limits, num_channels, m2=False):
    """The float64 ``save`` array a training kernel fills (:func:`finish_channel`): rows
    ``mean`` and ``invstd``; then ``M2`` when ``m2``; then, with Batch Renormalization's
    ``limits`` ``(rmax, dmax)``, two rows holding ``rmax`` and ``dmax``, which the kernel
    replaces by ``r`` and ``d`` (:func:`renorm`).  So 2, 3, 4 or 5 rows."""
    rows = 2 + bool(m2) + (0 if limits is None else 2)
    save = np.empty((rows, num_channels))
    if limits is not None:
        save[rows - 2] = limits[0]
        save[rows - 1] = limits[1]
    return save
