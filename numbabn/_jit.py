"""How numbabn compiles: the jit options and the serial/parallel twins of each driver."""

import ctypes
import hashlib
import importlib.metadata
import os
import sys
import threading
import types

import numba
from numba import _dispatcher
from numba.core import cgutils
from numba.extending import intrinsic

#: ``reassoc`` and ``contract`` let LLVM vectorize the float loops; ``nnan``/``ninf`` are never
#: used, so NaN and Inf propagate.  ``error_model="numpy"`` drops division-by-zero checks.
FASTMATH = {"reassoc", "contract"}
OPTIONS = {"fastmath": FASTMATH, "error_model": "numpy", "nogil": True, "cache": True}

#: Stages are inlined into their callers at numba's level: functions with ``prange`` loops, so
#: a driver compiled with ``parallel=True`` turns their loops into parallel regions and the
#: serial twin runs them as ``range``; per-element helpers, so their caller's loop vectorizes;
#: and small per-row or per-channel helpers, whose calls (arrays pass as structs of seven
#: fields) cost more than their bodies (docs/performance_notes.rst has the figures).
stage = numba.njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})

#: Leaves (no ``prange``, called per block, row or channel) are ordinary compiled functions:
#: inlined at numba's level too, they multiplied the typing work of every driver.
leaf = numba.njit(**OPTIONS)


#: In a :func:`by_address` signature: an output array of the first input's type, writable
#: (the arrays outputs are written to are C-contiguous views, writable and aligned like any
#: new array: ``numbabn._checks.output_for``), so the leaf's address depends on the inputs.
OUTPUT = object()


#: Every leaf made by :func:`by_address`, so tests can see where their code is linked.
BY_ADDRESS = []


def by_address(inputs, *rest):
    """Decorator: a leaf that drivers call through its address (:func:`indirect`), not by name.

    Numba copies a callee's code into every caller and optimizes and compiles it again there,
    once per parallel region too; a big leaf called through its address compiles once.  Its
    signature is fixed: the types of its first ``inputs`` arrays (one or two) as the driver
    received them, typed read-only (:func:`_signature`), so that ``leaf.address(*arrays)``
    can tell them from the arrays, then the numba types ``rest`` (:data:`OUTPUT`: an output
    like the first input).
    """

    def make(fn):
        disp = leaf(fn)
        disp.inputs = inputs
        disp.rest = rest
        memo = {}
        BY_ADDRESS.append(disp)

        def address(x, y):
            """The address of the leaf's code for input arrays like ``x`` and ``y``."""
            key = _type_key(x) + _type_key(y)
            addr = memo.get(key)
            return _compile(disp, memo, key, (x, y)) if addr is None else addr

        def address_of(x):
            """The same for a leaf of one input array (no tuple of arguments: small calls)."""
            addr = memo.get(_type_key(x))
            return _compile(disp, memo, _type_key(x), (x,)) if addr is None else addr

        disp.address = address_of if inputs == 1 else address
        return disp

    return make


def addresses(*leaves):
    """The code addresses of the :func:`by_address` leaves ``leaves``, which take the same
    input arrays, looked up together: ``addresses(a, b)(x)`` is ``(a.address(x),
    b.address(x))`` for the price of one lookup (small calls pay for each)."""
    memo = {}

    def of(arrays, key):
        found = memo[key] = tuple(leaf.address(*arrays) for leaf in leaves)
        return found

    def one(x):
        found = memo.get(_type_key(x))
        return of((x,), _type_key(x)) if found is None else found

    def two(g, x):
        key = _type_key(g) + _type_key(x)
        found = memo.get(key)
        return of((g, x), key) if found is None else found

    return one if leaves[0].inputs == 1 else two


def _signature(disp, inputs):
    """A :func:`by_address` leaf's signature for input arrays of the numba types ``inputs``:
    the inputs typed read-only (a leaf reads them; a writable array converts), so read-only
    and writable inputs share one compiled leaf."""
    out = inputs[0].copy(readonly=False)
    read = tuple(t.copy(readonly=True) for t in inputs)
    return read + tuple(out if t is OUTPUT else t for t in disp.rest)


def _flags_key(a):
    # What numba's typeof reads from an array, where numba lacks its C fingerprint.
    f = a.flags
    return a.dtype, a.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned


#: numba's own key of an argument's type (what its dispatcher matches calls by).
_type_key = getattr(_dispatcher, "compute_fingerprint", _flags_key)


def _compile(disp, memo, key, arrays):
    """Compile (or load from the cache) ``disp`` for input arrays like ``arrays`` and keep its
    code's address under ``key``."""
    sig = _signature(disp, [numba.typeof(a) for a in arrays])
    disp.compile(sig)
    cres = disp.overloads[sig]
    memo[key] = addr = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
    return addr


@intrinsic
def indirect(typingctx, fn, addr, args):
    """``fn(*args)`` for a :func:`by_address` leaf ``fn`` whose code is at ``addr`` (int64,
    from ``fn.address`` of the driver's input arrays): a call the driver's own compile does
    not copy.  Each argument is cast to the leaf's fixed signature."""
    disp = fn.dispatcher
    argtypes = tuple(args)
    sig = _signature(disp, argtypes[: disp.inputs])
    if len(argtypes) != len(sig) or not all(typingctx.can_convert(a, b) for a, b in zip(argtypes, sig, strict=True)):
        raise numba.core.errors.TypingError(f"{disp.__name__}: arguments {argtypes} do not fit {sig}")
    disp.compile(sig)
    ret = disp.overloads[sig].signature.return_type

    def codegen(context, builder, signature, llargs):
        fnty = context.call_conv.get_function_type(ret, sig)
        ptr = builder.inttoptr(llargs[1], fnty.as_pointer())
        vals = [
            context.cast(builder, builder.extract_value(llargs[2], i), a, b)
            for i, (a, b) in enumerate(zip(argtypes, sig, strict=True))
        ]
        status, res = context.call_conv.call_function(builder, ptr, ret, sig, vals)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return res

    return ret(fn, addr, args), codegen


#: Numba's workqueue threading layer aborts when two Python threads launch parallel regions at
#: once, and with OpenMP they would oversubscribe the cores; parallel drivers hold this lock.
_PARALLEL_LOCK = threading.Lock()

#: True in a forked process whose parallel regions would be unsafe (see
#: :func:`_after_fork_in_child`): its drivers run their serial twins, which give the same bits.
_SERIAL_ONLY = False

#: Threads that have run a numbabn parallel region, and whether the thread pool can be handed
#: to a child: see :func:`_before_fork`.
_LAUNCHERS = set()
_POOL_SHARED = False


def _before_fork():
    # No parallel region runs while a process forks: a child copied from a thread pool in the
    # middle of one can hang in its own.  TBB shuts its pool down for a fork, which it cannot
    # while other live threads have joined it, and a child copied from a live pool may hang.
    global _POOL_SHARED
    _PARALLEL_LOCK.acquire()
    alive = {t.ident for t in threading.enumerate()}
    _POOL_SHARED = bool((_LAUNCHERS - {threading.get_ident()}) & alive)


def _after_fork_in_parent():
    _PARALLEL_LOCK.release()


def _after_fork_in_child():
    # GNU OpenMP kills a forked child in its first parallel region; TBB is safe unless its pool
    # was shared with other threads at the fork.
    global _PARALLEL_LOCK, _SERIAL_ONLY
    _PARALLEL_LOCK = threading.Lock()
    layer = threading_layer()
    _SERIAL_ONLY = _SERIAL_ONLY or layer == "omp" or (layer == "tbb" and _POOL_SHARED)
    _LAUNCHERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def threading_layer():
    """The threading layer numba's parallel regions run on (``"tbb"``, ``"omp"`` or
    ``"workqueue"``), or None before the first parallel region of the process."""
    from numba.np.ufunc import parallel

    return numba.threading_layer() if parallel._is_initialized else None


#: The TBB runtime's file name in the ``tbb`` package, by platform.
_TBB_LIBRARY = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}


def _load_tbb():
    """Where the ``tbb`` package is installed, load its TBB runtime so numba can start its TBB
    threading layer, which survives ``fork()``: pip puts the library in the environment's
    ``lib/``, off the dynamic loader's path, where numba's own loading misses it and falls
    back to GNU OpenMP.  Numba's choice stays numba's: its priority (TBB first) and
    ``NUMBA_THREADING_LAYER`` apply as ever, and nothing happens once a parallel region has
    run."""
    name = _TBB_LIBRARY.get(sys.platform)
    if name is None or threading_layer() is not None:
        return
    try:
        files = importlib.metadata.files("tbb") or ()
    except importlib.metadata.PackageNotFoundError:
        return
    for f in files:
        if f.name == name:
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
            except OSError:  # a broken install: numba then picks another layer, as without tbb
                pass
            return


_load_tbb()


#: Every driver made by :func:`twin`, so tests can see what a call compiled.
TWINS = []


class Twin:
    """A driver compiled twice: ``serial`` for small arrays and ``parallel`` for large ones.

    Both come from the same Python function, so they compute the same thing; which one runs
    depends on the array's shape alone (its size and layout), never on the thread count.
    """

    def __init__(self, fn):
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.__module__ = fn.__module__
        self.serial = numba.njit(**OPTIONS)(_clone(fn, "serial"))
        self.parallel = numba.njit(parallel=True, **OPTIONS)(_clone(fn, "parallel"))
        TWINS.append(self)

    def __call__(self, parallel, *args):
        return self.pick(parallel)(*args)

    def pick(self, parallel):
        """The twin a call runs: ``serial``, or (``parallel`` true) the parallel driver behind
        the lock that parallel regions take.  ``twin.pick(parallel)(*args)`` is
        ``twin(parallel, *args)`` without its tuple of arguments, for small calls."""
        if not parallel or _SERIAL_ONLY:
            return self.serial
        return self._locked

    def _locked(self, *args):
        with _PARALLEL_LOCK:
            _LAUNCHERS.add(threading.get_ident())
            return self.parallel(*args)


def _clone(fn, suffix):
    # Each twin needs its own qualified name, or numba's on-disk cache would mix them up.
    f = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)
    f.__qualname__ = f"{fn.__qualname__}_{suffix}"
    f.__doc__ = fn.__doc__
    return f


def twin(fn):
    """Decorator: compile ``fn`` as a serial and a parallel driver (see :class:`Twin`)."""
    return Twin(fn)


# -- on-disk cache ----------------------------------------------------------------------------
# Numba invalidates a cached function when *its own* file changes, but numbabn's drivers inline
# stages and constants from other files (stats.py, _math.py, _config.py).  So every numbabn
# function is stamped with the whole package's sources: any edit recompiles everything, never
# a stale kernel.  This uses numba's cache-locator hook; if it is missing, numba's default
# per-file stamp applies.
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _package_stamp():
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(_PKG_DIR)):
        for name in sorted(files):
            if name.endswith(".py"):
                st = os.stat(os.path.join(root, name))
                h.update(
                    f"{os.path.relpath(os.path.join(root, name), _PKG_DIR)}:{st.st_mtime_ns}:{st.st_size};".encode()
                )
    return h.hexdigest()


def _install_package_locators():
    try:
        from numba.core import caching

        bases = [caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator]
        registry = caching.CacheImpl._locator_classes
    except AttributeError:  # pragma: no cover - numba moved its internals
        return
    stamp = _package_stamp()

    def make(base):
        def from_function(cls, py_func, py_file):
            if not os.path.abspath(py_file).startswith(_PKG_DIR + os.sep):
                return None
            return base.from_function.__func__(cls, py_func, py_file)

        return type(
            f"Numbabn{base.__name__}",
            (base,),
            {
                "from_function": classmethod(from_function),
                "get_source_stamp": lambda self: stamp,
            },
        )

    for base in reversed(bases):
        registry.insert(0, make(base))


_install_package_locators()
