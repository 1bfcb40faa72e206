"""Streaming stores against plain ones, kernel alone: each elementwise pass that can stream
(``numbabn.cpu._stream``) run on the same arrays with the size limit lifted (streaming) and
raised out of reach (plain), timed in interleaved rounds (:func:`numbabn.bench.timing.interleaved`),
outputs preallocated, two threads.

    .venv/bin/python tools/bench_stream.py [--budget SECONDS] [--repeat N]

Columns: each pass's streaming time over its plain time (below 1: streaming is faster), and
the plain time in ms.  ``bwd`` is the backward's ``grad_input`` pass and ``relu`` the fused
activation's.  Channel-minor layouts stream their forward only (the library's choice), so
their ``bwd`` and ``relu`` columns time plain stores against plain stores: the run's noise.
"""

import argparse

import numba
import numpy as np

from numbabn.bench.timing import interleaved
from numbabn.cpu import _stream
from numbabn.cpu import activation as act
from numbabn.cpu import backward as bwd
from numbabn.cpu import forward as fwd
from numbabn.cpu.api import parallel_for, views

CASES = [("NHWC (64, 56, 56, 64)", (64, 56, 56, 64), 3), ("(N, C) (65536, 512)", (65536, 512), 1)]
CASES += [("NCHW (64, 64, 56, 56)", (64, 64, 56, 56), 1)]
PLAIN = 1 << 62


def passes(shape, axis):
    """``{name: run(limit)}`` for one array: the forward's, the backward's and the ReLU's
    elementwise passes, each with outputs of its own."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    lay, (gv, xv, *outs) = views(x, axis, g, x, *(np.empty_like(x) for _ in range(6)))
    par = parallel_for(x.size, lay.inner)
    c = shape[axis]
    coef = np.stack([np.full(c, 1.1), np.full(c, -0.3), np.full(c, 0.2)])

    def forward(out):
        fwd.apply(par, lay, xv, coef[:2], out)

    def backward(out):
        bwd.grad_apply(par, lay, gv, xv, coef, out)

    def relu(out):
        act.apply(par, lay, xv, xv, act.RELU, coef[:2], out)

    def limited(step, out, limit):
        def run():
            _stream.STREAM_BYTES = limit
            step(out)

        return run

    fns = {}
    for k, (name, step) in enumerate((("fwd", forward), ("bwd", backward), ("relu", relu))):
        fns[f"{name} plain"] = limited(step, outs[2 * k], PLAIN)
        fns[f"{name} stream"] = limited(step, outs[2 * k + 1], 0)
    return fns


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=4.0, help="seconds per case and repeat")
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    cases = [(name, passes(shape, axis)) for name, shape, axis in CASES]
    for _, fns in cases:
        for run in fns.values():
            run()  # compile
    limit = _stream.STREAM_BYTES
    print(f"{'case':24} {'fwd':>14} {'bwd':>14} {'relu':>14}   (stream / plain, plain ms)")
    try:
        for _ in range(a.repeat):
            for name, fns in cases:
                t = interleaved(fns, budget=a.budget)
                cols = [
                    f"{t[f'{k} stream'] / t[f'{k} plain']:5.2f} ({t[f'{k} plain'] * 1e3:5.2f})"
                    for k in ("fwd", "bwd", "relu")
                ]
                print(f"{name:24} " + " ".join(f"{c:>14}" for c in cols), flush=True)
    finally:
        _stream.STREAM_BYTES = limit


if __name__ == "__main__":
    main()
