"""Masked statistics on the GPU (twin of ``cpu/masked.py``): per-channel ``(count, mean,
M2)`` over the positions a boolean mask keeps, read alongside the input in the same pass, the
masked elementwise backward, and the mask's True count.

The mask has the input's shape with 1 on the feature axis (the same for every channel), dense
in the input's memory order; the kernels see it as ``(outer, inner)`` beside the input's
``(outer, C, inner)`` view.  The reductions are those of :mod:`numbabn.cuda.stats` with each
chunk's kept values only: a thread's blocked Welford over chunks of ``CHUNK`` rows (their
loads, the mask's included, issued before any is used), the fixed shared-memory tree of a
block, then each channel's partials merged in a fixed order by the kernels of the unmasked
path (:func:`numbabn.cuda.stats.channel_partials`, inside ``forward.finish_channels``).  A
value the mask drops is loaded but never added (a NaN there changes nothing).  With every
value kept, the arithmetic, and the bits, are those of the unmasked kernels.

The backward's reduction is the unmasked one (``grad_bias`` and ``grad_weight`` sum over
every value); only the coefficients' count (the kept one) and the elementwise pass differ.
"""

import numpy as np
from numba import boolean, cuda, float64, int64

from .._math import chan_merge
from . import _arrays, _launch
from ._plan import CHUNK, MAX_THREADS, coef_dtype, columns, elementwise, launch_1d, per_channel_blocks, plan
from .backward import grad_channels
from .forward import finish_channels, first_row, next_row, normalize
from .stats import block_partial, channel_stats, rows_of_split


@cuda.jit(device=True)
def kept_chunk(vals, keep, n, mean, m2):
    """Merge the values ``vals[u]`` where ``keep[u]`` (``CHUNK`` of each) into ``(n, mean,
    m2)``: their exact mean, then their centred sum of squares, as ``stats.chunk_welford``
    (a dropped value adds 0.0, as a row past the end does there)."""
    s = 0.0
    cnt = 0.0
    for u in range(CHUNK):
        if keep[u]:
            s += vals[u]
            cnt += 1.0
        else:
            s += 0.0
    if cnt == 0.0:
        return n, mean, m2
    mb = s / cnt
    q = 0.0
    for u in range(CHUNK):
        if keep[u]:
            d = vals[u] - mb
            q += d * d
    return chan_merge(n, mean, m2, cnt, mb, q)


@cuda.jit(device=True)
def masked_chunk(x3, mk, c, i, mi, o, o1, step, n, mean, m2):
    """Merge the kept values of rows ``o, o + step, ...`` (``CHUNK`` of them, those below
    ``o1``) of column ``x3[:, c, i]``, whose mask column is ``mk[:, mi]``, into ``(n, mean,
    m2)``."""
    vals = cuda.local.array(CHUNK, float64)
    keep = cuda.local.array(CHUNK, boolean)
    for u in range(CHUNK):
        r = o + u * step
        v = 0.0
        k = False
        if r < o1:
            v = float64(x3[r, c, i])
            k = mk[r, mi]
        vals[u] = v
        keep[u] = k
    return kept_chunk(vals, keep, n, mean, m2)


@cuda.jit(device=True)
def masked_pair(x3, mk, c, i, mi, o, o1, step, n, mean, m2):
    """Merge the kept values of the two chunks of rows ``o, o + step, ...`` (``2 * CHUNK``
    rows, those below ``o1``) of column ``x3[:, c, i]`` (mask column ``mk[:, mi]``), one
    after the other as :func:`masked_chunk` would; when both chunks are whole, their values'
    and mask's ``4 * CHUNK`` loads are issued before any is used (``stats.chunk_pair``)."""
    if o + (2 * CHUNK - 1) * step < o1:
        va = cuda.local.array(CHUNK, float64)
        vb = cuda.local.array(CHUNK, float64)
        ka = cuda.local.array(CHUNK, boolean)
        kb = cuda.local.array(CHUNK, boolean)
        for u in range(CHUNK):
            va[u] = float64(x3[o + u * step, c, i])
        for u in range(CHUNK):
            vb[u] = float64(x3[o + (CHUNK + u) * step, c, i])
        for u in range(CHUNK):
            ka[u] = mk[o + u * step, mi]
        for u in range(CHUNK):
            kb[u] = mk[o + (CHUNK + u) * step, mi]
        n, mean, m2 = kept_chunk(va, ka, n, mean, m2)
        return kept_chunk(vb, kb, n, mean, m2)
    n, mean, m2 = masked_chunk(x3, mk, c, i, mi, o, o1, step, n, mean, m2)
    if o + CHUNK * step < o1:
        n, mean, m2 = masked_chunk(x3, mk, c, i, mi, o + CHUNK * step, o1, step, n, mean, m2)
    return n, mean, m2


@cuda.jit
def masked_partials_strided(x3, mk, rows_per_split, part):
    """Block ``(c, s)``: Welford of channel ``c``'s kept values over the outer rows of split
    ``s`` into ``part[:, s, c]`` (threads laid as in ``stats.partials_strided``)."""
    c, s = cuda.blockIdx.x, cuda.blockIdx.y
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    o0, o1 = rows_of_split(s, rows_per_split, x3.shape[0])
    n, mean, m2 = 0.0, 0.0, 0.0
    for i in range(tx, x3.shape[2], bx):
        for o in range(o0 + ty, o1, 2 * by * CHUNK):
            n, mean, m2 = masked_pair(x3, mk, c, i, i, o, o1, by, n, mean, m2)
    block_partial(n, mean, m2, 0, ty * bx + tx, 1, bx * by, True, part, s, c)


@cuda.jit
def masked_partials_minor(x2, mk, q, rows_per_split, part):
    """Block ``(tile, s)``: Welford of the kept values of columns ``j = tile * bx + tx`` of
    ``x2`` (viewed ``(outer, W, 1)``; column ``j``'s mask column is ``j % q``) over the rows
    of split ``s`` into ``part[:, s, j]``."""
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    j, s = cuda.blockIdx.x * bx + tx, cuda.blockIdx.y
    o0, o1 = rows_of_split(s, rows_per_split, x2.shape[0])
    n, mean, m2 = 0.0, 0.0, 0.0
    if j < x2.shape[1]:
        mi = j % q
        for o in range(o0 + ty, o1, 2 * by * CHUNK):
            n, mean, m2 = masked_pair(x2, mk, j, 0, mi, o, o1, by, n, mean, m2)
    block_partial(n, mean, m2, tx, ty, bx, by, True, part, s, j if j < x2.shape[1] else -1)


@cuda.jit
def apply_rows_masked(g3, x3, mk, coef, gi3):
    """Strided layouts: ``grad_input = g * A + x * B + D`` where the mask keeps the value,
    ``g * A`` where it drops it (threads as ``forward.normalize_rows``; the same arithmetic
    as ``backward.apply_rows``)."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    num_channels = x3.shape[1]
    if i < x3.shape[2]:
        r, o, c, step, so, sc = first_row(num_channels)
        rows = x3.shape[0] * num_channels
        while r < rows:
            b, d = coef[1, c], coef[2, c]
            if mk[o, i] and not (b == 0 and d == 0):
                gi3[o, c, i] = g3[o, c, i] * coef[0, c] + x3[o, c, i] * b + d
            else:
                gi3[o, c, i] = g3[o, c, i] * coef[0, c]
            r, o, c = next_row(r, o, c, step, so, sc, num_channels)


@cuda.jit
def apply_columns_masked(g2, x2, mk, q, coef, gi2):
    """Channel-minor layouts, ``(outer, C * q)``: the same, column ``j``'s mask column
    ``j % q`` (threads as ``forward.normalize_columns``)."""
    j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if j < x2.shape[1]:
        c = j // q
        mi = j - c * q
        a, b, d = coef[0, c], coef[1, c], coef[2, c]
        plain = b == 0 and d == 0
        step = cuda.gridDim.y * cuda.blockDim.y
        for o in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, x2.shape[0], step):
            if mk[o, mi] and not plain:
                gi2[o, j] = g2[o, j] * a + x2[o, j] * b + d
            else:
                gi2[o, j] = g2[o, j] * a


@cuda.jit
def count_true(m, count):
    """``count[0] +=`` the number of True values of the 1-D ``m``: each thread counts a
    strided share, a block adds its threads' counts along a fixed tree, then one integer
    atomic add per block (integers: the same total in any order)."""
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    k = 0
    for p in range(cuda.grid(1), m.shape[0], cuda.gridsize(1)):
        if m[p]:
            k += 1
    sh = cuda.shared.array(MAX_THREADS, int64)
    sh[t] = k
    h = nt // 2
    while h > 0:
        cuda.syncthreads()
        if t < h:
            sh[t] += sh[t + h]
        h //= 2
    cuda.syncthreads()
    if t == 0 and sh[0] > 0:
        cuda.atomic.add(count, 0, sh[0])


#: The most blocks :func:`count_true` runs: each thread then counts many values.
COUNT_BLOCKS = 256


def kept(mk, stream):
    """The number of True values of the dense device mask view ``mk`` (outer, inner),
    counted on the device and copied to the host (which waits for the stream)."""
    size = mk.shape[0] * mk.shape[1]
    if size == 0:
        return 0
    count = _arrays.to_device(np.zeros(1, np.int64), stream)
    grid, block = launch_1d(size)
    flat = _arrays.strided(mk, (size,), (mk.dtype.itemsize,))
    _arrays.launch(count_true, min(grid, COUNT_BLOCKS), block, stream, flat, count)
    return int(_arrays.to_host(count, stream)[0])


def masked_partials(x3, mk, stream):
    """Launch the masked partial statistics of ``x3``; returns ``(part, q)`` for
    :func:`numbabn.cuda.stats.channel_partials`."""
    outer, num_channels, inner = x3.shape
    p = plan(outer, num_channels, inner)
    part = _arrays.scratch("part", (3, p.nsplit, p.width), "f8", stream)
    if p.strided:
        _arrays.launch(masked_partials_strided, p.grid, (p.bx, p.by), stream, x3, mk, p.rows_per_split, part)
    else:
        x2 = _arrays.strided(x3, (outer, p.width, 1), (x3.strides[0], x3.strides[2], x3.strides[2]))
        _arrays.launch(masked_partials_minor, p.grid, (p.bx, p.by), stream, x2, mk, p.q, p.rows_per_split, part)
    return part, p.q


@_arrays.one_call
def welford_masked(x3, mk, stats, stream):
    """Driver: ``stats`` (3, C) float64 (device) receives the ``(count, mean, M2)`` of the
    values of ``x3`` that ``mk`` keeps."""
    part, q = masked_partials(x3, mk, stream)
    _arrays.launch(channel_stats, *per_channel_blocks(x3.shape[1]), stream, part, q, stats)


@_arrays.one_call
def forward_train_masked(x3, mk, weight, bias, running_mean, running_var, momentum, eps, y3, save, stream):
    """Driver, masked training: the kept values' statistics, the finish and EMA update of
    ``forward.forward_train`` (the count the kept one), then every value of ``x3`` normalized
    into ``y3``."""
    num_channels = x3.shape[1]
    coef = _arrays.scratch("coef", (2, num_channels), coef_dtype(x3.dtype), stream)
    part, q = masked_partials(x3, mk, stream)
    args = (part, q, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    _arrays.launch(finish_channels, *per_channel_blocks(num_channels), stream, *args)
    normalize(x3, coef, y3, stream)


def grad_apply_masked(g3, x3, mk, coef, gi3, stream):
    """``gi3 = g3 * coef[0, c] + (x3 * coef[1, c] + coef[2, c] where mk keeps the value)``,
    with the kernel of ``x3``'s layout family: a dropped value reaches the statistics of no
    one, so only the normalization's own gradient flows back to it."""
    if x3.size == 0:
        return
    outer, num_channels, inner = x3.shape
    strided, grid, block = elementwise(outer, num_channels, inner)
    if strided:
        _arrays.launch(apply_rows_masked, grid, block, stream, g3, x3, mk, coef, gi3)
    else:
        cols = (columns(g3), columns(x3), mk, inner, coef, columns(gi3))
        _arrays.launch(apply_columns_masked, grid, block, stream, *cols)


@_arrays.one_call
def backward_masked(g3, x3, mk, weight, mean, invstd, sums, n, gi3, grads, gwb, stream):
    """Driver, the backward of a masked training forward: from ``sums`` (3, C) float64, the
    reduction over every value (``backward.grad_reduce``, added over the parts of a global
    batch), and ``n`` the kept count, ``grads``, ``gwb`` and the coefficients as
    ``backward.grad_channels`` makes them, then :func:`grad_apply_masked` into ``gi3``."""
    num_channels = x3.shape[1]
    step = sums.strides[1] * num_channels
    part = _arrays.strided(sums, (3, 1, num_channels), (step, step, sums.strides[1]))
    coef = _arrays.scratch("coef", (3, num_channels), coef_dtype(x3.dtype), stream)
    args = (part, 1, n, weight, mean, invstd, True, coef, grads, gwb)
    _arrays.launch(grad_channels, *per_channel_blocks(num_channels), stream, *args)
    grad_apply_masked(g3, x3, mk, coef, gi3, stream)


_launch.cache_on_disk(
    masked_partials_strided, masked_partials_minor, apply_rows_masked, apply_columns_masked, count_true
)


#: The stages the GPU backend runs for masked calls, named as their host twins
#: (``cpu/masked.py``).
DRIVERS = ("welford_masked", "forward_train_masked", "grad_apply_masked", "backward_masked")
