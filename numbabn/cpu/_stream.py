"""Non-temporal (streaming) stores for outputs larger than the last-level cache.

A plain store first reads the destination line into the cache (read-for-ownership), so an
elementwise pass beyond the cache moves three bytes per byte written; a non-temporal store
writes the line without reading it, and keeps the output from evicting the input.  In the
cache the opposite holds: the output is read again soon, and a streaming store sends it to
memory.  So :func:`streams` picks them for outputs of at least ``STREAM_BYTES`` only
(docs/performance_notes.rst has the measurements).

numba has no streaming store, so :func:`stream_affine` (the forward's ``x * a + b``),
:func:`stream_grad` and :func:`stream_scale` (the backward's ``g * a + x * b + d`` and
``g * a``) and the fused activation's three (``stream_relu`` and the others) write one
16-byte vector through LLVM's ``!nontemporal`` store, with the float64
arithmetic, the operations and the one rounding of the plain kernels (the same bits), and
:func:`store_fence` orders a task's streaming stores before the parallel loop's end (x86
streaming stores are weakly ordered).
"""

import os

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .._config import ROW_CHUNK
from .._jit import FASTMATH, stage
from ._half import put, value

#: Bytes per streaming store: one 128-bit vector, the alignment every x86-64 and AArch64 CPU
#: streams without splitting.
VECTOR_BYTES = 16


#: The plain kernels' fast-math flags, so that LLVM contracts the same products into the
#: same fused multiply-adds and the streamed values are their bits.
FLAGS = tuple(sorted(FASTMATH))


class _Lanes:
    """One 16-byte vector's worth of lanes at index ``j`` of the arrays of an intrinsic's
    arguments: loads widened to float64, coefficients (arrays or scalars) as float64 vectors,
    and the streaming store of a float64 result rounded to the output's dtype."""

    def __init__(self, context, builder, sig, args, out_index, j):
        self.context, self.builder, self.sig, self.args, self.j = context, builder, sig, args, j
        dtype = context.get_data_type(sig.args[out_index].dtype)
        self.width = VECTOR_BYTES // context.get_abi_sizeof(dtype)
        self.elem = ir.VectorType(dtype, self.width)
        self.wide = ir.VectorType(ir.DoubleType(), self.width)

    def _at(self, k, vector):
        arr = self.context.make_array(self.sig.args[k])(self.context, self.builder, self.args[k])
        return self.builder.bitcast(self.builder.gep(arr.data, [self.j]), vector.as_pointer())

    def data(self, k):
        """Argument ``k``'s values (the input's dtype), widened to float64."""
        v = self.builder.load(self._at(k, self.elem), align=1)
        return v if self.elem == self.wide else self.builder.fpext(v, self.wide)

    def coef(self, k):
        """Argument ``k``'s coefficients: a float64 array's, or a scalar in every lane."""
        if isinstance(self.sig.args[k], types.Array):
            return self.builder.load(self._at(k, self.wide), align=8)
        value = self.context.cast(self.builder, self.args[k], self.sig.args[k], types.float64)
        vector = ir.Constant(self.wide, ir.Undefined)
        for lane in range(self.width):
            vector = self.builder.insert_element(vector, value, ir.Constant(ir.IntType(32), lane))
        return vector

    def stream(self, k, y):
        """Round ``y`` to argument ``k``'s dtype and stream it there (16-byte aligned)."""
        if self.elem != self.wide:
            y = self.builder.fptrunc(y, self.elem)
        store = self.builder.store(y, self._at(k, self.elem), align=VECTOR_BYTES)
        store.set_metadata("nontemporal", self.builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


def _streamable(out, *inputs):
    return out.dtype in (types.float32, types.float64) and all(a.dtype == out.dtype for a in inputs)


def _coefs(*coefs):
    """Coefficients all float64 arrays or all scalars."""
    return all(isinstance(c, types.Array) for c in coefs) or all(isinstance(c, types.Float) for c in coefs)


@intrinsic
def stream_affine(typingctx, xr, a, b, out, j):
    """``out[j:j + w] = xr[j:j + w] * a[j:j + w] + b[j:j + w]`` in float64, rounded once to
    ``out``'s dtype (float32 or float64, ``w`` = 4 or 2), with one streaming 16-byte store:
    ``out[j]`` must be 16-byte aligned.  ``a`` and ``b`` are float64 arrays, or float64
    scalars that every element shares."""
    if not (_streamable(out, xr) and _coefs(a, b)):
        return None

    def codegen(context, builder, sig, args):
        lanes = _Lanes(context, builder, sig, args, 3, args[4])
        product = builder.fmul(lanes.data(0), lanes.coef(1), flags=FLAGS)
        lanes.stream(3, builder.fadd(product, lanes.coef(2), flags=FLAGS))
        return context.get_dummy_value()

    return types.void(xr, a, b, out, j), codegen


@intrinsic
def stream_grad(typingctx, gr, xr, a, b, d, out, j):
    """``out[j:j + w] = gr * a + xr * b + d`` over the same lanes, as :func:`stream_affine`
    (the backward's elementwise pass, in its order of operations)."""
    if not (_streamable(out, gr, xr) and _coefs(a, b, d)):
        return None

    def codegen(context, builder, sig, args):
        lanes = _Lanes(context, builder, sig, args, 5, args[6])
        ga = builder.fmul(lanes.data(0), lanes.coef(2), flags=FLAGS)
        xb = builder.fmul(lanes.data(1), lanes.coef(3), flags=FLAGS)
        lanes.stream(5, builder.fadd(builder.fadd(ga, xb, flags=FLAGS), lanes.coef(4), flags=FLAGS))
        return context.get_dummy_value()

    return types.void(gr, xr, a, b, d, out, j), codegen


@intrinsic
def stream_scale(typingctx, gr, a, out, j):
    """``out[j:j + w] = gr * a`` over the same lanes (the backward's pass in eval, where
    ``x`` is not read)."""
    if not (_streamable(out, gr) and _coefs(a)):
        return None

    def codegen(context, builder, sig, args):
        lanes = _Lanes(context, builder, sig, args, 2, args[3])
        lanes.stream(2, builder.fmul(lanes.data(0), lanes.coef(1), flags=FLAGS))
        return context.get_dummy_value()

    return types.void(gr, a, out, j), codegen


def _activated(relu, residual):
    """An intrinsic ``(xr, zr, a, b, out, j)``: ``out[j:j + w] = act(xr * a + b [+ zr])``
    over the same lanes, as ``activation.act_row`` computes it (the ReLU keeps NaN)."""

    @intrinsic
    def stream_act(typingctx, xr, zr, a, b, out, j):
        if not (_streamable(out, xr, zr) and _coefs(a, b)):
            return None

        def codegen(context, builder, sig, args):
            lanes = _Lanes(context, builder, sig, args, 4, args[5])
            v = builder.fadd(builder.fmul(lanes.data(0), lanes.coef(2), flags=FLAGS), lanes.coef(3), flags=FLAGS)
            if residual:
                v = builder.fadd(v, lanes.data(1), flags=FLAGS)
            if relu:
                zero = ir.Constant(lanes.wide, None)
                v = builder.select(builder.fcmp_ordered("<", v, zero), zero, v)
            lanes.stream(4, v)
            return context.get_dummy_value()

        return types.void(xr, zr, a, b, out, j), codegen

    return stream_act


#: The fused activation's three modes (``activation.RELU``, ``RESIDUAL`` and both).
stream_relu = _activated(relu=True, residual=False)
stream_residual = _activated(relu=False, residual=True)
stream_residual_relu = _activated(relu=True, residual=True)


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
def row_chunks(rows, inner):
    """``(step, count)``: a channel-strided streaming pass's chunks of ``step`` rows of
    ``inner`` values (about ``ROW_CHUNK`` values each, one fence each) and their number."""
    step = max(1, ROW_CHUNK // max(inner, 1))
    return step, (rows + step - 1) // step


@stage
def vector_span(out):
    """``(step, head, end)`` of a row ``out``: values per 16-byte vector, the values before
    its first 16-byte boundary, and the end of its last whole vector after them."""
    n = out.shape[0]
    step = VECTOR_BYTES // out.itemsize
    head = min(n, ((-out.ctypes.data) % VECTOR_BYTES) // out.itemsize)
    return step, head, head + (n - head) // step * step


@stage
def affine_row_stream(xr, a, b, out):
    """``out[j] = xr[j] * a[j] + b[j]`` along one row (``a`` and ``b`` arrays, as
    ``forward.affine_row_minor``, or scalars, as ``forward.affine_row``): plain stores up to
    ``out``'s first 16-byte boundary and after its last, streaming ones between."""
    step, head, end = vector_span(out)
    for k in range(head):
        put(out, k, value(xr, k) * coef_at(a, k) + coef_at(b, k))
    for j in range(head, end, step):
        stream_affine(xr, a, b, out, j)
    for k in range(end, out.shape[0]):
        put(out, k, value(xr, k) * coef_at(a, k) + coef_at(b, k))


@stage
def grad_put(gr, xr, a, b, d, out, k, with_x):
    """``out[k]`` of the backward's elementwise pass with scalar coefficients, plain store
    (``backward.apply_row``)."""
    if with_x:
        put(out, k, value(gr, k) * a + value(xr, k) * b + d)
    else:
        put(out, k, value(gr, k) * a)


@stage
def grad_row_stream(gr, xr, a, b, d, out, with_x):
    """``out = gr * a + xr * b + d`` along one row, or ``gr * a`` where not ``with_x``
    (``backward.apply_row``), streaming as :func:`affine_row_stream`."""
    step, head, end = vector_span(out)
    for k in range(head):
        grad_put(gr, xr, a, b, d, out, k, with_x)
    if with_x:
        for j in range(head, end, step):
            stream_grad(gr, xr, a, b, d, out, j)
    else:
        for j in range(head, end, step):
            stream_scale(gr, a, out, j)
    for k in range(end, out.shape[0]):
        grad_put(gr, xr, a, b, d, out, k, with_x)


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
