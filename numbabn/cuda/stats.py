"""Per-channel Welford statistics on the GPU (twin of ``cpu/stats.py``).

Every thread runs blocked Welford over its share of a channel (column): ``CHUNK`` rows
loaded at once (independent loads in flight), their exact mean and centred sum of squares,
then a Chan merge into the thread's running ``(n, mean, M2)``, all in float64.  A block
merges its threads' partials in shared memory along a fixed tree (no warp shuffles: the
CUDA simulator has none, and no GPU has checked yet whether they would win) and writes one
partial per (split, column); :func:`channel_stats` merges them in a fixed order.  Bytes
moved: ``x`` once.
"""

from numba import cuda, float64

from .._math import chan_merge
from ._plan import CHUNK, MAX_THREADS, plan


@cuda.jit(device=True)
def chunk_welford(x3, c, i, o, o1, step, n, mean, m2):
    """Merge rows ``o, o + step, ...`` (``CHUNK`` of them, those below ``o1``; at least one)
    of column ``x3[:, c, i]`` into ``(n, mean, m2)``."""
    vals = cuda.local.array(CHUNK, float64)
    s = 0.0
    cnt = 0.0
    for u in range(CHUNK):
        v = 0.0
        if o + u * step < o1:
            v = float64(x3[o + u * step, c, i])
            cnt += 1.0
        vals[u] = v
        s += v
    mb = s / cnt
    q = 0.0
    for u in range(CHUNK):
        if o + u * step < o1:
            d = vals[u] - mb
            q += d * d
    return chan_merge(n, mean, m2, cnt, mb, q)


@cuda.jit(device=True)
def tree(sh, lane, row, width, height, welford):
    """Reduce ``sh[:, r * width + lane]`` over rows ``r < height`` (a power of two) into row
    0, pairing rows ``r`` and ``r + s`` for ``s = height / 2, ..., 1``: a fixed order.
    Chan merges when ``welford``, else sums.  Every thread of the block must call it."""
    s = height // 2
    while s > 0:
        cuda.syncthreads()
        if row < s:
            a = row * width + lane
            b = a + s * width
            if welford:
                sh[0, a], sh[1, a], sh[2, a] = chan_merge(sh[0, a], sh[1, a], sh[2, a], sh[0, b], sh[1, b], sh[2, b])
            else:
                sh[0, a] += sh[0, b]
                sh[1, a] += sh[1, b]
                sh[2, a] += sh[2, b]
        s //= 2
    cuda.syncthreads()


@cuda.jit
def partials_strided(x3, rows_per_split, part):
    """Block ``(c, s)``: Welford of channel ``c`` over outer rows of split ``s`` into
    ``part[:, s, c]``; threads ``(tx, ty)`` take row elements ``tx, tx + bx, ...`` of rows
    ``ty, ty + by, ...``."""
    c = cuda.blockIdx.x
    s = cuda.blockIdx.y
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    bx, by = cuda.blockDim.x, cuda.blockDim.y
    o0 = s * rows_per_split
    o1 = min(x3.shape[0], o0 + rows_per_split)
    n, mean, m2 = 0.0, 0.0, 0.0
    for i in range(tx, x3.shape[2], bx):
        for o in range(o0 + ty, o1, by * CHUNK):
            n, mean, m2 = chunk_welford(x3, c, i, o, o1, by, n, mean, m2)
    sh = cuda.shared.array((3, MAX_THREADS), float64)
    t = ty * bx + tx
    sh[0, t], sh[1, t], sh[2, t] = n, mean, m2
    tree(sh, 0, t, 1, bx * by, True)
    if t == 0:
        part[0, s, c], part[1, s, c], part[2, s, c] = sh[0, 0], sh[1, 0], sh[2, 0]


@cuda.jit
def partials_minor(x2, rows_per_split, part):
    """Block ``(tile, s)``: Welford of columns ``j = tile * bx + tx`` of ``x2`` (viewed
    ``(outer, W, 1)``) over rows of split ``s`` into ``part[:, s, j]``."""
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    bx, by = cuda.blockDim.x, cuda.blockDim.y
    j = cuda.blockIdx.x * bx + tx
    s = cuda.blockIdx.y
    o0 = s * rows_per_split
    o1 = min(x2.shape[0], o0 + rows_per_split)
    n, mean, m2 = 0.0, 0.0, 0.0
    if j < x2.shape[1]:
        for o in range(o0 + ty, o1, by * CHUNK):
            n, mean, m2 = chunk_welford(x2, j, 0, o, o1, by, n, mean, m2)
    sh = cuda.shared.array((3, MAX_THREADS), float64)
    t = ty * bx + tx
    sh[0, t], sh[1, t], sh[2, t] = n, mean, m2
    tree(sh, tx, ty, bx, by, True)
    if ty == 0 and j < x2.shape[1]:
        part[0, s, j], part[1, s, j], part[2, s, j] = sh[0, tx], sh[1, tx], sh[2, tx]


@cuda.jit
def channel_stats(part, q, stats):
    """``stats[:, c] = (n, mean, M2)`` of channel ``c``: its partials merged split by split,
    column ``c * q .. c * q + q - 1`` within a split."""
    c = cuda.grid(1)
    if c < stats.shape[1]:
        n, mean, m2 = 0.0, 0.0, 0.0
        for s in range(part.shape[1]):
            for j in range(c * q, c * q + q):
                n, mean, m2 = chan_merge(n, mean, m2, part[0, s, j], part[1, s, j], part[2, s, j])
        stats[0, c], stats[1, c], stats[2, c] = n, mean, m2


@cuda.jit
def merge_channels(na, mean_a, m2_a, nb, mean_b, m2_b):
    """Chan's merge of ``(nb, mean_b, m2_b)`` into ``(na, mean_a, m2_a)``, per channel, in place."""
    c = cuda.grid(1)
    if c < mean_a.shape[0]:
        _, mean_a[c], m2_a[c] = chan_merge(na, mean_a[c], m2_a[c], nb, mean_b[c], m2_b[c])


@cuda.jit
def copy_cast(src, factor, dst):
    """``dst[c] = src[c] * factor`` converted to ``dst``'s dtype."""
    c = cuda.grid(1)
    if c < dst.shape[0]:
        dst[c] = src[c] * factor


def launch_1d(n):
    """``(grid, block)`` for one thread per item of ``n``."""
    from .. import _config

    block = min(_config.CUDA_THREADS, 128)
    return max(1, -(-n // block)), block


def welford(x3, stats, stream):
    """Driver: ``stats`` (3, C) float64 (device) receives ``(n, mean, M2)`` of ``x3``."""
    from . import _arrays

    outer, num_channels, inner = x3.shape
    p = plan(outer, num_channels, inner)
    part = _arrays.scratch("part", (3, p.nsplit, p.width), "f8", stream)
    if p.strided:
        partials_strided[p.grid, (p.bx, p.by), stream](x3, p.rows_per_split, part)
    else:
        x2 = _arrays.strided(x3, (outer, p.width, 1), (x3.strides[0], x3.strides[2], x3.strides[2]))
        partials_minor[p.grid, (p.bx, p.by), stream](x2, p.rows_per_split, part)
    grid, block = launch_1d(num_channels)
    channel_stats[grid, block, stream](part, p.q, stats)
