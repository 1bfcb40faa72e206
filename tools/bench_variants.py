"""The batch-norm variants beside ``BatchNorm`` on the same arrays, timed in interleaved
rounds (:func:`numbabn.bench.timing.interleaved`): Batch Renormalization, ghost batches and
masked statistics, training forward and backward, float32.

    .venv/bin/python tools/bench_variants.py [--budget SECONDS] [--cases TEXT ...] [--no-masked]

Ratios are the variant's median time over ``BatchNorm``'s, measured side by side in one run.
"""

import argparse

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


def layers(shape, axis, ghost):
    c = shape[axis]
    made = {
        "BatchNorm": numbabn.BatchNorm(c, axis=axis),
        "BatchRenorm": numbabn.BatchRenorm(c, axis=axis, rmax=3.0, dmax=5.0),
        f"ghost {ghost}": numbabn.BatchNorm(c, axis=axis, virtual_batch_size=ghost),
    }
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


def masked(rng, budget):
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
            "masked": lambda bn=made["masked"], x=x, m=mask: bn(x, m),
        }
        t_fwd = interleaved(fwd, budget=budget)
        for f in fwd.values():
            f()
        bwd = {k: (lambda bn=bn, g=g: bn.backward(g)) for k, bn in made.items()}
        t_bwd = interleaved(bwd, budget=budget)
        for label, t in (("forward", t_fwd), ("backward", t_bwd)):
            bn_t, mk_t = t["BatchNorm"] * 1e6, t["masked"] * 1e6
            print(f"{name:26} {label:8} {bn_t:9.1f}us {mk_t:10.1f}us {mk_t / bn_t:10.2f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=3.0, help="seconds per table row and pass")
    p.add_argument("--cases", nargs="+", help="run only the cases whose name contains one of these texts")
    p.add_argument("--no-masked", action="store_true", help="skip the masked-statistics table")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    head = ("case", "pass", "BatchNorm", "BatchRenorm", "ghost", "renorm/bn", "ghost/bn")
    print("{:26} {:8} {:>11} {:>12} {:>12} {:>10} {:>9}".format(*head))
    for name, shape, axis, ghost in CASES:
        if a.cases and not any(c in name for c in a.cases):
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        made = layers(shape, axis, ghost)
        fwd = {k: (lambda bn=bn, x=x: bn(x)) for k, bn in made.items()}
        t_fwd = interleaved(fwd, budget=a.budget)
        for bn in made.values():
            bn(x)
        bwd = {k: (lambda bn=bn, g=g: bn.backward(g)) for k, bn in made.items()}
        t_bwd = interleaved(bwd, budget=a.budget)
        for label, t in (("forward", t_fwd), ("backward", t_bwd)):
            bn_t, rn_t, gh_t = (t[k] * 1e6 for k in made)
            times = f"{bn_t:9.1f}us {rn_t:10.1f}us {gh_t:10.1f}us"
            print(f"{name:26} {label:8} {times} {rn_t / bn_t:10.2f} {gh_t / bn_t:9.2f}", flush=True)
    if not a.no_masked:
        masked(rng, a.budget)


if __name__ == "__main__":
    main()
