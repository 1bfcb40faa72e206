"""Batch Renormalization (Ioffe, 2017): batch normalization whose training output is
corrected towards the running statistics, for small and non-i.i.d. batches.

With the batch's ``mean_B`` and biased ``var_B`` and the running statistics *before* the
step's update, per channel::

    s_B = sqrt(var_B + eps),  s = sqrt(running_var + eps)
    r = clip(s_B / s, 1 / rmax, rmax),  d = clip((mean_B - running_mean) / s, -dmax, dmax)
    y = weight * ((x - mean_B) / s_B * r + d) + bias

``r`` and ``d`` are constants to the gradient.  So a training step is a batch-norm step with
the affine pair ``(weight * r, bias + weight * d)``: the backend's statistics pass, then its
normalize pass with those statistics (:func:`numbabn.cpu.api.forward_with_stats` and its
twins), the running statistics updated as ``BatchNorm`` updates them.  The backward is the
batch-norm backward with weight ``weight * r``, and ``grad_weight = r * sum(g * xhat) +
d * sum(g)``.  ``r``, ``d`` and the affine pair are computed on the host in float64.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _call, _checks
from ._device import is_device
from .layer import DEFAULT_MOMENTUM, BatchNorm

Array = Any


def check_limits(rmax: Any, dmax: Any) -> tuple[float, float]:
    """``(rmax, dmax)`` as floats, checked: finite, ``rmax >= 1`` and ``dmax >= 0``."""
    return _limit(rmax, "rmax", 1.0), _limit(dmax, "dmax", 0.0)


def _limit(value, name, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite float >= {low:g}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= low):
        raise ValueError(f"{name} must be a finite float >= {low:g}, got {value!r}")
    return value


def renorm_factors(mean, var, running_mean, running_var, eps, rmax, dmax):
    """Per-channel ``(r, d)``, float64, from the batch's ``mean`` and biased ``var`` and the
    running statistics before the step's update (all float64 host arrays)."""
    s = np.sqrt(running_var + eps)
    r = np.clip(np.sqrt(var + eps) / s, 1.0 / rmax, rmax)
    d = np.clip((mean - running_mean) / s, -dmax, dmax)
    return r, d


def _host(a):
    """A per-channel array (host or GPU) as a float64 NumPy array."""
    if is_device(a):
        from .cuda._arrays import as_numba

        a = as_numba(a).copy_to_host()
    return np.asarray(a, dtype=np.float64)


def _like(values, inp, like=None):
    """Host float64 ``values`` in ``inp``'s dtype, on ``inp``'s device (as ``like``'s kind of
    array there, when given)."""
    values = np.ascontiguousarray(values, dtype=inp.dtype)
    if inp.backend.DEVICE == "cpu":
        return values
    from numba import cuda

    from .cuda._arrays import like as like_kind

    d = cuda.to_device(values)
    return d if like is None else like_kind(d, like)


def _forward(call, rmax, dmax):
    """``(output, save_mean, save_invstd, r, d)`` of a checked training
    :class:`numbabn._call.ForwardCall` with running statistics, renormalized."""
    inp = call.inp
    num_channels = inp.num_channels
    ones, zeros = np.ones(num_channels), np.zeros(num_channels)
    if (rmax == 1.0 and dmax == 0.0) or inp.x.size == 0:
        # r = 1 and d = 0 exactly (or an empty batch): batch normalization itself.
        return (*call.run(), ones, zeros)
    count, mean, m2 = inp.backend.batch_stats(inp)
    mean, m2 = _host(mean), _host(m2)
    r, d = renorm_factors(mean, m2 / count, _host(call.running_mean), _host(call.running_var), call.eps, rmax, dmax)
    w = ones if call.weight is None else _host(call.weight)
    b = zeros if call.bias is None else _host(call.bias)
    stats = np.stack([np.full(num_channels, float(count)), mean, m2])
    renormed = _call.ForwardCall(
        inp,
        _like(w * r, inp),
        _like(b + w * d, inp),
        call.running_mean,
        call.running_var,
        True,
        call.momentum,
        call.eps,
        call.out,
        call.saved,
    )
    return (*inp.backend.forward_with_stats(renormed, stats), r, d)


def _backward(call, r, d):
    """``(grad_input, grad_weight, grad_bias, abs_grad_sum)`` of a checked training
    :class:`numbabn._call.BackwardCall` of a renormalized forward with factors ``r``, ``d``."""
    inp = call.inp
    w = np.ones(inp.num_channels) if call.weight is None else _host(call.weight)
    scaled = _call.BackwardCall(
        inp, call.grad_output, _like(w * r, inp), call.save_mean, call.save_invstd, True, call.out, call.abs_sum
    )
    grad_input, grad_xhat, grad_bias, abs_sum = inp.backend.backward(scaled)
    grad_weight = _like(r * _host(grad_xhat) + d * _host(grad_bias), inp, grad_xhat)
    return grad_input, grad_weight, grad_bias, abs_sum


def _factors(a, name, inp):
    """``r`` or ``d`` as given to :func:`batch_renorm_backward`: float64 host values, finite."""
    a = _checks.per_channel(a, inp.num_channels, np.dtype(np.float64), name, allow_f64=True)
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite (as batch_renorm_forward returns it), got {a[~np.isfinite(a)][0]}")
    return a


def batch_renorm_forward(
    input: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array,
    running_var: Array,
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    out: Array | None = None,
    stream: Any = None,
) -> tuple[Array, Array, Array, np.ndarray, np.ndarray]:
    """Batch Renormalization's training forward; returns what
    :func:`batch_renorm_backward` needs.

    Parameters
    ----------
    input : ndarray, GPU array or dask.array.Array
        As :func:`batch_norm_forward`.
    weight, bias : ndarray of shape (C,) or None
        The affine parameters (``1`` and ``0`` when None).
    running_mean, running_var : ndarray of shape (C,)
        Required: they give ``r`` and ``d`` (their values before this call), then receive
        the EMA update in place, as in :func:`batch_norm_forward`.
    rmax : float >= 1, default 3.0
        ``r`` is clipped to ``[1 / rmax, rmax]``.
    dmax : float >= 0, default 5.0
        ``d`` is clipped to ``[-dmax, dmax]``.  ``rmax=1, dmax=0`` is batch normalization,
        bit for bit.
    momentum, eps, axis, out, stream
        As :func:`batch_norm_forward`.

    Returns
    -------
    output : ndarray
        ``weight * ((x - mean_B) / s_B * r + d) + bias`` (see :mod:`numbabn.renorm`).
    save_mean, save_invstd : ndarray of float64, shape (C,)
        The batch's mean and ``1 / s_B``.
    r, d : ndarray of float64, shape (C,)
        The correction factors, host arrays.

    Raises
    ------
    ValueError
        ``rmax < 1``, ``dmax < 0`` or either not finite; running statistics missing; and
        every error of :func:`batch_norm_forward` in training.  Nothing is written then.
    """
    rmax, dmax = check_limits(rmax, dmax)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required by batch renormalization (r and d), got None")
    inp = _call.check_input(input, axis, stream)
    call = _call.forward_call(inp, weight, bias, running_mean, running_var, True, momentum, eps, out)
    return _forward(call, rmax, dmax)


def batch_renorm_backward(
    grad_output: Array,
    input: Array,
    weight: Array | None,
    save_mean: Array,
    save_invstd: Array,
    r: Array,
    d: Array,
    *,
    axis: int = 1,
    out: Array | None = None,
    stream: Any = None,
) -> tuple[Array, Array, Array]:
    """Gradients of Batch Renormalization's training forward, ``r`` and ``d`` held fixed.

    Parameters
    ----------
    grad_output, input, weight, save_mean, save_invstd, axis, out, stream
        As :func:`batch_norm_backward`.
    r, d : ndarray of shape (C,)
        As returned by :func:`batch_renorm_forward`.

    Returns
    -------
    grad_input, grad_weight, grad_bias : arrays
        As :func:`batch_norm_backward`; here ``grad_weight = sum(g * (xhat * r + d))`` and
        ``grad_input`` is the batch-norm gradient with weight ``weight * r``.
    """
    inp = _call.check_input(input, axis, stream)
    r, d = _factors(r, "r", inp), _factors(d, "d", inp)
    call = _call.backward_call(inp, grad_output, weight, save_mean, save_invstd, True, out, abs_sum=False)
    return _backward(call, r, d)[:3]


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe, 2017): a :class:`BatchNorm` whose training output is
    corrected towards the running statistics by per-channel factors ``r`` and ``d`` (see
    :mod:`numbabn.renorm`), for small or non-i.i.d. batches.

    Parameters
    ----------
    num_features, eps, momentum, affine, axis, dtype, decay, device
        As :class:`BatchNorm`.  Running statistics are always tracked.
    rmax : float >= 1, default 3.0
        ``r`` is clipped to ``[1 / rmax, rmax]``.  A writable attribute, as schedules ramp it
        up during training (from 1).
    dmax : float >= 0, default 5.0
        ``d`` is clipped to ``[-dmax, dmax]``; writable too (ramped from 0).

    Notes
    -----
    Eval mode is :class:`BatchNorm`'s.  ``rmax=1, dmax=0`` gives :class:`BatchNorm`'s results
    bit for bit.  State-dict keys are :class:`BatchNorm`'s; :attr:`r` and :attr:`d` hold the
    last training forward's factors (float64, host).

    Examples
    --------
    >>> import numpy as np, numbabn
    >>> bn = numbabn.BatchRenorm(3, rmax=1.5, dmax=0.5)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (4, 3, 2, 2)).astype(np.float32)
    >>> y = bn(x)
    >>> gx = bn.backward(np.ones_like(y))
    >>> bool(np.all(bn.r <= 1.5))
    True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = DEFAULT_MOMENTUM,
        affine: bool = True,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        axis: int = 1,
        dtype: Any = np.float32,
        decay: float | None = None,
        device: str = "cpu",
    ) -> None:
        rmax, dmax = check_limits(rmax, dmax)
        super().__init__(num_features, eps, momentum, affine, True, axis=axis, dtype=dtype, decay=decay, device=device)
        self._rmax, self._dmax = rmax, dmax
        self.r = self.d = None
        self._factors = None

    _HOST_STATE = (*BatchNorm._HOST_STATE, "r", "d")
    _BACKWARD_STATE = (*BatchNorm._BACKWARD_STATE, "_factors")

    @property
    def rmax(self) -> float:
        """``r``'s clip, ``[1 / rmax, rmax]``; a finite float >= 1."""
        return self._rmax

    @rmax.setter
    def rmax(self, value: float) -> None:
        self._rmax = _limit(value, "rmax", 1.0)

    @property
    def dmax(self) -> float:
        """``d``'s clip, ``[-dmax, dmax]``; a finite float >= 0."""
        return self._dmax

    @dmax.setter
    def dmax(self, value: float) -> None:
        self._dmax = _limit(value, "dmax", 0.0)

    def _run_forward(self, call):
        if not call.training:
            self._factors = None
            return call.run()
        y, mean, invstd, r, d = _forward(call, self._rmax, self._dmax)
        self._factors = (r, d)
        self.r, self.d = r, d
        return y, mean, invstd

    def _run_backward(self, call):
        factors = self._factors
        if factors is None or not call.training:
            return super()._run_backward(call)
        return (*_backward(call, *factors), _checks.values_per_channel(call.inp.shape, call.inp.axis))

    def __repr__(self):
        return (
            f"BatchRenorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"rmax={self._rmax}, dmax={self._dmax}, axis={self.axis}, dtype={self.dtype.name}"
            + (", device='cuda')" if self.device == "cuda" else ")")
        )
