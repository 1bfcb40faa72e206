"""Per-channel Welford statistics on the GPU (twin of ``cpu/stats.py``).

Every thread runs blocked Welford over its share of a channel (column): ``CHUNK`` rows at a
time, their exact mean and centred sum of squares, then a Chan merge into the thread's
running ``(n, mean, M2)``, all in float64; two chunks' loads are issued before either is
used (``2 * CHUNK`` loads in flight, checked in the PTX by ``tests/_ptx_check.py``).  A block
merges its threads' partials in shared memory along a fixed tree (no warp shuffles: the
CUDA simulator, which the tests run in, has none) and writes one
partial per (split, column); a block per channel then merges a channel's partials in a
fixed order (:func:`channel_partials`, inside :func:`channel_stats` and the finish and
gradient kernels).  Bytes moved: ``x`` once.
"""

from numba import cuda, float64

from .._math import chan_merge
from . import _arrays, _launch
from ._plan import CHUNK, MAX_THREADS, per_channel_blocks, plan


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
def full_chunk(vals, n, mean, m2):
    """:func:`chunk_welford`'s merge of ``CHUNK`` loaded values ``vals`` (all rows present),
    with the same operations in the same order (the same bits)."""
    s = 0.0
    for u in range(CHUNK):
        s += vals[u]
    mb = s / float64(CHUNK)
    q = 0.0
    for u in range(CHUNK):
        d = vals[u] - mb
        q += d * d
    return chan_merge(n, mean, m2, float64(CHUNK), mb, q)


@cuda.jit(device=True)
def chunk_pair(x3, c, i, o, o1, step, n, mean, m2):
    """Merge the two chunks of rows ``o, o + step, ...`` (``2 * CHUNK`` rows, those below
    ``o1``; at least one) of column ``x3[:, c, i]`` into ``(n, mean, m2)``, one after the
    other as :func:`chunk_welford` would.  When both chunks are whole, their ``2 * CHUNK``
    loads are issued before any is used (loads in flight: one at a time, an H200 read the
    statistics of a large NCHW array at 2.4x a copy's time)."""
    if o + (2 * CHUNK - 1) * step < o1:
        va = cuda.local.array(CHUNK, float64)
        vb = cuda.local.array(CHUNK, float64)
        for u in range(CHUNK):
            va[u] = float64(x3[o + u * step, c, i])
        for u in range(CHUNK):
            vb[u] = float64(x3[o + (CHUNK + u) * step, c, i])
        n, mean, m2 = full_chunk(va, n, mean, m2)
        return full_chunk(vb, n, mean, m2)
    n, mean, m2 = chunk_welford(x3, c, i, o, o1, step, n, mean, m2)
    if o + CHUNK * step < o1:
        n, mean, m2 = chunk_welford(x3, c, i, o + CHUNK * step, o1, step, n, mean, m2)
    return n, mean, m2


@cuda.jit(device=True)
def rows_of_split(s, rows_per_split, outer):
    """``[o0, o1)``: the outer rows that split ``s`` reduces."""
    o0 = s * rows_per_split
    return o0, min(outer, o0 + rows_per_split)


@cuda.jit(device=True)
def tree(v0, v1, v2, lane, row, width, height, welford):
    """Reduce the triples of a ``width x height`` block's threads ``(lane, row)`` over rows
    (Chan merges when ``welford``, else sums) and return ``lane``'s result (meaningful in
    row 0).  Rows ``r`` and ``r + h`` pair up for ``h = height / 2, ..., 1`` (``height`` a
    power of two): a fixed order.  Every thread must call it, once per kernel.

    The per-channel merges use it.  The partial kernels keep :func:`block_partial`, the same
    tree in the form a GPU's NVVM accepted for them (docs/performance_notes.rst)."""
    sh = cuda.shared.array((3, MAX_THREADS), float64)
    t = row * width + lane
    sh[0, t], sh[1, t], sh[2, t] = v0, v1, v2
    h = height // 2
    while h > 0:
        cuda.syncthreads()
        if row < h:
            a = t
            b = t + h * width
            if welford:
                sh[0, a], sh[1, a], sh[2, a] = chan_merge(sh[0, a], sh[1, a], sh[2, a], sh[0, b], sh[1, b], sh[2, b])
            else:
                sh[0, a] += sh[0, b]
                sh[1, a] += sh[1, b]
                sh[2, a] += sh[2, b]
        h //= 2
    cuda.syncthreads()
    return sh[0, lane], sh[1, lane], sh[2, lane]


@cuda.jit(device=True)
def block_partial(v0, v1, v2, lane, row, width, height, welford, part, s, j):
    """Reduce the triples of a ``width x height`` block's threads ``(lane, row)`` over rows
    into row 0 (Chan merges when ``welford``, else sums), then ``part[:, s, j]`` receives
    ``lane``'s result (``j < 0``: none).  Rows ``r`` and ``r + h`` pair up for ``h = height / 2,
    ..., 1`` (``height`` a power of two): a fixed order.  Every thread must call it."""
    sh = cuda.shared.array((3, MAX_THREADS), float64)
    t = row * width + lane
    sh[0, t], sh[1, t], sh[2, t] = v0, v1, v2
    h = height // 2
    while h > 0:
        cuda.syncthreads()
        if row < h:
            a = t
            b = t + h * width
            if welford:
                sh[0, a], sh[1, a], sh[2, a] = chan_merge(sh[0, a], sh[1, a], sh[2, a], sh[0, b], sh[1, b], sh[2, b])
            else:
                sh[0, a] += sh[0, b]
                sh[1, a] += sh[1, b]
                sh[2, a] += sh[2, b]
        h //= 2
    cuda.syncthreads()
    if row == 0 and j >= 0:
        part[0, s, j], part[1, s, j], part[2, s, j] = sh[0, lane], sh[1, lane], sh[2, lane]


@cuda.jit(device=True)
def channel_partials(part, q, c, welford):
    """Block ``c`` (one block per channel, a power-of-two number of threads): channel ``c``'s
    partials ``part[:, s, c * q + k]`` merged (``welford``) or added, and returned to thread
    0.  Thread ``t`` takes items ``t, t + threads, ...`` of the split-major ``(s, k)``
    sequence in order, then :func:`tree` combines the threads: the order depends on the
    shape alone.  (One thread per channel merging every split in turn was measured far
    slower on many splits.)"""
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    v0, v1, v2 = 0.0, 0.0, 0.0
    for item in range(t, part.shape[1] * q, nt):
        s = item // q
        j = c * q + item - s * q
        if welford:
            v0, v1, v2 = chan_merge(v0, v1, v2, part[0, s, j], part[1, s, j], part[2, s, j])
        else:
            v0, v1, v2 = v0 + part[0, s, j], v1 + part[1, s, j], v2 + part[2, s, j]
    return tree(v0, v1, v2, 0, t, 1, nt, welford)


@cuda.jit
def partials_strided(x3, rows_per_split, part):
    """Block ``(c, s)``: Welford of channel ``c`` over the outer rows of split ``s`` into
    ``part[:, s, c]``; threads ``(tx, ty)`` take row elements ``tx, tx + bx, ...`` of rows
    ``ty, ty + by, ...``."""
    c, s = cuda.blockIdx.x, cuda.blockIdx.y
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    o0, o1 = rows_of_split(s, rows_per_split, x3.shape[0])
    n, mean, m2 = 0.0, 0.0, 0.0
    for i in range(tx, x3.shape[2], bx):
        for o in range(o0 + ty, o1, 2 * by * CHUNK):
            n, mean, m2 = chunk_pair(x3, c, i, o, o1, by, n, mean, m2)
    block_partial(n, mean, m2, 0, ty * bx + tx, 1, bx * by, True, part, s, c)


@cuda.jit
def partials_minor(x2, rows_per_split, part):
    """Block ``(tile, s)``: Welford of columns ``j = tile * bx + tx`` of ``x2`` (viewed
    ``(outer, W, 1)``) over the rows of split ``s`` into ``part[:, s, j]``."""
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    j, s = cuda.blockIdx.x * bx + tx, cuda.blockIdx.y
    o0, o1 = rows_of_split(s, rows_per_split, x2.shape[0])
    n, mean, m2 = 0.0, 0.0, 0.0
    if j < x2.shape[1]:
        for o in range(o0 + ty, o1, 2 * by * CHUNK):
            n, mean, m2 = chunk_pair(x2, j, 0, o, o1, by, n, mean, m2)
    block_partial(n, mean, m2, tx, ty, bx, by, True, part, s, j if j < x2.shape[1] else -1)


@cuda.jit
def channel_stats(part, q, stats):
    """Block ``c``: ``stats[:, c] = (n, mean, M2)`` of channel ``c`` from its partials
    (:func:`channel_partials`)."""
    c = cuda.blockIdx.x
    n, mean, m2 = channel_partials(part, q, c, True)
    if cuda.threadIdx.x == 0:
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


def partials(x3, stream):
    """Launch the partial statistics of ``x3``; returns ``(part, q)`` for
    :func:`channel_partials`."""
    outer, num_channels, inner = x3.shape
    p = plan(outer, num_channels, inner)
    part = _arrays.scratch("part", (3, p.nsplit, p.width), "f8", stream)
    if p.strided:
        _arrays.launch(partials_strided, p.grid, (p.bx, p.by), stream, x3, p.rows_per_split, part)
    else:
        x2 = _arrays.strided(x3, (outer, p.width, 1), (x3.strides[0], x3.strides[2], x3.strides[2]))
        _arrays.launch(partials_minor, p.grid, (p.bx, p.by), stream, x2, p.rows_per_split, part)
    return part, p.q


@_arrays.one_call
def welford(x3, stats, stream):
    """Driver: ``stats`` (3, C) float64 (device) receives ``(n, mean, M2)`` of ``x3``."""
    part, q = partials(x3, stream)
    _arrays.launch(channel_stats, *per_channel_blocks(x3.shape[1]), stream, part, q, stats)


_launch.cache_on_disk(partials_strided, partials_minor, channel_stats, merge_channels, copy_cast)


#: The stages the GPU backend runs, named as their host twins (``cpu/stats.py``).
DRIVERS = ("welford",)
