"""Compile every numbabn CUDA kernel to PTX for a real GPU (sm_90), for float16, float32
and float64 data, without a GPU: the CUDA simulator runs kernels as Python and cannot catch
what only numba-cuda's typing and NVVM see.  Run by ``test_cuda.py`` in a subprocess (the
simulator must be off); prints one line per kernel and exits non-zero on any failure."""

import sys

import numba.cuda.dispatcher as _dispatcher
from numba import cuda, types


class _H100:
    compute_capability = (9, 0)


# Device functions ask the current device for its compute capability; there is none here.
_dispatcher.get_current_device = lambda: _H100()

from numbabn.cuda import backward as B  # noqa: E402
from numbabn.cuda import forward as F  # noqa: E402
from numbabn.cuda import stats as S  # noqa: E402


def arr(dtype, ndim):
    return types.Array(dtype, ndim, "C")


def signatures(dt):
    f8, i8 = types.float64, types.int64
    coef = types.float32 if dt == types.float16 else f8
    pc = [dt, types.float32] if dt == types.float16 else [dt]
    out = [
        (S.partials_strided, (arr(dt, 3), i8, arr(f8, 3))),
        (S.partials_minor, (arr(dt, 3), i8, arr(f8, 3))),
        (S.channel_stats, (arr(f8, 3), i8, arr(f8, 2))),
        (S.merge_channels, (f8, arr(f8, 1), arr(f8, 1), f8, arr(f8, 1), arr(f8, 1))),
        (S.copy_cast, (arr(f8, 1), f8, arr(dt, 1))),
        (F.normalize_rows, (arr(dt, 3), arr(coef, 2), arr(dt, 3))),
        (F.normalize_columns, (arr(dt, 2), i8, arr(coef, 2), arr(dt, 2))),
        (B.grad_partials_strided, (arr(dt, 3), arr(dt, 3), arr(f8, 1), i8, arr(f8, 3))),
        (B.grad_partials_minor, (arr(dt, 3), arr(dt, 3), arr(f8, 1), i8, i8, arr(f8, 3))),
        (B.apply_rows, (arr(dt, 3), arr(dt, 3), arr(coef, 2), arr(dt, 3))),
        (B.apply_columns, (arr(dt, 2), arr(dt, 2), i8, arr(coef, 2), arr(dt, 2))),
    ]
    for p in pc:
        out += [
            (
                F.finish_channels,
                (arr(f8, 3), i8, arr(p, 1), arr(p, 1), arr(p, 1), arr(p, 1), f8, f8, arr(coef, 2), arr(f8, 2)),
            ),
            (F.eval_channels, (arr(p, 1), arr(p, 1), arr(p, 1), arr(p, 1), f8, arr(coef, 2), arr(f8, 2))),
            (
                B.grad_channels,
                (
                    arr(f8, 3),
                    i8,
                    f8,
                    arr(p, 1),
                    arr(f8, 1),
                    arr(f8, 1),
                    types.boolean,
                    arr(coef, 2),
                    arr(f8, 2),
                    arr(types.float32 if dt == types.float16 else dt, 2),
                ),
            ),
        ]
    return out


def main():
    failures = 0
    for dt in (types.float16, types.float32, types.float64):
        for kernel, sig in signatures(dt):
            try:
                cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
                print(f"ok   {kernel.py_func.__name__} {dt}")
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAIL {kernel.py_func.__name__} {dt}: {type(e).__name__}: {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
