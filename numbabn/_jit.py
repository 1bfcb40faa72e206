"""How numbabn compiles: the jit options and the serial/parallel twins of each driver."""

import threading
import types

import numba

#: ``reassoc`` and ``contract`` let LLVM vectorize the float loops; ``nnan``/``ninf`` are never
#: used, so NaN and Inf propagate.  ``error_model="numpy"`` drops division-by-zero checks.
FASTMATH = {"reassoc", "contract"}
OPTIONS = {"fastmath": FASTMATH, "error_model": "numpy", "nogil": True, "cache": True}

#: Stages are inlined into their driver, so a driver compiled with ``parallel=True`` turns the
#: stage's ``prange`` loops into parallel regions and the serial twin runs them as ``range``.
stage = numba.njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})

#: Numba's workqueue threading layer aborts when two Python threads launch parallel regions at
#: once, and with OpenMP they would oversubscribe the cores; parallel drivers hold this lock.
_PARALLEL_LOCK = threading.Lock()


class Twin:
    """A driver compiled twice: ``serial`` for small arrays and ``parallel`` for large ones.

    Both come from the same Python function, so they compute the same thing; which one runs
    depends on the array's size alone, never on the thread count.
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
