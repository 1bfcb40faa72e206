"""The host backend: checked calls (:mod:`numbabn._call`) on NumPy arrays, run by the
compiled drivers of :mod:`numbabn.cpu`.

Arrays are viewed as ``(outer, C, inner)`` without a copy where their memory order allows
(a non-contiguous input is copied once); nothing is written, running statistics included,
before the drivers run, and every argument was checked before this module sees it.
"""

import functools
import sys

import numpy as np

from .. import _layout
from .._config import PARALLEL_MIN
from .._device import host_stream
from . import backward as _bwd
from . import forward as _fwd
from . import stats as _stats

#: Where this backend's arrays live (``BatchNorm.device``'s spelling).
DEVICE = "cpu"


class Input:
    """A checked host input: a floating ndarray with ``ndim >= 2``, its feature axis
    (non-negative) and the per-channel and like-input checks of its call."""

    __slots__ = ("x", "axis", "num_channels", "dtype", "shape")

    def __init__(self, x, axis, stream, name="input"):
        host_stream(stream)
        x = _layout.as_input(x, name)
        self.axis = _layout.norm_axis(axis, x.ndim)
        self.x = x
        self.shape = x.shape
        self.num_channels = x.shape[self.axis]
        self.dtype = x.dtype

    def per_channel(self, a, name, *, writable=False, save=False):
        """A per-channel NumPy array of shape ``(C,)`` and the input's dtype (``save``:
        float64 too), writable when updated in place; ``None`` passes through."""
        return _layout.per_channel(a, self.num_channels, self.dtype, name, writable=writable, allow_f64=save)

    def like_input(self, a, name, *, writable=False):
        """A NumPy array of the input's shape and dtype (writable when it receives results)."""
        return _layout.same_kind(self.x, a, name, writable=writable)


def forward(call):
    """``(output, save_mean, save_invstd)`` of a checked :class:`numbabn._call.ForwardCall`."""
    inp = call.inp
    x = _layout.contiguous(inp.x)
    dtype, num_channels = inp.dtype, inp.num_channels
    dest = _layout.output_for(x, call.out)
    x3, y3 = _layout.view3(x, inp.axis, dest)
    w = per_channel_array(call.weight, 1.0, num_channels, dtype)
    b = per_channel_array(call.bias, 0.0, num_channels, dtype)
    save = np.empty((2, num_channels))
    parallel = x.size >= PARALLEL_MIN
    if call.training and x.size == 0:
        # An empty batch, as in PyTorch: an empty output, running statistics untouched.
        save[...] = np.nan
    elif call.training:
        rm = _buffer(call.running_mean, dtype)
        rv = _buffer(call.running_var, dtype)
        _fwd.forward_train(parallel, x3, w, b, rm, rv, call.momentum, call.eps, y3, save)
        _write_back(call.running_mean, rm)
        _write_back(call.running_var, rv)
    else:
        mean, var = _buffer(call.running_mean, dtype), _buffer(call.running_var, dtype)
        _fwd.forward_eval(parallel, x3, w, b, mean, var, call.eps, y3, save)
    return deliver(dest, call.out), save[0], save[1]


def backward(call):
    """``(grad_input, grad_weight, grad_bias, abs_grad_sum)`` of a checked
    :class:`numbabn._call.BackwardCall`; the last is the per-channel ``sum |grad_output|``
    (float64) that the reduction pass accumulates beside ``grad_bias``."""
    inp = call.inp
    dtype, num_channels = inp.dtype, inp.num_channels
    x = _layout.contiguous(inp.x)
    g = _same_order(call.grad_output, x)
    grad_input = _layout.output_for(x, call.out, g)
    grads = np.empty((3, num_channels))
    g3, x3, gi3 = _layout.view3(g, inp.axis, x, grad_input)
    _bwd.backward(
        x.size >= PARALLEL_MIN,
        g3,
        x3,
        per_channel_array(call.weight, 1.0, num_channels, dtype),
        np.ascontiguousarray(call.save_mean, dtype=np.float64),
        np.ascontiguousarray(call.save_invstd, dtype=np.float64),
        call.training,
        gi3,
        grads,
    )
    return deliver(grad_input, call.out), grads[0].astype(dtype), grads[1].astype(dtype), grads[2]


def batch_stats(inp):
    """``(count, mean, m2)`` of a checked :class:`Input`, mean and m2 float64 ``(C,)``."""
    x = _layout.contiguous(inp.x)
    stats = np.empty((3, inp.num_channels))
    _stats.welford(x.size >= PARALLEL_MIN, _layout.view3(x, inp.axis), stats)
    return _layout.values_per_channel(inp.shape, inp.axis), stats[1], stats[2]


def scaled(a, factor):
    """``a * factor`` as float64."""
    return np.asarray(a, dtype=np.float64) * factor


# -- stages for statistics merged elsewhere (Dask chunks, SyncBatchNorm's processes) --------
# A training forward is welford -> merge -> finish -> apply; a backward is grad_reduce ->
# sum -> grad_coefs -> grad_apply.  ``parallel=None`` picks the kernels by size, as the
# whole-array drivers do; Dask's tasks pass False (Dask supplies the parallelism).


def finish(count, mean, m2, weight, bias, running_mean, running_var, momentum, eps, dtype):
    """Merged statistics ``(count, mean, m2)`` of every channel to the fold coefficients
    ``coef`` (2, C) of :func:`apply` and the saved ``(mean, invstd)`` (2, C), both float64,
    with the EMA update of ``running_mean`` and ``running_var`` (in place, when given) that a
    training forward on those statistics makes."""
    num_channels = mean.shape[0]
    stats = np.empty((3, num_channels))
    stats[0] = count
    stats[1] = mean
    stats[2] = m2
    rm, rv = _buffer(running_mean, dtype), _buffer(running_var, dtype)
    coef, save = np.empty((2, num_channels)), np.empty((2, num_channels))
    w = per_channel_array(weight, 1.0, num_channels, dtype)
    b = per_channel_array(bias, 0.0, num_channels, dtype)
    _fwd.finish_channels(stats, w, b, rm, rv, momentum, eps, coef, save)
    _write_back(running_mean, rm)
    _write_back(running_var, rv)
    return coef, save


def eval_coef(mean, var, weight, bias, eps, dtype):
    """The fold coefficients (2, C) and saved ``(mean, invstd)`` (2, C) of normalizing with
    the given (running) ``mean`` and ``var``, as an eval forward computes them."""
    # var is m2 / count with count = 1; without running buffers finish makes no EMA step.
    return finish(1.0, mean, var, weight, bias, None, None, 0.0, eps, dtype)


def apply(x, axis, coef, out=None, parallel=None):
    """``y = x * coef[0] + coef[1]`` per channel for a host array ``x`` (into ``out`` when
    given, of ``x``'s shape and dtype)."""
    x = _layout.contiguous(x)
    dest = _layout.output_for(x, out)
    x3, y3 = _layout.view3(x, axis, dest)
    _fwd.apply(_parallel(parallel, x), x3, coef, y3)
    return deliver(dest, out)


def grad_reduce(g, x, axis, mean, parallel=None):
    """``(sum g, sum g * (x - mean), sum |g|)`` per channel, (3, C) float64, of host arrays
    ``g`` and ``x`` of one shape (``mean`` float64)."""
    x = _layout.contiguous(x)
    g = _same_order(g, x)
    sums = np.empty((3, x.shape[axis]))
    g3, x3 = _layout.view3(g, axis, x)
    _bwd.grad_reduce(_parallel(parallel, x), g3, x3, np.ascontiguousarray(mean, dtype=np.float64), sums)
    return sums


def grad_coefs(sums, n, weight, mean, invstd, training, dtype):
    """From the summed :func:`grad_reduce` of ``n`` values per channel: the coefficients
    (3, C) of :func:`grad_apply` and ``(grad_weight, grad_bias, sum |g|)`` (3, C), float64."""
    num_channels = sums.shape[1]
    coef, grads = np.empty((3, num_channels)), np.empty((3, num_channels))
    w = per_channel_array(weight, 1.0, num_channels, dtype)
    mean = np.ascontiguousarray(mean, dtype=np.float64)
    invstd = np.ascontiguousarray(invstd, dtype=np.float64)
    _bwd.grad_coefs(np.ascontiguousarray(sums), float(n), w, mean, invstd, bool(training), coef, grads)
    return coef, grads


def grad_apply(g, x, axis, coef, out=None, parallel=None):
    """``grad_input = g * coef[0] + x * coef[1] + coef[2]`` per channel (into ``out`` when
    given)."""
    x = _layout.contiguous(x)
    g = _same_order(g, x)
    dest = _layout.output_for(x, out, g)
    g3, x3, gi3 = _layout.view3(g, axis, x, dest)
    _bwd.grad_apply(_parallel(parallel, x), g3, x3, coef, gi3)
    return deliver(dest, out)


def forward_with_stats(call, count, mean, m2):
    """A checked training forward normalized with statistics merged elsewhere (the global
    batch's): ``(output, save_mean, save_invstd)``; running statistics updated as
    :func:`forward` would on an input with those statistics."""
    inp = call.inp
    coef, save = finish(
        count, mean, m2, call.weight, call.bias, call.running_mean, call.running_var, call.momentum, call.eps, inp.dtype
    )
    return apply(inp.x, inp.axis, coef, call.out), save[0], save[1]


def backward_with_sums(call, sums, n):
    """A checked backward whose reduction ``sums`` (:func:`grad_reduce`, summed over every
    part) cover ``n`` values per channel: ``(grad_input, grad_weight, grad_bias,
    abs_grad_sum)``."""
    inp = call.inp
    coef, grads = grad_coefs(sums, n, call.weight, call.save_mean, call.save_invstd, call.training, inp.dtype)
    gi = grad_apply(call.grad_output, inp.x, inp.axis, coef, call.out)
    return gi, grads[0].astype(inp.dtype), grads[1].astype(inp.dtype), grads[2]


def _parallel(parallel, x):
    return x.size >= PARALLEL_MIN if parallel is None else parallel


def _same_order(g, x):
    """``g`` in ``x``'s memory order (one copy of ``g`` when it is not)."""
    if _layout.same_view(g, x):
        return g
    return np.ascontiguousarray(g) if x.flags.c_contiguous else np.asfortranarray(g)


def deliver(result, out):
    """``out`` holding ``result`` when ``out`` is given (copied when the kernels could not
    write it directly, see ``_layout.output_for``), else ``result``."""
    if out is None or result is out:
        return result
    out[...] = result
    return out


def per_channel_array(a, fill, num_channels, dtype):
    """``a`` as a contiguous array, or the constant ``fill`` when ``a`` is None."""
    if a is None:
        return _constant(fill, num_channels, dtype)
    return np.ascontiguousarray(a)


def _constant(fill, num_channels, dtype):
    if num_channels > 1 << 16:  # not worth keeping alive
        return np.full(num_channels, fill, dtype=dtype)
    return _small_constant(fill, num_channels, dtype)


@functools.lru_cache(maxsize=64)
def _small_constant(fill, num_channels, dtype):
    # The default weight (ones) and bias (zeros), made once per (C, dtype) and only read by
    # the kernels.  Not flagged read-only: numba would compile a second specialization.
    return np.full(num_channels, fill, dtype=dtype)


def _buffer(a, dtype):
    # Kernels take contiguous per-channel arrays; a strided one goes through a copy (which
    # _write_back copies back when the kernel updated it).
    if a is None:
        return np.empty(0, dtype=dtype)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _write_back(a, buf):
    if a is not None and a is not buf:
        a[...] = buf


Input.backend = sys.modules[__name__]
