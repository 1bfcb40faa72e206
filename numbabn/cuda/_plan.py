"""Launch geometry of the CUDA kernels, from the shape alone (twin of ``cpu/_plan.py``).

Two families, as on the CPU.  Channel-strided (rows of ``inner >= CUDA_MIN_INNER``): a block
reduces one channel over a range of outer rows, its threads laid along the row.
Channel-minor (short rows: NHWC, ``(N, C)``): the array is ``(outer, W)`` with ``W = C *
inner`` columns, a block reduces ``bx`` neighbouring columns over a range of rows, so a warp
reads consecutive values.  Each channel's (column's) reduction is split over ``nsplit``
blocks, whose partials a second kernel merges in a fixed order: deterministic, and small
``C`` still fills the GPU.
"""

import functools
import math
from typing import NamedTuple

from .. import _config
from . import _arrays

#: Size of the shared-memory reduction buffers: the most threads a block may have.
MAX_THREADS = 256

#: Rows a thread loads before it merges them (independent loads in flight per thread).  4 is
#: the value checked on hardware; it leaves the statistics short of loads in flight on large
#: NCHW arrays (docs/performance_notes.rst).
CHUNK = 4

#: Rows a thread of the strided elementwise kernels takes (at least, when the grid allows).
ELEMENTWISE_ROWS = 8

#: CUDA's limit on ``gridDim.y``.
MAX_GRID_Y = 65535


class Plan(NamedTuple):
    strided: bool
    bx: int  # threads along a row (strided) or across columns (minor)
    by: int  # threads across rows
    width: int  # reduced columns: C (strided) or C * inner (minor)
    q: int  # columns per channel: 1 (strided) or inner (minor)
    rows_per_split: int
    nsplit: int
    grid: tuple


def _pow2_at_least(n):
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def plan(outer, num_channels, inner):
    """The reduction geometry of an ``(outer, C, inner)`` array (made once per shape and
    tunables: a call's plan is a dictionary lookup)."""
    return _plan(outer, num_channels, inner, _config.CUDA_THREADS, _config.CUDA_MIN_INNER, _config.CUDA_BLOCK_ELEMS)


@functools.lru_cache(maxsize=1024)
def _plan(outer, num_channels, inner, threads, min_inner, block_elems):
    if threads > MAX_THREADS or threads & (threads - 1):
        raise ValueError(f"CUDA_THREADS must be a power of two <= {MAX_THREADS}, got {threads}")
    strided = inner >= min_inner
    if strided:
        bx = min(threads, _pow2_at_least(inner))
        width, q, row_elems = num_channels, 1, inner
    else:
        bx = min(threads, 32)
        width, q, row_elems = num_channels * inner, inner, bx
    by = threads // bx
    rows = max(by * CHUNK, -(-block_elems // row_elems))
    nsplit = max(1, -(-outer // rows))
    if nsplit > MAX_GRID_Y:
        nsplit = MAX_GRID_Y
    rows = max(1, -(-outer // nsplit))
    nsplit = max(1, -(-outer // rows))
    cols = num_channels if strided else -(-width // bx)
    return Plan(strided, bx, by, width, q, rows, nsplit, (cols, nsplit))


def one_block(p, size):
    """Whether a training forward or a backward of ``size`` elements with reduction plan ``p``
    runs in one launch (``forward.train_strided``/``train_minor``,
    ``backward.backward_strided``/``backward_minor``): every channel reduced by one block (no
    split; channel-minor arrays with one column per channel) and at most ``CUDA_FUSE_ELEMS``
    elements, where the launches cost more than the work."""
    return p.nsplit == 1 and (p.strided or p.q == 1) and size <= _config.CUDA_FUSE_ELEMS


def elementwise(outer, num_channels, inner):
    """``(strided, grid, block)`` of the elementwise kernels: threads along rows of ``inner`` values
    (strided; rows are the ``outer * C`` (outer, channel) pairs) or across the ``C * inner``
    columns (minor; rows are the ``outer`` rows)."""
    return _elementwise(outer, num_channels, inner, _config.CUDA_THREADS, _config.CUDA_MIN_INNER)


@functools.lru_cache(maxsize=1024)
def _elementwise(outer, num_channels, inner, threads, min_inner):
    strided = inner >= min_inner
    if strided:
        cols, rows = inner, outer * num_channels
    else:
        cols, rows = num_channels * inner, outer
    bx = min(threads, _pow2_at_least(cols))
    by = threads // bx
    # Strided rows: each thread takes several (outer, channel) rows, so the division that
    # finds its first row's channel is paid once per ELEMENTWISE_ROWS elements.
    per_thread = ELEMENTWISE_ROWS if strided else 1
    grid = (-(-cols // bx), max(1, min(MAX_GRID_Y, -(-rows // (by * per_thread)))))
    return strided, grid, (bx, by)


def columns(a3):
    """``(outer, C, inner)`` viewed as ``(outer, C * inner)`` (same memory)."""
    outer, num_channels, inner = a3.shape
    return _arrays.strided(a3, (outer, num_channels * inner), (a3.strides[0], a3.strides[2]))


def coef_dtype(dtype):
    """The arithmetic of the elementwise passes: float32 for float16 data, else float64."""
    return "f4" if dtype.itemsize == 2 else "f8"


def per_channel_blocks(num_channels):
    """``(grid, block)`` of the kernels that merge each channel's partials: a block per
    channel, ``CUDA_MERGE_THREADS`` threads (a power of two) each."""
    return _per_channel_blocks(num_channels, _config.CUDA_MERGE_THREADS)


@functools.lru_cache(maxsize=1024)
def _per_channel_blocks(num_channels, threads):
    if threads > MAX_THREADS or threads & (threads - 1):
        raise ValueError(f"CUDA_MERGE_THREADS must be a power of two <= {MAX_THREADS}, got {threads}")
    return max(1, num_channels), threads


def launch_1d(n):
    """``(grid, block)`` for one thread per item of ``n`` (the per-channel kernels)."""
    block = min(_config.CUDA_THREADS, 128)
    return max(1, -(-n // block)), block
