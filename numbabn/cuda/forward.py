"""Forward pass on the GPU (twin of ``cpu/forward.py``): statistics (training) or running
statistics (eval), the O(C) finalize with the fused EMA update, then ``y = x * a + b``.

Bytes moved: training reads ``x`` twice and writes ``y`` (3s per element), eval reads ``x``
and writes ``y`` (2s).  The finalize step is :func:`numbabn._math.finish_channel`, the CPU
drivers' own (with the EMA step and fold), compiled for the device.  The
elementwise pass computes in float64 for float32/float64 data, so float32 outputs keep
float32 precision when ``|mean| / std`` is large; float16 data computes in float32.
"""

from numba import cuda, float64

from .._math import channel_invstd, fold, invstd_of
from .._math import finish_channel as _finish_channel
from . import _arrays, _launch
from ._plan import CHUNK, coef_dtype, columns, elementwise, launch_1d, one_block, per_channel_blocks, plan
from .stats import block_partial, channel_partials, chunk_pair, partials

finish_channel = _arrays.shared(_finish_channel)


@cuda.jit
def finish_channels(part, q, weight, bias, running_mean, running_var, momentum, eps, coef, save):
    """Block ``c``: channel ``c``'s partials merged (:func:`stats.channel_partials`), then its
    fold coefficients, saved ``(mean, invstd)`` and the EMA update of the running statistics
    (when given: non-empty), in one launch."""
    c = cuda.blockIdx.x
    n, mean, m2 = channel_partials(part, q, c, True)
    if cuda.threadIdx.x == 0:
        invstd = channel_invstd(n, m2, eps)
        finish_channel(c, n, mean, m2, invstd, weight, bias, running_mean, running_var, momentum, eps, coef, save)


@cuda.jit
def eval_channels(weight, bias, mean, var, eps, coef, save):
    """One thread per channel: the running statistics' fold coefficients and ``(mean, invstd)``."""
    c = cuda.grid(1)
    if c < coef.shape[1]:
        m = float64(mean[c])
        invstd = invstd_of(float64(var[c]), eps)
        coef[0, c], coef[1, c] = fold(m, invstd, float64(weight[c]), float64(bias[c]))
        save[0, c] = m
        save[1, c] = invstd


@cuda.jit(device=True)
def first_row(num_channels):
    """The first (outer, channel) row of this thread in the strided elementwise kernels, and
    the step between its rows, each as ``(row, outer, channel)``: the rows that follow are
    found by addition, without an integer division per element (a division per element made
    the normalize 3.9x as slow as a copy of (256, 64, 112, 112) on an H200)."""
    r = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    step = cuda.gridDim.y * cuda.blockDim.y
    o = r // num_channels
    so = step // num_channels
    return r, o, r - o * num_channels, step, so, step - so * num_channels


@cuda.jit(device=True)
def next_row(r, o, c, step, so, sc, num_channels):
    """The row after ``(r, o, c)`` by :func:`first_row`'s step: additions and one compare, no
    division."""
    c += sc
    o += so
    if c >= num_channels:
        c -= num_channels
        o += 1
    return r + step, o, c


@cuda.jit
def normalize_rows(x3, coef, y3):
    """Strided layouts: thread ``(tx, ty)`` of block ``(bi, bj)`` takes row element
    ``i = bi * bx + tx`` of the (outer, channel) rows ``bj * by + ty``, then every
    ``gridDim.y * by``-th row after it."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    num_channels = x3.shape[1]
    if i < x3.shape[2]:
        r, o, c, step, so, sc = first_row(num_channels)
        rows = x3.shape[0] * num_channels
        while r < rows:
            y3[o, c, i] = x3[o, c, i] * coef[0, c] + coef[1, c]
            r, o, c = next_row(r, o, c, step, so, sc, num_channels)


@cuda.jit
def normalize_columns(x2, q, coef, y2):
    """Channel-minor layouts, ``(outer, C * q)``: thread ``(tx, ty)`` takes column
    ``j = bi * bx + tx`` (channel ``j // q``) of rows ``bj * by + ty, ...``."""
    j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if j < x2.shape[1]:
        c = j // q
        a = coef[0, c]
        b = coef[1, c]
        step = cuda.gridDim.y * cuda.blockDim.y
        for o in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, x2.shape[0], step):
            y2[o, j] = x2[o, j] * a + b


def normalize(x3, coef, y3, stream):
    """``y3 = x3 * coef[0, c] + coef[1, c]``, with the kernel of ``x3``'s layout family."""
    if x3.size == 0:
        return
    strided, grid, block = elementwise(*x3.shape)
    if strided:
        _arrays.launch(normalize_rows, grid, block, stream, x3, coef, y3)
    else:
        _arrays.launch(normalize_columns, grid, block, stream, columns(x3), x3.shape[2], coef, columns(y3))


@cuda.jit
def train_strided(x3, part, weight, bias, running_mean, running_var, momentum, eps, coef, save, y3):
    """The training forward in one launch, on an array whose every channel one block reduces
    (``_plan.one_block``): block ``c`` computes channel ``c``'s statistics as
    :func:`stats.partials_strided` does, finishes it as :func:`finish_channels` does, then
    normalizes it as :func:`normalize_rows` does: the three launches' arithmetic, and bits."""
    c = cuda.blockIdx.x
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    outer, inner = x3.shape[0], x3.shape[2]
    # While loops: a range with a step inside another loop divides for its trip count.
    n, mean, m2 = 0.0, 0.0, 0.0
    i = tx
    while i < inner:
        o = ty
        while o < outer:
            n, mean, m2 = chunk_pair(x3, c, i, o, outer, by, n, mean, m2)
            o += 2 * by * CHUNK
        i += bx
    block_partial(n, mean, m2, 0, ty * bx + tx, 1, bx * by, True, part, 0, c)
    if tx == 0 and ty == 0:  # the thread that wrote the channel's partial
        n, mean, m2 = part[0, 0, c], part[1, 0, c], part[2, 0, c]
        invstd = channel_invstd(n, m2, eps)
        finish_channel(c, n, mean, m2, invstd, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    cuda.syncthreads()
    a = coef[0, c]
    b = coef[1, c]
    o = ty
    while o < outer:
        i = tx
        while i < inner:
            y3[o, c, i] = x3[o, c, i] * a + b
            i += bx
        o += by


@cuda.jit
def train_minor(x2, part, weight, bias, running_mean, running_var, momentum, eps, coef, save, y2):
    """The training forward in one launch, on a channel-minor ``(outer, C, 1)`` array (one
    column per channel: ``(N, C)``, channels-last) whose every column one block reduces
    (``_plan.one_block``): thread column ``j`` computes channel ``j``'s statistics with its
    block as :func:`stats.partials_minor` does, finishes it as :func:`finish_channels` does,
    then the block normalizes its columns as :func:`normalize_columns` does: the three
    launches' arithmetic, and bits."""
    tx, ty, bx, by = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x, cuda.blockDim.y
    j = cuda.blockIdx.x * bx + tx
    outer, width = x2.shape[0], x2.shape[1]
    n, mean, m2 = 0.0, 0.0, 0.0
    if j < width:
        for o in range(ty, outer, 2 * by * CHUNK):
            n, mean, m2 = chunk_pair(x2, j, 0, o, outer, by, n, mean, m2)
    block_partial(n, mean, m2, tx, ty, bx, by, True, part, 0, j if j < width else -1)
    if ty == 0 and j < width:  # the thread that wrote the column's partial
        n, mean, m2 = part[0, 0, j], part[1, 0, j], part[2, 0, j]
        invstd = channel_invstd(n, m2, eps)
        finish_channel(j, n, mean, m2, invstd, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    cuda.syncthreads()
    if j < width:
        a = coef[0, j]
        b = coef[1, j]
        for o in range(ty, outer, by):
            y2[o, j, 0] = x2[o, j, 0] * a + b


@_arrays.one_call
def forward_train(x3, weight, bias, running_mean, running_var, momentum, eps, y3, save, stream):
    """Driver, training: batch statistics, EMA update, normalize ``x3`` into ``y3``; ``save``
    (2, C) float64 receives the mean and invstd used."""
    outer, num_channels, inner = x3.shape
    coef = _arrays.scratch("coef", (2, num_channels), coef_dtype(x3.dtype), stream)
    p = plan(outer, num_channels, inner)
    if one_block(p, x3.size):
        part = _arrays.scratch("part", (3, 1, p.width), "f8", stream)
        args = (part, weight, bias, running_mean, running_var, momentum, eps, coef, save)
        kernel = train_strided if p.strided else train_minor
        _arrays.launch(kernel, p.grid, (p.bx, p.by), stream, x3, *args, y3)
        return
    part, q = partials(x3, stream)
    args = (part, q, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    _arrays.launch(finish_channels, *per_channel_blocks(num_channels), stream, *args)
    normalize(x3, coef, y3, stream)


@_arrays.one_call
def forward_with_stats(x3, stats, weight, bias, running_mean, running_var, momentum, eps, y3, save, stream):
    """Driver, training with statistics merged elsewhere (SyncBatchNorm's global batch):
    ``stats`` (3, C) float64 holds every channel's ``(count, mean, M2)``; the finish and EMA
    update of :func:`forward_train`, then normalize ``x3`` into ``y3``.

    ``stats`` goes to :func:`finish_channels` as the one partial of each channel, which its
    merge returns unchanged (a Chan merge with an empty side is exact): the arithmetic, and on
    one part the bits, of :func:`forward_train`."""
    num_channels = x3.shape[1]
    step = stats.strides[1] * num_channels
    part = _arrays.strided(stats, (3, 1, num_channels), (step, step, stats.strides[1]))
    coef = _arrays.scratch("coef", (2, num_channels), coef_dtype(x3.dtype), stream)
    args = (part, 1, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    _arrays.launch(finish_channels, *per_channel_blocks(num_channels), stream, *args)
    normalize(x3, coef, y3, stream)


@_arrays.one_call
def forward_eval(x3, weight, bias, mean, var, eps, y3, save, stream):
    """Driver, eval: normalize ``x3`` into ``y3`` with the given (running) ``mean`` and
    ``var``; ``save`` (2, C) float64 receives the mean and invstd used."""
    num_channels = x3.shape[1]
    coef = _arrays.scratch("coef", (2, num_channels), coef_dtype(x3.dtype), stream)
    grid, block = launch_1d(num_channels)
    _arrays.launch(eval_channels, grid, block, stream, weight, bias, mean, var, eps, coef, save)
    normalize(x3, coef, y3, stream)


_launch.cache_on_disk(finish_channels, eval_channels, normalize_rows, normalize_columns, train_strided, train_minor)


#: The stages the GPU backend runs, named as their host twins (``cpu/forward.py``).
DRIVERS = ("forward_train", "forward_eval", "forward_with_stats")
