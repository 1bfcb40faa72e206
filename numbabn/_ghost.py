"""Ghost batches (``virtual_batch_size``, Hoffer et al., 2017): axis 0 cut into consecutive
virtual batches of ``virtual_batch_size`` samples (the last holds the remainder), each
normalized with its own statistics, exactly as a training forward of that slice alone.

Each ghost is one training call of the input's backend on a slice along axis 0, written into
its slice of one output: the ghosts together read the input once, as one call would.  The
kernels also hand back each ghost's ``M2`` (:func:`numbabn._math.save_rows`), so the whole
batch's statistics are the ghosts' Chan-merged in order, and the running statistics take one
update from them (``BatchNorm``'s update, one ``num_batches_tracked``).  The backward is each
ghost's own; ``grad_weight`` and ``grad_bias`` are summed over the ghosts in order, in
float64.  Saved statistics (and Batch Renormalization's ``r`` and ``d``) are float64 host
arrays of shape ``(G, C)``, one row per ghost.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _call, _checks
from ._device import is_device
from .cpu import api as _host
from .stats import merge_parts


def check_size(virtual_batch_size, axis=None):
    """``virtual_batch_size`` checked: None, or an int >= 1; the feature axis (when known)
    must not be 0, the axis ghosts cut."""
    v = virtual_batch_size
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"virtual_batch_size must be an int >= 1 or None, got {type(v).__name__} {v!r}")
    if v < 1:
        raise ValueError(f"virtual_batch_size must be an int >= 1 or None, got {v!r}")
    if axis == 0:
        raise ValueError(
            "virtual_batch_size cuts axis 0 into ghost batches, so the feature axis must not be 0, got axis=0"
        )
    return int(v)


def applies(inp, virtual_batch_size):
    """Whether a training call on ``inp`` runs as ghost batches: more than one ghost.  Fewer
    samples than ``virtual_batch_size`` is batch normalization itself, and runs as such."""
    return virtual_batch_size is not None and inp.shape[0] > virtual_batch_size


def slices(n, virtual_batch_size):
    """The ghosts' ``(start, stop)`` along axis 0."""
    return [(i, min(i + virtual_batch_size, n)) for i in range(0, n, virtual_batch_size)]


def _check(inp, virtual_batch_size):
    """What a ghost call refuses, before anything is written."""
    if inp.axis % len(inp.shape) == 0:
        check_size(virtual_batch_size, 0)
    if not hasattr(inp.backend, "part_stats"):  # the Dask backend
        raise TypeError(
            "virtual_batch_size takes NumPy or GPU arrays, got a Dask array: ghost batches are slices along "
            "axis 0, which a Dask array's chunks need not follow; normalize each ghost batch's slice instead"
        )
    last = inp.shape[0] % virtual_batch_size or virtual_batch_size
    per_sample = _checks.values_per_channel(inp.shape, inp.axis) // inp.shape[0]
    if last * per_sample == 1:
        raise ValueError(
            "expected more than 1 value per channel in each ghost batch when training, got a ghost batch of 1 "
            f"value per channel (input shape {inp.shape}, virtual_batch_size={virtual_batch_size}: the last "
            f"ghost batch holds {last} sample(s))"
        )


def _output(inp, out):
    """The array every ghost writes its slice of, and what the caller returns."""
    if out is not None:
        return out, out
    if inp.backend.DEVICE == "cpu":
        dest = np.empty(inp.shape, inp.dtype)
        return dest, dest
    dest = inp.new_like_input()
    return dest, inp.hand_back(dest)


def host(a):
    """A per-channel array (host or GPU) as a float64 NumPy array."""
    if is_device(a):
        from .cuda._arrays import as_numba

        a = as_numba(a).copy_to_host()
    return np.asarray(a, dtype=np.float64)


def on_device_of(inp, values, dtype=None, result=False):
    """A new copy of host ``values`` (cast to ``dtype``) as the arrays ``inp``'s backend
    takes; a ``result`` as the input's kind of array (CuPy, PyTorch, numba)."""
    values = np.array(values, dtype=dtype, order="C")
    if inp.backend.DEVICE == "cpu":
        return values
    from numba import cuda

    d = cuda.to_device(values)
    return inp.hand_back(d) if result else d


def _write(buffer, values):
    """``values`` (host) into the per-channel ``buffer`` (host or GPU), in place."""
    if is_device(buffer):
        from .cuda._arrays import as_numba

        as_numba(buffer).copy_to_device(np.ascontiguousarray(values, dtype=buffer.dtype))
    else:
        buffer[...] = values


def forward(call, virtual_batch_size):
    """``(output, save_mean, save_invstd, extra)`` of a checked training
    :class:`numbabn._call.ForwardCall` run as ghost batches: ``save_*`` float64 ``(G, C)``,
    ``extra`` the rows of each ghost's ``save`` past them (``(G, k, C)``: ``M2``, then
    ``r`` and ``d`` with ``call.limits``)."""
    inp = call.inp
    _check(inp, virtual_batch_size)
    if call.mask is not None:
        raise NotImplementedError("virtual_batch_size and mask together are not supported: give one of them")
    if inp.backend is _host and _host.ghosts_fit(inp) and not call.act:  # activated: a call per ghost
        y, save = _host.ghost_forward(call, virtual_batch_size)
        return y, save[0], save[1], save[2:].transpose(1, 0, 2)
    num_channels, stream = inp.num_channels, getattr(inp, "stream", None)
    dest, y = _output(inp, call.out)
    parts = slices(inp.shape[0], virtual_batch_size)
    renorm = call.limits is not None
    if renorm:  # r and d need the running statistics before this call's one update
        before = [host(a) for a in (call.running_mean, call.running_var)]
    save = np.empty((len(parts), 2, num_channels))
    extra = np.empty((len(parts), 1 + 2 * renorm, num_channels))
    counts = np.empty(len(parts))
    for g, (i0, i1) in enumerate(parts):
        ghost = _call.check_input(inp.x[i0:i1], inp.axis, stream)
        # Each renormalized ghost updates a scratch copy of the running statistics.
        running = [on_device_of(inp, a, _checks.param_dtype(inp.dtype)) for a in before] if renorm else (None, None)
        step = _call.ForwardCall(
            ghost,
            call.weight,
            call.bias,
            *running,
            True,
            call.momentum,
            call.eps,
            ghost.like_input(dest[i0:i1], "out", writable=True),
        )
        step.limits, step.m2 = call.limits, True
        step.act = call.act  # the activation and residual, per ghost as the normalize
        if call.residual is not None:
            step.residual = ghost.like_input(call.residual[i0:i1], "residual")
        _, mean, invstd = step.run()
        save[g, 0], save[g, 1], extra[g] = host(mean), host(invstd), step.extra
        counts[g] = _checks.values_per_channel(ghost.shape, ghost.axis)
    if call.running_mean is not None:
        _update_running(call, counts, save[:, 0], extra[:, 0])
    return y, save[:, 0], save[:, 1], extra


def _update_running(call, counts, means, m2s):
    """The running statistics' one update, ``BatchNorm``'s, from the ghosts' statistics
    Chan-merged in order."""
    num_channels = means.shape[1]
    parts = np.concatenate([counts[:, None], means, m2s], axis=1)
    stats = np.empty((3, num_channels))
    count = merge_parts(parts, stats)
    # float64 copies of the buffers' values: the same arithmetic as the kernels' update,
    # rounded to the buffers' dtype once, by the write back.
    rm, rv = host(call.running_mean), host(call.running_var)
    _host.finish(count, stats[1], stats[2], None, None, rm, rv, call.momentum, call.eps, np.dtype(np.float64))
    _write(call.running_mean, rm)
    _write(call.running_var, rv)


def backward(inp, grad_output, weight, save_mean, save_invstd, virtual_batch_size, factors=None, out=None):
    """``(grad_input, grad_weight, grad_bias, abs_grad_sum)`` of a ghost-batch training
    forward: each ghost's own backward into its slice of ``grad_input``; the per-channel
    sums added over the ghosts in order.  ``factors``: Batch Renormalization's ``(r, d)``,
    each ``(G, C)``."""
    _check(inp, virtual_batch_size)
    num_ghosts = -(-inp.shape[0] // virtual_batch_size)
    num_channels, stream = inp.num_channels, getattr(inp, "stream", None)
    save_mean = _per_ghost(save_mean, "save_mean", num_ghosts, num_channels)
    save_invstd = _per_ghost(save_invstd, "save_invstd", num_ghosts, num_channels)
    if factors is not None:
        factors = tuple(_per_ghost(f, name, num_ghosts, num_channels) for f, name in zip(factors, "rd", strict=True))
    # The checks of a plain backward call (grad_output, weight, out and their overlaps).
    first = (save_mean[0], save_invstd[0])
    if inp.backend is not _host:
        first = tuple(on_device_of(inp, a) for a in first)
    call = _call.backward_call(inp, grad_output, weight, *first, True, out)
    w = np.ones(num_channels) if call.weight is None else host(call.weight)
    if inp.backend is _host and _host.ghosts_fit(inp):
        weights = w if factors is None else w * factors[0]
        return _host.ghost_backward(call, virtual_batch_size, weights, save_mean, save_invstd, factors)
    parts = slices(inp.shape[0], virtual_batch_size)
    dest, grad_input = _output(inp, call.out)
    sums = np.zeros((3, num_channels))
    for g, (i0, i1) in enumerate(parts):
        ghost = _call.check_input(inp.x[i0:i1], inp.axis, stream)
        scale = w if factors is None else w * factors[0][g]
        step = _call.BackwardCall(
            ghost,
            ghost.like_input(call.grad_output[i0:i1], "grad_output"),
            on_device_of(inp, scale, _checks.param_dtype(inp.dtype)),
            on_device_of(inp, save_mean[g]),
            on_device_of(inp, save_invstd[g]),
            True,
            ghost.like_input(dest[i0:i1], "out", writable=True),
        )
        _, grad_xhat, grad_bias, abs_sum = step.run()
        grad_xhat, grad_bias = host(grad_xhat), host(grad_bias)
        if factors is not None:
            grad_xhat = factors[0][g] * grad_xhat + factors[1][g] * grad_bias
        sums += (grad_xhat, grad_bias, host(abs_sum))
    grad_weight, grad_bias = (on_device_of(inp, s, _checks.param_dtype(inp.dtype), True) for s in sums[:2])
    return grad_input, grad_weight, grad_bias, on_device_of(inp, sums[2], result=True)


def _per_ghost(a, name, num_ghosts, num_channels):
    """A saved per-ghost array: float64-able values of shape ``(G, C)``, on the host."""
    a = host(a)
    if a.shape != (num_ghosts, num_channels):
        raise ValueError(
            f"{name} must have shape ({num_ghosts}, {num_channels}) (one row per ghost batch, as the forward "
            f"with the same virtual_batch_size returns it), got {a.shape}"
        )
    return a
