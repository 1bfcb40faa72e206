"""Mergeable per-channel statistics: :class:`Stats`, :func:`welford`, :func:`merge_stats`."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from . import _call
from ._device import host_only, host_stream, is_device
from ._math import chan_merge

_F64 = np.dtype(np.float64)


class Stats(NamedTuple):
    """Per-channel statistics of ``count`` values each: ``mean`` and ``m2`` (float64, shape
    ``(C,)``), with ``m2 = sum((x - mean)**2)``.

    Partial statistics merge exactly with :func:`merge_stats`, so one array, a stream of
    batches or chunks spread over many machines (:func:`numbabn.dask.welford`) give the
    same numbers (to rounding).
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def var(self, ddof: int = 0) -> Any:
        """Per-channel variance ``m2 / (count - ddof)``: ``ddof=0`` is the biased variance
        batch norm normalizes with, ``ddof=1`` the unbiased one ``running_var`` tracks.
        NaN where ``count <= ddof``.  Host statistics give float64 (integer fields are
        converted); complex ones are refused."""
        m2 = self.m2
        if not is_device(m2):  # float64, so that NaN exists and integer fields divide exactly
            m2 = _real(m2, "stats.m2")
        d = _count(self.count, "stats") - ddof
        if d <= 0:
            return np.full_like(m2, np.nan)
        return m2 / d

    def std(self, ddof: int = 0) -> Any:
        """Per-channel standard deviation, ``sqrt(var(ddof))``."""
        return np.sqrt(self.var(ddof))

    def to_array(self) -> np.ndarray:
        """The statistics as one float64 array ``[count, mean[0..C), m2[0..C)]`` of length
        ``2 C + 1``: the payload to send between processes (:meth:`from_array` reads it).
        GPU statistics are copied to the host."""
        count, mean, m2 = _as_stats(self, "stats", device=is_device(self.mean))
        mean, m2 = _host_array(mean), _host_array(m2)
        c = mean.shape[0]
        out = np.empty(2 * c + 1)  # filled in place: faster than np.concatenate of a list
        out[0] = count
        out[1 : 1 + c] = mean
        out[1 + c :] = m2
        return out

    @classmethod
    def from_array(cls, a: Any) -> Stats:
        """The :class:`Stats` of an array made by :meth:`to_array`."""
        a = np.asarray(a)
        if a.ndim != 1 or a.shape[0] % 2 != 1 or a.dtype != np.float64:
            raise ValueError(
                f"a must be a 1-d float64 array of length 2 C + 1 (count, mean, m2), got dtype {a.dtype} "
                f"and shape {a.shape}"
            )
        count = a[0]
        if not (np.isfinite(count) and count >= 0 and count == int(count)):
            raise ValueError(f"a[0] (the count) must be an integer >= 0, got {count!r}")
        c = (a.shape[0] - 1) // 2
        return cls(int(count), a[1 : 1 + c].copy(), a[1 + c :].copy())


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
        parts = [_as_stats(s, f"stats[{i}]", device=True) for i, s in enumerate(stats)]
        _same_channels(parts)
        count, mean, m2 = _call.cuda_backend().merge(parts, stream)
        return Stats(count, mean, m2)
    host_stream(stream, "host statistics")
    parts = [_as_stats(s, f"stats[{i}]") for i, s in enumerate(stats)]
    _same_channels(parts)
    count, mean, m2 = parts[0]
    for s in parts[1:]:
        count, mean, m2 = chan_merge.py_func(count, mean, m2, s.count, s.mean, s.m2)
    return Stats(int(count), np.array(mean, dtype=np.float64), np.array(m2, dtype=np.float64))


def _same_channels(parts):
    shape = parts[0].mean.shape
    for i, s in enumerate(parts):
        if s.mean.shape != shape:
            raise ValueError(f"stats[{i}] must have {shape[0]} channels (as stats[0]), got {s.mean.shape[0]}")


def _as_stats(s, name, device=False):
    try:
        count, mean, m2 = s
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a Stats (count, mean, m2), got {type(s).__name__}") from None
    count = _count(count, name)
    if device:
        for part, a in (("mean", mean), ("m2", m2)):
            if not is_device(a):
                raise TypeError(
                    f"{name}.{part} is a host array ({type(a).__name__}) but other parts are GPU arrays: "
                    "host and device statistics are not mixed; move one of them"
                )
        if mean.ndim != 1 or m2.shape != mean.shape:
            raise ValueError(f"{name}.mean and .m2 must both have shape (C,), got {mean.shape} and {m2.shape}")
        return Stats(count, mean, m2)
    host_only(f"{name}.mean", mean)
    host_only(f"{name}.m2", m2)
    mean, m2 = _real(mean, f"{name}.mean"), _real(m2, f"{name}.m2")
    if mean.ndim != 1 or m2.shape != mean.shape:
        raise ValueError(f"{name}.mean and .m2 must both have shape (C,), got {mean.shape} and {m2.shape}")
    return Stats(count, mean, m2)


def _count(count, name):
    """``name.count`` as an int, checked: an integer >= 0 (a complex one is a TypeError)."""
    if isinstance(count, numbers.Complex) and not isinstance(count, numbers.Real):
        raise TypeError(f"{name}.count must be an integer >= 0, got complex {count!r}")
    if isinstance(count, bool) or not isinstance(count, numbers.Real) or not (math.isfinite(count) and count >= 0):
        raise ValueError(f"{name}.count must be an integer >= 0, got {count!r}")
    if int(count) != count:
        raise ValueError(f"{name}.count must be an integer >= 0, got {count!r}")
    return int(count)


def _real(a, name):
    """The host field ``name`` as a float64 array: complex values are refused, not cast with a
    warning that drops their imaginary part."""
    try:
        arr = np.asarray(a)
        if arr.dtype.kind != "c":
            return arr.astype(np.float64, copy=False)
    except (TypeError, ValueError, OverflowError) as e:
        owner, field = name.rsplit(".", 1)
        kind = type(a).__name__
        raise TypeError(f"{owner}.mean and .m2 must be arrays of numbers, got a {kind} {field} ({e})") from None
    raise TypeError(f"{name} must be real (float64 statistics), got {arr.dtype}")


def _host_array(a):
    if type(a) is np.ndarray and a.dtype == _F64:
        return a
    if is_device(a):
        from .cuda._arrays import as_numba

        return as_numba(a).copy_to_host()
    return np.asarray(a, dtype=np.float64)
