"""numbabn: Numba-accelerated batch normalization for NumPy.

Public names only; the documentation (docs/) has the math, the design and the API.
"""

from ._fold import fold
from ._version import __version__ as __version__
from .functional import batch_norm, batch_norm_backward, batch_norm_forward, merge_stats, welford
from .layer import BatchNorm
from .renorm import BatchRenorm, SyncBatchRenorm, batch_renorm_backward, batch_renorm_forward
from .stats import Stats
from .sync import SyncBatchNorm


def __getattr__(name):
    # numbabn.dask (Dask arrays, the numbabn[dask] extra) loads on first use, so
    # ``import numbabn`` stays free of Dask.
    if name == "dask":
        import importlib

        return importlib.import_module(".dask", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "Stats",
    "SyncBatchNorm",
    "SyncBatchRenorm",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "fold",
    "merge_stats",
    "welford",
]
