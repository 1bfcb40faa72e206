"""numbabn's GPU backend: ``numba.cuda`` twins of :mod:`numbabn.cpu`, stage for stage.

Imported only when a GPU array reaches the public API, so numbabn imports and runs on the
CPU without numba-cuda, a driver or a device.  :func:`require` says which one is missing.
"""

import importlib.util
import os

_FOUND_DEVICE = False  # a driver and a device were found once (require() runs at every GPU call)


def require():
    """``numba.cuda``, ready to launch kernels, or a ``RuntimeError`` that says why not."""
    global _FOUND_DEVICE
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    if not simulated and importlib.util.find_spec("numba_cuda") is None:
        raise RuntimeError(
            "numbabn's GPU backend needs the numba-cuda package, which is not installed: pip install 'numbabn[cuda]'"
        )
    from numba import cuda

    if simulated:
        return cuda
    _require_compiler()
    if _FOUND_DEVICE:
        return cuda
    try:
        from numba.cuda.cudadrv.driver import driver

        count = driver.get_device_count()
    except Exception as e:  # noqa: BLE001 - numba raises several kinds for a missing driver
        raise RuntimeError(f"numbabn's GPU backend found no usable NVIDIA driver: {e}".strip()) from None
    if count == 0:
        raise RuntimeError("numbabn's GPU backend found an NVIDIA driver but no CUDA device")
    _FOUND_DEVICE = True
    return cuda


def _require_compiler():
    """Load numba-cuda's lowering registry, which its first kernel compile imports, so a
    numba-cuda that cannot run with the installed NumPy fails here with a message that says so.

    numba-cuda 0.30.4 with NumPy 2.5 raises ``AttributeError: module 'numpy' has no
    attribute 'row_stack'`` (removed in NumPy 2.5) from deep inside the first compile;
    ``numbabn[cuda]`` pins ``numpy<2.5`` for that reason.
    """
    try:
        importlib.import_module("numba.cuda.cudaimpl")
    except Exception as e:  # noqa: BLE001 - any failure here means no kernel can compile
        import numpy
        from numba_cuda import __version__ as version

        raise RuntimeError(
            f"numbabn's GPU backend: numba-cuda {version} cannot compile kernels with NumPy "
            f"{numpy.__version__} ({type(e).__name__}: {e}); install a NumPy it supports, "
            "pip install 'numpy<2.5' (numbabn[cuda] pins it), or a newer numba-cuda"
        ) from None
