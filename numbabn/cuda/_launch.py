"""numbabn's own kernel launches on a GPU: each kernel compiled once per signature by
numba-cuda, then launched through ``cuda.core.launch`` with its arguments already flattened
to numba's kernel ABI, skipping numba-cuda's per-launch typing and argument preparation
(their cost per launch and per array argument is in docs/performance_notes.rst).

numba-cuda passes an array argument as the scalars ``(meminfo, parent, nitems, itemsize,
data, shape..., strides...)`` (``numba.cuda.dispatcher._Kernel._prepare_args``); a float64
as a double, an int64 as an 8-byte integer, a boolean as one byte.  :class:`Dev` is a device
array held as those scalars (no numba object, no allocation), which the drivers' internal
views and work arrays are on this path; the caller's numba arrays are converted at launch.

A driver's launches are recorded once per signature (:func:`record`) and replayed with only
their pointers and float arguments filled in (:class:`Recorded`); ``_arrays.one_call`` makes
the recording and the replays.

Used on a real GPU unless ``NUMBABN_CUDA_LAUNCH=numba`` (read at import) asks for numba's
own ``kernel[grid, block, stream](...)``, kept for comparison; the CUDA simulator always
takes numba's path (see :func:`numbabn.cuda._arrays.launch`).  Nothing here synchronizes.
"""

import functools
import math
import operator
import os
import threading

import numpy as np
from numba import cuda, types
from numba.np import numpy_support

from .._memo import bounded_put

#: numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM``): kernels run in Python and its
#: arrays wrap NumPy ones.  The one copy of the flag: ``_arrays`` and the tests import it.
SIMULATED = bool(cuda.config.ENABLE_CUDASIM)

#: "fast" (this module) or "numba" (numba-cuda's own launches), from NUMBABN_CUDA_LAUNCH.
MODE = os.environ.get("NUMBABN_CUDA_LAUNCH", "fast").strip().lower() or "fast"
if MODE not in ("fast", "numba"):
    raise ValueError(f"NUMBABN_CUDA_LAUNCH must be 'fast' or 'numba', got {MODE!r}")

#: Whether kernels launch through this module (a real GPU, not told otherwise).
FAST = not SIMULATED and MODE == "fast"


def layout_of(shape, strides, itemsize):
    """``"C"``, ``"F"`` or ``"A"``: the layout numba-cuda types a device array of this shape
    and byte strides as (``DeviceNDArray._numba_type_``), which selects the compiled kernel."""
    size = math.prod(shape)
    if size == 0:
        return "C"
    if 0 in strides:  # broadcast
        return "A"
    c = f = True
    expected = itemsize
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and s != expected:
            c = False
            break
        expected *= n
    if c:
        return "C"
    expected = itemsize
    for n, s in zip(shape, strides, strict=True):
        if n != 1 and s != expected:
            f = False
            break
        expected *= n
    return "F" if f else "A"


class Dev:
    """A device array as a kernel receives it: ``abi`` is its argument scalars, ``sig`` what
    selects its compiled kernel.  Has the ``shape``, ``strides``, ``dtype``, ``size`` and
    ``ndim`` the drivers read; owns nothing (the memory's owner must outlive the launch).
    Made per call (a replayed call reads only the pointer, shape, strides and dtype): what
    derives from those is looked up when read."""

    __slots__ = ("ptr", "shape", "strides", "dtype")

    def __init__(self, ptr, shape, strides, dtype):
        self.ptr = ptr
        self.shape = shape
        self.strides = strides
        self.dtype = dtype

    @property
    def _derived(self):
        derived = _DERIVED.get((self.shape, self.strides, self.dtype))
        return _derive(self.shape, self.strides, self.dtype) if derived is None else derived

    size = property(lambda self: self._derived[0], doc="The number of elements.")
    ndim = property(lambda self: self._derived[1], doc="The number of axes.")
    sig = property(lambda self: self._derived[2], doc="``(dtype, ndim, layout)``: what selects a kernel.")
    head = property(lambda self: self._derived[3], doc="``(meminfo, parent, nitems, itemsize)``.")
    dims = property(lambda self: self._derived[4], doc="``shape + strides``.")

    @property
    def abi(self):
        """``(meminfo, parent, nitems, itemsize, data, shape..., strides...)``."""
        return (*self.head, self.ptr, *self.dims)


_DERIVED = {}  # (shape, strides, dtype) -> what Dev derives from them


def _derive(shape, strides, dtype):
    size = math.prod(shape)
    sig = (dtype, len(shape), layout_of(shape, strides, dtype.itemsize))
    return bounded_put(
        _DERIVED, (shape, strides, dtype), (size, len(shape), sig, (0, 0, size, dtype.itemsize), shape + strides)
    )


def pointer(a):
    """The device address of the data of ``a`` (a :class:`Dev` or a numba device array)."""
    if type(a) is Dev:
        return a.ptr
    try:
        return int(a.gpu_data.device_pointer)
    except AttributeError:  # a pointer-less (empty) array, or a proxied one
        return a.device_ctypes_pointer.value or 0


def describe(a):
    """``a`` (a numba device array, or a :class:`Dev`) as a :class:`Dev`."""
    if type(a) is Dev:
        return a
    return Dev(pointer(a), a.shape, a.strides, a.dtype)


def c_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# -- numba types, compiled kernels, configurations, streams: each made once ---------------------

SCALARS = {float: types.float64, int: types.int64, bool: types.boolean}
SCALARS.update({np.float64: types.float64, np.int64: types.int64, np.bool_: types.boolean})


def argtypes_of(key):
    """The numba argument types of a launch key (``Dev.sig`` for arrays, the Python type of
    scalars): the types numba-cuda's dispatcher infers for the same arguments."""
    out = []
    for k in key:
        if type(k) is tuple:
            dtype, ndim, layout = k
            out.append(types.Array(numpy_support.from_dtype(dtype), ndim, layout))
        else:
            out.append(SCALARS[k])
    return tuple(out)


def compiled(dispatcher, argtypes):
    """numba-cuda's compiled kernel of ``dispatcher`` for ``argtypes`` (compiled, or loaded
    from the disk cache, once per signature), bound to the current context: its
    ``cuda.core`` Kernel."""
    kernel = dispatcher.compile(argtypes)
    kernel.bind()  # loads the module into the current context (a no-op once loaded)
    return kernel._codelibrary.get_cufunc().kernel


def context_key():
    """The current CUDA context, as compiled kernels are cached per context (a module loaded
    in one context cannot run in another)."""
    return id(cuda.current_context())


@functools.lru_cache(maxsize=1024)
def launch_config(grid, block):
    from cuda.core import LaunchConfig

    return LaunchConfig(grid=grid, block=block)


_STREAMS = {}


def core_stream(stream):
    """``stream`` (a numba stream or 0) as the ``cuda.core`` Stream ``launch`` takes, one per
    handle."""
    handle = int(stream) if stream else 0
    s = _STREAMS.get(handle)
    if s is None:
        from numba.cuda.cudadrv.driver import _to_core_stream

        if len(_STREAMS) > 256:
            _STREAMS.clear()
        s = _STREAMS[handle] = _to_core_stream(stream)
    return s


def driver_launch(stream, config, kernel, args):
    """The one call into CUDA: ``cuda.core.launch`` (numba-cuda's own launch primitive) of
    ``kernel`` with the packed arguments ``args``."""
    _core_launch()(stream, config, kernel, *args)


@functools.cache
def _core_launch():
    from cuda.core import launch

    return launch


_KERNELS = {}  # (dispatcher, launch key, context) -> cuda.core Kernel


def launch(dispatcher, grid, block, stream, *args):
    """Launch ``dispatcher`` (a ``numba.cuda.jit`` kernel) on ``grid`` x ``block`` on
    ``stream``.  Arguments: :class:`Dev` or numba device arrays, Python floats (float64),
    ints (int64) and bools.  While a call is recorded (:func:`record`), the launch is
    appended to the recording instead."""
    packed = []
    key = [dispatcher]
    for a in args:
        t = type(a)
        if t in SCALARS:
            packed.append(a)
            key.append(t)
            continue
        if t is Slot:  # a recorded call's float argument
            packed.append(a)
            key.append(float)
            continue
        if t is not Dev:
            a = describe(a)
        _, _, sig, head, dims = a._derived
        packed += head
        packed.append(a.ptr)
        packed += dims
        key.append(sig)
    key.append(context_key())
    key = tuple(key)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = compiled(dispatcher, argtypes_of(key[1:-1]))
    recording = _RECORDING.launches
    if recording is not None:
        recording.append((core_stream(stream), launch_config(grid, block), kernel, packed))
        return
    driver_launch(core_stream(stream), launch_config(grid, block), kernel, tuple(packed))


# -- recorded calls -----------------------------------------------------------------------------
# A driver's launches depend on its arguments' shapes, strides and dtypes, its flags, the stream,
# the context and the tunables, never on their data: recorded once per such signature, a call is
# replayed with only its pointers and float scalars filled in.


class Slot:
    """A value that each replay of a recorded call supplies: value ``index`` of the replay (an
    argument's pointer or float, a work array's pointer).  Drivers pass it on to launches;
    reading it (``bool``, ``float``, a comparison) raises, as a recording holds for every call
    of its signature."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index

    def _refuse(self, *_):
        raise TypeError("a GPU driver read a per-call value (a pointer or a float argument) while being recorded")

    __bool__ = __float__ = __int__ = __index__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse


class _Recording(threading.local):
    launches = scratch = nvalues = None  # the call this thread records: see record()


_RECORDING = _Recording()


def recording():
    """Whether this thread is recording a call (:func:`record`)."""
    return _RECORDING.launches is not None


def scratch_slot(shape, dtype):
    """The pointer :class:`Slot` of a work array of the call being recorded: each replay
    carves it from the call's workspace."""
    scratch = _RECORDING.scratch
    scratch.append(max(1, math.prod(shape)) * dtype.itemsize)
    return Slot(_RECORDING.nvalues + len(scratch) - 1)


#: Work arrays start at multiples of this many bytes in a call's workspace.
ALIGN = 256


class Recorded:
    """A recorded call: ``launches``, each ``(stream, config, kernel, pack)`` with
    ``pack(values)`` its packed arguments; ``workspace``, the bytes of work arrays it takes,
    at byte ``offsets`` of one workspace; ``consts``, the values no replay changes.  A
    replay's values are the call's pointers and floats, then its work arrays' pointers, then
    ``consts``."""

    __slots__ = ("launches", "workspace", "offsets", "consts")

    def __init__(self, launches, scratch, nvalues):
        self.offsets, end = [], 0
        for nbytes in scratch:
            self.offsets.append(end)
            end += -(-nbytes // ALIGN) * ALIGN
        self.workspace = end
        ndyn = nvalues + len(scratch)
        self.consts, self.launches = [], []
        for stream, config, kernel, packed in launches:
            index = []
            for v in packed:
                if type(v) is Slot:
                    index.append(v.index)
                else:
                    index.append(ndyn + len(self.consts))
                    self.consts.append(v)
            self.launches.append((stream, config, kernel, getter(index)))

    def replay(self, values):
        """Make the launches with ``values`` (the call's, then its work arrays' pointers)."""
        values += self.consts
        for stream, config, kernel, pack in self.launches:
            driver_launch(stream, config, kernel, pack(values))


def getter(index):
    """``values -> tuple(values[i] for i in index)``, in one C call where it can."""
    if len(index) == 1:
        return lambda values, i=index[0]: (values[i],)
    return operator.itemgetter(*index) if index else (lambda values: ())


def record(driver, args, nvalues):
    """The :class:`Recorded` launches of ``driver(*args)``, a driver's arguments with
    :class:`Slot` pointers and floats ``0 .. nvalues - 1``: the driver runs, its launches and
    work arrays are recorded, nothing is launched."""
    _RECORDING.launches, _RECORDING.scratch, _RECORDING.nvalues = [], [], nvalues
    try:
        if driver(*args) is not None:
            raise TypeError(f"GPU driver {driver.__name__} returned a value: a recorded call only launches")
        return Recorded(_RECORDING.launches, _RECORDING.scratch, nvalues)
    finally:
        _RECORDING.launches = _RECORDING.scratch = None


# -- compiled kernels on disk -------------------------------------------------------------------

#: The sources a kernel's machine code depends on beyond its own function: device functions
#: and constants (CHUNK, MAX_THREADS) of these modules are compiled into the kernels.
SOURCES = ("_math.py", "_jit.py", "cuda/_plan.py", "cuda/stats.py", "cuda/forward.py", "cuda/backward.py")

#: Whether kernels are cached on disk, from NUMBABN_CUDA_CACHE (default on; "0" turns it off).
CACHE = os.environ.get("NUMBABN_CUDA_CACHE", "1").strip() not in ("0", "")


@functools.cache
def sources_hash(root=None, names=SOURCES):
    """A hash of :data:`SOURCES`' contents (numbabn's package directory by default)."""
    import hashlib

    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for name in names:
        with open(os.path.join(root, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


@functools.cache
def _cache_class():
    from numba.cuda.dispatcher import CUDACache

    class KernelCache(CUDACache):
        """numba-cuda's disk cache (keyed by signature, CUDA version, compute capability,
        numba-cuda version and the kernel's bytecode), also keyed by :func:`sources_hash`:
        numba-cuda checks only the kernel's own file, and would load a kernel compiled before
        a device function in another module changed."""

        def _index_key(self, sig, codegen):
            return (*super()._index_key(sig, codegen), ("numbabn-sources", sources_hash()))

    return KernelCache


def cache_on_disk(*dispatchers):
    """Cache the compiled ``dispatchers`` on disk (``cache=True``, with the key above), so a
    fresh process loads them instead of compiling them (seconds per kernel and dtype).  Not
    under the simulator, nor with ``NUMBABN_CUDA_CACHE=0``; where numba finds no cache
    directory it can write, the kernels stay uncached."""
    if SIMULATED or not CACHE:
        return
    for d in dispatchers:
        try:
            d._cache = _cache_class()(d.py_func)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            pass
