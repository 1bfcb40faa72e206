"""How a reduction over an ``(outer, C, inner)`` array is cut into tasks: shape only.

Two kernel families (DESIGN.md section 3):

- channel-strided (``inner >= MIN_INNER``, NCHW): a task is one channel over a range of
  outer rows; each row is contiguous.
- channel-minor (``inner < MIN_INNER``, NHWC, (N, C)): a task is a tile of ``ct`` whole
  channels over a range of outer rows; loops run along the contiguous ``(channel, inner)``
  row so they vectorize across channels.

A task writes its partial into slot ``[split, channel]``; partials are merged in split order.
Nothing here depends on the thread count, so neither do the results.
"""

from .._config import FUSE_BYTES, FUSE_CHANNELS, MAX_SPLITS, MIN_INNER, TASK_ELEMS, TILE
from .._jit import stage


@stage
def plan(outer, num_channels, inner):
    """Return ``(strided, ct, ntiles, nsplit)`` for a reduction over ``(outer, C, inner)``:
    channels per tile, tiles per row, and row ranges per channel."""
    strided = inner >= MIN_INNER
    if strided:
        ct = 1
    else:
        ct = max(1, TILE // max(inner, 1))
    ntiles = (num_channels + ct - 1) // ct
    per_tile = outer * min(ct, num_channels) * inner
    nsplit = min(max(1, (per_tile + TASK_ELEMS - 1) // TASK_ELEMS), MAX_SPLITS, max(outer, 1))
    return strided, ct, ntiles, nsplit


@stage
def fuse_channels(outer, num_channels, inner, itemsize):
    """Whether a channel-strided pass can take one whole channel per task and revisit its
    slice in L2: enough channels to keep every core busy, slices that fit in L2."""
    return inner >= MIN_INNER and num_channels >= FUSE_CHANNELS and outer * inner * itemsize <= FUSE_BYTES


@stage
def rows(split, nsplit, outer):
    """The half-open range of outer rows of row range ``split``."""
    return split * outer // nsplit, (split + 1) * outer // nsplit


@stage
def expand(values, inner):
    """Repeat each per-channel value ``inner`` times: the channel-minor kernels' row layout."""
    out = values.repeat(inner) if inner != 1 else values.copy()
    return out
