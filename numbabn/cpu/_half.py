"""float16 data in the CPU kernels: numba's CPU target has no float16 arrays, so float16
arrays reach the kernels as their ``uint16`` bits, and the kernels read and write every data
array through :func:`value` and :func:`put`.

For float32 and float64 arrays both are plain indexing (LLVM inlines them: the same machine
code as before; numba's own ``inline="always"`` lost a conditional expression passed to
:func:`put`).  For ``uint16`` (float16 bits) :func:`value` widens to float32, exactly
(LLVM's ``fpext``, one F16C instruction for 8 or 16 values where the CPU has it), and
:func:`put` rounds a float64 result to float16 correctly: to float32 with round-to-odd, then
to float16 (round-to-nearest-even), which rounds as one step would (float32 has more than
twice float16's precision plus two bits).  The arithmetic in between is the float64 of the
float32 kernels.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def half_to_float(typingctx, bits):
    """The float32 value of float16 bits (a ``uint16``), exact."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def float_to_half(typingctx, v):
    """The float16 bits (a ``uint16``) of the float64 ``v`` correctly rounded (to nearest,
    ties to even): round-to-odd to float32, then to float16.  NaN stays NaN, overflow gives
    infinity."""
    sig = types.uint16(types.float64)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        low = ir.Constant(i64, (1 << 29) - 1)
        bits = builder.bitcast(args[0], i64)
        # Round to odd in the float64 bits: the 29 bits below float32's last are cleared
        # (toward zero), and float32's last bit is set when any of them was (the carry of
        # ``low`` into bit 29), so no tie remains for the second rounding.
        carry = builder.add(builder.and_(bits, low), low)
        odd = builder.and_(builder.or_(bits, carry), builder.not_(low))
        f32 = builder.fptrunc(builder.bitcast(odd, ir.DoubleType()), ir.FloatType())
        return builder.bitcast(builder.fptrunc(f32, ir.HalfType()), ir.IntType(16))

    return sig, codegen


def value(a, i):
    """``a[i]`` as a float: float16 bits widened, other arrays' values as they are."""


def put(a, i, v):
    """``a[i] = v``: rounded once to float16 for float16 bits, else as numba assigns."""


@overload(value)
def _value(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: half_to_float(a[i])
    return lambda a, i: a[i]


@overload(put)
def _put(a, i, v):
    if a.dtype == types.uint16:

        def put_half(a, i, v):
            a[i] = float_to_half(np.float64(v))

        return put_half

    def put_value(a, i, v):
        a[i] = v

    return put_value


#: The kernels' dtype for float16 data: its bits.
BITS = np.dtype(np.uint16)
HALF = np.dtype(np.float16)


def bits(a):
    """The kernels' view of an array: its ``uint16`` bits when it holds float16."""
    return a.view(np.uint16) if a.dtype == HALF else a
