"""The host backend: checked calls (:mod:`numbabn._call`) on NumPy arrays, run by the
compiled drivers of :mod:`numbabn.cpu`.

Arrays are viewed as ``(outer, C, inner)`` without a copy where their memory order allows
(a non-contiguous input is copied once); nothing is written, running statistics included,
before the drivers run, and every argument was checked before this module sees it.
"""

from collections import namedtuple
from typing import ClassVar

import numpy as np

from .. import _checks, _mask
from .._backend import PartBackend
from .._config import MIN_INNER, PARALLEL_MIN, PARALLEL_MIN_STRIDED, WIDEN_TO
from .._device import host_stream
from .._math import save_rows
from .._memo import bounded_put
from ..stats import payload as _payload
from . import _half, _plan
from . import activation as _act
from . import backward as _bwd
from . import forward as _fwd
from . import ghost as _ghost
from . import masked as _masked
from . import stats as _stats

#: Where this backend's arrays live (``BatchNorm.device``'s spelling).
DEVICE = "cpu"
#: Masked statistics run here (``numbabn._mask``).
MASKS = True

_F64 = np.dtype(np.float64)  # compared with dtypes: ``dtype == np.float64`` converts the type each time


class Input:
    """A checked host input: a floating ndarray with ``ndim >= 2``, its feature axis
    (non-negative) and the per-channel and like-input checks of its call.

    float16 data takes float32 per-channel arrays (``param_dtype``) and reaches the kernels
    as its bits (:mod:`numbabn.cpu._half`).

    ``x`` is C- or F-contiguous (a strided input is copied here, once for the forward and
    backward of a layer's step; ``original`` is the array as given, whose memory the alias
    checks compare), ``layout`` how the kernels see it (:class:`numbabn.cpu._plan.Layout`:
    which kernel family, and :meth:`view`'s shape) and ``parallel`` whether its drivers run
    their parallel twins (:func:`parallel_for`), worked out once: small calls spend their
    time in Python.  ``count`` is the values per channel; ``plain`` says the kernels' view
    is ``x`` itself.  ``facts`` (:class:`Facts`: all of the above but ``x`` and
    ``original``) is set where ``x`` is the ndarray as given: later inputs of the same
    shape, strides, dtype and ``axis`` look them up instead of deriving them (:func:`known`;
    the quick path, :mod:`numbabn.cpu.quick`, takes such inputs only); else None.
    """

    __slots__ = (
        "original",
        "x",
        "axis",
        "c_order",
        "shape",
        "num_channels",
        "count",
        "dtype",
        "param_dtype",
        "half",
        "layout",
        "parallel",
        "plain",
        "facts",
    )
    #: The backend that runs this input's calls, this module: bound by :mod:`numbabn._call`,
    #: which loads every backend.
    backend: ClassVar[PartBackend]

    def __init__(self, x, axis, stream, name="input"):
        if type(x) is np.ndarray and type(axis) is int and stream is None:
            # A contiguous array of a kind checked before: the facts below follow from its
            # shape, strides, dtype and axis alone, so they are looked up, not derived again.
            facts = _KNOWN.get((x.shape, x.strides, x.dtype, axis))
            if facts is not None:
                self.original = self.x = x
                self.facts = facts
                (
                    self.axis,
                    self.c_order,
                    self.shape,
                    self.num_channels,
                    self.count,
                    self.dtype,
                    self.param_dtype,
                    self.half,
                    self.layout,
                    self.parallel,
                    self.plain,
                ) = facts
                return
        if stream is not None:
            host_stream(stream)
        given, given_axis = x, axis
        self.original = x = _checks.as_input(x, name)
        self.axis = axis = _checks.norm_axis(axis, x.ndim)
        flags = x.flags
        c_order = flags.c_contiguous
        # Known: an ndarray used as given, whose facts later calls look up (:mod:`.quick`).
        known = x is given and stream is None
        if not (c_order or flags.f_contiguous):
            x = np.ascontiguousarray(x)
            c_order = True
            known = False
        self.c_order = c_order
        self.x = x
        self.shape = shape = x.shape
        self.num_channels = shape[axis]
        self.count = _checks.values_per_channel(shape, axis)
        self.dtype = x.dtype
        self.param_dtype = _checks.param_dtype(x.dtype)
        self.half = self.param_dtype is not x.dtype  # float16: the kernels take its bits
        self.layout = lay = layout_of(x, axis, c_order)
        self.parallel = parallel_for(x.size, lay.inner)
        self.plain = c_order and lay.view == shape and not self.half  # the kernels' view is x
        self.facts = None
        if known and type(given_axis) is int:
            self.facts = facts = Facts._make(getattr(self, name) for name in Facts._fields)
            bounded_put(_KNOWN, (shape, x.strides, x.dtype, given_axis), facts)

    def per_channel(self, a, name, *, writable=False, save=False):
        """A per-channel NumPy array of shape ``(C,)`` and the input's dtype (``save``:
        float64 too), writable when updated in place; ``None`` passes through."""
        if (
            type(a) is np.ndarray
            and a.shape == (self.num_channels,)
            and (a.dtype == self.param_dtype or (save and a.dtype == _F64))
            and (not writable or a.flags.writeable)
        ):
            return a  # fast path: every check of _checks.per_channel would pass
        if self.param_dtype != self.dtype and getattr(a, "dtype", None) == self.dtype:
            raise TypeError(
                f"{name} must have dtype {self.param_dtype} for {self.dtype} input (float16 data takes float32 "
                f"parameters and running statistics, PyTorch's mixed precision), got {self.dtype}"
            )
        return _checks.per_channel(a, self.num_channels, self.param_dtype, name, writable=writable, allow_f64=save)

    def like_input(self, a, name, *, writable=False):
        """A NumPy array of the input's shape and dtype (writable when it receives results)."""
        if (
            type(a) is np.ndarray
            and a.shape == self.shape
            and a.dtype == self.dtype
            and (not writable or a.flags.writeable)
        ):
            return a  # fast path: every check of _checks.same_kind would pass
        return _checks.same_kind(self.x, a, name, writable=writable)

    def view(self, a):
        """The kernels' view of ``a``, an array of ``x``'s shape and memory order (float16
        data as its bits)."""
        return view(self, a)


#: What a contiguous input's ``(shape, strides, dtype, axis)`` imply: the attributes of
#: :class:`Input` but ``x`` and ``original``.
Facts = namedtuple("Facts", "axis c_order shape num_channels count dtype param_dtype half layout parallel plain")

#: The :class:`Facts` of the contiguous arrays checked before, by ``(shape, strides, dtype,
#: axis)``.
_KNOWN = {}


def known(x, axis):
    """The :class:`Facts` of ``x`` when it is an ndarray of a kind checked before (its shape,
    strides, dtype and the int ``axis``), else None: ``x`` then needs an :class:`Input`."""
    if type(x) is np.ndarray and type(axis) is int:
        return _KNOWN.get((x.shape, x.strides, x.dtype, axis))
    return None


def view(facts, a):
    """The kernels' view of ``a``, an array of the shape and memory order that ``facts`` (an
    :class:`Input` or its :class:`Facts`) describe (float16 data as its bits)."""
    if facts.plain:
        return a
    if facts.half:
        a = a.view(_half.BITS)
    return a.reshape(facts.layout.view) if facts.c_order else a.T.reshape(facts.layout.view)


def forward(call):
    """``(output, save_mean, save_invstd)`` of a checked :class:`numbabn._call.ForwardCall`;
    a training call with a mask takes the statistics of the values it keeps; one with an
    activation or a residual (``call.act``) applies them in its normalize pass."""
    inp = call.inp
    x, dtype = inp.x, inp.param_dtype
    dest = np.empty_like(x) if call.out is None else _checks.output_for(x, call.out, call.residual)
    w, b = _affine(call.weight, call.bias, inp.num_channels, dtype)
    save = save_rows(call.limits, inp.num_channels, call.m2)
    rm, rv = _buffers(call.running_mean, call.running_var, dtype)
    xv, yv = inp.view(x), inp.view(dest)
    if not call.training:
        if call.act:
            _act.forward_eval(
                inp.parallel, inp.layout, xv, _residual(call, xv), call.act, w, b, rm, rv, call.eps, yv, save
            )
        else:
            _fwd.forward_eval(inp.parallel, inp.layout, xv, w, b, rm, rv, call.eps, yv, save)
    elif x.size if call.mask is None else call.kept:
        _train(call, xv, w, b, rm, rv, yv, save)
        if rm is not call.running_mean or rv is not call.running_var:
            _write_back(call.running_mean, rm)
            _write_back(call.running_var, rv)
    else:
        # An empty batch, as in PyTorch (or a mask that keeps nothing): running statistics
        # untouched, no statistics, so NaN for every value there is.
        dest[...] = np.nan
        save[...] = np.nan
    return _forward_result(call, dest, save)


def _train(call, xv, w, b, rm, rv, yv, save):
    """The training forward's kernels: the layout's driver, masked, activated or plain."""
    inp = call.inp
    lay, parallel = inp.layout, inp.parallel
    settings = (w, b, rm, rv, call.momentum, call.eps)
    mk = None if call.mask is None else _mask.view(call.mask, inp.c_order, lay)
    if not call.act:
        if mk is None:
            _fwd.forward_train(parallel, lay, xv, *settings, yv, save)
        else:
            _masked.forward_train_masked(parallel, lay, xv, mk, *settings, yv, save)
        return
    z = _residual(call, xv)
    if mk is None:
        _act.forward_train(parallel, lay, xv, z, call.act, *settings, yv, save)
    else:
        stats = np.empty((3, inp.num_channels))
        _masked.welford_masked(parallel, lay, xv, mk, stats)
        _act.forward_with_stats(parallel, lay, xv, z, call.act, stats, *settings, yv, save)


def _residual(call, xv):
    """The kernels' view of the call's residual, or ``xv`` (never read) without one."""
    if call.residual is None:
        return xv
    inp = call.inp
    return inp.view(_same_order(call.residual, inp.x))


def _forward_result(call, dest, save):
    """What a forward returns: the output (in ``out`` when given), then the saved mean and
    invstd, or None for a call that is not ``saved``; the rows of ``save`` past those go to
    ``call.extra``."""
    if save.shape[0] > 2:
        call.extra = save[2:]
    y = deliver(dest, call.out)
    return (y, save[0], save[1]) if call.saved else (y, None, None)


def backward(call):
    """``(grad_input, grad_weight, grad_bias, abs_grad_sum)`` of a checked
    :class:`numbabn._call.BackwardCall`; the last is the per-channel ``sum |grad_output|``
    (float64) that the reduction pass accumulates beside ``grad_bias``."""
    if call.mask is not None:
        return _masked_backward(call)
    return _backward(call, _bwd.backward)


def _masked_backward(call, sums=None, n=None):
    """The backward of a masked training forward: the reduction over every value (as the
    plain backward's), coefficients over the kept count, and the masked elementwise pass;
    ``sums`` and ``n``: the reduction and the kept count made elsewhere (SyncBatchNorm's
    parts, added)."""
    inp = call.inp
    x, dtype, num_channels = inp.x, inp.param_dtype, inp.num_channels
    g = _same_order(call.grad_output, x)
    grad_input = _checks.output_for(x, call.out, g)
    mean = _saved(call.save_mean)
    gv, xv = inp.view(g), inp.view(x)
    if sums is None:
        sums, n = np.empty((3, num_channels)), call.kept
        _bwd.grad_reduce(inp.parallel, inp.layout, gv, xv, mean, sums)
    grads = np.empty((3, num_channels))
    weight = per_channel_array(call.weight, 1.0, num_channels, dtype)
    mk = _mask.view(call.mask, inp.c_order, inp.layout)
    invstd, giv = _saved(call.save_invstd), inp.view(grad_input)
    _masked.backward_masked(inp.parallel, inp.layout, gv, xv, mk, weight, mean, invstd, sums, float(n), giv, grads)
    affine = grads[:2].astype(dtype)
    return deliver(grad_input, call.out), affine[0], affine[1], grads[2]


def _backward(call, driver, *sums):
    """Run a backward ``driver`` on a checked call; ``sums``: the reduction and its count
    that :func:`numbabn.cpu.backward.backward_with_sums` takes (made elsewhere)."""
    inp = call.inp
    x, dtype, num_channels = inp.x, inp.param_dtype, inp.num_channels
    g = _same_order(call.grad_output, x)
    grad_input = _checks.output_for(x, call.out, g)
    grads = np.empty((3, num_channels))
    driver(
        inp.parallel,
        inp.layout,
        inp.view(g),
        inp.view(x),
        per_channel_array(call.weight, 1.0, num_channels, dtype),
        _saved(call.save_mean),
        _saved(call.save_invstd),
        call.training,
        *sums,
        inp.view(grad_input),
        grads,
    )
    affine = grads[:2].astype(dtype)  # one conversion for both
    return deliver(grad_input, call.out), affine[0], affine[1], grads[2]


def batch_stats(inp):
    """``(count, mean, m2)`` of a checked :class:`Input`, mean and m2 float64 ``(C,)``."""
    stats = _welford(inp)
    return _checks.values_per_channel(inp.shape, inp.axis), stats[1], stats[2]


def _welford(inp):
    """The (3, C) float64 statistics of a checked :class:`Input`, rows count, mean and M2."""
    stats = np.empty((3, inp.num_channels))
    _stats.welford(inp.parallel, inp.layout, inp.view(inp.x), stats)
    return stats


def scaled(a, factor):
    """``a * factor`` as float64."""
    return np.asarray(a, dtype=np.float64) * factor


# -- stages for statistics merged elsewhere (Dask chunks, SyncBatchNorm's processes) --------
# A training forward is welford -> merge -> finish -> apply; a backward is grad_reduce ->
# sum -> grad_coefs -> grad_apply.  ``parallel=None`` picks the kernels by size and layout
# (parallel_for), as the whole-array drivers do; Dask's tasks pass False (Dask supplies the
# parallelism).


def finish(count, mean, m2, weight, bias, running_mean, running_var, momentum, eps, dtype, limits=None, want_m2=False):
    """Merged statistics ``(count, mean, m2)`` of every channel to the fold coefficients
    ``coef`` (2, C) of :func:`apply` and the saved ``(mean, invstd)`` (2, C), both float64,
    with the EMA update of ``running_mean`` and ``running_var`` (in place, when given) that a
    training forward on those statistics makes; ``save`` has the rows of
    :func:`numbabn._math.save_rows` for ``limits`` and ``want_m2``."""
    num_channels = mean.shape[0]
    stats = np.empty((3, num_channels))
    stats[0] = count
    stats[1] = mean
    stats[2] = m2
    rm, rv = _buffers(running_mean, running_var, _checks.param_dtype(dtype))
    coef, save = np.empty((2, num_channels)), save_rows(limits, num_channels, want_m2)
    dtype = _checks.param_dtype(dtype)
    w, b = _affine(weight, bias, num_channels, dtype)
    _fwd.finish_channels(stats, w, b, rm, rv, momentum, eps, coef, save)
    _write_back(running_mean, rm)
    _write_back(running_var, rv)
    return coef, save


def eval_coef(mean, var, weight, bias, eps, dtype):
    """The fold coefficients (2, C) and saved ``(mean, invstd)`` (2, C) of normalizing with
    the given (running) ``mean`` and ``var``, as an eval forward computes them."""
    # var is m2 / count with count = 1; without running buffers finish makes no EMA step.
    return finish(1.0, mean, var, weight, bias, None, None, 0.0, eps, dtype)


def apply(x, axis, coef, out=None, parallel=None, residual=None, mode=0):
    """``y = x * coef[0] + coef[1]`` per channel for a host array ``x`` (into ``out`` when
    given, of ``x``'s shape and dtype); with the activation ``mode``
    (:mod:`numbabn._activation`) ``y = act(x * coef[0] + coef[1] [+ residual])``."""
    x = _checks.contiguous(x)
    dest = _checks.output_for(x, out)
    z = x if residual is None else _same_order(residual, x)
    lay, (xv, zv, yv) = views(x, axis, x, z, dest)
    if mode:
        _act.apply(_parallel(parallel, x, lay), lay, xv, zv, mode, coef, yv)
    else:
        _fwd.apply(_parallel(parallel, x, lay), lay, xv, coef, yv)
    return deliver(dest, out)


def grad_reduce(g, x, axis, mean, parallel=None):
    """``(sum g, sum g * (x - mean), sum |g|)`` per channel, (3, C) float64, of host arrays
    ``g`` and ``x`` of one shape (``mean`` float64)."""
    x = _checks.contiguous(x)
    g = _same_order(g, x)
    sums = np.empty((3, x.shape[axis]))
    lay, (gv, xv) = views(x, axis, g, x)
    _bwd.grad_reduce(_parallel(parallel, x, lay), lay, gv, xv, _saved(mean), sums)
    return sums


def grad_coefs(sums, n, weight, mean, invstd, training, dtype):
    """From the summed :func:`grad_reduce` of ``n`` values per channel: the coefficients
    (3, C) of :func:`grad_apply` and ``(grad_weight, grad_bias, sum |g|)`` (3, C), float64."""
    num_channels = sums.shape[1]
    coef, grads = np.empty((3, num_channels)), np.empty((3, num_channels))
    w = per_channel_array(weight, 1.0, num_channels, _checks.param_dtype(dtype))
    mean = _saved(mean)
    invstd = _saved(invstd)
    _bwd.grad_coefs(np.ascontiguousarray(sums), float(n), w, mean, invstd, bool(training), coef, grads)
    return coef, grads


def grad_apply(g, x, axis, coef, out=None, parallel=None):
    """``grad_input = g * coef[0] + x * coef[1] + coef[2]`` per channel (into ``out`` when
    given)."""
    x = _checks.contiguous(x)
    g = _same_order(g, x)
    dest = _checks.output_for(x, out, g)
    lay, (gv, xv, giv) = views(x, axis, g, x, dest)
    _bwd.grad_apply(_parallel(parallel, x, lay), lay, gv, xv, coef, giv)
    return deliver(dest, out)


def masked_stats(x, axis, mask, stats):
    """The masked ``(count, mean, M2)`` of a host array ``x`` (a Dask task's chunk, serial
    kernels) into ``stats`` (3, C); ``mask`` has ``x``'s shape with 1 on ``axis``.  Returns
    the kept count."""
    x = _checks.contiguous(x)
    c_order = x.flags.c_contiguous
    mask = np.ascontiguousarray(mask) if c_order else np.asfortranarray(mask)
    lay, (xv,) = views(x, axis, x)
    _masked.welford_masked(False, lay, xv, _mask.view(mask, c_order, lay), stats)
    return int(np.count_nonzero(mask))


def masked_grad_apply(g, x, axis, mask, coef):
    """The masked elementwise backward of host arrays (a Dask task's chunks, serial kernels):
    ``g * coef[0] + (x * coef[1] + coef[2] where mask, else 0)``."""
    x = _checks.contiguous(x)
    g = _same_order(g, x)
    c_order = x.flags.c_contiguous
    mask = np.ascontiguousarray(mask) if c_order else np.asfortranarray(mask)
    dest = _checks.output_for(x, None, g)
    lay, (gv, xv, giv) = views(x, axis, g, x, dest)
    _masked.grad_apply_masked(False, lay, gv, xv, _mask.view(mask, c_order, lay), coef, giv)
    return dest


def relu_grad(inp, grad_output, output):
    """``grad_output`` where ``output > 0``, else 0: a new array in the input's memory order
    (``output`` is the checked forward output)."""
    x = inp.x
    g, y = _same_order(grad_output, x), _same_order(output, x)
    dest = np.empty_like(x)
    _act.relu_grad(inp.parallel, _flat(inp, g), _flat(inp, y), _flat(inp, dest))
    return dest


def _flat(inp, a):
    """A flat view of ``a``, of ``inp``'s shape and memory order (C- or F-contiguous; float16
    data as its bits)."""
    if inp.half:
        a = a.view(_half.BITS)
    return a.reshape(-1) if inp.c_order else a.T.reshape(-1)


def part_stats(inp, mask=None, kept=None):
    """The statistics of one process's part of a global batch as SyncBatchNorm sends them:
    one float64 array ``[count, mean[0..C), m2[0..C)]`` (:meth:`numbabn.Stats.to_array`); of
    the values a checked ``mask`` keeps, when given (the count then ``kept``, its True
    count)."""
    if mask is None:
        return _payload(_checks.values_per_channel(inp.shape, inp.axis), _welford(inp))
    stats = np.empty((3, inp.num_channels))
    x = inp.x
    _masked.welford_masked(inp.parallel, inp.layout, inp.view(x), _mask.view(mask, inp.c_order, inp.layout), stats)
    return _payload(int(np.count_nonzero(mask)) if kept is None else kept, stats)


def part_sums(call):
    """:func:`grad_reduce` of a checked backward call's ``grad_output`` and input (``mean``
    its ``save_mean``): one process's (3, C) float64 payload."""
    inp = call.inp
    x = inp.x
    g = _same_order(call.grad_output, x)
    sums = np.empty((3, inp.num_channels))
    _bwd.grad_reduce(inp.parallel, inp.layout, inp.view(g), inp.view(x), _saved(call.save_mean), sums)
    return sums


def forward_with_stats(call, stats):
    """A checked training forward normalized with the statistics ``stats`` (3, C) float64,
    rows count, mean and M2, merged elsewhere (the global batch's): ``(output, save_mean,
    save_invstd)``; running statistics updated as :func:`forward` would on an input with
    those statistics."""
    inp = call.inp
    x, dtype = inp.x, inp.param_dtype
    dest = np.empty_like(x) if call.out is None else _checks.output_for(x, call.out, call.residual)
    w, b = _affine(call.weight, call.bias, inp.num_channels, dtype)
    rm, rv = _buffers(call.running_mean, call.running_var, dtype)
    save = save_rows(call.limits, inp.num_channels, call.m2)
    xv, yv = inp.view(x), inp.view(dest)
    if call.act:
        z, settings = _residual(call, xv), (w, b, rm, rv, call.momentum, call.eps)
        _act.forward_with_stats(inp.parallel, inp.layout, xv, z, call.act, stats, *settings, yv, save)
    else:
        _fwd.forward_with_stats(inp.parallel, inp.layout, xv, stats, w, b, rm, rv, call.momentum, call.eps, yv, save)
    if rm is not call.running_mean or rv is not call.running_var:
        _write_back(call.running_mean, rm)
        _write_back(call.running_var, rv)
    return _forward_result(call, dest, save)


def backward_with_sums(call, sums, n):
    """A checked backward whose reduction ``sums`` (:func:`part_sums`, added over every
    part) cover ``n`` values per channel: ``(grad_input, grad_weight, grad_bias,
    abs_grad_sum)``."""
    sums = np.ascontiguousarray(sums, dtype=np.float64)
    if call.mask is not None:
        return _masked_backward(call, sums, n)
    return _backward(call, _bwd.backward_with_sums, sums, float(n))


# -- ghost batches (numbabn._ghost) on channel-minor layouts: every ghost in one driver call ----


def ghosts_fit(inp):
    """Whether a checked :class:`Input`'s ghost batches run in one driver call
    (:mod:`numbabn.cpu.ghost`): a C-contiguous, channel-minor input with values.  Other
    inputs run one call per ghost."""
    return inp.c_order and not inp.layout.strided and inp.x.size > 0


def ghost_forward(call, virtual_batch_size):
    """``(output, save)`` of a checked training :class:`numbabn._call.ForwardCall` of an input
    that :func:`ghosts_fit`, run as ghost batches: ``save`` (rows, G, C) float64 holds each
    ghost's rows of :func:`numbabn._math.save_rows` (mean, invstd, M2, then ``r`` and ``d``
    with ``call.limits``); the running statistics take one update."""
    inp = call.inp
    x, dtype, num_channels = inp.x, inp.param_dtype, inp.num_channels
    dest = np.empty_like(x) if call.out is None else _checks.output_for(x, call.out)
    w, b = _affine(call.weight, call.bias, num_channels, dtype)
    num_ghosts, views = _ghost_views(inp, virtual_batch_size)
    rows = save_rows(call.limits, num_channels, True)
    save = np.empty((rows.shape[0], num_ghosts, num_channels))
    save[3:] = rows[3:, None]  # Batch Renormalization's limits, where asked
    rm, rv = _buffers(call.running_mean, call.running_var, dtype)
    (x2, xe), (_, ye) = views(x), views(dest)
    _ghost.forward_train_ghosts(inp.parallel, x2, inp.layout.inner, w, b, rm, rv, call.momentum, call.eps, xe, ye, save)
    if rm is not call.running_mean or rv is not call.running_var:
        _write_back(call.running_mean, rm)
        _write_back(call.running_var, rv)
    return deliver(dest, call.out), save


def ghost_backward(call, virtual_batch_size, weights, save_mean, save_invstd, factors):
    """``(grad_input, grad_weight, grad_bias, abs_grad_sum)`` of a checked training
    :class:`numbabn._call.BackwardCall` of an input that :func:`ghosts_fit`, run as ghost
    batches: ghost ``g`` with weight ``weights[g]`` (or ``weights`` for all, ``(C,)``) and saved ``save_mean[g]`` and
    ``save_invstd[g]`` (``(G, C)`` host arrays), Batch Renormalization's ``factors`` ``(r,
    d)`` (each ``(G, C)``) or None; the per-channel sums added over the ghosts in order."""
    inp = call.inp
    x, dtype, num_channels = inp.x, inp.param_dtype, inp.num_channels
    g = _same_order(call.grad_output, x)
    dest = _checks.output_for(x, call.out, g)
    num_ghosts, views = _ghost_views(inp, virtual_batch_size)
    scale = np.empty((num_ghosts, num_channels), dtype)
    scale[...] = weights  # rounded to the parameters' dtype, as each ghost's own call takes them
    if factors is None:
        factors = np.empty((0, num_ghosts, num_channels))
    else:
        factors = np.ascontiguousarray(np.stack(factors), dtype=np.float64)
    total = np.empty((3, num_channels))
    (g2, ge), (x2, xe), (_, gie) = views(g), views(x), views(dest)
    mean, invstd = _saved(save_mean), _saved(save_invstd)
    _ghost.backward_ghosts(inp.parallel, g2, x2, inp.layout.inner, scale, mean, invstd, factors, ge, xe, gie, total)
    affine = total[:2].astype(dtype)  # one conversion for both
    return deliver(dest, call.out), affine[0], affine[1], total[2]


def _ghost_views(inp, virtual_batch_size):
    """``(G, views)``: the number of ghosts of a checked :class:`Input` that
    :func:`ghosts_fit`, and ``views(a)``, the reduction and elementwise view pairs
    (:mod:`numbabn.cpu.ghost`) of an array ``a`` of the input's shape and C order."""
    key = (inp.shape, inp.axis, inp.dtype.itemsize, virtual_batch_size)
    geometry = _GHOSTS.get(key)
    if geometry is None:
        geometry = bounded_put(
            _GHOSTS, key, _ghost_geometry(inp.shape, inp.axis, inp.dtype.itemsize, virtual_batch_size)
        )
    num_ghosts, size, shapes = geometry

    def views(a):
        flat = _half.bits(a).reshape(-1)
        head, tail = flat[:size], flat[size:]
        pairs = []
        for full, rest in shapes:
            a3 = head.reshape(full)
            pairs.append((a3, tail.reshape(rest) if rest else a3[:0]))
        return pairs

    return num_ghosts, views


def _ghost_geometry(shape, axis, itemsize, virtual_batch_size):
    """``(G, size, shapes)`` of :func:`_ghost_views`: ``size`` values in the ghosts of
    ``virtual_batch_size`` samples, and the 3-D shapes of the reduction and the elementwise
    views of those ghosts and of the remainder (None without one)."""
    n = shape[0]
    full, rest = divmod(n, virtual_batch_size)
    outer, num_channels, inner = _checks.shape3(shape, axis)
    per = outer // n  # rows of the (outer, C * inner) view per sample
    width = num_channels * inner

    def reduction(rows):  # a call on the slice's own view
        return _plan.layout((rows, num_channels, inner), itemsize).view

    def elementwise(rows):
        return _elementwise_view(rows, width)

    shapes = [
        ((full, *view(virtual_batch_size * per)), (1, *view(rest * per)) if rest else None)
        for view in (reduction, elementwise)
    ]
    return full + bool(rest), full * virtual_batch_size * per * width, shapes


def _elementwise_view(rows, width):
    """The super-rows of an elementwise pass over ``rows`` rows of ``width`` values: ``k``
    rows each, the most that divides ``rows`` with ``k * width <= WIDEN_TO``."""
    k = max(1, min(rows, WIDEN_TO // max(width, 1)))
    while rows % k:
        k -= 1
    return rows // k, k * width


_GHOSTS = {}


def parallel_for(size, inner):
    """Whether an array of ``size`` elements viewed as ``(outer, C, inner)`` runs the parallel
    twins of the drivers: past ``PARALLEL_MIN``, or ``PARALLEL_MIN_STRIDED`` for the
    channel-strided kernels (the shape alone decides, never the thread count)."""
    return size >= (PARALLEL_MIN_STRIDED if inner >= MIN_INNER else PARALLEL_MIN)


def _parallel(parallel, x, lay):
    return parallel_for(x.size, lay.inner) if parallel is None else parallel


def layout_of(x, axis, c_order):
    """The :class:`numbabn.cpu._plan.Layout` of ``x``, C-contiguous (``c_order``) or
    F-contiguous (seen through its transpose), with the features on ``axis``."""
    if c_order:
        shape3 = _checks.shape3(x.shape, axis)
    else:
        shape3 = _checks.shape3(x.shape[::-1], x.ndim - 1 - axis)
    return _plan.layout(shape3, x.itemsize)


def views(x, axis, *arrays):
    """The :class:`numbabn.cpu._plan.Layout` of the C- or F-contiguous ``x`` with the features
    on ``axis``, and the kernels' views of ``arrays`` (of ``x``'s shape and memory order)."""
    c_order = x.flags.c_contiguous
    lay = layout_of(x, axis, c_order)
    return lay, [_half.bits(a if c_order else a.T).reshape(lay.view) for a in arrays]


def _same_order(g, x):
    """``g`` in ``x``'s memory order (one copy of ``g`` when it is not)."""
    if _checks.same_view(g, x):
        return g
    return np.ascontiguousarray(g) if x.flags.c_contiguous else np.asfortranarray(g)


def deliver(result, out):
    """``out`` holding ``result`` when ``out`` is given (copied when the kernels could not
    write it directly, see ``_checks.output_for``), else ``result``."""
    if out is None or result is out:
        return result
    out[...] = result
    return out


def per_channel_array(a, fill, num_channels, dtype):
    """``a`` as a contiguous array, or the constant ``fill`` when ``a`` is None."""
    if a is None:
        return _constant(fill, num_channels, dtype)
    return _contiguous(a)


def _affine(weight, bias, num_channels, dtype):
    """The kernels' ``(weight, bias)``: the given arrays (contiguous) or the defaults."""
    return per_channel_array(weight, 1.0, num_channels, dtype), per_channel_array(bias, 0.0, num_channels, dtype)


def _constant(fill, num_channels, dtype):
    # The default weight (ones) and bias (zeros), made once per (C, dtype) and only read by
    # the kernels (a dict, not lru_cache: small calls spend their time in Python).  Not
    # flagged read-only: numba would compile a second specialization.
    key = (fill, num_channels, dtype)
    a = _CONSTANTS.get(key)
    if a is None:
        a = np.full(num_channels, fill, dtype=dtype)
        if num_channels <= 1 << 16 and len(_CONSTANTS) < 64:  # larger ones: not worth keeping
            _CONSTANTS[key] = a
    return a


_CONSTANTS = {}


def _saved(a):
    """A saved statistic (float64 or the input's dtype) as the contiguous float64 array the
    kernels take."""
    return a if a.dtype == _F64 and a.flags.c_contiguous else np.ascontiguousarray(a, dtype=np.float64)


def _buffers(running_mean, running_var, dtype):
    """The kernels' running statistics: the given arrays, contiguous copies of strided ones
    (which :func:`_write_back` copies back once the kernel updated them), or empty arrays,
    which the kernels neither read nor write."""
    if running_mean is None:
        empty = _constant(0.0, 0, dtype)
        return empty, empty
    return _contiguous(running_mean), _contiguous(running_var)


def _contiguous(a):
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _write_back(a, buf):
    if a is not None and a is not buf:
        a[...] = buf
