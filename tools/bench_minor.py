"""Where the time of a channel-minor training forward goes: the whole call beside PyTorch,
the eval call, a copy, and each stage of the kernel alone, timed in interleaved rounds.

    .venv/bin/python tools/bench_minor.py                  # the default shapes, float32
    .venv/bin/python tools/bench_minor.py --budget 3 --shapes 256x1024 64x56x56x64
    .venv/bin/python tools/bench_minor.py --cpu            # one thread each, CPU time
    .venv/bin/python tools/bench_minor.py --baseline /tmp/base/numbabn_base
    .venv/bin/python tools/bench_minor.py --channels-first --shapes 32x64x16x16 64x64x56x56

``--dtype float16`` times float16 data (float32 parameters) and adds the same values' float32
calls as ``f32_train`` and ``f32_eval``, for the float16/float32 ratio per element.

``--floors`` adds two elementwise passes over the kernels' view (channel-minor layouts): the
plainest float64 loop, ``y = float32(x * a + b)`` with float64 ``a`` and ``b`` per column
(``f64_loop``: the floor of the normalize pass numbabn's accuracy bound allows), and the same
in float32 arithmetic (``f32_loop``: what PyTorch computes, outside that bound; see
docs/performance_notes.rst).  The column ``stages`` adds ``k_stats``, ``k_finish`` and
``f64_loop``: the two-pass training forward at its floors, to compare with half of
``torch_train`` (the issue-28 2x target).

``--baseline DIR`` imports DIR, a copy of the ``numbabn`` package under another name (say an
older commit's ``git archive``), and times its train, eval and welford calls in the same
rounds (columns ``base_*``): a before/after in one process.

Each shape is (N, C) or channels-last (N, H, W, C) (``axis=-1``), or with ``--channels-first``
(N, C, ...) (``axis=1``: the channel-strided kernels); every figure is a time per
call in us: the median over interleaved rounds (``--stat p10``: their 10th percentile, the
figure to read on a machine that other jobs share, as they only ever add time).  ``--cpu``
runs numbabn and PyTorch on one thread each and times the calling thread's CPU time, which
descheduling by other jobs does not inflate: per-core work, comparable on a busy machine.
"""

import argparse
import importlib
import os
import sys
import time

import numba
import numpy as np

import numbabn
from numbabn._jit import FASTMATH
from numbabn.bench.timing import interleaved
from numbabn.cpu import forward as fwd
from numbabn.cpu import stats as cst
from numbabn.cpu.api import parallel_for, views

SHAPES = ["32x64", "64x1024", "256x1024", "1024x512", "8192x256", "4096x1024", "64x56x56x64"]


def f64_loop(x, a, b, y):
    """The plainest float64 elementwise pass: ``y = float32(x * a + b)``, rounded once."""
    for o in numba.prange(x.shape[0]):
        for j in range(x.shape[1]):
            y[o, j] = np.float32(np.float64(x[o, j]) * a[j] + b[j])


def f32_loop(x, a, b, y):
    """The same in float32 arithmetic (float32 ``a`` and ``b``)."""
    for o in numba.prange(x.shape[0]):
        for j in range(x.shape[1]):
            y[o, j] = x[o, j] * a[j] + b[j]


#: Each loop compiled parallel and serial, run as numbabn runs the same shape.
LOOPS = {
    (name, parallel): numba.njit(parallel=parallel, fastmath=FASTMATH, error_model="numpy")(fn)
    for name, fn in (("f64", f64_loop), ("f32", f32_loop))
    for parallel in (True, False)
}


def parse(s):
    return tuple(int(v) for v in s.split("x"))


def contenders(shape, dtype, torch, base=None, channels_first=False, floors=False):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    axis = 1 if len(shape) == 2 or channels_first else -1
    c = shape[axis]
    half = dtype == np.float16
    pdtype = np.dtype(np.float32) if half else dtype
    rm, rv = np.zeros(c, pdtype), np.ones(c, pdtype)
    y = np.empty_like(x)
    lay, (x3, y3) = views(x, axis % x.ndim, x, y)
    par = parallel_for(x.size, lay.inner)
    stats = np.empty((3, c))
    if not half:
        cst.welford(par, lay, x3, stats)
    w, b = np.ones(c, pdtype), np.zeros(c, pdtype)
    coef, save = np.empty((2, c)), np.empty((2, c))
    fwd.finish_channels(stats, w, b, rm.copy(), rv.copy(), 0.1, 1e-5, coef, save)
    e = np.empty(0, pdtype)
    fns = {
        "train": lambda: numbabn.batch_norm(x, rm, rv, training=True, axis=axis),
        "eval": lambda: numbabn.batch_norm(x, rm, rv, training=False, axis=axis),
        "copy": lambda: np.copyto(y, x),
        "welford": lambda: numbabn.welford(x, axis=axis),
    }
    if half:
        # float16 beside the same values in float32: the issue's "float32's time per element".
        x32 = x.astype(np.float32)
        fns["f32_train"] = lambda: numbabn.batch_norm(x32, rm, rv, training=True, axis=axis)
        fns["f32_eval"] = lambda: numbabn.batch_norm(x32, rm, rv, training=False, axis=axis)
    else:
        fns["k_train"] = lambda: fwd.forward_train(par, lay, x3, w, b, e, e, 0.1, 1e-5, y3, save)
        fns["k_stats"] = lambda: cst.welford(par, lay, x3, stats)
        fns["k_finish"] = lambda: fwd.finish_channels(stats, w, b, e, e, 0.1, 1e-5, coef, save)
        fns["k_norm"] = lambda: fwd.apply(par, lay, x3, coef, y3)
    if floors and not half and not lay.strided:
        a64, b64 = np.full(x3.shape[1], 1.1), np.full(x3.shape[1], -0.3)
        a32, b32 = a64.astype(np.float32), b64.astype(np.float32)
        loop64, loop32 = LOOPS["f64", par], LOOPS["f32", par]
        fns["f64_loop"] = lambda: loop64(x3, a64, b64, y3)
        fns["f32_loop"] = lambda: loop32(x3, a32, b32, y3)
    if base is not None:
        fns["base_train"] = lambda: base.batch_norm(x, rm, rv, training=True, axis=axis)
        fns["base_eval"] = lambda: base.batch_norm(x, rm, rv, training=False, axis=axis)
        fns["base_welford"] = lambda: base.welford(x, axis=axis)
    if torch is not None:
        tx = torch.from_numpy(x)
        if axis == -1:
            tx = tx.permute(0, tx.ndim - 1, *range(1, tx.ndim - 1))
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        fb = torch.nn.functional.batch_norm
        fns["torch_train"] = lambda: fb(tx, trm, trv, training=True)
        fns["torch_eval"] = lambda: fb(tx, trm, trv, training=False)
    return fns


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=SHAPES)
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--stat", choices=["median", "p10"], default="median")
    p.add_argument("--cpu", action="store_true", help="one thread each, thread CPU time")
    p.add_argument("--baseline", help="a renamed copy of the numbabn package to time beside it")
    p.add_argument("--channels-first", action="store_true", help="(N, C, ...) shapes, axis=1")
    p.add_argument("--floors", action="store_true", help="add the plain float64 and float32 elementwise loops")
    a = p.parse_args()
    base = None
    if a.baseline:
        path = os.path.abspath(a.baseline)
        sys.path.insert(0, os.path.dirname(path))
        base = importlib.import_module(os.path.basename(path))
    threads = 1 if a.cpu else 2
    clock = time.thread_time if a.cpu else time.perf_counter
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch = None
    if not a.no_torch:
        import torch

        torch.set_num_threads(threads)
    cols = ["train", "torch_train", "eval", "torch_eval", "copy", "welford", "k_train", "k_stats", "k_finish", "k_norm"]
    if np.dtype(a.dtype) == np.float16:
        cols = ["f32_train", "train", "torch_train", "f32_eval", "eval", "torch_eval", "copy", "welford"]
    if a.floors:
        cols += ["f64_loop", "f32_loop", "stages"]
    if base is not None:
        cols = [
            "base_train",
            "train",
            "torch_train",
            "base_eval",
            "eval",
            "torch_eval",
            "copy",
            "base_welford",
            "welford",
        ] + (["f32_train", "f32_eval"] if np.dtype(a.dtype) == np.float16 else [])
    print(f"{'shape':>16} {'MB':>6} " + " ".join(f"{k:>11}" for k in cols) + "  torch/train  torch/eval  welford/copy")
    for s in a.shapes:
        shape = parse(s)
        fns = contenders(shape, np.dtype(a.dtype), torch, base, a.channels_first, a.floors)
        t = interleaved(
            fns,
            a.budget,
            batch=0.004,
            min_rounds=9,
            max_rounds=10**6,
            quantile=0.5 if a.stat == "median" else 0.1,
            clock=clock,
        )
        mb = np.prod(shape) * np.dtype(a.dtype).itemsize / 1e6
        if "f64_loop" in t:
            t["stages"] = t["k_stats"] + t["k_finish"] + t["f64_loop"]
        row = " ".join(f"{t[k] * 1e6:11.2f}" if k in t else f"{'-':>11}" for k in cols)
        ratio = t["torch_train"] / t["train"] if "torch_train" in t else float("nan")
        ratio_eval = t["torch_eval"] / t["eval"] if "torch_eval" in t else float("nan")
        print(
            f"{s:>16} {mb:6.2f} {row}  {ratio:11.2f}  {ratio_eval:10.2f}  {t['welford'] / t['copy']:12.2f}", flush=True
        )


if __name__ == "__main__":
    main()
