"""The functional API, shaped like ``torch.nn.functional.batch_norm``, and the statistics
functions :func:`welford` and :func:`merge_stats` (the :class:`~numbabn.Stats` they return is
in :mod:`numbabn.stats`).

Each function checks every argument once (:mod:`numbabn._call`), which also picks the
backend from the input's kind (NumPy, GPU or Dask array), then runs the checked call there.
Nothing is written, running statistics included, until every check has passed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _activation, _call, _checks, _ghost
from ._device import host_stream, is_device
from ._math import chan_merge
from .stats import Stats, checked, same_channels

#: An input: a NumPy array (or anything ``numpy.asarray`` takes), a GPU array or a
#: ``dask.array.Array``; results come back as the same kind of array.
Array = Any


def batch_norm(
    input: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: Array | None = None,
    stream: Any = None,
    virtual_batch_size: int | None = None,
    mask: Array | None = None,
    activation: str | None = None,
    residual: Array | None = None,
) -> Array:
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    input : ndarray, GPU array or dask.array.Array of float16, float32 or float64, ndim >= 2
        ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ... with the features on ``axis``.
        float16 data takes float32 per-channel arrays (PyTorch's mixed precision; on the
        GPU float16 ones too) and computes in float64 on the host.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics, same dtype as ``input`` (float32 for float16 data).  Used to normalize in eval mode
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
    virtual_batch_size : int >= 1, optional
        Ghost batches in training: axis 0 cut into consecutive batches of this many samples
        (the last holds the remainder), each normalized with its own statistics; the running
        statistics take one update from the whole batch's (the ghosts' merged).  NumPy and
        GPU arrays; the feature axis must not be 0.  Ignored in eval.
    mask : ndarray or GPU array of bool, optional
        Masked statistics in training: ``input``'s shape with 1 on the feature axis, True
        where a value counts (padding False), the same for every channel.  The batch
        statistics and the running-statistics update (its count, in the unbiased variance
        too) use the kept values only; every value is normalized with them.  A mask keeping
        nothing is an empty batch (NaN output, no update); keeping one value per channel is
        refused.  Ignored in eval (but checked).  A NumPy array for a NumPy input (copied
        when not in its memory order); a NumPy or Dask array for a Dask input (rechunked to
        its chunks); for a GPU input, a NumPy array (copied to the device on the call's
        stream, any memory order) or a GPU array dense in the input's memory order, whose
        True count is made on the device: the host then waits for the stream.
    activation : {None, "relu"}, default None
        Fused into the normalize pass: ``y = relu(bn(x) [+ residual])``, written once.
    residual : array, optional
        Added to the normalized value before the activation (a residual connection), in the
        same pass: ``input``'s shape, dtype and kind (may be ``out`` itself).

    Returns
    -------
    ndarray
        ``y = (x - mean) / sqrt(var + eps) * weight + bias``, then ``+ residual`` and the
        activation when given, in ``input``'s memory order
        (the input's kind of array; a lazy ``dask.array.Array`` with ``input``'s chunks for
        a Dask input).

    Notes
    -----
    Training uses the biased variance to normalize and feeds the unbiased variance
    ``var * n / (n - 1)`` to ``running_var``::

        running_mean <- (1 - momentum) * running_mean + momentum * mean
        running_var  <- (1 - momentum) * running_var  + momentum * var * n / (n - 1)

    A non-contiguous ``input`` is copied once.

    A Dask ``input`` takes NumPy per-channel arrays: in training its statistics are computed
    during the call (one pass) and the running statistics updated then; the normalization is
    the lazy second pass; ``out`` is refused (see the Dask page of the docs).
    """
    plain = activation is None and residual is None and virtual_batch_size is None
    if plain and stream is None and mask is None:
        facts = _call.known_input(input, axis)
        done = _call.quick_forward(input, facts, weight, bias, running_mean, running_var, training, momentum, eps, out)
        if done is not None:
            return done[0]
    virtual_batch_size = _ghost.check_size(virtual_batch_size, axis)
    inp = _call.check_input(input, axis, stream)
    settings = (training, momentum, eps, out)
    acts = {"activation": activation, "residual": residual}
    call = _call.forward_call(inp, weight, bias, running_mean, running_var, *settings, saved=False, mask=mask, **acts)
    if call.training and _ghost.applies(inp, virtual_batch_size):
        return _ghost.forward(call, virtual_batch_size)[0]
    return call.run()[0]


def batch_norm_forward(
    input: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    out: Array | None = None,
    stream: Any = None,
    virtual_batch_size: int | None = None,
    mask: Array | None = None,
    activation: str | None = None,
    residual: Array | None = None,
) -> tuple[Array, np.ndarray, np.ndarray]:
    """Batch-norm forward that also returns what :func:`batch_norm_backward` needs.

    Parameters are those of :func:`batch_norm`; here ``training`` defaults to True and
    without running statistics eval mode is an error, as there.  With ghost batches
    (``virtual_batch_size`` below the batch size, in training) ``save_mean`` and
    ``save_invstd`` are float64 host arrays of shape ``(G, C)``, a row per ghost batch, for
    :func:`batch_norm_backward` with the same ``virtual_batch_size``.  With
    ``activation="relu"`` keep the output: the backward reads it (``output=``).

    Returns
    -------
    output : ndarray
        The normalized ``input`` (with the residual and activation, when given).
    save_mean, save_invstd : ndarray of float64, shape (C,)
        The mean and ``1 / sqrt(var + eps)`` the output was normalized with: the batch's
        in training, the running statistics' in eval.  Kept in float64 so the backward pass
        loses nothing when ``|mean| / std`` is large.  NumPy arrays for a Dask input too
        (the output is lazy).
    """
    plain = activation is None and residual is None and virtual_batch_size is None
    if plain and stream is None and mask is None:
        facts = _call.known_input(input, axis)
        done = _call.quick_forward(input, facts, weight, bias, running_mean, running_var, training, momentum, eps, out)
        if done is not None:
            y, save = done
            return y, save[0], save[1]
    virtual_batch_size = _ghost.check_size(virtual_batch_size, axis)
    inp = _call.check_input(input, axis, stream)
    settings = (training, momentum, eps, out)
    acts = {"activation": activation, "residual": residual}
    call = _call.forward_call(inp, weight, bias, running_mean, running_var, *settings, mask=mask, **acts)
    if call.training and _ghost.applies(inp, virtual_batch_size):
        return _ghost.forward(call, virtual_batch_size)[:3]
    return call.run()


def batch_norm_backward(
    grad_output: Array,
    input: Array,
    weight: Array | None,
    save_mean: Array,
    save_invstd: Array,
    *,
    training: bool = True,
    axis: int = 1,
    out: Array | None = None,
    stream: Any = None,
    virtual_batch_size: int | None = None,
    mask: Array | None = None,
    activation: str | None = None,
    output: Array | None = None,
    residual: bool = False,
) -> tuple[Array, ...]:
    """Gradients of batch normalization (and of the fused activation and residual).

    Parameters
    ----------
    grad_output : ndarray, GPU array or dask.array.Array
        Gradient of the loss with respect to the output; shape, dtype and kind of
        ``input`` (a Dask one is rechunked to ``input``'s chunks).
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
    virtual_batch_size : int >= 1, optional
        The forward's (training): each ghost batch's own backward, ``grad_weight`` and
        ``grad_bias`` summed over the ghosts in order; ``save_mean`` and ``save_invstd``
        then have shape ``(G, C)``.
    mask : ndarray of bool, optional
        The forward's (training): the exact gradient of the masked forward.  A dropped value
        gets gradient through the normalization only (``g * weight * invstd``), not through
        the statistics; ``grad_weight`` and ``grad_bias`` sum over every value.
    activation : {None, "relu"}, default None
        The forward's: with ``"relu"`` the gradient reaching batch normalization is
        ``grad_output`` where ``output > 0`` and 0 elsewhere.
    output : array, optional
        The forward's output; required with ``activation="relu"`` (nothing else is saved).
    residual : bool, default False
        Whether the forward added a residual: then also return its gradient.

    Returns
    -------
    grad_input : ndarray
        Same shape and dtype as ``input``, C-contiguous unless ``input`` is F-contiguous
        (``out`` when given).
    grad_weight, grad_bias : ndarray of shape (C,)
        Per-channel, in ``input``'s dtype, even when ``weight`` is None.  For a Dask input
        they are NumPy arrays computed during the call (one pass over ``grad_output`` and
        ``input``) and ``grad_input`` is lazy.
    grad_residual : ndarray
        With ``residual=True`` only: the residual's gradient, the ReLU's masked
        ``grad_output`` (a new array), or ``grad_output`` itself without an activation.

    Notes
    -----
    With ``xhat = (x - mean) * invstd``, ``g = grad_output`` and ``n`` values per channel::

        grad_bias   = sum(g)
        grad_weight = sum(g * xhat)
        grad_input  = weight * invstd / n * (n * g - grad_bias - xhat * grad_weight)  # training
        grad_input  = g * weight * invstd                                            # eval
    """
    plain = activation is None and output is None and residual is False
    if plain and stream is None and mask is None and virtual_batch_size is None:
        facts = _call.known_input(input, axis)
        done = _call.quick_backward(input, facts, grad_output, weight, save_mean, save_invstd, training, out)
        if done is not None:
            return done[:3]
    virtual_batch_size = _ghost.check_size(virtual_batch_size, axis)
    inp = _call.check_input(input, axis, stream)
    relu, output, residual = _activation.check_backward(inp, activation, output, residual)
    g = _activation.incoming(inp, grad_output, relu, output)
    if _checks.check_flag(training, "training") and _ghost.applies(inp, virtual_batch_size):
        if mask is not None:
            raise NotImplementedError("virtual_batch_size and mask together are not supported: give one of them")
        grads = _ghost.backward(inp, g, weight, save_mean, save_invstd, virtual_batch_size, out=out)[:3]
    else:
        call = _call.backward_call(inp, g, weight, save_mean, save_invstd, training, out, abs_sum=False, mask=mask)
        _activation.reuse_gradient(call, relu, residual)
        grads = call.run()[:3]
    return (*grads, g if relu else grad_output) if residual else grads


def welford(x: Any, *, axis: int = 1, stream: Any = None) -> Stats:
    """Per-channel count, mean and M2 of ``x`` in one pass (blocked Welford / Chan).

    Parameters
    ----------
    x : ndarray, GPU array or dask.array.Array of float32 or float64, ndim >= 2
        Values; every axis but ``axis`` is reduced.  A non-contiguous ``x`` is copied once.
        A Dask ``x`` is computed now and gives NumPy ``Stats`` (:func:`numbabn.dask.welford`
        takes ``split_every`` and ``compute=False``).
    axis : int, default 1
        The feature (channel) axis; ``-1`` for channels-last.
    stream : optional
        GPU inputs only: the CUDA stream to run on (see :func:`numbabn.batch_norm`).

    Returns
    -------
    Stats
        ``count`` (int, values per channel), ``mean`` and ``m2`` (float64, shape ``(C,)``;
        GPU arrays of the input's kind for a GPU input).

    Notes
    -----
    Blocks of ``x`` get their exact mean and centred sum of squares from two sweeps while
    in cache, then are merged with Chan's formula in an order fixed by the shape: the result
    is bitwise identical for any number of threads and never suffers the cancellation of
    ``E[x^2] - E[x]^2``.  An ``x`` with no values per channel (a zero-length axis other than
    ``axis``) gives ``count=0`` and zeros, the identity of :func:`merge_stats`; ``count`` is
    always the number of values per channel, so shape ``(4, 0, 5)`` (no channels) gives
    ``count=20`` and empty ``mean`` and ``m2``.
    """
    inp = _call.check_input(x, axis, stream, "x")
    return Stats(*inp.backend.batch_stats(inp))


def merge_stats(*stats: Stats, stream: Any = None) -> Stats:
    """Merge partial statistics exactly, left to right (Chan et al.).

    Parameters
    ----------
    *stats : Stats
        Statistics of disjoint parts of the same channels (same ``C``).  When their arrays
        are on the GPU (all of them), the merge runs there.
    stream : optional
        GPU statistics only: the CUDA stream to run on.

    Returns
    -------
    Stats
        The statistics of all parts together::

            n = na + nb;  d = mean_b - mean_a
            mean = mean_a + d * nb / n
            m2 = m2_a + m2_b + d**2 * na * nb / n
    """
    if not stats:
        raise TypeError("merge_stats needs at least one Stats, got none")
    if any(is_device(s[1]) for s in stats if isinstance(s, tuple) and len(s) == 3):
        parts = [checked(s, f"stats[{i}]", device=True) for i, s in enumerate(stats)]
        same_channels(parts)
        count, mean, m2 = _call.cuda_backend().merge(parts, stream)
        return Stats(count, mean, m2)
    host_stream(stream, "host statistics")
    parts = [checked(s, f"stats[{i}]") for i, s in enumerate(stats)]
    same_channels(parts)
    count, mean, m2 = parts[0]
    for s in parts[1:]:
        count, mean, m2 = chan_merge.py_func(count, mean, m2, s.count, s.mean, s.m2)
    return Stats(int(count), np.array(mean, dtype=np.float64), np.array(m2, dtype=np.float64))
