"""GPU arrays in and out: numba views of CuPy/PyTorch/numba arrays (zero-copy), the
``(outer, C, inner)`` view of a dense array, allocation, streams, and results handed back
as the caller's kind of array."""

import functools
import math
import threading

import numpy as np
from numba import cuda

from . import _launch

SIMULATED = bool(cuda.config.ENABLE_CUDASIM)  # the CUDA simulator: arrays wrap NumPy ones


def shared(fn):
    """A CPU ``@njit`` function (``numbabn._math``, the CPU finalize stages) as kernels call
    it: compiled for the device by numba-cuda, or its Python function under the simulator
    (whose kernels pass arrays the CPU dispatcher cannot unbox)."""
    return fn.py_func if SIMULATED else fn


_LAUNCHERS = {}


def launch(kernel, grid, block, stream, *args):
    """Launch ``kernel`` on ``grid`` x ``block`` on ``stream``: through numbabn's own launch
    layer (:mod:`._launch`) on a GPU, else ``kernel[grid, block, stream](*args)``, reusing the
    configured launcher (the simulator, ``NUMBABN_CUDA_LAUNCH=numba``).  Every launch of the
    drivers goes through here.

    numba-cuda builds a launch configuration at every ``kernel[...]``: it converts the stream
    and, for grids under 128 blocks (numbabn's per-channel kernels, and every kernel on small
    arrays), makes a ``NumbaPerformanceWarning`` even when the warning is filtered out, tens
    of microseconds of host time per launch.  A configuration holds no arguments (numba keeps
    those per thread), so one per (kernel, grid, block, stream) serves every later launch.
    """
    if SIMULATED:
        kernel[grid, block, stream](*args)
        return
    if _launch.FAST and isinstance(kernel, _dispatcher()):
        _launch.launch(kernel, grid, block, stream, *args)
        return
    key = (kernel, grid, block, _stream_key(stream))
    configured = _LAUNCHERS.get(key)
    if configured is None:
        if len(_LAUNCHERS) > 4096:  # grids vary with shapes: keep the table bounded
            _LAUNCHERS.clear()
        configured = _LAUNCHERS[key] = kernel[grid, block, stream]
    configured(*args)


@functools.cache
def _dispatcher():
    from numba.cuda.dispatcher import CUDADispatcher

    return CUDADispatcher


def kind(a):
    """``"torch"``, ``"cupy"`` or ``"numba"``: which library ``a`` belongs to."""
    module = type(a).__module__.split(".")[0]
    return module if module in ("torch", "cupy") else "numba"


def as_numba(a):
    """A numba device array viewing ``a``'s memory (no copy, no host synchronization: the
    work is ordered on the caller's stream instead)."""
    if getattr(a, "__cuda_ndarray__", False) is True:
        return a
    return cuda.as_cuda_array(a, sync=False)


def stream_of(stream, original):
    """The numba stream to launch on: ``stream`` (a numba stream, a CuPy or PyTorch stream,
    or a raw ``cudaStream_t`` int), else the current stream of ``original``'s library, else
    numba's default stream."""
    if stream is None:
        k = kind(original)
        if k == "torch":
            import torch

            stream = torch.cuda.current_stream(original.device).cuda_stream
        elif k == "cupy":
            import cupy

            stream = cupy.cuda.get_current_stream().ptr
        else:
            return cuda.default_stream()
    if type(stream).__module__.startswith("numba"):  # numba's own (or the simulator's)
        return stream
    for attr in ("cuda_stream", "ptr"):  # PyTorch, CuPy
        if hasattr(stream, attr):
            stream = getattr(stream, attr)
            break
    if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)):
        raise TypeError(
            f"stream must be a numba, CuPy or PyTorch stream or a cudaStream_t int, got {type(stream).__name__}"
        )
    return cuda.default_stream() if int(stream) == 0 else cuda.external_stream(int(stream))


def dense_order(a):
    """Axes of ``a`` from the slowest-varying in memory to the fastest, when ``a`` is dense
    (a permutation of a C-contiguous array: C, F, channels-last, ...); else None."""
    order = _dense_order(tuple(a.shape), tuple(a.strides), a.dtype.itemsize)
    return None if order is None else list(order)


@functools.lru_cache(maxsize=1024)
def _dense_order(shape, strides, size):
    if 0 in shape:  # no elements: any order will do (their strides may read 0)
        return list(range(len(shape)))
    order = sorted(range(len(shape)), key=lambda i: (-strides[i], i))
    expected = size
    for i in reversed(order):
        if shape[i] != 1 and strides[i] != expected:
            return None
        expected *= shape[i]
    return order


def view3(a, axis, order):
    """``a`` (dense, axes in memory ``order``) viewed as a C-contiguous ``(outer, C, inner)``
    array: the axes before ``axis`` in memory order make ``outer``, those after ``inner``."""
    shape, strides = _view3(tuple(a.shape), axis, tuple(order), a.dtype.itemsize)
    return strided(a, shape, strides)


@functools.lru_cache(maxsize=1024)
def _view3(shape, axis, order, s):
    k = order.index(axis)
    outer = math.prod(shape[i] for i in order[:k])
    inner = math.prod(shape[i] for i in order[k + 1 :])
    return (outer, shape[axis], inner), (shape[axis] * inner * s, inner * s, s)


def strided(a, shape, strides):
    """A view of dense ``a``'s memory with the given shape and byte strides: a
    :class:`._launch.Dev` on the fast launch path (kernel arguments only)."""
    if _launch.FAST:
        return _launch.Dev(_launch.pointer(a), shape, strides, a.dtype)
    return _numba_view(a, shape, strides)


def _numba_view(a, shape, strides):
    if SIMULATED:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        host = np.lib.stride_tricks.as_strided(a._ary, shape, strides)
        return FakeCUDAArray(host)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape, strides, a.dtype, stream=a.stream, gpu_data=a.gpu_data)


def empty_like(a, order, stream):
    """A new numba array of ``a``'s shape and dtype with ``a``'s memory ``order``."""
    strides = [0] * a.ndim
    step = a.dtype.itemsize
    for i in reversed(order):
        strides[i] = step
        step *= a.shape[i]
    n = math.prod(a.shape)
    flat = cuda.device_array(n, dtype=a.dtype, stream=stream)
    return _numba_view(flat, a.shape, tuple(strides))


def rows(a):
    """The rows ``a[0], a[1], ...`` of a C-contiguous 2-D numba array, made directly on its
    memory: numba's ``a[i]`` indexes a dummy array and checks the context first, tens of
    microseconds of host time per row (the saved mean and invstd every call returns)."""
    if SIMULATED or a.size == 0:
        return [a[i] for i in range(a.shape[0])]
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    n, step = a.shape[1], a.strides[0]
    shape, strides = (n,), (a.strides[1],)
    data = a.gpu_data
    return [
        DeviceNDArray(shape, strides, a.dtype, a.stream, data.view(i * step, i * step + step))
        for i in range(a.shape[0])
    ]


def empty(shape, dtype, stream):
    """A new C-contiguous numba array."""
    return cuda.device_array(shape, dtype=dtype, stream=stream)


def constant(fill, n, dtype):
    """A length-``n`` array of ``fill`` on the current device, made once per (device, value,
    length, dtype) and shared by later calls (an allocation costs about 26 us of host time):
    the default weight (ones) and bias (zeros), and the length-0 "no running statistics"."""
    return _constant(_context_key(), fill, n, np.dtype(dtype).str)


@functools.lru_cache(maxsize=64)
def _constant(context, fill, n, dtype):
    return to_device(np.full(n, fill, dtype=dtype), 0)


_FREE = {}  # (context, stream, tag, dtype) -> (array, its pointer or None) no call holds
_FREE_LOCK = threading.Lock()
_HELD = threading.local()  # .arrays: the (key, array) pairs the current driver call holds


def one_call(driver):
    """Decorate a driver (one call's launches): the work arrays it takes with :func:`scratch`
    are its own until it returns, then go back to the free list of their stream.

    Host threads may share a stream: the launches of two calls then interleave in the stream's
    order, so arrays held per stream alone would let one call's finish read another's partials.
    Returned only once every launch reading them is enqueued, an array is next written by a
    later launch on the same stream: stream order makes that reuse safe.  Uncontended, each
    call reuses the arrays of the one before (no ``cudaMalloc`` per call)."""

    @functools.wraps(driver)
    def run(*args):
        if getattr(_HELD, "arrays", None) is not None:  # a driver inside a driver: one call
            return driver(*args)
        _HELD.arrays = []
        try:
            return driver(*args)
        finally:
            held, _HELD.arrays = _HELD.arrays, None
            with _FREE_LOCK:
                for key, buf in held:
                    _FREE.setdefault(key, []).append(buf)

    return run


def scratch(tag, shape, dtype, stream):
    """A work array (partials, per-channel coefficients) for the running :func:`one_call`
    driver: one no other call holds, reused from earlier calls on the same stream and device
    when one is free and large enough (saving a ``cudaMalloc`` and the device-wide
    synchronization of numba's deferred ``cudaFree``)."""
    held = getattr(_HELD, "arrays", None)
    if held is None:
        raise RuntimeError("scratch() is for drivers decorated with _arrays.one_call")
    n = math.prod(shape)
    dtype = np.dtype(dtype)
    key = (_context_key(), _scratch_stream_key(stream), tag, dtype)
    with _FREE_LOCK:
        free = _FREE.get(key)
        buf = free.pop() if free else None
    if buf is None or buf[0].shape[0] < n:
        a = cuda.device_array(max(n, 1), dtype=dtype, stream=stream)
        buf = (a, _launch.pointer(a) if _launch.FAST else None, {})
    held.append((key, buf))
    a, ptr, views = buf
    if ptr is not None:  # the fast launch path: the kernels' view, no numba array made, one per shape
        view = views.get(shape)
        if view is None:
            if len(views) > 64:
                views.clear()
            view = views[shape] = _launch.Dev(ptr, shape, _launch.c_strides(shape, dtype.itemsize), dtype)
        return view
    return a[:n].reshape(shape)


def _scratch_stream_key(stream):
    """The stream as work arrays are shared on it: a per-thread default stream (numba's
    ``per_thread_default_stream``, or handle 0 under ``CUDA_PER_THREAD_DEFAULT_STREAM``) is a
    different stream in each host thread, so the thread is part of its key."""
    key = _stream_key(stream)
    per_thread = 2  # CU_STREAM_PER_THREAD
    if key == per_thread or (key == 0 and getattr(cuda.config, "CUDA_PER_THREAD_DEFAULT_STREAM", 0)):
        return key, threading.get_ident()
    return key


def _stream_key(stream):
    try:
        return int(stream)  # the cudaStream_t of a numba stream
    except TypeError:  # the simulator's streams, which run in order anyway
        return None


def _context_key():
    if SIMULATED:
        return None
    return id(cuda.current_context())


def to_device(host, stream):
    return cuda.to_device(np.ascontiguousarray(host), stream=stream)


def to_host(a, stream):
    """A NumPy copy of the numba array ``a``, made on ``stream`` once the work queued there
    before is done (the host waits for it)."""
    host = a.copy_to_host(stream=stream)
    stream.synchronize()
    return host


def like(result, original):
    """``result`` (a numba array) as the kind of array ``original`` is: CuPy in, CuPy out;
    PyTorch in, PyTorch out; numba in, numba out.  Zero-copy."""
    k = kind(original)
    if k == "cupy":
        import cupy

        return cupy.asarray(result)
    if k == "torch":
        import torch

        return torch.as_tensor(result, device=original.device)
    return result
