"""The common host forward, recognized and run in a few Python steps.

A small call spends most of its time in Python, checking what cannot have changed since the
last call.  A forward call is *common* when:

- its input is a contiguous ndarray of a shape, strides, dtype and axis checked before
  (its :class:`numbabn.cpu.api.Facts` are looked up, not derived again, and no ``Input``
  is made);
- its per-channel arrays are None or C-contiguous ndarrays of shape ``(C,)`` and the
  parameter dtype; in training the running statistics, which the call writes, are writable
  and share no memory with each other, the input or the affine parameters (a test by the
  arrays' owners, remembered for the last set of per-channel arrays, which it keeps alive);
- ``training`` is a ``bool``, ``momentum`` and ``eps`` are ``float`` in range, a training
  batch has more than one value per channel;
- ``out``, when given, is an ndarray of the input's shape, strides and dtype, writable and
  aligned, whose memory has an owner NumPy names other than the per-channel arrays' (and the
  input's, unless it *is* the input: an elementwise pass runs in place safely);
- and nothing else is asked: no stream, mask, activation, residual or ghost batches (the
  callers test that).

A backward call is common when its ``grad_output`` is an ndarray of the input's shape,
dtype and memory order, ``weight`` is None or plain as above, the saved mean and invstd are
the forward's (C-contiguous float64 ``(C,)``), ``training`` is a ``bool``, ``out`` is None
or as a forward's (it may be ``grad_output`` or the input themselves), and nothing else is
asked (no stream, mask, activation or ghost batches).

Those tests imply that every check of :mod:`numbabn._call` passes, so :func:`forward` and
:func:`backward` run the drivers at once.  Any other call gets None and takes the general path, which checks it
and raises where it must: the errors and what is left unchanged are the general path's.
"""

import math

import numpy as np

from .. import _checks
from . import api as _api
from . import backward as _bwd
from . import forward as _fwd

#: The last running statistics and affine parameters found disjoint, and the owners of the
#: two written arrays' memory: ``(running_mean, running_var, weight, bias, owners)``, replaced
#: whole (so a thread reads one consistent entry).
_LAST = (None,) * 5


def forward(x, facts, weight, bias, running_mean, running_var, training, momentum, eps, out=None):
    """``(output, save)`` of a common forward call on the ndarray ``x`` of
    :class:`numbabn.cpu.api.Facts` ``facts`` (``save`` (2, C) float64: the mean and invstd
    used; ``output`` is ``out`` when given), or None when the call is not common (``facts``
    None included).  The call must ask for nothing else (see the module notes)."""
    if facts is None:
        return None
    if not (training is True or training is False):
        return None
    if not (type(momentum) is float and 0.0 <= momentum <= 1.0 and type(eps) is float and 0.0 <= eps < math.inf):
        return None
    num_channels, dtype = facts.num_channels, facts.param_dtype
    if not _plain((num_channels,), dtype, training, weight, bias, running_mean, running_var):
        return None
    if running_mean is None or running_var is None:
        if running_mean is not running_var or not training:
            return None
        running_mean = running_var = _api._constant(0.0, 0, dtype)  # neither read nor written
    elif training and not _disjoint(x, running_mean, running_var, weight, bias):
        return None
    if training and (facts.count < 2 or num_channels == 0):  # the general path's empty batch, or an error
        return None
    y = _output(facts, out, x, None, weight, bias, running_mean, running_var)
    if y is None:
        return None
    save = np.empty((2, num_channels))
    if weight is None or bias is None:
        ones, zeros = _defaults(num_channels, dtype)
        weight = ones if weight is None else weight
        bias = zeros if bias is None else bias
    xv, yv = (x, y) if facts.plain else (_api.view(facts, x), _api.view(facts, y))
    parallel, lay = facts.parallel, facts.layout
    if training:
        _fwd.forward_train(parallel, lay, xv, weight, bias, running_mean, running_var, momentum, eps, yv, save)
    else:
        _fwd.forward_eval(parallel, lay, xv, weight, bias, running_mean, running_var, eps, yv, save)
    return y, save


def backward(x, facts, grad_output, weight, save_mean, save_invstd, training, out=None):
    """``(grad_input, grad_weight, grad_bias, abs_grad_sum)`` of a common backward call on the
    ndarray ``x`` of :class:`numbabn.cpu.api.Facts` ``facts``, as the host backend's
    ``backward`` returns them (``grad_input`` in ``out`` when given), or None when the call
    is not common (``facts`` None included; see the module notes)."""
    g = grad_output
    if facts is None or not (training is True or training is False) or type(g) is not _ndarray:
        return None
    if g.shape != facts.shape or g.dtype is not facts.dtype:
        return None
    flags = g.flags
    if not (flags.c_contiguous if facts.c_order else flags.f_contiguous):
        return None
    num_channels, dtype = facts.num_channels, facts.param_dtype
    shape = (num_channels,)
    if not _plain(shape, dtype, False, weight, None, None, None):
        return None
    for a in (save_mean, save_invstd):
        if type(a) is not _ndarray or a.dtype is not _api._F64 or a.shape != shape or not a.flags.c_contiguous:
            return None
    grad_input = _output(facts, out, x, g, weight, save_mean, save_invstd, None)
    if grad_input is None:
        return None
    grads = np.empty((3, num_channels))
    if weight is None:
        weight = _defaults(num_channels, dtype)[0]
    if facts.plain:
        gv, xv, giv = g, x, grad_input
    else:
        gv, xv, giv = _api.view(facts, g), _api.view(facts, x), _api.view(facts, grad_input)
    _bwd.backward(facts.parallel, facts.layout, gv, xv, weight, save_mean, save_invstd, training, giv, grads)
    affine = grads[:2].astype(dtype)  # one conversion for both
    return grad_input, affine[0], affine[1], grads[2]


def _plain(shape, dtype, training, weight, bias, running_mean, running_var):
    """Whether each per-channel array is None or a C-contiguous ndarray of ``shape`` and
    ``dtype`` (the very dtype object: an equal one from elsewhere takes the general path),
    the running statistics writable in ``training``."""
    for a in (weight, bias, running_mean, running_var):
        if a is not None:
            if type(a) is not _ndarray or a.dtype is not dtype or a.shape != shape or not a.flags.c_contiguous:
                return False
    if training and running_mean is not None and running_var is not None:
        return running_mean.flags.writeable and running_var.flags.writeable
    return True


def _disjoint(x, running_mean, running_var, weight, bias):
    """Whether the written ``running_mean`` and ``running_var`` surely share no memory with
    each other, ``x``, ``weight`` or ``bias``: every array's memory has an owner NumPy names
    (:func:`numbabn._checks.owner`), and the written arrays' owners are their own.  False
    means "not sure": the general path then compares the arrays exactly."""
    global _LAST
    last = _LAST
    if not (running_mean is last[0] and running_var is last[1] and weight is last[2] and bias is last[3]):
        first, second = owners = _owner(running_mean, running_mean.flags), _owner(running_var, running_var.flags)
        if first is None or second is None or first is second:
            return False
        for a in (weight, bias):
            if a is not None:
                own = _owner(a, a.flags)
                if own is None or own is first or own is second:
                    return False
        last = _LAST = (running_mean, running_var, weight, bias, owners)
    owner = _owner(x, x.flags)
    return owner is not None and owner is not last[4][0] and owner is not last[4][1]


def _output(facts, out, x, z, p, q, r, s):
    """The array a common call writes its result to: a new one of ``facts``' shape, dtype and
    memory order when ``out`` is None, ``out`` itself where :func:`_into` accepts it (the
    other arguments are its), else None: the call is not common."""
    if out is None:
        return np.empty(facts.shape, facts.dtype, "C" if facts.c_order else "F")
    return out if _into(out, x, z, p, q, r, s) else None


def _into(out, x, z, p, q, r, s):
    """Whether a common call may write its result straight into ``out``: a writable, aligned
    ndarray of ``x``'s shape, strides and dtype (so the same memory order and the kernels'
    view of the same layout) that is one of the inputs ``x`` and ``z`` (an elementwise pass
    runs in place safely) or shares no owner with them, and shares none with the per-channel
    arrays ``p``, ``q``, ``r`` and ``s`` (``z`` and those None where the call has fewer).
    Every array's memory must have an owner NumPy names (:func:`numbabn._checks.owner`);
    False means "not sure", and the general path compares the arrays exactly (and copies
    around an overlap with an input).  The last arrays found disjoint are remembered, as
    :func:`_disjoint` remembers its own."""
    global _LAST_INTO
    if type(out) is not _ndarray or out.dtype is not x.dtype or out.shape != x.shape or out.strides != x.strides:
        return False
    flags = out.flags
    if not flags.writeable:
        return False
    last = _LAST_INTO
    if (
        out is last[0]
        and x is last[1]
        and z is last[2]
        and p is last[3]
        and q is last[4]
        and r is last[5]
        and s is last[6]
    ):
        return True
    own = _owner(out, flags)
    if own is None or not flags.aligned:
        return False
    for a in (x, z, p, q, r, s):
        if a is None or a is out and (a is x or a is z):
            continue
        other = _owner(a, a.flags)
        if other is None or other is own:
            return False
    _LAST_INTO = (out, x, z, p, q, r, s)
    return True


#: The last ``(out, x, z, p, q, r, s)`` :func:`_into` accepted, replaced whole.
_LAST_INTO = (None,) * 7


_owner = _checks.owner
_ndarray = np.ndarray


def _defaults(num_channels, dtype):
    """The default weight and bias (ones and zeros, the host backend's shared constants) in
    one lookup."""
    pair = _DEFAULTS.get((num_channels, dtype))
    if pair is None:
        pair = _api._constant(1.0, num_channels, dtype), _api._constant(0.0, num_channels, dtype)
        if num_channels <= 1 << 16 and len(_DEFAULTS) < 64:  # as the backend keeps its constants
            _DEFAULTS[num_channels, dtype] = pair
    return pair


_DEFAULTS = {}
