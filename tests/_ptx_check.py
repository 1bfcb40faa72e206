"""Compile every numbabn CUDA kernel to PTX for a real GPU (sm_90), for float16, float32
and float64 data, without a GPU: the CUDA simulator runs kernels as Python and cannot catch
what only numba-cuda's typing and NVVM see.  Run by ``test_cuda.py`` in a subprocess (the
simulator must be off); prints one line per kernel and exits non-zero on any failure.

Then reads the PTX's loops (a label and a later branch back to it):

- the elementwise kernels have no integer division or remainder in any loop (one per
  element made the normalize 3.9x a copy's time on an H200);
- the one-launch kernels (a reduction, then an elementwise pass in the same block) have
  none in their innermost loops;
- the data reductions' innermost loops that read global memory have a basic block issuing at
  least ``MIN_LOADS`` global loads, so that many are in flight before any is used (loads
  each behind its own branch went one at a time: the statistics took 2.4x a copy's time).

``--dump DIR`` writes each kernel's PTX there.
"""

import re
import sys

import numba.cuda.dispatcher as _dispatcher
from numba import cuda, types


class _H100:
    compute_capability = (9, 0)


# Device functions ask the current device for its compute capability; there is none here.
_dispatcher.get_current_device = lambda: _H100()

from numbabn.cuda import activation as A  # noqa: E402
from numbabn.cuda import backward as B  # noqa: E402
from numbabn.cuda import forward as F  # noqa: E402
from numbabn.cuda import masked as M  # noqa: E402
from numbabn.cuda import stats as S  # noqa: E402


def arr(dtype, ndim):
    return types.Array(dtype, ndim, "C")


def signatures(dt):
    f8, i8, b1 = types.float64, types.int64, types.boolean
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
        (B.grad_sums, (arr(f8, 3), i8, arr(f8, 2))),
        (B.apply_rows, (arr(dt, 3), arr(dt, 3), arr(coef, 2), arr(dt, 3))),
        (B.apply_columns, (arr(dt, 2), arr(dt, 2), i8, arr(coef, 2), arr(dt, 2))),
        (A.act_rows, (arr(dt, 3), arr(dt, 3), i8, arr(coef, 2), arr(dt, 3))),
        (A.act_columns, (arr(dt, 2), arr(dt, 2), i8, i8, arr(coef, 2), arr(dt, 2))),
        (M.masked_partials_strided, (arr(dt, 3), arr(b1, 2), i8, arr(f8, 3))),
        (M.masked_partials_minor, (arr(dt, 3), arr(b1, 2), i8, i8, arr(f8, 3))),
        (M.apply_rows_masked, (arr(dt, 3), arr(dt, 3), arr(b1, 2), arr(coef, 2), arr(dt, 3))),
        (M.apply_columns_masked, (arr(dt, 2), arr(dt, 2), arr(b1, 2), i8, arr(coef, 2), arr(dt, 2))),
        (M.count_true, (arr(b1, 1), arr(i8, 1))),
    ]
    for p in pc:
        out += [
            (
                F.finish_channels,
                (arr(f8, 3), i8, arr(p, 1), arr(p, 1), arr(p, 1), arr(p, 1), f8, f8, arr(coef, 2), arr(f8, 2)),
            ),
            (F.eval_channels, (arr(p, 1), arr(p, 1), arr(p, 1), arr(p, 1), f8, arr(coef, 2), arr(f8, 2))),
        ]
        # The one-launch training forwards: data, partials, weight, bias, running stats, momentum,
        # eps, coefficients, saved statistics, output.
        train = (arr(f8, 3), arr(p, 1), arr(p, 1), arr(p, 1), arr(p, 1), f8, f8, arr(coef, 2), arr(f8, 2))
        out += [
            (F.train_strided, (arr(dt, 3), *train, arr(dt, 3))),
            (F.train_minor, (arr(dt, 3), *train, arr(dt, 3))),
        ]
        # The one-launch backwards: grad_output, input, partials, n, weight, mean, invstd,
        # training, coefficients, gradients (float64 and output dtype), grad_input.
        grads = (arr(f8, 2), arr(types.float32 if dt == types.float16 else dt, 2))
        back = (arr(f8, 3), f8, arr(p, 1), arr(f8, 1), arr(f8, 1), types.boolean, arr(coef, 2), *grads)
        out += [
            (B.backward_strided, (arr(dt, 3), arr(dt, 3), *back, arr(dt, 3))),
            (B.backward_minor, (arr(dt, 3), arr(dt, 3), *back, arr(dt, 3))),
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


#: One-launch kernels: a reduction, then an elementwise pass; their innermost loops (the
#: elementwise one among them) have no integer division.
FUSED = ("train_strided", "train_minor", "backward_strided", "backward_minor")
ELEMENTWISE = (
    "normalize_rows",
    "normalize_columns",
    "apply_rows",
    "apply_columns",
    "apply_rows_masked",
    "apply_columns_masked",
    "act_rows",
    "act_columns",
)
REDUCTIONS = (
    "partials_strided",
    "partials_minor",
    "grad_partials_strided",
    "grad_partials_minor",
    "masked_partials_strided",
    "masked_partials_minor",
)
MIN_LOADS = 4

_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_INT_DIVISION = re.compile(r"\b(?:div|rem)\.[su](?:16|32|64)\b")


def loops(ptx):
    """``(lines, [(first, last), ...])``: each loop of the PTX as the line range from its
    label to the branch back to it."""
    lines, seen, out = ptx.splitlines(), {}, []
    for n, line in enumerate(lines):
        label = _LABEL.match(line)
        if label:
            seen[label.group(1)] = n
        branch = _BRANCH.search(line)
        if branch and branch.group(1) in seen:
            out.append((seen[branch.group(1)], n))
    return lines, out


def blocks(lines):
    """The basic blocks of ``lines``: split after branches and before labels."""
    block = []
    for line in lines:
        if _LABEL.match(line) and block:
            yield block
            block = []
        block.append(line)
        if _BRANCH.search(line) or "ret;" in line:
            yield block
            block = []
    if block:
        yield block


def integer_divisions_in_loops(ptx, innermost=False):
    lines, found = loops(ptx)
    if innermost:
        found = [(a, b) for a, b in found if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in found)]
    return [lines[n].split()[0] for a, b in found for n in range(a, b + 1) if _INT_DIVISION.search(lines[n])]


def loads_in_flight(ptx):
    """The fewest global loads that one basic block of an innermost global-loading loop
    issues, at best (None: no loop reads global memory)."""
    lines, found = loops(ptx)
    best = []
    for a, b in found:
        if any(a <= c and d <= b and (c, d) != (a, b) for c, d in found):
            continue  # not innermost
        body = lines[a : b + 1]
        if any("ld.global" in line for line in body):
            best.append(max(sum("ld.global" in line for line in blk) for blk in blocks(body)))
    return min(best) if best else None


def check_ptx(name, ptx):
    """What is wrong with kernel ``name``'s PTX, or None."""
    if name in ELEMENTWISE:
        divisions = integer_divisions_in_loops(ptx)
        if divisions:
            return f"integer division in a loop: {', '.join(divisions)}"
    if name in FUSED:
        divisions = integer_divisions_in_loops(ptx, innermost=True)
        if divisions:
            return f"integer division in an innermost loop: {', '.join(divisions)}"
    if name in REDUCTIONS:
        loads = loads_in_flight(ptx)
        if loads is None or loads < MIN_LOADS:
            return f"{loads} global loads issued together in the inner loop, want >= {MIN_LOADS}"
    return None


def main(argv=()):
    dump = argv[argv.index("--dump") + 1] if "--dump" in argv else None
    failures = 0
    for dt in (types.float16, types.float32, types.float64):
        for kernel, sig in signatures(dt):
            name = kernel.py_func.__name__
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
                print(f"ok   {name} {dt}")
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAIL {name} {dt}: {type(e).__name__}: {e}")
                continue
            if dump:
                with open(f"{dump}/{name}-{dt}.ptx", "w") as f:
                    f.write(ptx)
            wrong = check_ptx(name, ptx)
            if wrong:
                failures += 1
                print(f"FAIL {name} {dt} PTX: {wrong}")
            elif name in REDUCTIONS:
                print(f"     {name} {dt} PTX: {loads_in_flight(ptx)} global loads issued together in the inner loop")
            elif name in ELEMENTWISE:
                print(f"     {name} {dt} PTX: no integer division in loops")
            elif name in FUSED:
                print(f"     {name} {dt} PTX: no integer division in innermost loops")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
