"""numbabn: Numba-accelerated batch normalization for NumPy.

Public names only; the documentation (docs/) has the math, the design and the API.
"""

from ._version import __version__ as __version__
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .layer import BatchNorm
from .stats import Stats, merge_stats, welford
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm",
    "Stats",
    "SyncBatchNorm",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "merge_stats",
    "welford",
]
