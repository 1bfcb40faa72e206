"""Batch Renormalization (Ioffe, 2017): batch normalization whose training output is
corrected towards the running statistics, for small and non-i.i.d. batches.

With the batch's ``mean_B`` and biased ``var_B`` and the running statistics *before* the
step's update, per channel::

    s_B = sqrt(var_B + eps),  s = sqrt(running_var + eps)
    r = clip(s_B / s, 1 / rmax, rmax),  d = clip((mean_B - running_mean) / s, -dmax, dmax)
    y = weight * ((x - mean_B) / s_B * r + d) + bias

``r`` and ``d`` are constants to the gradient.  So a training step is a batch-norm step
whose finalize folds ``(weight * r, bias + weight * d)`` instead of ``(weight, bias)``:
the backends' training kernels do it per channel (:func:`numbabn._math.renorm`), between
the statistics and the normalize pass, at no cost in memory traffic, and return ``r`` and
``d``; the running statistics update as ``BatchNorm``'s.  The backward is the batch-norm
backward with weight ``weight * r``, and ``grad_weight = r * sum(g * xhat) + d * sum(g)``
(host float64 arithmetic on the per-channel results).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _activation, _call, _checks, _ghost
from .layer import DEFAULT_MOMENTUM, BatchNorm
from .sync import SyncBatchNorm

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


def _ask_limits(call, rmax, dmax, elsewhere=False):
    """Ask the kernels of a training ``call`` for ``r`` and ``d`` (``call.limits``), unless
    ``rmax=1, dmax=0`` make them 1 and 0 exactly (batch normalization itself) or the batch
    is empty and no other process's part (``elsewhere``) makes its statistics."""
    if not (rmax == 1.0 and dmax == 0.0) and (call.inp.x.size or elsewhere):
        call.limits = (rmax, dmax)


def _factors_of(call, shape):
    """``(r, d)`` the kernels left in ``call.extra`` (the last two rows), or 1 and 0 of
    ``shape`` where the call did not ask for them."""
    if call.limits is None:
        return np.ones(shape), np.zeros(shape)
    return call.extra[..., -2, :], call.extra[..., -1, :]


def _scale_weight(call, r):
    """A backward ``call``'s weight times ``r``: the batch-norm backward of a renormalized
    forward, ``r`` held fixed."""
    inp = call.inp
    w = np.ones(inp.num_channels) if call.weight is None else _ghost.host(call.weight)
    call.weight = _ghost.on_device_of(inp, w * r, _checks.param_dtype(inp.dtype))


def _grad_weight(inp, grad_xhat, grad_bias, r, d):
    """``sum(g * (xhat * r + d))`` from the batch-norm backward's ``sum(g * xhat)`` and
    ``sum(g)``, as ``inp``'s kind of array."""
    grad_weight = r * _ghost.host(grad_xhat) + d * _ghost.host(grad_bias)
    return _ghost.on_device_of(inp, grad_weight, _checks.param_dtype(inp.dtype), True)


def _forward(call, rmax, dmax, ghosts=None):
    """``(output, save_mean, save_invstd, r, d)`` of a checked training
    :class:`numbabn._call.ForwardCall` with running statistics, renormalized; as ghost
    batches of ``ghosts`` samples when given (then every per-channel result is ``(G, C)``,
    a row per ghost)."""
    _ask_limits(call, rmax, dmax)
    if ghosts is None:
        y, mean, invstd = call.run()
    else:
        y, mean, invstd, call.extra = _ghost.forward(call, ghosts)
    return (y, mean, invstd, *_factors_of(call, mean.shape))


def _backward(call, r, d):
    """``(grad_input, grad_weight, grad_bias, abs_grad_sum)`` of a checked training
    :class:`numbabn._call.BackwardCall` of a renormalized forward with factors ``r``, ``d``."""
    _scale_weight(call, r)
    grad_input, grad_xhat, grad_bias, abs_sum = call.run()
    return grad_input, _grad_weight(call.inp, grad_xhat, grad_bias, r, d), grad_bias, abs_sum


def _factors(a, name, inp):
    """``r`` or ``d`` as given to :func:`batch_renorm_backward`: float64 host values, finite."""
    a = _checks.per_channel(a, inp.num_channels, np.dtype(np.float64), name, allow_f64=True)
    return _finite(a, name)


def _finite(a, name):
    a = _ghost.host(a)
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
    virtual_batch_size: int | None = None,
    activation: str | None = None,
    residual: Array | None = None,
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
    momentum, eps, axis, out, stream, virtual_batch_size, activation, residual
        As :func:`batch_norm_forward`; with ghost batches every ghost gets its own ``r`` and
        ``d`` (from the running statistics before the call's one update).

    Returns
    -------
    output : ndarray
        ``weight * ((x - mean_B) / s_B * r + d) + bias`` (see :ref:`renorm`), then
        ``+ residual`` and the activation when given.
    save_mean, save_invstd : ndarray of float64, shape (C,)
        The batch's mean and ``1 / s_B``.
    r, d : ndarray of float64, shape (C,)
        The correction factors, host arrays (``(G, C)`` with ghost batches, as the saved
        statistics).

    Raises
    ------
    ValueError
        ``rmax < 1``, ``dmax < 0`` or either not finite; running statistics missing; and
        every error of :func:`batch_norm_forward` in training.  Nothing is written then.
    """
    rmax, dmax = check_limits(rmax, dmax)
    virtual_batch_size = _ghost.check_size(virtual_batch_size, axis)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required by batch renormalization (r and d), got None")
    inp = _call.check_input(input, axis, stream)
    acts = {"activation": activation, "residual": residual}
    call = _call.forward_call(inp, weight, bias, running_mean, running_var, True, momentum, eps, out, **acts)
    return _forward(call, rmax, dmax, virtual_batch_size if _ghost.applies(inp, virtual_batch_size) else None)


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
    virtual_batch_size: int | None = None,
    activation: str | None = None,
    output: Array | None = None,
    residual: bool = False,
) -> tuple[Array, ...]:
    """Gradients of Batch Renormalization's training forward, ``r`` and ``d`` held fixed.

    Parameters
    ----------
    grad_output, input, weight, save_mean, save_invstd, axis, out, stream, virtual_batch_size
        As :func:`batch_norm_backward`.
    activation, output, residual
        As :func:`batch_norm_backward`: the forward's ReLU, its output, and whether to
        return the residual's gradient too.
    r, d : ndarray of shape (C,), or (G, C) with ghost batches
        As returned by :func:`batch_renorm_forward`.

    Returns
    -------
    grad_input, grad_weight, grad_bias : arrays
        As :func:`batch_norm_backward`; here ``grad_weight = sum(g * (xhat * r + d))`` and
        ``grad_input`` is the batch-norm gradient with weight ``weight * r``.
    grad_residual : array
        With ``residual=True`` only, as :func:`batch_norm_backward`.
    """
    virtual_batch_size = _ghost.check_size(virtual_batch_size, axis)
    inp = _call.check_input(input, axis, stream)
    relu, output, residual = _activation.check_backward(inp, activation, output, residual)
    if _ghost.applies(inp, virtual_batch_size):
        factors = (_finite(r, "r"), _finite(d, "d"))
        g = _activation.incoming(inp, grad_output, relu, output)
        grads = _ghost.backward(inp, g, weight, save_mean, save_invstd, virtual_batch_size, factors, out)[:3]
    else:
        r, d = _factors(r, "r", inp), _factors(d, "d", inp)
        g = _activation.incoming(inp, grad_output, relu, output)
        call = _call.backward_call(inp, g, weight, save_mean, save_invstd, True, out, abs_sum=False)
        _activation.reuse_gradient(call, relu, residual)
        grads = _backward(call, r, d)[:3]
    return (*grads, g if relu else grad_output) if residual else grads


class _Renormalizing:
    """Batch Renormalization on top of a batch-norm layer's steps (:class:`BatchRenorm`,
    :class:`numbabn.SyncBatchRenorm`): a training forward asks the kernels for ``r`` and
    ``d`` (``call.limits``), the backward runs with weight ``weight * r`` and corrects
    ``grad_weight``; what the layer underneath does (ghost batches, exchanging statistics
    between processes) is unchanged."""

    _HOST_STATE = ("r", "d")
    _BACKWARD_STATE = ("_factors",)

    def _init_renorm(self, rmax, dmax):
        self._rmax, self._dmax = rmax, dmax
        self.r = self.d = None
        self._factors = None

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
        self._factors = None
        if not call.training:
            return super()._run_forward(call)
        _ask_limits(call, self._rmax, self._dmax, self._statistics_elsewhere())
        y, mean, invstd = super()._run_forward(call)
        r, d = _factors_of(call, mean.shape)
        self._factors = (r, d)
        if self._ghosts is not None:
            self._ghosts = (self._ghosts[0], self._factors)
        self.r, self.d = r, d
        return y, mean, invstd

    def _statistics_elsewhere(self):
        """Whether a training forward's statistics come from other processes too."""
        return False

    def _run_backward(self, call):
        if self._factors is None or not call.training:
            return super()._run_backward(call)
        r, d = self._factors
        _scale_weight(call, r)
        grad_input, grad_xhat, grad_bias, abs_sum, n = super()._run_backward(call)
        return grad_input, _grad_weight(call.inp, grad_xhat, grad_bias, r, d), grad_bias, abs_sum, n

    def _extra_repr(self):
        return f"rmax={self._rmax}, dmax={self._dmax}, "


class BatchRenorm(_Renormalizing, BatchNorm):
    """Batch Renormalization (Ioffe, 2017): a :class:`BatchNorm` whose training output is
    corrected towards the running statistics by per-channel factors ``r`` and ``d`` (see
    :ref:`renorm`), for small or non-i.i.d. batches.

    Parameters
    ----------
    num_features, eps, momentum, affine, axis, dtype, decay, device, virtual_batch_size, activation
        As :class:`BatchNorm`.  Running statistics are always tracked.  With ghost batches
        each ghost has its own ``r`` and ``d``.
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
        virtual_batch_size: int | None = None,
        activation: str | None = None,
    ) -> None:
        rmax, dmax = check_limits(rmax, dmax)
        settings = dict(axis=axis, dtype=dtype, decay=decay, device=device, virtual_batch_size=virtual_batch_size)
        settings["activation"] = activation
        super().__init__(num_features, eps, momentum, affine, True, **settings)
        self._init_renorm(rmax, dmax)

    _HOST_STATE = (*BatchNorm._HOST_STATE, *_Renormalizing._HOST_STATE)
    _BACKWARD_STATE = (*BatchNorm._BACKWARD_STATE, *_Renormalizing._BACKWARD_STATE)

    def __repr__(self):
        return f"BatchRenorm({self._settings_repr(tracking=False)})"


class SyncBatchRenorm(_Renormalizing, SyncBatchNorm):
    """Batch Renormalization over a batch split across processes: a
    :class:`~numbabn.SyncBatchNorm` whose training steps are :class:`BatchRenorm`'s, ``r``
    and ``d`` computed from the global batch's statistics (the same bits on every rank).

    Parameters
    ----------
    num_features, eps, momentum, affine, axis, dtype, decay, device, comm, activation
        As :class:`~numbabn.SyncBatchNorm`.  Running statistics are always tracked.
    rmax, dmax : float
        As :class:`BatchRenorm`; every rank must use the same values (they are not
        exchanged).
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
        comm: Any = None,
        activation: str | None = None,
    ) -> None:
        rmax, dmax = check_limits(rmax, dmax)
        settings = dict(axis=axis, dtype=dtype, decay=decay, device=device, comm=comm, activation=activation)
        super().__init__(num_features, eps, momentum, affine, True, **settings)
        self._init_renorm(rmax, dmax)

    _HOST_STATE = (*SyncBatchNorm._HOST_STATE, *_Renormalizing._HOST_STATE)
    _BACKWARD_STATE = (*SyncBatchNorm._BACKWARD_STATE, *_Renormalizing._BACKWARD_STATE)

    def _statistics_elsewhere(self):
        return self._syncing()

    def __repr__(self):
        comm = "" if self.comm is None else f", comm={type(self.comm).__name__}"
        return f"SyncBatchRenorm({self._settings_repr(tracking=False)}{comm})"
