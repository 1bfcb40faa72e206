"""Forward pass on the GPU (twin of ``cpu/forward.py``): statistics (training) or running
statistics (eval), the O(C) finalize with the fused EMA update, then ``y = x * a + b``.

Bytes moved: training reads ``x`` twice and writes ``y`` (3s per element), eval reads ``x``
and writes ``y`` (2s).  The finalize step is :func:`numbabn._math.finish_channel`, the CPU
drivers' own (with the EMA step and fold), compiled for the device.  The
elementwise pass computes in float64 for float32/float64 data, so float32 outputs keep
float32 precision when ``|mean| / std`` is large; float16 data computes in float32.
"""

from numba import cuda, float64

from .._math import finish_channel as _finish_channel
from .._math import fold, invstd_of
from . import _arrays
from ._plan import coef_dtype, columns, elementwise, launch_1d
from .stats import welford

finish_channel = _arrays.shared(_finish_channel)


@cuda.jit
def finish_channels(stats, weight, bias, running_mean, running_var, momentum, eps, coef, save):
    """One thread per channel: statistics to fold coefficients, saved ``(mean, invstd)`` and
    the EMA update of the running statistics (when given: non-empty)."""
    c = cuda.grid(1)
    if c < stats.shape[1]:
        finish_channel(
            c, stats[0, c], stats[1, c], stats[2, c], weight, bias, running_mean, running_var, momentum, eps, coef, save
        )


@cuda.jit
def eval_channels(weight, bias, mean, var, eps, coef, save):
    """One thread per channel: the running statistics' fold coefficients and ``(mean, invstd)``."""
    c = cuda.grid(1)
    if c < coef.shape[1]:
        m = float64(mean[c])
        invstd = invstd_of(float64(var[c]), eps)
        coef[0, c], coef[1, c] = fold(m, invstd, weight[c], bias[c])
        save[0, c] = m
        save[1, c] = invstd


@cuda.jit
def normalize_rows(x3, coef, y3):
    """Strided layouts: thread ``(tx, ty)`` of block ``(bi, bj)`` takes row element
    ``i = bi * bx + tx`` of the (outer, channel) rows ``bj * by + ty, ...``."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    num_channels = x3.shape[1]
    if i < x3.shape[2]:
        step = cuda.gridDim.y * cuda.blockDim.y
        for r in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, x3.shape[0] * num_channels, step):
            o = r // num_channels
            c = r - o * num_channels
            y3[o, c, i] = x3[o, c, i] * coef[0, c] + coef[1, c]


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
        normalize_rows[grid, block, stream](x3, coef, y3)
    else:
        normalize_columns[grid, block, stream](columns(x3), x3.shape[2], coef, columns(y3))


def forward_train(x3, weight, bias, running_mean, running_var, momentum, eps, y3, save, stream):
    """Driver, training: batch statistics, EMA update, normalize ``x3`` into ``y3``; ``save``
    (2, C) float64 receives the mean and invstd used."""
    num_channels = x3.shape[1]
    stats = _arrays.scratch("stats", (3, num_channels), "f8", stream)
    welford(x3, stats, stream)
    coef = _arrays.scratch("coef", (2, num_channels), coef_dtype(x3.dtype), stream)
    grid, block = launch_1d(num_channels)
    finish_channels[grid, block, stream](stats, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    normalize(x3, coef, y3, stream)


def forward_eval(x3, weight, bias, mean, var, eps, y3, save, stream):
    """Driver, eval: normalize ``x3`` into ``y3`` with the given (running) ``mean`` and
    ``var``; ``save`` (2, C) float64 receives the mean and invstd used."""
    num_channels = x3.shape[1]
    coef = _arrays.scratch("coef", (2, num_channels), coef_dtype(x3.dtype), stream)
    grid, block = launch_1d(num_channels)
    eval_channels[grid, block, stream](weight, bias, mean, var, eps, coef, save)
    normalize(x3, coef, y3, stream)
