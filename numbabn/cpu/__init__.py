"""CPU kernels: ``@njit`` stages inlined into serial/parallel drivers (see ``numbabn._jit``).

Every kernel works on C-contiguous ``(outer, C, inner)`` views and takes per-channel values
as float64 arrays; validation and layout live in ``numbabn._checks``.
"""
