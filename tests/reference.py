"""The tests' float64 NumPy oracle: :mod:`numbabn.bench.reference`, the one oracle that the
self-check and the benchmarks' checks use too."""

from numbabn.bench.reference import backward, ema, forward, relative_error, stats, update_threshold

__all__ = ["backward", "ema", "forward", "relative_error", "stats", "update_threshold"]
