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

from typing import NamedTuple

import numpy as np

from .._config import (
    FUSE_BYTES,
    FUSE_CHANNELS,
    MAX_SPLITS,
    MIN_INNER,
    MINOR_MIN_TASKS,
    MINOR_ROWS,
    MINOR_TASK_ELEMS,
    SKEW_SLACK,
    TASK_ELEMS,
    TILE,
    TRAIL,
    WIDEN_TO,
)
from .._jit import leaf, stage
from .._memo import bounded_put


class Layout(NamedTuple):
    """How the kernels see an ``(outer, C, inner)`` array, from its shape and item size alone
    (see :func:`layout`): which kernel family, and the view its kernels take."""

    #: Channel-strided kernels (``inner >= MIN_INNER``); else channel-minor.
    strided: bool
    #: The kernels' view: ``(outer, C, inner)`` (strided) or ``(outer // k, k * C * inner)``,
    #: super-rows of ``k`` rows (channel-minor, see :func:`widen`).
    view: tuple
    num_channels: int
    inner: int
    #: Channel-strided passes that take one whole channel per task (:func:`fuse_channels`):
    #: the forward's, whose slice is ``x``, and the backward's, ``g`` and ``x``.
    fused_forward: bool
    fused_backward: bool


def layout(shape3, itemsize):
    """The :class:`Layout` of an ``(outer, C, inner)`` array of ``itemsize``-byte elements,
    worked out once per shape (a dict lookup: small calls spend their time in Python)."""
    key = (shape3, itemsize)
    lay = _LAYOUTS.get(key)
    if lay is None:
        outer, num_channels, inner = shape3
        if inner >= MIN_INNER:
            view = shape3
        else:
            k = widen(outer, num_channels * inner)
            view = (outer // k, k * num_channels * inner)
        lay = Layout(
            inner >= MIN_INNER,
            view,
            num_channels,
            inner,
            fuse_channels(outer, num_channels, inner, itemsize),
            fuse_channels(outer, num_channels, inner, 2 * itemsize),
        )
        bounded_put(_LAYOUTS, key, lay)
    return lay


_LAYOUTS = {}


def widen(outer, width):
    """Rows per super-row for channel-minor kernels: the largest ``k`` dividing ``outer`` with
    ``k * width <= WIDEN_TO`` that leaves at least ``MINOR_ROWS`` super-rows.  ``k``
    consecutive rows of ``width`` elements are one row of ``k * width`` (``k * C``
    pseudo-channels), so loops stay long when ``C * inner`` is small (short loops ran well
    below copy speed).  Small arrays keep ``k = 1``: their per-block work is O(width), which
    widening multiplies."""
    k = max(1, min(outer // MINOR_ROWS, WIDEN_TO // max(width, 1)))
    while outer % k:
        k -= 1
    return k


def fuse_channels(outer, num_channels, inner, itemsize):
    """Whether a channel-strided pass can take one whole channel per task and revisit its
    slice in L2: enough channels to keep every core busy, slices that fit in L2."""
    return inner >= MIN_INNER and num_channels >= FUSE_CHANNELS and outer * inner * itemsize <= FUSE_BYTES


@leaf
def plan(outer, num_channels, inner):
    """Return ``(ct, ntiles, nsplit)`` for a reduction over the kernels' view of a layout
    (:class:`Layout`), ``(outer, C, inner)`` with ``outer`` and ``C`` counted in super-rows
    and pseudo-channels for the channel-minor kernels: channels per tile (1 for the
    channel-strided kernels), tiles per row, and row ranges per channel."""
    strided = inner >= MIN_INNER
    ct = 1 if strided else max(1, TILE // max(inner, 1))
    ntiles = (num_channels + ct - 1) // ct
    per_tile = outer * min(ct, num_channels) * inner
    nsplit = (per_tile + TASK_ELEMS - 1) // TASK_ELEMS
    if not strided:  # larger tasks, but up to MINOR_MIN_TASKS of TASK_ELEMS for the cores
        nsplit = max((per_tile + MINOR_TASK_ELEMS - 1) // MINOR_TASK_ELEMS, min(nsplit, MINOR_MIN_TASKS))
    nsplit = min(max(1, nsplit), MAX_SPLITS, max(outer, 1))
    return ct, ntiles, nsplit


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
        for c in range(out.shape[0]):
            out[c] = acc[c]
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
        for c in range(values.shape[0]):
            out[c] = values[c]
    else:
        for c in range(values.shape[0]):
            for i in range(inner):
                out[c * inner + i] = values[c]


@stage
def super_rows(width, num_channels, inner):
    """``k``, the rows per super-row of a channel-minor view whose rows hold ``width`` values
    of ``num_channels`` channels of ``inner`` values (1 for rows of no values)."""
    return width // (num_channels * inner) if num_channels * inner > 0 else 1


@leaf
def expand(values, inner, k):
    """Each per-channel value repeated ``inner`` times, the whole tiled ``k`` times: the
    channel-minor kernels' (super-)row layout (``values`` itself when that is the same)."""
    if k * inner == 1:  # (N, C): the values are the row already
        return values
    width = values.shape[0] * inner
    out = np.empty(k * width)
    repeat_inner(values, inner, out[:width])
    for j in range(width, k * width):
        out[j] = out[j - width]
    return out


@stage
def scratch_behind(size, a, r, j0, hot, zero):
    """A new float64 scratch array of ``size`` elements (zeroed when ``zero``) placed so that
    byte ``hot`` of it trails ``a[r, j0]``, the rows a sweep loads while it stores there, by
    ``TRAIL`` bytes modulo 4 KiB: a store that matched the low 12 address bits of a load still
    to come would stall that load (4K aliasing), which happened or not by where the allocator
    put the scratch.  ``r`` past ``a``'s rows (no rows to sweep) places it anywhere."""
    work = np.zeros(size + SKEW_SLACK) if zero else np.empty(size + SKEW_SLACK)
    at = a[r, j0:].ctypes.data if r < a.shape[0] else a.ctypes.data
    skew = (4096 - TRAIL + at - work.ctypes.data - hot) % 4096
    return work[(skew // 64) * 8 : (skew // 64) * 8 + size]
