"""The functional API, shaped like ``torch.nn.functional.batch_norm``.

Each function validates every argument (``numbabn._layout``), views the arrays as
``(outer, C, inner)`` and calls one compiled driver of ``numbabn.cpu``.  Nothing is written,
running statistics included, until every check has passed.
"""

import functools

import numpy as np

from . import _device, _layout
from ._config import PARALLEL_MIN
from .cpu import backward as _bwd
from .cpu import forward as _fwd


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    axis=1,
    out=None,
    stream=None,
):
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    input : ndarray of float32 or float64, ndim >= 2
        ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ... with the features on ``axis``.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics, same dtype as ``input``.  Used to normalize in eval mode
        (required there); updated in place in training mode when given.
    weight, bias : ndarray of shape (C,), optional
        Affine parameters (``1`` and ``0`` when None).
    training : bool, default False
        Normalize with the batch statistics (and update the running ones) or with the
        running statistics.
    momentum : float in [0, 1], default 0.1
        Weight of the new batch in the running statistics (PyTorch's convention; Keras and
        Flax call ``1 - momentum`` the momentum).
    eps : float, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The feature axis; ``-1`` for channels-last.
    out : ndarray, optional
        Receives the result (same shape and dtype as ``input``; may be ``input`` itself).
    stream : optional
        GPU inputs only: the CUDA stream to run on (a numba, CuPy or PyTorch stream, or a
        ``cudaStream_t`` int); default the input library's current stream.  Nothing
        synchronizes the host.

    Returns
    -------
    ndarray
        ``y = (x - mean) / sqrt(var + eps) * weight + bias``, in ``input``'s memory order.

    Notes
    -----
    Training uses the biased variance to normalize and feeds the unbiased variance
    ``var * n / (n - 1)`` to ``running_var``::

        running_mean <- (1 - momentum) * running_mean + momentum * mean
        running_var  <- (1 - momentum) * running_var  + momentum * var * n / (n - 1)

    A non-contiguous ``input`` is copied once.
    """
    return _forward(input, weight, bias, running_mean, running_var, training, momentum, eps, axis, out, stream)[0]


def batch_norm_forward(
    input,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    *,
    training=True,
    momentum=0.1,
    eps=1e-5,
    axis=1,
    out=None,
    stream=None,
):
    """Batch-norm forward that also returns what :func:`batch_norm_backward` needs.

    Parameters are those of :func:`batch_norm`; here ``training`` defaults to True and
    without running statistics eval mode is an error, as there.

    Returns
    -------
    output : ndarray
        The normalized ``input``.
    save_mean, save_invstd : ndarray of float64, shape (C,)
        The mean and ``1 / sqrt(var + eps)`` the output was normalized with: the batch's
        in training, the running statistics' in eval.  Kept in float64 so the backward pass
        loses nothing when ``|mean| / std`` is large.
    """
    return _forward(input, weight, bias, running_mean, running_var, training, momentum, eps, axis, out, stream)


def batch_norm_backward(
    grad_output, input, weight, save_mean, save_invstd, *, training=True, axis=1, out=None, stream=None
):
    """Gradients of batch normalization.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss with respect to the output; shape and dtype of ``input``.
    input : ndarray of float32 or float64
        The forward pass's input.
    weight : ndarray of shape (C,) or None
        The affine weight (``1`` when None).
    save_mean, save_invstd : ndarray of shape (C,)
        As returned by :func:`batch_norm_forward` (float64, or ``input``'s dtype).
    training : bool, default True
        Whether the forward pass normalized with batch statistics (then the statistics
        depend on ``input`` too) or with running statistics.
    axis : int, default 1
        The feature axis.
    out : ndarray, optional
        Receives ``grad_input`` (same shape and dtype as ``input``; may be ``grad_output``
        itself).  Saves allocating (and the OS zero-filling) a new array per call.

    Returns
    -------
    grad_input : ndarray
        Same shape and dtype as ``input``, C-contiguous unless ``input`` is F-contiguous
        (``out`` when given).
    grad_weight, grad_bias : ndarray of shape (C,)
        Per-channel, in ``input``'s dtype, even when ``weight`` is None.

    Notes
    -----
    With ``xhat = (x - mean) * invstd``, ``g = grad_output`` and ``n`` values per channel::

        grad_bias   = sum(g)
        grad_weight = sum(g * xhat)
        grad_input  = weight * invstd / n * (n * g - grad_bias - xhat * grad_weight)  # training
        grad_input  = g * weight * invstd                                            # eval
    """
    return _backward(grad_output, input, weight, save_mean, save_invstd, training, axis, out, stream)[:3]


def _backward(grad_output, input, weight, save_mean, save_invstd, training, axis, out, stream=None):
    """:func:`batch_norm_backward`'s work; returns ``(grad_input, grad_weight, grad_bias,
    abs_grad_sum)``, the last the per-channel ``sum |grad_output|`` (float64) that the
    reduction pass accumulates beside ``grad_bias`` (:attr:`BatchNorm.update_threshold`)."""
    if _device.is_device(input):
        return _cuda().backward(grad_output, input, weight, save_mean, save_invstd, training, axis, out, stream)
    _device.host_stream(stream)
    x = _layout.as_input(input, "input")
    g = _layout.same_kind(x, grad_output, "grad_output")
    ax = _layout.norm_axis(axis, x.ndim)
    training = _layout.check_flag(training, "training")
    num_channels, dtype = x.shape[ax], x.dtype
    weight = _layout.per_channel(weight, num_channels, dtype, "weight")
    save_mean = _layout.per_channel(save_mean, num_channels, dtype, "save_mean", allow_f64=True)
    save_invstd = _layout.per_channel(save_invstd, num_channels, dtype, "save_invstd", allow_f64=True)
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean and save_invstd are required (as returned by batch_norm_forward), got None")
    out = _layout.check_out(x, out)
    x, g = _layout.contiguous(x), _layout.contiguous(g)
    if not _layout.same_view(g, x):  # bring g to x's memory order (one copy, of g only)
        g = np.ascontiguousarray(g) if x.flags.c_contiguous else np.asfortranarray(g)
    grad_input = _layout.output_for(x, out, g)
    grads = np.empty((3, num_channels))
    g3, x3, gi3 = _layout.view3(g, ax, x, grad_input)
    _bwd.backward(
        x.size >= PARALLEL_MIN,
        g3,
        x3,
        _per_channel_array(weight, 1.0, num_channels, dtype),
        np.ascontiguousarray(save_mean, dtype=np.float64),
        np.ascontiguousarray(save_invstd, dtype=np.float64),
        training,
        gi3,
        grads,
    )
    return _deliver(grad_input, out), grads[0].astype(dtype), grads[1].astype(dtype), grads[2]


def _cuda():
    """numbabn's GPU backend (imported on first use), or a RuntimeError saying why not."""
    from . import cuda

    cuda.require()
    from .cuda import api

    return api


def _forward(input, weight, bias, running_mean, running_var, training, momentum, eps, axis, out, stream):
    if _device.is_device(input):
        args = (weight, bias, running_mean, running_var, training, momentum, eps, axis, out, stream)
        return _cuda().forward(input, *args)
    _device.host_stream(stream)
    x = _layout.as_input(input, "input")
    ax = _layout.norm_axis(axis, x.ndim)
    num_channels, dtype = x.shape[ax], x.dtype
    training = _layout.check_flag(training, "training")
    weight = _layout.per_channel(weight, num_channels, dtype, "weight")
    bias = _layout.per_channel(bias, num_channels, dtype, "bias")
    running_mean = _layout.per_channel(running_mean, num_channels, dtype, "running_mean", writable=training)
    running_var = _layout.per_channel(running_var, num_channels, dtype, "running_var", writable=training)
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"running_mean and running_var must be given together, got {missing}=None")
    if training:
        momentum = _layout.check_momentum(momentum)
        _layout.check_training_count(x, ax)
    elif running_mean is None:
        raise ValueError("running_mean and running_var are required in eval mode (training=False), got None")
    eps = _layout.check_eps(eps)
    out = _layout.check_out(x, out)

    x = _layout.contiguous(x)
    dest = _layout.output_for(x, out)
    x3, y3 = _layout.view3(x, ax, dest)
    w = _per_channel_array(weight, 1.0, num_channels, dtype)
    b = _per_channel_array(bias, 0.0, num_channels, dtype)
    save = np.empty((2, num_channels))
    parallel = x.size >= PARALLEL_MIN
    if training and x.size == 0:
        # An empty batch, as in PyTorch: an empty output, running statistics untouched.
        save[...] = np.nan
    elif training:
        rm = _buffer(running_mean, dtype)
        rv = _buffer(running_var, dtype)
        _fwd.forward_train(parallel, x3, w, b, rm, rv, momentum, eps, y3, save)
        _write_back(running_mean, rm)
        _write_back(running_var, rv)
    else:
        mean, var = _buffer(running_mean, dtype), _buffer(running_var, dtype)
        _fwd.forward_eval(parallel, x3, w, b, mean, var, eps, y3, save)
    return _deliver(dest, out), save[0], save[1]


def _deliver(result, out):
    """``out`` holding ``result`` when ``out`` is given (copied when the kernels could not
    write it directly, see ``_layout.output_for``), else ``result``."""
    if out is None or result is out:
        return result
    out[...] = result
    return out


def _per_channel_array(a, fill, num_channels, dtype):
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
