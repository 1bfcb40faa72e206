"""The batch-norm variants beside ``BatchNorm`` on the same arrays, timed in interleaved
rounds (:func:`numbabn.bench.timing.interleaved`): Batch Renormalization, ghost batches and
masked statistics, training forward and backward, float32.

    .venv/bin/python tools/bench_variants.py [--budget SECONDS] [--cases TEXT ...] [--no-masked]
    .venv/bin/python tools/bench_variants.py --baseline /tmp/base/numbabn_base
    .venv/bin/python tools/bench_variants.py --cpu           # one thread, CPU time

Ratios are the variant's median time over ``BatchNorm``'s, measured side by side in one run.
``--baseline DIR`` imports DIR, a copy of the ``numbabn`` package under another name (an older
commit's ``git archive``), and times its ``BatchNorm`` and ghost batches in the same rounds
(columns ``base bn`` and ``base ghost/bn``): a before and after in one process.  ``--cpu``
runs the kernels on one thread and times the calling thread's CPU time, which other jobs on
a shared machine do not inflate: per-core work.
"""

import argparse
import importlib
import os
import sys
import time

import numba
import numpy as np

import numbabn
from numbabn.bench.timing import interleaved

#: (name, shape, axis, ghost batch size).
CASES = [
    ("NCHW (256, 64, 16, 16)", (256, 64, 16, 16), 1, 32),
    ("NCHW (64, 64, 56, 56)", (64, 64, 56, 56), 1, 8),
    ("NHWC (256, 16, 16, 64)", (256, 16, 16, 64), -1, 32),
    ("(N, C) (256, 512)", (256, 512), 1, 32),
    ("(N, C) (8192, 256)", (8192, 256), 1, 1024),
]


def layers(shape, axis, ghost, base=None):
    c = shape[axis]
    made = {
        "BatchNorm": numbabn.BatchNorm(c, axis=axis),
        "BatchRenorm": numbabn.BatchRenorm(c, axis=axis, rmax=3.0, dmax=5.0),
        "ghost": numbabn.BatchNorm(c, axis=axis, virtual_batch_size=ghost),
    }
    if base is not None:
        made["base bn"] = base.BatchNorm(c, axis=axis)
        made["base ghost"] = base.BatchNorm(c, axis=axis, virtual_batch_size=ghost)
    for bn in made.values():  # running statistics away from the first batch's, so r, d != 1, 0
        bn.running_mean[:] = 0.5
        bn.running_var[:] = 2.0
    return made


#: (name, shape, axis): masked statistics, a mask keeping about 3/4 of the positions.
MASKED = [
    ("NCHW (64, 64, 56, 56)", (64, 64, 56, 56), 1),
    ("sequences (256, 512, 128)", (256, 512, 128), 1),
    ("(N, C) (8192, 256)", (8192, 256), 1),
]


def masked(rng, budget, clock=None):
    print("\n{:26} {:8} {:>11} {:>12} {:>10}".format("case", "pass", "BatchNorm", "masked", "masked/bn"))
    for name, shape, axis in MASKED:
        x = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        mshape = list(shape)
        mshape[axis] = 1
        mask = rng.random(mshape) < 0.75
        made = {
            "BatchNorm": numbabn.BatchNorm(shape[axis], axis=axis),
            "masked": numbabn.BatchNorm(shape[axis], axis=axis),
        }
        fwd = {
            "BatchNorm": lambda bn=made["BatchNorm"], x=x: bn(x),
            "masked": lambda bn=made["masked"], x=x, m=mask: bn(x, mask=m),
        }
        t_fwd = interleaved(fwd, budget=budget, clock=clock)
        for f in fwd.values():
            f()
        bwd = {k: (lambda bn=bn, g=g: bn.backward(g)) for k, bn in made.items()}
        t_bwd = interleaved(bwd, budget=budget, clock=clock)
        for label, t in (("forward", t_fwd), ("backward", t_bwd)):
            bn_t, mk_t = t["BatchNorm"] * 1e6, t["masked"] * 1e6
            print(f"{name:26} {label:8} {bn_t:9.1f}us {mk_t:10.1f}us {mk_t / bn_t:10.2f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=3.0, help="seconds per table row and pass")
    p.add_argument("--cases", nargs="+", help="run only the cases whose name contains one of these texts")
    p.add_argument("--no-masked", action="store_true", help="skip the masked-statistics table")
    p.add_argument("--baseline", help="a renamed copy of the numbabn package to time beside it")
    p.add_argument("--cpu", action="store_true", help="one thread, the calling thread's CPU time")
    a = p.parse_args()
    clock = time.thread_time if a.cpu else None
    if a.cpu:
        numba.set_num_threads(1)
    base = None
    if a.baseline:
        path = os.path.abspath(a.baseline)
        sys.path.insert(0, os.path.dirname(path))
        base = importlib.import_module(os.path.basename(path))
    rng = np.random.default_rng(0)
    head = ("case", "pass", "BatchNorm", "BatchRenorm", "ghost", "renorm/bn", "ghost/bn")
    head += ("base bn", "base ghost/bn") if base else ()
    print(("{:26} {:8} {:>11} {:>12} {:>12} {:>10} {:>9}" + (" {:>11} {:>14}" if base else "")).format(*head))
    for name, shape, axis, ghost in CASES:
        if a.cases and not any(c in name for c in a.cases):
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        made = layers(shape, axis, ghost, base)
        fwd = {k: (lambda bn=bn, x=x: bn(x)) for k, bn in made.items()}
        t_fwd = interleaved(fwd, budget=a.budget, clock=clock)
        for bn in made.values():
            bn(x)
        bwd = {k: (lambda bn=bn, g=g: bn.backward(g)) for k, bn in made.items()}
        t_bwd = interleaved(bwd, budget=a.budget, clock=clock)
        for label, t in (("forward", t_fwd), ("backward", t_bwd)):
            bn_t, rn_t, gh_t = (t[k] * 1e6 for k in ("BatchNorm", "BatchRenorm", "ghost"))
            times = f"{bn_t:9.1f}us {rn_t:10.1f}us {gh_t:10.1f}us"
            line = f"{name:26} {label:8} {times} {rn_t / bn_t:10.2f} {gh_t / bn_t:9.2f}"
            if base:
                line += f" {t['base bn'] * 1e6:9.1f}us {t['base ghost'] / t['base bn']:14.2f}"
            print(line, flush=True)
    if not a.no_masked:
        masked(rng, a.budget, clock)


if __name__ == "__main__":
    main()
