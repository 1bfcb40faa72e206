"""Fused activation and residual add on the GPU (twin of ``cpu/activation.py``):
``y = act(x * a + b + z)`` in the normalize pass, and the ReLU's gradient from the saved
output.

The forward drivers are :mod:`numbabn.cuda.forward`'s, with the activated normalize in place
of the plain one (and no one-launch form: the statistics, finalize and normalize run as
three launches).  One pair of elementwise kernels serves every mode, the ReLU's backward
(``GRAD``) included.
"""

from numba import cuda

from .._activation import RELU, RESIDUAL
from . import _arrays, _launch
from ._plan import coef_dtype, columns, elementwise, launch_1d, per_channel_blocks
from .forward import eval_channels, finish_channels, first_row, next_row
from .stats import partials

#: The elementwise kernels' mode for the ReLU's backward: ``out = 0 if y <= 0 else g``.
GRAD = 4


@cuda.jit(device=True)
def act(x, a, b, w, mode):
    """``act(x * a + b [+ w])``, ``w`` the residual's value, the ReLU and residual as
    ``mode`` says; for ``GRAD``, ``x`` is the gradient and ``w`` the saved output."""
    if mode == GRAD:
        return 0.0 if w <= 0.0 else x
    v = x * a + b
    if mode & RESIDUAL:
        v += w
    if mode & RELU and v < 0.0:
        v = 0.0
    return v


@cuda.jit
def act_rows(x3, z3, mode, coef, y3):
    """Strided layouts, as :func:`numbabn.cuda.forward.normalize_rows`:
    ``y = act(x * coef[0, c] + coef[1, c] [+ z])``."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    num_channels = x3.shape[1]
    if i < x3.shape[2]:
        r, o, c, step, so, sc = first_row(num_channels)
        rows = x3.shape[0] * num_channels
        while r < rows:
            y3[o, c, i] = act(x3[o, c, i], coef[0, c], coef[1, c], z3[o, c, i], mode)
            r, o, c = next_row(r, o, c, step, so, sc, num_channels)


@cuda.jit
def act_columns(x2, z2, q, mode, coef, y2):
    """Channel-minor layouts, as :func:`numbabn.cuda.forward.normalize_columns`."""
    j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if j < x2.shape[1]:
        c = j // q
        a = coef[0, c]
        b = coef[1, c]
        step = cuda.gridDim.y * cuda.blockDim.y
        for o in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, x2.shape[0], step):
            y2[o, j] = act(x2[o, j], a, b, z2[o, j], mode)


def normalize(x3, z3, mode, coef, y3, stream):
    """``y3 = act(x3 * coef[0, c] + coef[1, c] [+ z3])`` with the kernel of ``x3``'s layout
    family (``z3`` is ``x3``, unread, without a residual)."""
    if x3.size == 0:
        return
    strided, grid, block = elementwise(*x3.shape)
    if strided:
        _arrays.launch(act_rows, grid, block, stream, x3, z3, mode, coef, y3)
    else:
        _arrays.launch(act_columns, grid, block, stream, columns(x3), columns(z3), x3.shape[2], mode, coef, columns(y3))


@_arrays.one_call
def forward_train(x3, z3, mode, weight, bias, running_mean, running_var, momentum, eps, y3, save, stream):
    """Driver, training: batch statistics, EMA update, then the activated normalize."""
    num_channels = x3.shape[1]
    coef = _arrays.scratch("coef", (2, num_channels), coef_dtype(x3.dtype), stream)
    part, q = partials(x3, stream)
    args = (part, q, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    _arrays.launch(finish_channels, *per_channel_blocks(num_channels), stream, *args)
    normalize(x3, z3, mode, coef, y3, stream)


@_arrays.one_call
def forward_with_stats(x3, z3, mode, stats, weight, bias, running_mean, running_var, momentum, eps, y3, save, stream):
    """Driver, training with statistics merged elsewhere (as
    :func:`numbabn.cuda.forward.forward_with_stats`), then the activated normalize."""
    num_channels = x3.shape[1]
    step = stats.strides[1] * num_channels
    part = _arrays.strided(stats, (3, 1, num_channels), (step, step, stats.strides[1]))
    coef = _arrays.scratch("coef", (2, num_channels), coef_dtype(x3.dtype), stream)
    args = (part, 1, weight, bias, running_mean, running_var, momentum, eps, coef, save)
    _arrays.launch(finish_channels, *per_channel_blocks(num_channels), stream, *args)
    normalize(x3, z3, mode, coef, y3, stream)


@_arrays.one_call
def forward_eval(x3, z3, mode, weight, bias, mean, var, eps, y3, save, stream):
    """Driver, eval: the running statistics' coefficients, then the activated normalize."""
    num_channels = x3.shape[1]
    coef = _arrays.scratch("coef", (2, num_channels), coef_dtype(x3.dtype), stream)
    grid, block = launch_1d(num_channels)
    _arrays.launch(eval_channels, grid, block, stream, weight, bias, mean, var, eps, coef, save)
    normalize(x3, z3, mode, coef, y3, stream)


@_arrays.one_call
def relu_grad(g3, y3, out3, stream):
    """Driver: ``out = 0 where y <= 0, else g`` (a NaN ``y`` passes ``g``, as in PyTorch);
    the kernels' coefficients are unread."""
    normalize(g3, y3, GRAD, _arrays.scratch("coef", (2, g3.shape[1]), "f8", stream), out3, stream)


_launch.cache_on_disk(act_rows, act_columns)

#: The stages the GPU backend runs, named as their host twins (``cpu/activation.py``).
DRIVERS = ("forward_train", "forward_eval", "forward_with_stats", "relu_grad")
