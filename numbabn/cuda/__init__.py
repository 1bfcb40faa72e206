"""numbabn's GPU backend: ``numba.cuda`` twins of :mod:`numbabn.cpu`, stage for stage.

Imported only when a GPU array reaches the public API, so numbabn imports and runs on the
CPU without numba-cuda, a driver or a device.  :func:`require` says which one is missing.
"""

import importlib.util
import os


def require():
    """``numba.cuda``, ready to launch kernels, or a ``RuntimeError`` that says why not."""
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    if not simulated and importlib.util.find_spec("numba_cuda") is None:
        raise RuntimeError(
            "numbabn's GPU backend needs the numba-cuda package, which is not installed: pip install 'numbabn[cuda]'"
        )
    from numba import cuda

    if simulated:
        return cuda
    try:
        from numba.cuda.cudadrv.driver import driver

        count = driver.get_device_count()
    except Exception as e:  # noqa: BLE001 - numba raises several kinds for a missing driver
        raise RuntimeError(f"numbabn's GPU backend found no usable NVIDIA driver: {e}".strip()) from None
    if count == 0:
        raise RuntimeError("numbabn's GPU backend found an NVIDIA driver but no CUDA device")
    return cuda
