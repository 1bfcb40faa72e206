"""How a reduction over an ``(outer, C, inner)`` array is cut into tasks: shape only.

Two kernel families (the layouts of docs/design.rst):

- channel-strided (``inner >= MIN_INNER``, NCHW): a task is one channel over a range of
  outer rows; each row is contiguous.
- channel-minor (``inner < MIN_INNER``, NHWC, (N, C)): a task is a tile of ``ct`` whole
  channels over a range of outer rows; loops run along the contiguous ``(channel, inner)``
  row so they vectorize across channels.

A task writes its partial into slot ``[split, channel]``; partials are merged in split order.
Nothing here depends on the thread count, so neither do the results.
"""

import numpy as np

from .._config import (
    FUSE_BYTES,
    FUSE_CHANNELS,
    MAX_SPLITS,
    MIN_INNER,
    MINOR_MIN_TASKS,
    MINOR_ROWS,
    MINOR_TASK_ELEMS,
    TASK_ELEMS,
    TILE,
    WIDEN_TO,
)
from .._jit import leaf, stage


@leaf
def widen(outer, width):
    """Rows per super-row for channel-minor kernels: the largest ``k`` dividing ``outer`` with
    ``k * width <= WIDEN_TO`` that leaves at least ``MINOR_ROWS`` super-rows.  ``k``
    consecutive rows of ``width`` elements are one row of ``k * width`` (``k * C``
    pseudo-channels), so loops stay long when ``C * inner`` is small: NHWC with 64 channels
    normalized 1.4x slower than a copy in 64-element loops.  Small arrays keep ``k = 1``:
    their per-block work is O(width), and widening made (32, 64) statistics 2.5x slower."""
    k = max(1, min(outer // MINOR_ROWS, WIDEN_TO // max(width, 1)))
    while outer % k:
        k -= 1
    return k


@leaf
def plan(outer, num_channels, inner):
    """Return ``(strided, k, ct, ntiles, nsplit)`` for a reduction over ``(outer, C, inner)``:
    the super-row factor (channel-minor only, see :func:`widen`; the kernels then see
    ``(outer // k, k * C, inner)``), channels per tile, tiles per row, and row ranges per
    channel."""
    strided = inner >= MIN_INNER
    if strided:
        k = 1
        ct = 1
    else:
        k = widen(outer, num_channels * inner)
        outer //= k
        num_channels *= k
        ct = max(1, TILE // max(inner, 1))
    ntiles = (num_channels + ct - 1) // ct
    per_tile = outer * min(ct, num_channels) * inner
    nsplit = (per_tile + TASK_ELEMS - 1) // TASK_ELEMS
    if not strided:  # larger tasks, but up to MINOR_MIN_TASKS of TASK_ELEMS for the cores
        nsplit = max((per_tile + MINOR_TASK_ELEMS - 1) // MINOR_TASK_ELEMS, min(nsplit, MINOR_MIN_TASKS))
    nsplit = min(max(1, nsplit), MAX_SPLITS, max(outer, 1))
    return strided, k, ct, ntiles, nsplit


@leaf
def fuse_channels(outer, num_channels, inner, itemsize):
    """Whether a channel-strided pass can take one whole channel per task and revisit its
    slice in L2: enough channels to keep every core busy, slices that fit in L2."""
    return inner >= MIN_INNER and num_channels >= FUSE_CHANNELS and outer * inner * itemsize <= FUSE_BYTES


@stage
def rows(split, nsplit, outer):
    """The half-open range of outer rows of row range ``split``."""
    return split * outer // nsplit, (split + 1) * outer // nsplit


@stage
def minor_task(task, nsplit, ntiles, ct, outer, num_channels):
    """Channel-minor task ``task`` as ``(split, r0, r1, c0, nc)``: its row range
    ``[r0, r1)`` and its tile of ``nc`` channels from ``c0``."""
    split = task // ntiles
    c0 = (task % ntiles) * ct
    r0, r1 = rows(split, nsplit, outer)
    return split, r0, r1, c0, min(num_channels, c0 + ct) - c0


@leaf
def sum_inner(acc, inner, out):
    """``out[c] = sum(acc[c * inner : (c + 1) * inner])``."""
    if inner == 1:
        out[:] = acc
    else:
        for c in range(out.shape[0]):
            s = 0.0
            for i in range(inner):
                s += acc[c * inner + i]
            out[c] = s


@leaf
def repeat_inner(values, inner, out):
    """``out[c * inner + i] = values[c]`` (no integer division per element: it cost more
    than both sweeps of a block)."""
    if inner == 1:
        out[:] = values
    else:
        for c in range(values.shape[0]):
            for i in range(inner):
                out[c * inner + i] = values[c]


@leaf
def expand(values, inner, k):
    """Each per-channel value repeated ``inner`` times, the whole tiled ``k`` times: the
    channel-minor kernels' (super-)row layout."""
    width = values.shape[0] * inner
    out = np.empty(k * width)
    repeat_inner(values, inner, out[:width])
    for m in range(1, k):
        out[m * width : (m + 1) * width] = out[:width]
    return out
