"""Argument checks and the canonical ``(outer, C, inner)`` shape: the one place for both.

Every check runs before any kernel or buffer is touched, and every message names the
argument, what was expected and what was received.
"""

import math
import numbers

import numpy as np

from ._device import host_only

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: The dtypes of inputs: float16 data takes float32 parameters (:func:`param_dtype`).
INPUT_DTYPES = (*FLOAT_DTYPES, np.dtype(np.float16))
_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)


def param_dtype(dtype):
    """The dtype of the per-channel arrays (weight, bias, running statistics) and of
    ``grad_weight`` and ``grad_bias`` for input of ``dtype``: float32 for float16 data
    (PyTorch's mixed precision, where statistics and parameters keep float32), else the
    input's."""
    return _F32 if dtype == _F16 else dtype


# NumPy >= 1.25 has it in ``numpy.exceptions`` only, older ones at the top level.
_TOO_HARD = getattr(np, "exceptions", np).TooHardError


def as_input(x, name="input"):
    """Return ``x`` as a floating ndarray with ``ndim >= 2`` or raise.  Array-likes (lists,
    ``np.matrix``, PyTorch CPU tensors, ...) are converted with ``numpy.asarray``, without a
    copy where they allow it; masked arrays are refused (their mask would be ignored)."""
    if type(x) is not np.ndarray:
        if x is None or isinstance(x, (str, bytes, numbers.Number)):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        x = _plain(x, name)
    return check_input(x, name, INPUT_DTYPES)


def check_input(x, name, dtypes):
    """Check the dtype (one of ``dtypes``) and ``ndim >= 2`` of an input array (host or GPU)."""
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch, channels, ...), got {x.ndim} (shape {x.shape})"
        )
    return x


def _names(dtypes):
    names = [np.dtype(d).name for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def norm_axis(axis, ndim, name="axis"):
    """Return ``axis`` as a non-negative int in ``[0, ndim)`` or raise."""
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim}) for an input with ndim {ndim}, got {axis}")
    return int(axis) % ndim


def same_kind(x, other, name, *, writable=False):
    """Check that ``other`` is an ndarray with ``x``'s shape and dtype (and writable when it
    receives results)."""
    other = check_like(x, _ndarray(other, name), name)
    if writable and not other.flags.writeable:
        raise ValueError(f"{name} must be writable (it receives the results), got a read-only array")
    return other


def check_like(x, other, name):
    """``other`` (host or GPU) has ``x``'s shape and dtype."""
    if other.shape != x.shape:
        raise ValueError(f"{name} must have shape {x.shape} (the input's), got {other.shape}")
    _dtype(other, (x.dtype,), name)
    return other


def per_channel(a, num_channels, dtype, name, *, writable=False, allow_f64=False):
    """Check a per-channel array: shape ``(C,)``, dtype ``dtype`` (or float64 when
    ``allow_f64``), writable when it is updated in place.  ``None`` passes through."""
    if a is None:
        return None
    a = _ndarray(a, name)
    check_channels(a, num_channels, (dtype, np.float64) if allow_f64 else (dtype,), name)
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable (it is updated in place), got a read-only array")
    return a


def check_channels(a, num_channels, dtypes, name):
    """``a`` (host or GPU) has shape ``(C,)`` and one of ``dtypes`` (the first is the input's)."""
    if a.shape != (num_channels,):
        raise ValueError(f"{name} must have shape ({num_channels},) (one value per channel), got {a.shape}")
    _dtype(a, dtypes, name)


def check_momentum(momentum, name="momentum", meaning="the weight of the new batch"):
    """``momentum`` is the weight of the new batch, a real number in [0, 1] (``name`` and
    ``meaning`` let Keras's ``decay`` share the check)."""
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    if momentum is None:
        raise TypeError(
            f"{name} must be a float in [0, 1], got None; the cumulative average "
            "(momentum=None) is BatchNorm's, which counts num_batches_tracked"
        )
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] ({meaning}), got {momentum}")
    return float(momentum)


def check_eps(eps):
    """``eps`` is a finite real number >= 0."""
    if type(eps) is float and 0.0 <= eps < math.inf:
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float >= 0, got {type(eps).__name__}")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return float(eps)


def values_per_channel(shape, axis):
    """``n``, the number of values that share each channel: the product of the other axes."""
    if len(shape) == 2:
        return shape[1 - axis]
    return math.prod(shape[:axis]) * math.prod(shape[axis + 1 :])


def check_training_count(shape, axis):
    """Training needs more than one value per channel (the unbiased variance divides by
    n - 1); an empty batch (n = 0) is allowed, as in PyTorch (its output is empty and the
    running statistics are untouched)."""
    n = values_per_channel(shape, axis)
    if n == 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of shape "
            f"{shape} ({n} value(s) per channel along axis {axis})"
        )


def shape3(shape, axis):
    """``(outer, C, inner)`` of a C-ordered ``shape`` with the features on ``axis`` (without
    ``math.prod`` for the common 2-d and axis-1 shapes: small calls spend their time in
    Python)."""
    ndim = len(shape)
    if ndim == 2:
        return (shape[0], shape[1], 1) if axis == 1 else (1, shape[0], shape[1])
    outer = shape[0] if axis == 1 else math.prod(shape[:axis])
    return (outer, shape[axis], shape[2] if ndim == 3 and axis == 1 else math.prod(shape[axis + 1 :]))


def contiguous(x):
    """``x`` itself when C- or F-contiguous, else a C-contiguous copy (strided views,
    negative strides)."""
    if x.flags.c_contiguous or x.flags.f_contiguous:
        return x
    return np.ascontiguousarray(x)


def output_for(x, out, *others):
    """The array results are written to: ``out`` itself when it is viewed as ``x`` is (same
    memory order) and overlaps none of ``x``, ``*others`` unless it *is*
    one of them (elementwise passes run in place safely); otherwise a new array in ``x``'s
    order, which the caller copies into ``out`` at the end.  An unaligned ``out`` (the kernels
    write aligned outputs) gets the new array too."""
    if out is not None and same_view(out, x) and out.flags.aligned:
        for a in (x, *others):
            if out is not a and np.may_share_memory(out, a):
                break
        else:
            return out
    return np.empty_like(x)


def same_view(a, x):
    c = a.flags.c_contiguous
    return c == x.flags.c_contiguous and (c or a.flags.f_contiguous)


def check_disjoint(written, read, allowed=()):
    """Raise ``ValueError`` when an array written in place (``written``: ``(name, array)``
    pairs) overlaps itself or shares memory with another of the call's arrays (``written`` or
    ``read``), except the pairs of names in ``allowed`` (each a ``frozenset``: arrays the
    backend copies around); entries that are not NumPy arrays (None, GPU or Dask arrays) are
    skipped.

    Arrays whose memory NumPy says they own, or views of such an owner, can only overlap
    arrays of the same owner: a call whose arrays have distinct owners (the common case)
    costs one pass over them.  Any other pair (views of a buffer, ``np.frombuffer``,
    ``as_strided``, PyTorch's ``.numpy()``, the same owner) is compared by its bounds and,
    where they overlap, exactly.
    """
    owners = set()
    count = 0
    distinct = True
    for name, a in written:
        if type(a) is np.ndarray:
            flags = a.flags
            if not (flags.c_contiguous or flags.f_contiguous) and _overlaps_itself(a):
                raise ValueError(
                    f"{name} must not overlap itself ({name} is written in place), got a view with shape "
                    f"{a.shape} and strides {a.strides} whose elements share memory"
                )
            own = owner(a, flags)
            distinct = distinct and own is not None
            owners.add(id(own))
            count += 1
    for _, a in read:
        if distinct and type(a) is np.ndarray:
            own = owner(a, a.flags)
            distinct = own is not None
            owners.add(id(own))
            count += 1
    if distinct and len(owners) == count:
        return
    _find_overlap(written, read, allowed)


def _find_overlap(written, read, allowed):
    """The slow half of :func:`check_disjoint`: compare the pairs one by one."""
    arrays = [(name, a, owner(a, a.flags)) for name, a in (*written, *read) if type(a) is np.ndarray]
    written = {id(a) for _, a in written}
    for i, (name, a, own) in enumerate(arrays):
        for other, b, other_own in arrays[i + 1 :]:
            if (
                (id(a) in written or id(b) in written)
                and frozenset((name, other)) not in allowed
                and _share(a, own, b, other_own)
            ):
                if id(a) not in written:
                    name, other = other, name
                raise ValueError(
                    f"{name} and {other} must not share memory ({name} is written in place), got overlapping arrays"
                )


def owner(a, flags):
    """The ndarray that owns ``a``'s memory, by NumPy's own account (``a`` itself or its
    ``base``), or None where NumPy cannot say (memory from a buffer, ``as_strided``, another
    library); ``flags`` are ``a``'s."""
    base = a.base
    if base is None:
        return a if flags.owndata else None
    if type(base) is np.ndarray and base.base is None and base.flags.owndata:
        return base
    return None


def _share(a, owner_a, b, owner_b):
    """Whether ``a`` and ``b`` share memory: never for distinct owners; else the bounds, and
    where they overlap the exact answer (an answer too costly to find counts as shared)."""
    if owner_a is not None and owner_b is not None and owner_a is not owner_b:
        return False
    if not np.may_share_memory(a, b):
        return False
    try:
        return np.shares_memory(a, b, max_work=1 << 16)
    except _TOO_HARD:
        return True


def _overlaps_itself(a):
    """Whether two elements of a non-contiguous ``a`` share memory (a zero stride, or strides
    that interleave): each stride, smallest first, must step past the extent of the axes below
    it, or the array is taken to overlap itself."""
    if a.size <= 1:
        return False
    extent = a.itemsize
    for stride, length in sorted((abs(s), n) for s, n in zip(a.strides, a.shape, strict=True) if n > 1):
        if stride < extent:
            return True
        extent += stride * (length - 1)
    return False


def _ndarray(a, name):
    host_only(name, a)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    return a if type(a) is np.ndarray else _plain(a, name)


def _plain(a, name):
    """``a`` as a base-class ndarray (a view where possible: in-place updates still reach
    subclasses such as ``np.memmap``); masked arrays and ragged sequences are refused."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} must not be a masked array (its mask would be ignored), got {type(a).__name__}")
    if getattr(a, "requires_grad", False) is True:
        raise TypeError(
            f"{name} must be an array without autograd history, got a {type(a).__name__} that requires grad; "
            f"pass {name}.detach() (numbabn computes gradients with backward, not autograd)"
        )
    try:
        return np.asarray(a)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array of numbers, got {type(a).__name__} ({e})") from None


def check_flag(value, name):
    """A boolean argument: ``bool``, ``numpy.bool_`` or the ints 0 and 1."""
    if value is True or value is False:
        return value
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _dtype(a, dtypes, name):
    if a.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)} (the input's; dtypes are not mixed), got {a.dtype}")
