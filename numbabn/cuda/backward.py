"""Backward pass on the GPU (twin of ``cpu/backward.py``): one reduction pass (``sum g``,
``sum g * (x - mean)``, ``sum |g|``) and one elementwise pass ``grad_input = g * A + x * B +
D`` with per-channel coefficients.

Bytes moved: the reduction reads ``g`` and ``x`` (2s per element), the elementwise pass
reads both again and writes ``grad_input`` (3s): 5s.  Sums run in float64 per thread, then
along the same fixed shared-memory tree as the statistics, then over splits in a fixed
order: deterministic.  The per-channel coefficients are :func:`numbabn._math.grad_coef`,
the CPU drivers' own, compiled for the device.
"""

from numba import cuda, float64

from .._math import grad_coef as _grad_coef
from . import _arrays, _launch
from ._plan import CHUNK, coef_dtype, columns, elementwise, one_block, per_channel_blocks, plan
from .forward import first_row, next_row
from .stats import block_partial, channel_partials, rows_of_split

grad_coef = _arrays.shared(_grad_coef)


@cuda.jit(device=True)
def column_sums(g3, x3, c, i, m, o0, o1, step):
    """``(sum g, sum g * (x - m), sum |g|)`` over rows ``o0, o0 + step, ... < o1`` of column
    ``[:, c, i]``, ``CHUNK`` rows per round (a whole round's ``2 * CHUNK`` loads in flight)."""
    sg, sgx, sa = 0.0, 0.0, 0.0
    gs = cuda.local.array(CHUNK, float64)
    xs = cuda.local.array(CHUNK, float64)
    for o in range(o0, o1, step * CHUNK):
        if o + (CHUNK - 1) * step < o1:  # a whole chunk: its 2 * CHUNK loads before any use
            for u in range(CHUNK):
                gs[u] = float64(g3[o + u * step, c, i])
            for u in range(CHUNK):
                xs[u] = float64(x3[o + u * step, c, i])
            for u in range(CHUNK):
                g = gs[u]
                sg += g
                sgx += g * (xs[u] - m)
                sa += abs(g)
        else:
            for u in range(CHUNK):
                r = o + u * step
                if r < o1:
                    g = float64(g3[r, c, i])
                    sg += g
                    sgx += g * (float64(x3[r, c, i]) - m)
                    sa += abs(g)
    return sg, sgx, sa


@cuda.jit
def grad_partials_strided(g3, x3, mean, rows_per_split, part):
    """Block ``(c, s)``: channel ``c``'s sums over the outer rows of split ``s`` into
    ``part[:, s, c]`` (threads laid as in ``stats.partials_strided``)."""
    c, s = cuda.blockIdx.x, cuda.blockIdx.y
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    o0, o1 = rows_of_split(s, rows_per_split, x3.shape[0])
    sg, sgx, sa = 0.0, 0.0, 0.0
    for i in range(tx, x3.shape[2], bx):
        a, b, d = column_sums(g3, x3, c, i, mean[c], o0 + ty, o1, by)
        sg, sgx, sa = sg + a, sgx + b, sa + d
    block_partial(sg, sgx, sa, 0, ty * bx + tx, 1, bx * by, False, part, s, c)


@cuda.jit
def grad_partials_minor(g2, x2, mean, q, rows_per_split, part):
    """Block ``(tile, s)``: column ``j``'s sums (channel ``j // q``; arrays viewed
    ``(outer, W, 1)``) over the rows of split ``s`` into ``part[:, s, j]``."""
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    j, s = cuda.blockIdx.x * bx + tx, cuda.blockIdx.y
    o0, o1 = rows_of_split(s, rows_per_split, x2.shape[0])
    sg, sgx, sa = 0.0, 0.0, 0.0
    if j < x2.shape[1]:
        sg, sgx, sa = column_sums(g2, x2, j, 0, mean[j // q], o0 + ty, o1, by)
    block_partial(sg, sgx, sa, tx, ty, bx, by, False, part, s, j if j < x2.shape[1] else -1)


@cuda.jit
def grad_sums(part, q, sums):
    """Block ``c``: ``sums[:, c] = (sum g, sum g * (x - mean), sum |g|)`` of channel ``c``,
    its partial sums added (:func:`stats.channel_partials`): the reduction alone, to be added
    to other parts' (SyncBatchNorm's processes) before the coefficients."""
    c = cuda.blockIdx.x
    sg, sgx, sa = channel_partials(part, q, c, False)
    if cuda.threadIdx.x == 0:
        sums[0, c], sums[1, c], sums[2, c] = sg, sgx, sa


@cuda.jit
def grad_channels(part, q, n, weight, mean, invstd, training, coef, grads, gwb):
    """Block ``c``: channel ``c``'s partial sums added (:func:`stats.channel_partials`), then
    ``grads[:, c] = (grad_weight, grad_bias, sum |g|)`` (float64), the same two in
    ``gwb[:, c]`` in the output dtype, and the coefficients ``coef[:, c] = (A, B, D)``."""
    c = cuda.blockIdx.x
    sg, sgx, sa = channel_partials(part, q, c, False)
    if cuda.threadIdx.x == 0:
        # gwb from the values, not read back from grads (a shared sink when the caller
        # discards the float64 gradients).
        gwb[0, c], gwb[1, c] = grad_coef(c, sg, sgx, sa, n, weight, mean, invstd, training, coef, grads)


@cuda.jit
def backward_strided(g3, x3, part, n, weight, mean, invstd, training, coef, grads, gwb, gi3):
    """The backward in one launch, on an array whose every channel one block reduces
    (``_plan.one_block``): block ``c`` sums channel ``c`` as :func:`grad_partials_strided`
    does, makes its coefficients and gradients as :func:`grad_channels` does, then applies
    them to the channel as :func:`apply_rows` does: the three launches' arithmetic, and bits."""
    c = cuda.blockIdx.x
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    outer, inner = x3.shape[0], x3.shape[2]
    sg, sgx, sa = 0.0, 0.0, 0.0
    for i in range(tx, inner, bx):
        a, b, d = column_sums(g3, x3, c, i, mean[c], ty, outer, by)
        sg, sgx, sa = sg + a, sgx + b, sa + d
    block_partial(sg, sgx, sa, 0, ty * bx + tx, 1, bx * by, False, part, 0, c)
    if tx == 0 and ty == 0:  # the thread that wrote the channel's partial
        channel_coef(part, c, n, weight, mean, invstd, training, coef, grads, gwb)
    cuda.syncthreads()
    a, b, d = coef[0, c], coef[1, c], coef[2, c]
    plain = b == 0 and d == 0  # eval: grad_input does not read x, so a NaN there stays out
    o = ty
    while o < outer:  # while loops: a range with a step inside a loop divides for its trip count
        i = tx
        while i < inner:
            if plain:
                gi3[o, c, i] = g3[o, c, i] * a
            else:
                gi3[o, c, i] = g3[o, c, i] * a + x3[o, c, i] * b + d
            i += bx
        o += by


@cuda.jit
def backward_minor(g2, x2, part, n, weight, mean, invstd, training, coef, grads, gwb, gi2):
    """The backward in one launch, on a channel-minor ``(outer, C, 1)`` array (one column
    per channel) whose every column one block reduces (``_plan.one_block``): column ``j``'s
    sums as :func:`grad_partials_minor` makes them, its coefficients and gradients as
    :func:`grad_channels` makes them, applied as :func:`apply_columns` does: the three
    launches' arithmetic, and bits."""
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    j = cuda.blockIdx.x * bx + tx
    outer, width = x2.shape[0], x2.shape[1]
    sg, sgx, sa = 0.0, 0.0, 0.0
    if j < width:
        sg, sgx, sa = column_sums(g2, x2, j, 0, mean[j], ty, outer, by)
    block_partial(sg, sgx, sa, tx, ty, bx, by, False, part, 0, j if j < width else -1)
    if ty == 0 and j < width:  # the thread that wrote the column's partial
        channel_coef(part, j, n, weight, mean, invstd, training, coef, grads, gwb)
    cuda.syncthreads()
    if j < width:
        a, b, d = coef[0, j], coef[1, j], coef[2, j]
        if b == 0 and d == 0:  # eval: grad_input does not read x, so a NaN there stays out
            for o in range(ty, outer, by):
                gi2[o, j, 0] = g2[o, j, 0] * a
        else:
            for o in range(ty, outer, by):
                gi2[o, j, 0] = g2[o, j, 0] * a + x2[o, j, 0] * b + d


@cuda.jit(device=True)
def channel_coef(part, c, n, weight, mean, invstd, training, coef, grads, gwb):
    """:func:`grad_channels`' work for channel ``c`` whose one partial is ``part[:, 0, c]``:
    its merge adds that partial to zeros (``0.0 + v``, which turns a -0.0 into 0.0)."""
    sg, sgx, sa = 0.0 + part[0, 0, c], 0.0 + part[1, 0, c], 0.0 + part[2, 0, c]
    gwb[0, c], gwb[1, c] = grad_coef(c, sg, sgx, sa, n, weight, mean, invstd, training, coef, grads)


@cuda.jit
def apply_rows(g3, x3, coef, gi3):
    """Strided layouts: ``grad_input = g * A + x * B + D`` (threads as ``normalize_rows``)."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    num_channels = x3.shape[1]
    if i < x3.shape[2]:
        r, o, c, step, so, sc = first_row(num_channels)
        rows = x3.shape[0] * num_channels
        while r < rows:
            b, d = coef[1, c], coef[2, c]
            if b == 0 and d == 0:  # eval: grad_input does not read x, so a NaN there stays out
                gi3[o, c, i] = g3[o, c, i] * coef[0, c]
            else:
                gi3[o, c, i] = g3[o, c, i] * coef[0, c] + x3[o, c, i] * b + d
            r, o, c = next_row(r, o, c, step, so, sc, num_channels)


@cuda.jit
def apply_columns(g2, x2, q, coef, gi2):
    """Channel-minor layouts: ``grad_input = g * A + x * B + D`` (threads as
    ``normalize_columns``)."""
    j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if j < x2.shape[1]:
        c = j // q
        a, b, d = coef[0, c], coef[1, c], coef[2, c]
        step = cuda.gridDim.y * cuda.blockDim.y
        first = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        if b == 0 and d == 0:  # eval: grad_input does not read x, so a NaN there stays out
            for o in range(first, x2.shape[0], step):
                gi2[o, j] = g2[o, j] * a
        else:
            for o in range(first, x2.shape[0], step):
                gi2[o, j] = g2[o, j] * a + x2[o, j] * b + d


def grad_partials(g3, x3, mean, stream):
    """Launch the partial sums of ``g3`` and ``x3`` (``mean`` float64 (C,)); returns
    ``(part, q)`` for :func:`stats.channel_partials`."""
    outer, num_channels, inner = x3.shape
    p = plan(outer, num_channels, inner)
    part = _arrays.scratch("part", (3, p.nsplit, p.width), "f8", stream)
    if p.strided:
        _arrays.launch(grad_partials_strided, p.grid, (p.bx, p.by), stream, g3, x3, mean, p.rows_per_split, part)
    else:
        g2, x2 = (_arrays.strided(a, (outer, p.width, 1), (a.strides[0], a.strides[2], a.strides[2])) for a in (g3, x3))
        _arrays.launch(grad_partials_minor, p.grid, (p.bx, p.by), stream, g2, x2, mean, p.q, p.rows_per_split, part)
    return part, p.q


def grad_apply(g3, x3, coef, gi3, stream):
    """``gi3 = g3 * coef[0, c] + x3 * coef[1, c] + coef[2, c]``, with the kernel of ``x3``'s
    layout family."""
    if x3.size == 0:
        return
    outer, num_channels, inner = x3.shape
    strided, grid, block = elementwise(outer, num_channels, inner)
    if strided:
        _arrays.launch(apply_rows, grid, block, stream, g3, x3, coef, gi3)
    else:
        _arrays.launch(apply_columns, grid, block, stream, columns(g3), columns(x3), inner, coef, columns(gi3))


@_arrays.one_call
def backward(g3, x3, weight, mean, invstd, training, gi3, grads, gwb, stream):
    """Driver: ``grads`` (3, C) float64 receives ``(grad_weight, grad_bias, sum |g|)``,
    ``gwb`` (2, C) the first two in the output dtype, ``gi3`` the input gradient (formulas
    of ``cpu.backward.backward``)."""
    outer, num_channels, inner = x3.shape
    coef = _arrays.scratch("coef", (3, num_channels), coef_dtype(x3.dtype), stream)
    p = plan(outer, num_channels, inner)
    if one_block(p, x3.size):
        part = _arrays.scratch("part", (3, 1, p.width), "f8", stream)
        args = (part, float(outer * inner), weight, mean, invstd, training, coef, grads, gwb)
        kernel = backward_strided if p.strided else backward_minor
        _arrays.launch(kernel, p.grid, (p.bx, p.by), stream, g3, x3, *args, gi3)
        return
    part, q = grad_partials(g3, x3, mean, stream)
    args = (part, q, float(outer * inner), weight, mean, invstd, training, coef, grads, gwb)
    _arrays.launch(grad_channels, *per_channel_blocks(num_channels), stream, *args)
    grad_apply(g3, x3, coef, gi3, stream)


@_arrays.one_call
def grad_reduce(g3, x3, mean, sums, stream):
    """Driver, the reduction pass alone: ``sums`` (3, C) float64 receives ``(sum g,
    sum g * (x - mean), sum |g|)`` per channel (the partials added in a fixed order, from
    the shape alone), to be added to other parts' before :func:`backward_with_sums`."""
    part, q = grad_partials(g3, x3, mean, stream)
    _arrays.launch(grad_sums, *per_channel_blocks(x3.shape[1]), stream, part, q, sums)


@_arrays.one_call
def backward_with_sums(g3, x3, weight, mean, invstd, training, sums, n, gi3, grads, gwb, stream):
    """Driver, the backward of a part of a global batch: from ``sums`` (3, C) float64, the
    :func:`grad_reduce` sums of every part added, over ``n`` values per channel, ``grads``,
    ``gwb`` and ``gi3`` as :func:`backward` gives them (the CPU's ``grad_coefs`` and
    ``grad_apply``).  ``sums`` go to :func:`grad_channels` as the one partial of each
    channel, which it adds to zeros: unchanged (but for the sign of a zero)."""
    num_channels = x3.shape[1]
    step = sums.strides[1] * num_channels
    part = _arrays.strided(sums, (3, 1, num_channels), (step, step, sums.strides[1]))
    coef = _arrays.scratch("coef", (3, num_channels), coef_dtype(x3.dtype), stream)
    args = (part, 1, n, weight, mean, invstd, training, coef, grads, gwb)
    _arrays.launch(grad_channels, *per_channel_blocks(num_channels), stream, *args)
    grad_apply(g3, x3, coef, gi3, stream)


_launch.cache_on_disk(
    grad_partials_strided,
    grad_partials_minor,
    grad_sums,
    grad_channels,
    apply_rows,
    apply_columns,
    backward_strided,
    backward_minor,
)


#: The stages the GPU backend runs, named as their host twins (``cpu/backward.py``).
DRIVERS = ("backward", "backward_with_sums", "grad_reduce", "grad_apply")
