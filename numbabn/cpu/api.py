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
    g = call.grad_output
    if not _layout.same_view(g, x):  # g in x's memory order: one copy, of g only
        g = np.ascontiguousarray(g) if x.flags.c_contiguous else np.asfortranarray(g)
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


def welford(inp):
    """``(count, mean, m2)`` of a checked :class:`Input`, mean and m2 float64 ``(C,)``."""
    x = _layout.contiguous(inp.x)
    stats = np.empty((3, inp.num_channels))
    _stats.welford(x.size >= PARALLEL_MIN, _layout.view3(x, inp.axis), stats)
    return _layout.values_per_channel(inp.shape, inp.axis), stats[1], stats[2]


def scaled(a, factor):
    """``a * factor`` as float64."""
    return np.asarray(a, dtype=np.float64) * factor


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
