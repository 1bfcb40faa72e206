"""numbabn: Numba-accelerated batch normalization for NumPy.

Public names only; see the README and ``DESIGN.md`` for the math and architecture.
"""

from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .layer import BatchNorm
from .stats import Stats, merge_stats, welford

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "Stats",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "merge_stats",
    "welford",
]
