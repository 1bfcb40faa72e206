"""Scalar math shared by every backend: Chan's merge, the EMA step, the scale/shift fold.

Plain ``@njit`` functions (numbabn's ``leaf``), so CPU kernels call them and ``numba.cuda``
kernels can call them too.  Symbols follow DESIGN.md section 2.
"""

import math

from ._jit import leaf as _jit


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
        mean_a[:] = mean_b
        m2_a[:] = m2_b
        return nb
    n = na + nb
    f = nb / n
    g = na * f
    for c in range(mean_a.shape[0]):
        d = mean_b[c] - mean_a[c]
        mean_a[c] = mean_a[c] + d * f
        m2_a[c] = m2_a[c] + m2_b[c] + d * d * g
    return n


@_jit
def ema(running, value, momentum):
    """One exponential-moving-average step: ``(1 - momentum) * running + momentum * value``."""
    return (1.0 - momentum) * running + momentum * value


@_jit
def unbiased(m2, n):
    """The unbiased variance ``M2 / (n - 1)`` that feeds ``running_var`` (NaN when n < 2)."""
    if n < 2:
        return math.nan
    return m2 / (n - 1)


@_jit
def invstd_of(var, eps):
    """``1 / sqrt(var + eps)``."""
    return 1.0 / math.sqrt(var + eps)


@_jit
def fold(mean, invstd, weight, bias):
    """Fold normalization and affine into ``y = x * a + b``: ``a = weight * invstd``,
    ``b = bias - mean * a``."""
    a = weight * invstd
    return a, bias - mean * a
