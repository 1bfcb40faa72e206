"""How numbabn compiles: the jit options and the serial/parallel twins of each driver."""

import hashlib
import os
import threading
import types

import numba

#: ``reassoc`` and ``contract`` let LLVM vectorize the float loops; ``nnan``/``ninf`` are never
#: used, so NaN and Inf propagate.  ``error_model="numpy"`` drops division-by-zero checks.
FASTMATH = {"reassoc", "contract"}
OPTIONS = {"fastmath": FASTMATH, "error_model": "numpy", "nogil": True, "cache": True}

#: Stages are inlined into their callers at numba's level: functions with ``prange`` loops, so
#: a driver compiled with ``parallel=True`` turns their loops into parallel regions and the
#: serial twin runs them as ``range``; per-element helpers, so their caller's loop vectorizes;
#: and small per-row or per-channel helpers, whose calls (arrays pass as structs of seven
#: fields) cost more than their bodies: as a leaf, the per-channel finalize made the
#: (256, 1024) training forward 25% slower.
stage = numba.njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})

#: Leaves (no ``prange``, called per block, row or channel) are ordinary compiled functions.
#: Inlining them at numba's level too multiplied the typing work: the parallel float32
#: training forward took 21 s to compile, against 7 s as leaves.
leaf = numba.njit(**OPTIONS)

#: Numba's workqueue threading layer aborts when two Python threads launch parallel regions at
#: once, and with OpenMP they would oversubscribe the cores; parallel drivers hold this lock.
_PARALLEL_LOCK = threading.Lock()


def _new_lock_in_child():
    # A fork while another thread held the lock would leave the child's copy locked forever.
    global _PARALLEL_LOCK
    _PARALLEL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


class Twin:
    """A driver compiled twice: ``serial`` for small arrays and ``parallel`` for large ones.

    Both come from the same Python function, so they compute the same thing; which one runs
    depends on the array's shape alone (its size and layout), never on the thread count.
    """

    def __init__(self, fn):
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.serial = numba.njit(**OPTIONS)(_clone(fn, "serial"))
        self.parallel = numba.njit(parallel=True, **OPTIONS)(_clone(fn, "parallel"))

    def __call__(self, parallel, *args):
        if not parallel:
            return self.serial(*args)
        with _PARALLEL_LOCK:
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
