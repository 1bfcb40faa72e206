"""Non-temporal (streaming) stores for outputs larger than the last-level cache.

A plain store first reads the destination line into the cache (read-for-ownership), so an
elementwise pass beyond the cache moves three bytes per byte written; a non-temporal store
writes the line without reading it, and keeps the output from evicting the input.  In the
cache the opposite holds: the output is read again soon, and a streaming store sends it to
memory.  So :func:`streams` picks them for outputs of at least ``STREAM_BYTES`` only
(docs/performance_notes.rst has the measurements).

numba has no streaming store, so :func:`stream_affine` writes one 16-byte vector of
``x * a + b`` through LLVM's ``!nontemporal`` store, with the float64 arithmetic and the one
rounding of the plain kernels (the same bits), and :func:`store_fence` orders a task's
streaming stores before the parallel loop's end (x86 streaming stores are weakly ordered).
"""

import os

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._jit import stage
from ._half import put, value

#: Bytes per streaming store: one 128-bit vector, the alignment every x86-64 and AArch64 CPU
#: streams without splitting.
VECTOR_BYTES = 16


@intrinsic
def stream_affine(typingctx, xr, a, b, out, j):
    """``out[j:j + w] = xr[j:j + w] * a[j:j + w] + b[j:j + w]`` in float64, rounded once to
    ``out``'s dtype (float32 or float64, ``w`` = 4 or 2), with one streaming 16-byte store:
    ``out[j]`` must be 16-byte aligned.  ``a`` and ``b`` are float64 arrays, or float64
    scalars that every element shares."""
    if out.dtype not in (types.float32, types.float64) or xr.dtype != out.dtype:
        return None
    scalar = isinstance(a, types.Float)
    if scalar != isinstance(b, types.Float):
        return None
    sig = types.void(xr, a, b, out, j)

    def codegen(context, builder, sig, args):
        x_arr, out_arr = (context.make_array(sig.args[k])(context, builder, args[k]) for k in (0, 3))
        j = args[4]
        width = VECTOR_BYTES // context.get_abi_sizeof(context.get_data_type(sig.args[3].dtype))
        elem = ir.VectorType(context.get_data_type(sig.args[3].dtype), width)
        wide = ir.VectorType(ir.DoubleType(), width)

        def at(arr, vector):
            return builder.bitcast(builder.gep(arr.data, [j]), vector.as_pointer())

        xv = builder.load(at(x_arr, elem), align=1)
        if elem != wide:
            xv = builder.fpext(xv, wide)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(wide, [wide] * 3), f"llvm.fma.v{width}f64")
        coefs = []
        for k in (1, 2):
            if scalar:  # the scalar in every lane
                value = context.cast(builder, args[k], sig.args[k], types.float64)
                vector = ir.Constant(wide, ir.Undefined)
                for lane in range(width):
                    vector = builder.insert_element(vector, value, ir.Constant(ir.IntType(32), lane))
                coefs.append(vector)
            else:
                arr = context.make_array(sig.args[k])(context, builder, args[k])
                coefs.append(builder.load(at(arr, wide), align=8))
        y = builder.call(fma, [xv, *coefs])
        if elem != wide:
            y = builder.fptrunc(y, elem)
        store = builder.store(y, at(out_arr, elem), align=VECTOR_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_fence(typingctx):
    """A full memory fence: the streaming stores before it are visible to other threads."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def coef_at(a, j):
    """``a[j]`` of a per-column array of coefficients, or ``a`` itself when it is a scalar
    (one coefficient for the whole row)."""


@overload(coef_at)
def _coef_at(a, j):
    if isinstance(a, types.Float):
        return lambda a, j: a
    return lambda a, j: a[j]


@stage
def affine_row_stream(xr, a, b, out):
    """``out[j] = xr[j] * a[j] + b[j]`` along one row (``a`` and ``b`` arrays, as
    ``forward.affine_row_minor``, or scalars, as ``forward.affine_row``): plain stores up to
    ``out``'s first 16-byte boundary and after its last, streaming ones between."""
    n = xr.shape[0]
    size = out.itemsize
    step = VECTOR_BYTES // size
    head = min(n, ((-out.ctypes.data) % VECTOR_BYTES) // size)
    for j in range(head):
        put(out, j, value(xr, j) * coef_at(a, j) + coef_at(b, j))
    j = head
    while j + step <= n:
        stream_affine(xr, a, b, out, j)
        j += step
    for k in range(j, n):
        put(out, k, value(xr, k) * coef_at(a, k) + coef_at(b, k))


def _last_level_cache(base="/sys/devices/system/cpu/cpu0/cache"):
    """The bytes of this CPU's largest cache, as Linux reports it for CPU 0 (per core
    complex where the L3 is split), or 32 MiB where it cannot be read."""
    best = 0
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


#: Outputs of at least this many bytes are written with streaming stores: one and a half
#: last-level caches, past which no part of a pass's input or output stays cached for the
#: next call (at one cache's worth they measured even with plain stores).
STREAM_BYTES = _last_level_cache() * 3 // 2


def streams(y):
    """Whether an elementwise pass writes ``y`` (the kernels' view of the output) with
    streaming stores: float32 or float64 outputs of at least ``STREAM_BYTES``."""
    return y.nbytes >= STREAM_BYTES and y.dtype.itemsize >= 4
