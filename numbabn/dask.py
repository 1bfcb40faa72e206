"""Dask arrays (the ``numbabn[dask]`` extra): what only a Dask array has.

numbabn's public functions and :class:`~numbabn.BatchNorm` take ``dask.array.Array`` inputs
themselves (the backend is :mod:`numbabn._dask_backend`, loaded by :mod:`numbabn._call`);
this module adds :func:`welford` with the options only a Dask array has (``split_every``,
``compute``).  Importing it imports Dask.
"""

from __future__ import annotations

from typing import Any

from . import _call, _checks

__all__ = ["welford"]

#: The Dask backend, loaded (and bound to its inputs) by :mod:`numbabn._call`: importing
#: this module imports Dask, or raises ImportError without it.
_backend = _call.dask_backend()


def welford(x: Any, *, axis: int = 1, split_every: Any = None, compute: bool = True) -> Any:
    """Per-channel count, mean and M2 of a Dask array: exact, deterministic, one pass.

    Parameters
    ----------
    x : dask.array.Array of float32 or float64, ndim >= 2
        Values (NumPy chunks, any chunking: along the feature axis too, uneven, empty);
        every axis but ``axis`` is reduced.
    axis : int, default 1
        The feature (channel) axis; ``-1`` for channels-last.
    split_every : int >= 2, optional
        Partials merged per task of the reduction tree (default 16).
    compute : bool, default True
        Compute now and return the :class:`numbabn.Stats`, or return a
        ``dask.delayed.Delayed`` whose result is the ``Stats`` (to compute with other work:
        ``dask.compute(stats, other)``).

    Returns
    -------
    Stats or dask.delayed.Delayed
        ``count`` (int, values per channel), ``mean`` and ``m2`` (NumPy float64, ``(C,)``),
        equal to :func:`numbabn.welford` of the same values in memory to rounding.

    Notes
    -----
    Each chunk's partial ``(count, mean, M2)`` comes from numbabn's serial kernel in one
    task; the partials are Chan-merged in a tree whose order is fixed by the chunk grid and
    ``split_every``, so a given chunking gives bitwise identical results under every
    scheduler, worker count and after lost tasks are rerun::

        n = na + nb;  d = mean_b - mean_a
        mean = mean_a + d * nb / n
        m2 = m2_a + m2_b + d**2 * na * nb / n
    """
    compute = _checks.check_flag(compute, "compute")
    inp = _backend.Input(x, axis, None, "x")
    stats = _backend.statistics(inp, split_every)
    return stats.compute() if compute else stats
