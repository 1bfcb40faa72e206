"""GPU arrays in and out: numba views of CuPy/PyTorch/numba arrays (zero-copy), the
``(outer, C, inner)`` view of a dense array, allocation, streams, and results handed back
as the caller's kind of array."""

import functools
import math
import operator
import threading

import numpy as np
from numba import cuda

from .. import _config
from .._memo import bounded_put
from . import _launch
from ._launch import SIMULATED  # the CUDA simulator: arrays wrap NumPy ones


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
        if getattr(original, "__cuda_ndarray__", False) is True:  # numba's own
            return default_stream()
        k = kind(original)
        if k == "torch":
            import torch

            stream = torch.cuda.current_stream(original.device).cuda_stream
        elif k == "cupy":
            import cupy

            stream = cupy.cuda.get_current_stream().ptr
        else:
            return default_stream()
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
    return default_stream() if int(stream) == 0 else cuda.external_stream(int(stream))


_DEFAULT_STREAM = []


def default_stream():
    """numba's default stream, made once: a numba stream of handle 0 names the default stream
    of whichever context and thread launches on it (numba makes a new object per
    ``cuda.default_stream()``)."""
    if SIMULATED:
        return cuda.default_stream()
    if not _DEFAULT_STREAM:
        _DEFAULT_STREAM.append(cuda.default_stream())
    return _DEFAULT_STREAM[0]


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
    shape, strides = view_geometry(a.shape, axis, order, a.dtype.itemsize)
    return strided(a, shape, strides)


def view_geometry(shape, axis, order, s):
    """``(shape, byte strides)`` of :func:`view3`'s view of a dense array of ``shape`` with
    axes in memory ``order`` and items of ``s`` bytes."""
    return _view3(tuple(shape), axis, tuple(order), s)


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


def numba_view(a, shape, strides):
    """A numba array viewing dense ``a``'s memory with the given shape and byte strides,
    which keeps that memory alive (a view the caller holds, not a kernel argument)."""
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
    """The rows ``a[0], a[1], ...`` of a C-contiguous 2-D numba array (:func:`row`)."""
    return [row(a, i) for i in range(a.shape[0])]


def row(a, i):
    """Row ``i`` of a C-contiguous 2-D numba array, made directly on its memory: numba's
    ``a[i]`` indexes a dummy array and checks the context first, tens of microseconds of host
    time per row (the saved mean and invstd every call returns)."""
    if SIMULATED or a.size == 0:
        return a[i]
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    step = a.strides[0]
    return DeviceNDArray((a.shape[1],), (a.strides[1],), a.dtype, a.stream, a.gpu_data.view(i * step, i * step + step))


def empty(shape, dtype, stream):
    """A new C-contiguous numba array."""
    return cuda.device_array(shape, dtype=dtype, stream=stream)


def constant(fill, n, dtype):
    """A length-``n`` array of ``fill`` on the current device, made once per (device, value,
    length, dtype) and shared by later calls (a device allocation costs host time):
    the default weight (ones) and bias (zeros), and the length-0 "no running statistics"."""
    return _constant(_context_key(), fill, n, np.dtype(dtype).str)


@functools.lru_cache(maxsize=64)
def _constant(context, fill, n, dtype):
    return to_device(np.full(n, fill, dtype=dtype), 0)


def sink(rows, num_channels):
    """A (rows, C) float64 array on the current device that kernels write and nothing reads,
    not even the kernel that wrote it (the saved statistics or float64 gradients of a call
    whose caller discards them): one per (device, shape), shared by every call, so concurrent
    writes leave garbage no one reads."""
    return _sink(_context_key(), rows, num_channels)


@functools.lru_cache(maxsize=64)
def _sink(context, rows, num_channels):
    return empty((rows, num_channels), "f8", 0)


_FREE = {}  # (context, stream, tag, dtype) -> work arrays no call holds (numba's launch path)
_FREE_LOCK = threading.Lock()
_HELD = threading.local()  # .arrays: the (key, array) pairs the current driver call holds


def one_call(driver):
    """Decorate a driver (one call's launches; its last argument the stream): the work arrays
    it takes with :func:`scratch` are its own until it returns, then go back to the free list
    of their stream.  On the fast launch path the driver runs once per signature, recorded
    (:func:`numbabn.cuda._launch.record`), and each call replays its launches.

    Host threads may share a stream: the launches of two calls then interleave in the stream's
    order, so arrays held per stream alone would let one call's finish read another's partials.
    Returned only once every launch reading them is enqueued, an array is next written by a
    later launch on the same stream: stream order makes that reuse safe.  Uncontended, each
    call reuses the arrays of the one before (no ``cudaMalloc`` per call)."""

    spec = []  # on the fast launch path: where the driver takes arrays, floats and flags

    @functools.wraps(driver)
    def run(*args):
        if _launch.FAST:
            if _launch.recording():  # a driver inside a driver: part of the recording
                return driver(*args)
            if not spec:
                spec.append(_Spec(args))
            return _replayed(driver, spec[0], args)
        if getattr(_HELD, "arrays", None) is not None:  # a driver inside a driver: one call
            return driver(*args)
        _HELD.arrays = []
        try:
            return driver(*args)
        finally:
            held, _HELD.arrays = _HELD.arrays, None
            _give_back(held)

    return run


_FLOATS = (float, np.float64)
_ARRAY_KEY = operator.attrgetter("shape", "strides", "dtype")  # an array's part of a replay's key


def _kind(t):
    return "float" if t in _FLOATS else "flag" if t in _launch.SCALARS else "array"


class _Spec:
    """Where a driver takes its arrays, float scalars and flags (bools and ints: part of its
    signature), from its first call's arguments (the stream last): a driver's checked callers
    pass the same kinds in the same places."""

    __slots__ = ("array_at", "float_at", "arrays", "floats", "flags")

    def __init__(self, args):
        kinds = [_kind(type(a)) for a in args[:-1]]
        self.array_at = [i for i, k in enumerate(kinds) if k == "array"]
        self.float_at = [i for i, k in enumerate(kinds) if k == "float"]
        self.arrays, self.floats = _launch.getter(self.array_at), _launch.getter(self.float_at)
        self.flags = _launch.getter([i for i, k in enumerate(kinds) if k == "flag"])

    @property
    def nvalues(self):
        """The per-call values of a replay: the arrays' pointers, then the floats."""
        return len(self.array_at) + len(self.float_at)

    def symbolic(self, args):
        """The driver's arguments for recording: its arrays' pointers and its floats as
        :class:`numbabn.cuda._launch.Slot` ``0, 1, ...``, in the order of the values."""
        out = list(args)
        for slot, i in enumerate(self.array_at):
            a = args[i]
            out[i] = _launch.Dev(_launch.Slot(slot), tuple(a.shape), tuple(a.strides), a.dtype)
        for slot, i in enumerate(self.float_at, len(self.array_at)):
            out[i] = _launch.Slot(slot)
        return out


_RECORDED = {}  # (driver, context, stream, tunables, arguments' signature) -> _launch.Recorded
#: The tunables that shape the launches (read at each call: tests patch them).
_TUNABLES = operator.attrgetter(
    "CUDA_THREADS", "CUDA_MIN_INNER", "CUDA_BLOCK_ELEMS", "CUDA_MERGE_THREADS", "CUDA_FUSE_ELEMS"
)
_WORKSPACES = {}  # (context, stream) -> free workspaces (uint8 arrays, pointers)


def _replayed(driver, spec, args):
    """``driver(*args)`` on the fast launch path: its recorded launches for the arguments'
    shapes, strides, dtypes and flags (recorded on first use), made with their pointers and
    floats, the work arrays carved from one workspace taken for the call."""
    stream = args[-1]
    context, stream_key = _context_key(), _scratch_stream_key(stream)
    arrays = spec.arrays(args)
    key = (driver, context, stream_key, _TUNABLES(_config), tuple(map(_ARRAY_KEY, arrays)), spec.flags(args))
    recorded = _RECORDED.get(key)
    if recorded is None:
        recorded = bounded_put(_RECORDED, key, _launch.record(driver, spec.symbolic(args), spec.nvalues))
    values = list(map(_launch.pointer, arrays))
    values += spec.floats(args)
    if not recorded.workspace:
        recorded.replay(values)
        return
    # Lock-free: list.pop and list.append are atomic, so two threads never take one workspace.
    where = (context, stream_key)
    free = _WORKSPACES.get(where) or _WORKSPACES.setdefault(where, [])
    try:
        buf = free.pop()
    except IndexError:
        buf = None
    if buf is None or buf[0].shape[0] < recorded.workspace:
        a = cuda.device_array(recorded.workspace, dtype=np.uint8, stream=stream)
        buf = (a, _launch.pointer(a))
    try:
        values += map(buf[1].__add__, recorded.offsets)
        recorded.replay(values)
    finally:
        free.append(buf)


def _take(pool, n, dtype, stream):
    """A free work array of at least ``n`` values from ``pool`` (allocated when none is free)."""
    with _FREE_LOCK:
        free = _FREE.get(pool)
        a = free.pop() if free else None
    if a is None or a.shape[0] < n:
        a = cuda.device_array(max(n, 1), dtype=dtype, stream=stream)
    return a


def _give_back(held):
    with _FREE_LOCK:
        for pool, a in held:
            _FREE.setdefault(pool, []).append(a)


def scratch(tag, shape, dtype, stream):
    """A work array (partials, per-channel coefficients) for the running :func:`one_call`
    driver: one no other call holds, reused from earlier calls on the same stream and device
    when one is free and large enough (saving a ``cudaMalloc`` and the device-wide
    synchronization of numba's deferred ``cudaFree``)."""
    dtype = np.dtype(dtype)
    if _launch.recording():
        return _launch.Dev(_launch.scratch_slot(shape, dtype), shape, _launch.c_strides(shape, dtype.itemsize), dtype)
    held = getattr(_HELD, "arrays", None)
    if held is None:
        raise RuntimeError("scratch() is for drivers decorated with _arrays.one_call")
    n = math.prod(shape)
    pool = (_context_key(), _scratch_stream_key(stream), tag, dtype)
    a = _take(pool, n, dtype, stream)
    held.append((pool, a))
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
