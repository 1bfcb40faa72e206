"""``fold``: a batch-norm layer's eval transform folded into the weights and bias of the
linear or convolution layer before it, for deployment.

Host NumPy arithmetic only (a per-channel scale of the weights): no kernel is compiled.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _checks
from ._device import is_device

#: The weight dtypes ``fold`` takes (and returns): floating, at most float64's precision,
#: since the arithmetic is float64.
_WEIGHT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

_BN_ATTRIBUTES = ("running_mean", "running_var", "weight", "bias", "eps")


def fold(bn: Any, weight: Any, bias: Any | None = None, *, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fold a batch-norm layer's eval transform into the layer before it.

    For a linear or convolution layer ``layer`` whose output channels feed ``bn``, returns
    the weight and bias of a layer of the same kind that computes ``bn.eval()(layer(x))``
    in one step, to the rounding of ``weight``'s dtype::

        s = bn.weight / sqrt(bn.running_var + bn.eps)
        weight' = weight * s        (s along axis ``axis`` of weight)
        bias'   = (bias - bn.running_mean) * s + bn.bias

    The arithmetic is float64; nothing given is modified.

    Parameters
    ----------
    bn : BatchNorm or object
        The batch-norm layer after ``layer``: a :class:`BatchNorm` (on either device: GPU
        statistics are copied to the host) or any object with the attributes
        ``running_mean``, ``running_var``, ``weight``, ``bias`` (arrays of shape ``(C,)``;
        ``weight`` and ``bias`` may be None, meaning ones and zeros) and ``eps``, such as
        a ``torch.nn.BatchNorm2d``.  Its mode does not matter: the eval transform is folded.
    weight : ndarray of float16, float32 or float64
        The layer's weight, with the ``C`` output channels along ``axis``: ``(out, in)``
        (a PyTorch ``Linear``) or ``(out, in, kh, kw)`` (``Conv2d``) with ``axis=0``, or
        ``(in, out)`` for ``x @ weight`` with ``axis=1``.
    bias : ndarray of shape (C,), optional
        The layer's bias; None for a layer without one (zeros).
    axis : int, default 0
        The axis of ``weight`` that holds the output channels; negative counts from the end.

    Returns
    -------
    weight : ndarray
        The folded weight: ``weight``'s shape and dtype, a new array.
    bias : ndarray of shape (C,)
        The folded bias, of ``weight``'s dtype (also when ``bias`` is None), a new array.

    Raises
    ------
    TypeError
        ``weight`` is not a floating host array, ``bias`` is not a real one, ``axis`` is
        not an int, or ``bn`` lacks one of the attributes above or holds arrays that are
        not real-valued.
    ValueError
        ``bn`` has no running statistics (``track_running_stats=False``: its eval mode
        normalizes with batch statistics, which no fixed weights reproduce); its arrays
        are not of shape ``(C,)``, not finite, or ``running_var + eps`` is not positive;
        ``weight.shape[axis]`` is not ``C``; ``bias`` is not of shape ``(C,)``; ``axis``
        is out of range.

    Examples
    --------
    >>> import numpy as np, numbabn
    >>> rng = np.random.default_rng(0)
    >>> W, b = rng.normal(size=(4, 3)), rng.normal(size=4)  # a Linear layer, x @ W.T + b
    >>> bn = numbabn.BatchNorm(4, dtype=np.float64)
    >>> x = rng.normal(size=(16, 3))
    >>> _ = bn(x @ W.T + b)  # a training step: the running statistics move
    >>> W2, b2 = numbabn.fold(bn, W, b)
    >>> bool(np.allclose(x @ W2.T + b2, bn.eval()(x @ W.T + b)))
    True
    """
    weight = _host_array(weight, "weight")
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight must have a floating dtype ({_checks._names(_WEIGHT_DTYPES)}), got {weight.dtype}")
    if weight.ndim < 1:
        raise ValueError(f"weight must have at least 1 dimension (the output channels), got shape {weight.shape}")
    axis = _axis(axis, weight.ndim)
    mean, var, gamma, beta, eps = _bn_state(bn)
    num_channels = mean.shape[0]
    if weight.shape[axis] != num_channels:
        raise ValueError(
            f"weight must have {num_channels} output channels along axis {axis} (bn's channels), "
            f"got {weight.shape[axis]} (weight shape {weight.shape})"
        )
    if bias is not None:
        bias = _host_array(bias, "bias")
        if bias.shape != (num_channels,):
            raise ValueError(
                f"bias must have shape ({num_channels},) (one value per output channel, weight.shape[{axis}]), "
                f"got {bias.shape}"
            )
        bias = _real(bias, "bias")

    scale = gamma / np.sqrt(var + eps)
    shape = [1] * weight.ndim
    shape[axis] = num_channels
    # np.multiply makes a new float64 array, so astype(copy=False) still returns a new one.
    new_weight = np.multiply(weight, scale.reshape(shape), dtype=np.float64).astype(weight.dtype, copy=False)
    shifted = -mean if bias is None else bias - mean
    new_bias = (shifted * scale + beta).astype(weight.dtype, copy=False)
    return new_weight, new_bias


def _host_array(a, name):
    """The layer argument ``name`` as a host ndarray (lists, NumPy subclasses and PyTorch
    CPU tensors without autograd history are converted)."""
    if is_device(a):
        raise TypeError(
            f"{name} must be a host array (NumPy), got a GPU array ({type(a).__name__}): fold works on host "
            f"arrays; copy {name} to the host first"
        )
    if a is None or isinstance(a, (str, bytes)):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    return a if type(a) is np.ndarray else _checks._plain(a, name)


def _real(a, name):
    """``a`` as float64, refusing what is not real-valued (complex, bool, objects)."""
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a real-valued array (integer or floating), got dtype {a.dtype}")
    return a.astype(np.float64)


def _axis(axis, ndim):
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim}) for a weight with ndim {ndim}, got {axis}")
    return int(axis) % ndim


def _bn_state(bn):
    """``(running_mean, running_var, weight, bias, eps)`` of ``bn`` as float64 host arrays of
    shape ``(C,)`` (ones and zeros for a missing weight and bias) and a float, checked."""
    missing = [name for name in _BN_ATTRIBUTES if not hasattr(bn, name)]
    if missing:
        raise TypeError(
            f"bn must be a BatchNorm or an object with the attributes {', '.join(_BN_ATTRIBUTES)}, "
            f"got {type(bn).__name__} without {', '.join(missing)}"
        )
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is None:
            raise ValueError(
                f"bn must have running statistics to fold (a layer built with track_running_stats=True), "
                f"got {name} None: without them eval mode normalizes with batch statistics, which no fixed "
                "weights reproduce"
            )
    eps = bn.eps
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"bn.eps must be a float >= 0, got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"bn.eps must be a finite float >= 0, got {eps}")
    mean = _bn_array(bn, "running_mean", None)
    num_channels = mean.shape[0]
    var = _bn_array(bn, "running_var", num_channels)
    gamma = _bn_array(bn, "weight", num_channels)
    beta = _bn_array(bn, "bias", num_channels)
    gamma = np.ones(num_channels) if gamma is None else gamma
    beta = np.zeros(num_channels) if beta is None else beta
    for name, a in (("running_mean", mean), ("running_var", var), ("weight", gamma), ("bias", beta)):
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise ValueError(
                f"bn.{name} must be finite to fold, got {bad.size} non-finite value(s), "
                f"first {a[bad[0]]} at channel {bad[0]}"
            )
    bad = np.flatnonzero(var < 0)
    if bad.size:
        raise ValueError(f"bn.running_var must be >= 0 (a variance), got {var[bad[0]]} at channel {bad[0]}")
    bad = np.flatnonzero(var + eps <= 0)
    if bad.size:
        raise ValueError(
            f"bn.running_var + bn.eps must be > 0 (it is divided by), got 0 at channel {bad[0]} (eps {eps})"
        )
    return mean, var, gamma, beta, eps


def _bn_array(bn, name, num_channels):
    """``bn.<name>`` as a float64 host array of shape ``(num_channels,)`` (any length when
    ``num_channels`` is None, 1-d), or None: GPU arrays and PyTorch tensors are copied to the
    host."""
    value = getattr(bn, name)
    if value is None:
        return None
    label = f"bn.{name}"
    if hasattr(value, "detach"):  # a PyTorch tensor or parameter
        from .layer import _torch_numpy

        value = _torch_numpy(value, label)
    elif is_device(value):
        from .cuda._arrays import as_numba

        value = as_numba(value).copy_to_host()
    elif type(value) is not np.ndarray:
        if isinstance(value, (str, bytes, numbers.Number)):
            raise TypeError(f"{label} must be an array of shape (C,), got {type(value).__name__}")
        value = _checks._plain(value, label)
    if num_channels is None:
        if value.ndim != 1:
            raise ValueError(f"{label} must be 1-d (one value per channel), got shape {value.shape}")
    elif value.shape != (num_channels,):
        raise ValueError(f"{label} must have shape ({num_channels},) (bn.running_mean's), got {value.shape}")
    return _real(value, label)
