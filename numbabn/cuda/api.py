"""The GPU backend: checked calls (:mod:`numbabn._call`) on GPU arrays.  A zero-copy
``(outer, C, inner)`` view, the kernels launched on the caller's stream (nothing
synchronizes the host), results handed back as the caller's kind of array."""

from typing import ClassVar

import numpy as np

from .. import _checks
from .._backend import PartBackend
from .._device import is_device
from .._math import save_rows
from .._memo import bounded_put
from ..stats import payload as _payload
from . import _arrays, _launch
from . import activation as _act
from . import backward as _bwd
from . import forward as _fwd
from . import masked as _masked
from . import stats as _stats
from ._plan import coef_dtype, launch_1d

#: float16 is a storage format here: statistics accumulate in float64, elementwise passes
#: compute in float32 (``_plan.coef_dtype``).
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: Where this backend's arrays live (``BatchNorm.device``'s spelling).
DEVICE = "cuda"
#: Masked statistics run here (``numbabn._mask``): the mask a GPU or NumPy bool array
#: (:func:`mask_of`).
MASKS = True


#: The dtypes of per-channel arrays, by (input dtype, whether saved statistics): the input's,
#: float32 too for float16 inputs (as cuDNN takes them), float64 too for saved statistics.
_PER_CHANNEL_DTYPES = {
    (d, save): (d,) + ((np.dtype(np.float32),) if d.itemsize == 2 else ()) + ((np.dtype(np.float64),) if save else ())
    for d in DTYPES
    for save in (False, True)
}


class Input:
    """A checked GPU input: the caller's array, its numba view, dtype, axis, memory order,
    ``(outer, C, inner)`` view and stream, and the per-channel and like-input checks of its
    call.  The layout checks depend on the shape, strides, dtype and axis alone: made once per
    such signature (small calls spend their time in Python)."""

    __slots__ = ("original", "x", "axis", "num_channels", "dtype", "shape", "stream", "order", "view_shape")
    #: The backend that runs this input's calls, this module: bound by :mod:`numbabn._call`,
    #: which loads every backend.
    backend: ClassVar[PartBackend]

    def __init__(self, input, axis, stream, name="input"):
        self.original = input
        self.x = x = _arrays.as_numba(input)
        key = (x.shape, x.strides, x.dtype, axis)
        layout = _LAYOUTS.get(key) if type(axis) is int else None
        if layout is None:
            layout = bounded_put(_LAYOUTS, key, _layout_of(x, axis, name))
        self.axis, self.order, self.view_shape = layout
        self.num_channels = x.shape[self.axis]
        self.dtype = x.dtype
        self.shape = x.shape
        self.stream = _arrays.stream_of(stream, input)

    def per_channel(self, a, name, *, writable=False, save=False):
        """A per-channel GPU array: shape (C,), the input's dtype (float16 inputs also take
        float32 ones, as cuDNN does; saved statistics may be float64), contiguous."""
        if a is None:
            return None
        if (
            getattr(a, "__cuda_ndarray__", False) is True
            and (a.dtype is self.dtype or (save and a.dtype is _F64))
            and a.shape == (self.num_channels,)
            and a.strides == (a.dtype.itemsize,)
        ):
            return a  # fast path: a numba array that passes every check below
        a = _device_array(a, name)
        _checks.check_channels(a, self.num_channels, _PER_CHANNEL_DTYPES[self.dtype, save], name)
        if a.strides[0] != a.dtype.itemsize and self.num_channels > 1:
            raise ValueError(f"{name} must be contiguous on the GPU, got stride {a.strides[0]} bytes")
        return a

    def like_input(self, a, name, *, writable=False):
        """``a`` (a GPU array of the input's shape and dtype) with the input's memory order."""
        x = self.x
        if (
            getattr(a, "__cuda_ndarray__", False) is True
            and a.dtype is x.dtype
            and a.shape == x.shape
            and a.strides == x.strides
        ):
            return a  # fast path: the input's own layout
        a = _checks.check_like(x, _device_array(a, name), name)
        order = _arrays.dense_order(a)
        if order is None or _significant(order, a.shape) != _significant(self.order, a.shape):
            raise ValueError(
                f"{name} must have the same memory layout as input on the GPU (strides {x.strides}), "
                f"got strides {a.strides}"
            )
        return a

    def view(self, a):
        """The C-contiguous ``(outer, C, inner)`` view of ``a`` (dense, the input's layout)."""
        shape, strides = self.view_shape
        if _launch.FAST:
            return _launch.Dev(_launch.pointer(a), shape, strides, self.dtype)
        return _arrays.strided(a, shape, strides)

    def new_like_input(self):
        return _arrays.empty_like(self.x, self.order, self.stream)

    def constant(self, fill):
        """The default weight (``fill=1``) or bias (``0``): float32 for float16 inputs."""
        return _arrays.constant(fill, self.num_channels, "f4" if self.dtype.itemsize == 2 else self.dtype.str)

    def hand_back(self, a):
        return _arrays.like(a, self.original)


def forward(call):
    """``(output, save_mean, save_invstd)`` of a checked :class:`numbabn._call.ForwardCall`."""
    inp, out = call.inp, call.out
    dest = inp.new_like_input() if out is None else _arrays.as_numba(out)
    x3, y3 = inp.view(inp.x), inp.view(dest)
    w = inp.constant(1.0) if call.weight is None else call.weight
    b = inp.constant(0.0) if call.bias is None else call.bias
    running_mean, running_var = call.running_mean, call.running_var
    st = inp.stream
    y = out if out is not None else inp.hand_back(dest)
    if call.training and inp.x.size == 0:
        save = _arrays.to_device(np.full((2, inp.num_channels), np.nan), st)
    elif call.training and call.kept == 0:
        # A mask that keeps nothing: an empty batch, as on the host (NaN for every value and
        # statistic, running statistics untouched): x * NaN + NaN.
        save = _arrays.to_device(np.full_like(save_rows(call.limits, inp.num_channels, call.m2), np.nan), st)
        nan = _arrays.to_device(np.full((2, inp.num_channels), np.nan, coef_dtype(inp.dtype)), st)
        _fwd.normalize(x3, nan, y3, st)
    else:
        # A call that is not saved writes its mean and invstd where nothing reads them.
        if call.limits is not None or call.m2:
            save = _arrays.to_device(save_rows(call.limits, inp.num_channels, call.m2), st)
        elif call.saved:
            save = _arrays.empty((2, inp.num_channels), "f8", st)
        else:
            save = _arrays.sink(2, inp.num_channels)
        # The activated drivers take the residual's view (x3, unread, without one) and mode.
        fwd, act = (_act, (_residual(call, x3), call.act)) if call.act else (_fwd, ())
        if call.training:
            rm = _arrays.constant(0.0, 0, inp.dtype) if running_mean is None else running_mean
            rv = _arrays.constant(0.0, 0, inp.dtype) if running_var is None else running_var
            if call.mask is None:
                fwd.forward_train(x3, *act, w, b, rm, rv, call.momentum, call.eps, y3, save, st)
            elif not call.act:
                _masked.forward_train_masked(x3, call.mask, w, b, rm, rv, call.momentum, call.eps, y3, save, st)
            else:  # the kept values' statistics, then the activated finish and normalize
                stats = _arrays.empty((3, inp.num_channels), "f8", st)
                _masked.welford_masked(x3, call.mask, stats, st)
                _act.forward_with_stats(x3, *act, stats, w, b, rm, rv, call.momentum, call.eps, y3, save, st)
        else:
            fwd.forward_eval(x3, *act, w, b, running_mean, running_var, call.eps, y3, save, st)
        if not call.saved:
            _extra(call, save, st)
            return y, None, None
    _extra(call, save, st)
    mean, invstd = _arrays.rows(save)[:2]
    return y, inp.hand_back(mean), inp.hand_back(invstd)


def _residual(call, x3):
    """The kernels' view of the call's residual, or ``x3`` (never read) without one."""
    return x3 if call.residual is None else call.inp.view(call.residual)


def relu_grad(inp, grad_output, output):
    """``grad_output`` where ``output > 0``, else 0 (a NaN output passes it): a new array of
    the input's kind."""
    dest = inp.new_like_input()
    if inp.x.size:
        _act.relu_grad(inp.view(grad_output), inp.view(output), inp.view(dest), inp.stream)
    return inp.hand_back(dest)


def _extra(call, save, stream):
    """The rows of ``save`` past the mean and invstd (``_math.save_rows``) to ``call.extra``,
    on the host."""
    if save.shape[0] > 2:
        call.extra = _arrays.to_host(save, stream)[2:]


def backward(call):
    """``(grad_input, grad_weight, grad_bias, abs_grad_sum)`` of a checked
    :class:`numbabn._call.BackwardCall`; the last is the per-channel ``sum |grad_output|``
    (float64)."""
    if call.mask is not None:
        return _masked_backward(call)
    inp, out = call.inp, call.out
    dest = inp.new_like_input() if out is None else _arrays.as_numba(out)
    st = inp.stream
    mean, invstd = _as_f64(call.save_mean, st), _as_f64(call.save_invstd, st)
    w = inp.constant(1.0) if call.weight is None else call.weight
    gdtype = np.float32 if inp.dtype.itemsize == 2 else inp.dtype
    gi = out if out is not None else inp.hand_back(dest)
    if inp.x.size == 0:
        return (gi, *(inp.hand_back(a) for a in _empty_grads(inp.num_channels, invstd, gdtype, st)))
    # The float64 gradients go where nothing reads them when the caller discards abs_grad_sum.
    grads = _arrays.empty((3, inp.num_channels), "f8", st) if call.abs_sum else _arrays.sink(3, inp.num_channels)
    gwb = _arrays.empty((2, inp.num_channels), gdtype, st)
    g3, x3, gi3 = inp.view(call.grad_output), inp.view(inp.x), inp.view(dest)
    _bwd.backward(g3, x3, w, mean, invstd, call.training, gi3, grads, gwb, st)
    gw, gb = _arrays.rows(gwb)
    abs_sum = inp.hand_back(_arrays.row(grads, 2)) if call.abs_sum else None
    return gi, inp.hand_back(gw), inp.hand_back(gb), abs_sum


def _masked_backward(call, sums=None, n=None):
    """The backward of a masked training forward: the reduction over every value (as the
    plain backward's), the coefficients over the kept count, the masked elementwise pass
    (``masked.backward_masked``); ``sums`` and ``n``: the reduction (a host (3, C) float64
    array) and the kept count made elsewhere (SyncBatchNorm's parts, added), whose
    gradients are the global batch's (``abs_grad_sum`` too), as :func:`backward_with_sums`
    returns them."""
    inp, out = call.inp, call.out
    st, num_channels = inp.stream, inp.num_channels
    dest = inp.new_like_input() if out is None else _arrays.as_numba(out)
    gi = out if out is not None else inp.hand_back(dest)
    gdtype = np.float32 if inp.dtype.itemsize == 2 else inp.dtype
    mean, invstd = _as_f64(call.save_mean, st), _as_f64(call.save_invstd, st)
    given = sums is not None
    if (num_channels if given else inp.x.size) == 0:
        return (gi, *(inp.hand_back(a) for a in _empty_grads(num_channels, invstd, gdtype, st)))
    g3, x3, gi3 = inp.view(call.grad_output), inp.view(inp.x), inp.view(dest)
    if given:
        sums = _arrays.to_device(np.asarray(sums, dtype=np.float64), st)
    else:
        sums, n = _arrays.empty((3, num_channels), "f8", st), call.kept
        _bwd.grad_reduce(g3, x3, mean, sums, st)
    abs_sum = call.abs_sum or given
    # The float64 gradients go where nothing reads them when the caller discards abs_grad_sum.
    grads = _arrays.empty((3, num_channels), "f8", st) if abs_sum else _arrays.sink(3, num_channels)
    gwb = _arrays.empty((2, num_channels), gdtype, st)
    w = inp.constant(1.0) if call.weight is None else call.weight
    _masked.backward_masked(g3, x3, call.mask, w, mean, invstd, sums, float(n), gi3, grads, gwb, st)
    gw, gb = _arrays.rows(gwb)
    return gi, inp.hand_back(gw), inp.hand_back(gb), inp.hand_back(_arrays.row(grads, 2)) if abs_sum else None


def mask_of(mask, inp, use=True):
    """A mask of the right dtype and shape (``numbabn._mask.check``; a numba view of a GPU
    array, or a NumPy array) as the kernels read it beside the checked GPU input ``inp``: a
    2-D ``(outer, inner)`` numba bool array, and its True count.

    A GPU mask must be dense with the input's memory order (as ``grad_output`` and ``out``;
    axes of length 1 aside) and is viewed without a copy; its True count is made on the
    device and copied to the host, which waits for the input's stream.  A NumPy mask (any
    memory order) is copied to the device on the input's stream, in the input's memory
    order, and counted on the host: no wait.  ``use`` False (eval) checks and returns
    ``(None, None)``."""
    (outer, _, inner), _ = inp.view_shape
    if isinstance(mask, np.ndarray):
        if not use:
            return None, None
        # The input's memory order (its feature axis of length 1 here) as a C-ordered copy.
        host = np.ascontiguousarray(np.transpose(mask, inp.order)).reshape(outer, inner)
        return _arrays.to_device(host, inp.stream), int(np.count_nonzero(host))
    want = [a for a in _significant(inp.order, inp.shape) if a != inp.axis]
    order = _arrays.dense_order(mask)
    if order is None or _significant(order, mask.shape) != want:
        raise ValueError(
            f"mask must be a dense GPU array with the input's memory layout (input strides {inp.x.strides}), "
            f"got strides {mask.strides}; copy it to that layout, or pass a NumPy mask (copied to the device)"
        )
    if not use:
        return None, None
    if outer * inner == 0:  # no values: nothing reads it
        return _arrays.empty((outer, inner), np.bool_, inp.stream), 0
    mk = _arrays.numba_view(mask, (outer, inner), (inner * mask.dtype.itemsize, mask.dtype.itemsize))
    return mk, _masked.kept(mk, inp.stream)


def _empty_grads(num_channels, invstd, gdtype, stream):
    """``(grad_weight, grad_bias, sum |g|)`` of an input with no elements, as the CPU gives
    them: sums over nothing are 0, so ``grad_weight = 0 * invstd`` (NaN where an empty
    batch's statistics are NaN).  No kernel reads an empty array."""
    gb = _arrays.to_device(np.zeros(num_channels, gdtype), stream)
    gw = _cast(invstd, gdtype, stream, 0.0) if num_channels else _arrays.to_device(np.zeros(0, gdtype), stream)
    return gw, gb, _arrays.to_device(np.zeros(num_channels), stream)


def batch_stats(inp):
    """``(count, mean, m2)`` of a checked :class:`Input`, mean and m2 float64 arrays of the
    input's kind."""
    if inp.x.size == 0:  # count 0 and zeros: the identity of merge_stats
        stats = _arrays.to_device(np.zeros((3, inp.num_channels)), inp.stream)
    else:
        stats = _arrays.empty((3, inp.num_channels), "f8", inp.stream)
        _stats.welford(inp.view(inp.x), stats, inp.stream)
    count = _checks.values_per_channel(inp.shape, inp.axis)
    _, mean, m2 = _arrays.rows(stats)
    return count, inp.hand_back(mean), inp.hand_back(m2)


def merge(parts, stream):
    """Chan's merge of ``(count, mean, m2)`` parts whose arrays are on the GPU, left to right,
    on the device: ``(count, mean, m2)`` as the first part's kind of array."""
    first = parts[0][1]
    st = _arrays.stream_of(stream, first)
    views = []
    for i, (count, mean, m2) in enumerate(parts):
        mean, m2 = _device_array(mean, f"stats[{i}].mean"), _device_array(m2, f"stats[{i}].m2")
        if mean.dtype != np.float64 or m2.dtype != np.float64:
            raise TypeError(f"stats[{i}].mean and .m2 must be float64 on the GPU, got {mean.dtype} and {m2.dtype}")
        views.append((count, mean, m2))
    count, mean, m2 = views[0][0], _cast(views[0][1], np.float64, st), _cast(views[0][2], np.float64, st)
    grid, block = launch_1d(mean.shape[0])
    for c, mb, m2b in views[1:]:
        _arrays.launch(_stats.merge_channels, grid, block, st, float(count), mean, m2, float(c), mb, m2b)
        count += c
    return count, _arrays.like(mean, first), _arrays.like(m2, first)


# -- stages for statistics merged elsewhere (SyncBatchNorm's processes) ------------------------
# The twins of the host backend's: the payloads between the stages are host float64 arrays
# (an exchange goes through the host), the data stays on the GPU and the kernels run on the
# caller's stream.


def part_stats(inp, mask=None, kept=None):
    """:func:`welford` copied to the host on the input's stream, as SyncBatchNorm sends it:
    one float64 NumPy array ``[count, mean[0..C), m2[0..C)]`` (:meth:`numbabn.Stats.to_array`);
    of the values a checked ``mask`` keeps, when given (the count then ``kept``, its True
    count)."""
    count = _checks.values_per_channel(inp.shape, inp.axis) if mask is None else kept
    if inp.x.size == 0:
        return _payload(count, np.zeros((3, inp.num_channels)))
    stats = _arrays.empty((3, inp.num_channels), "f8", inp.stream)
    if mask is None:
        _stats.welford(inp.view(inp.x), stats, inp.stream)
    else:
        _masked.welford_masked(inp.view(inp.x), mask, stats, inp.stream)
    return _payload(count, _arrays.to_host(stats, inp.stream))


def forward_with_stats(call, stats):
    """A checked training forward normalized with statistics merged elsewhere (a host
    (3, C) float64 array, rows count, mean and M2 of the global batch): ``(output, save_mean,
    save_invstd)`` as the input's kind of array, the running statistics updated on the device
    as :func:`forward` would on an input with those statistics (the unbiased variance from
    ``count``).  The statistics are copied to the device and finished there by the kernel of
    :func:`forward` (``_math.finish_channel``): ranks holding the same statistics and running
    statistics compute the same bits."""
    inp, out = call.inp, call.out
    st, num_channels = inp.stream, inp.num_channels
    dest = inp.new_like_input() if out is None else _arrays.as_numba(out)
    save = _arrays.to_device(save_rows(call.limits, num_channels, call.m2), st)
    if num_channels:
        stats = _arrays.to_device(np.ascontiguousarray(stats, dtype=np.float64), st)
        w = inp.constant(1.0) if call.weight is None else call.weight
        b = inp.constant(0.0) if call.bias is None else call.bias
        rm = _arrays.constant(0.0, 0, inp.dtype) if call.running_mean is None else call.running_mean
        rv = _arrays.constant(0.0, 0, inp.dtype) if call.running_var is None else call.running_var
        x3, y3 = inp.view(inp.x), inp.view(dest)
        fwd, act = (_act, (_residual(call, x3), call.act)) if call.act else (_fwd, ())
        fwd.forward_with_stats(x3, *act, stats, w, b, rm, rv, call.momentum, call.eps, y3, save, st)
    y = out if out is not None else inp.hand_back(dest)
    _extra(call, save, st)
    mean, invstd = _arrays.rows(save)[:2]
    return y, inp.hand_back(mean), inp.hand_back(invstd)


def part_sums(call):
    """``(sum g, sum g * (x - mean), sum |g|)`` per channel of a checked
    :class:`numbabn._call.BackwardCall` (``mean`` its ``save_mean``): a (3, C) float64 host
    array, one rank's payload, the same bits for a given shape and data."""
    inp = call.inp
    st = inp.stream
    if inp.x.size == 0:
        return np.zeros((3, inp.num_channels))
    sums = _arrays.empty((3, inp.num_channels), "f8", st)
    mean = _as_f64(call.save_mean, st)
    _bwd.grad_reduce(inp.view(call.grad_output), inp.view(inp.x), mean, sums, st)
    return _arrays.to_host(sums, st)


def backward_with_sums(call, sums, n):
    """A checked backward whose reduction ``sums`` (:func:`part_sums`, added over every
    part; a host (3, C) float64 array) cover ``n`` values per channel: ``(grad_input,
    grad_weight, grad_bias, abs_grad_sum)`` as :func:`backward` returns them, the last three
    the global batch's."""
    if call.mask is not None:
        return _masked_backward(call, sums, n)
    inp, out = call.inp, call.out
    st, num_channels = inp.stream, inp.num_channels
    dest = inp.new_like_input() if out is None else _arrays.as_numba(out)
    gi = out if out is not None else inp.hand_back(dest)
    gdtype = np.float32 if inp.dtype.itemsize == 2 else inp.dtype
    mean, invstd = _as_f64(call.save_mean, st), _as_f64(call.save_invstd, st)
    if num_channels == 0:
        return (gi, *(inp.hand_back(a) for a in _empty_grads(0, invstd, gdtype, st)))
    sums = _arrays.to_device(np.asarray(sums, dtype=np.float64), st)
    grads = _arrays.empty((3, num_channels), "f8", st)
    gwb = _arrays.empty((2, num_channels), gdtype, st)
    w = inp.constant(1.0) if call.weight is None else call.weight
    g3, x3, gi3 = inp.view(call.grad_output), inp.view(inp.x), inp.view(dest)
    _bwd.backward_with_sums(g3, x3, w, mean, invstd, call.training, sums, float(n), gi3, grads, gwb, st)
    gw, gb = _arrays.rows(gwb)
    return gi, inp.hand_back(gw), inp.hand_back(gb), inp.hand_back(_arrays.row(grads, 2))


_LAYOUTS = {}  # (shape, strides, dtype, axis) of a checked input -> (axis, order, view geometry)
_F64 = np.dtype(np.float64)


def _layout_of(x, axis, name):
    """Check a GPU input's dtype, ndim, axis and density: ``(axis, memory order, (shape,
    strides) of its (outer, C, inner) view)``."""
    _checks.check_input(x, name, DTYPES)
    axis = _checks.norm_axis(axis, x.ndim)
    order = _arrays.dense_order(x)
    if order is None:
        raise ValueError(
            f"{name} must be a dense GPU array (C-, F-contiguous or a permutation such as channels-last), "
            f"got strides {x.strides} for shape {x.shape}; copy it first (e.g. .copy() or .contiguous())"
        )
    return axis, order, _arrays.view_geometry(x.shape, axis, order, x.dtype.itemsize)


def _significant(order, shape):
    # Axes of length 1 may carry any stride (PyTorch gives them arbitrary ones): only the
    # order of the others is the memory layout.
    return [i for i in order if shape[i] != 1]


def _device_array(a, name):
    if not is_device(a):
        raise TypeError(
            f"{name} is a host array ({type(a).__name__}) but input is a GPU array: "
            "host and device arrays are not mixed; move one of them"
        )
    return _arrays.as_numba(a)


def _as_f64(a, stream):
    return a if a.dtype == np.float64 else _cast(a, np.float64, stream)


def _cast(a, dtype, stream, factor=1.0):
    out = _arrays.empty(a.shape, dtype, stream)
    grid, block = launch_1d(a.shape[0])
    _arrays.launch(_stats.copy_cast, grid, block, stream, a, factor, out)
    return out


def scaled(a, factor, stream=None):
    """``a * factor`` (float64) for a GPU array ``a`` of shape (C,), as ``a``'s kind of array."""
    d = _arrays.as_numba(a)
    return _arrays.like(_cast(d, np.float64, _arrays.stream_of(stream, a), factor), a)
