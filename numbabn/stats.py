"""Mergeable per-channel statistics: the :class:`Stats` type and its payload layout
``[count, mean[0..C), m2[0..C)]``, in one place.

A leaf of the package: nothing here imports a backend, :mod:`numbabn._call` or the public
functions, so every layer may import it.  :func:`numbabn.welford` and
:func:`numbabn.merge_stats` (in :mod:`numbabn.functional`) make and merge ``Stats``; the
backends make payloads with :func:`payload` and SyncBatchNorm merges its ranks' payloads with
:func:`merge_parts`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from ._device import host_only, is_device, to_host
from ._jit import leaf
from ._math import chan_merge_channels

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
        count, mean, m2 = checked(self, "stats", device=is_device(self.mean))
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


def same_channels(parts):
    """Raise unless every part of ``parts`` (checked ``Stats``) has the channels of the first."""
    shape = parts[0].mean.shape
    for i, s in enumerate(parts):
        if s.mean.shape != shape:
            raise ValueError(f"stats[{i}] must have {shape[0]} channels (as stats[0]), got {s.mean.shape[0]}")


def checked(s, name, device=False):
    """``s`` as checked ``Stats`` named ``name`` in messages: an integer count >= 0 and fields of
    shape ``(C,)``, all on the GPU (``device``) or all on the host as float64 arrays."""
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
        return to_host(a)
    return np.asarray(a, dtype=np.float64)


# -- the payload: one float64 array [count, mean[0..C), m2[0..C)] ------------------------------


def payload(count, stats):
    """``[count, mean[0..C), m2[0..C)]`` (:meth:`Stats.to_array`'s layout) of the (3, C)
    C-contiguous float64 ``stats``, rows count, mean and M2, without a copy: ``stats``
    flattened from the last column of the count row on, that is memory shared with ``stats``,
    whose ``stats[0, -1]`` becomes ``count``."""
    num_channels = stats.shape[1]
    if num_channels == 0:
        return np.array([float(count)])
    out = stats.reshape(-1)[num_channels - 1 :]
    out[0] = count
    return out


@leaf
def merge_parts(parts, stats):
    """Chan-merge the rows of ``parts`` (P, 2 C + 1), each a payload ``[count, mean[0..C),
    m2[0..C)]``, left to right into ``stats`` (3, C), and return the merged count: one
    compiled call for the parts that SyncBatchNorm's ranks exchange."""
    num_channels = stats.shape[1]
    mean = stats[1]
    m2 = stats[2]
    for c in range(num_channels):
        mean[c] = 0.0
        m2[c] = 0.0
    n = 0.0
    for p in range(parts.shape[0]):
        n = chan_merge_channels(n, mean, m2, parts[p, 0], parts[p, 1 : 1 + num_channels], parts[p, 1 + num_channels :])
    for c in range(num_channels):
        stats[0, c] = n
    return n
