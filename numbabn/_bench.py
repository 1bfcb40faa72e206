"""Side-by-side timings: numbabn against a streaming copy, a triad, and PyTorch CPU.

Every ratio is measured in one run, rounds interleaved (each contender once per round,
median over rounds), because these machines are shared and noisy.
"""

import statistics
import time

import numba
import numpy as np
from numba import prange

from . import functional as F

#: The core issue's shape list: (shape, axis, label).
SHAPES = [
    ((64, 64, 56, 56), 1, "NCHW"),
    ((32, 256, 28, 28), 1, "NCHW"),
    ((64, 56, 56, 64), -1, "NHWC"),
    ((65536, 512), 1, "NC"),
    ((8192, 256), 1, "NC"),
    ((256, 1024), 1, "NC"),
    ((32, 64), 1, "NC"),
]


@numba.njit(parallel=True, fastmath=True, cache=True)
def _copy(src, dst):
    for i in prange(src.size):
        dst[i] = src[i]


@numba.njit(parallel=True, fastmath=True, cache=True)
def _triad(a, b, k, out):
    for i in prange(a.size):
        out[i] = a[i] + k * b[i]


def _np_copy(src, dst):
    np.copyto(dst, src)


def interleaved(fns, budget=0.6, batch=0.01, min_rounds=5, max_rounds=100):
    """Median seconds per call of each of ``fns`` (dict name -> callable).

    Each callable is calibrated to a batch of about ``batch`` seconds of back-to-back calls;
    rounds then time one batch of each callable in turn, so drifts of a shared machine hit
    every contender alike.  Batches also dilute the OpenMP spin-wait that one library's
    threads leave behind for the next library's first call.
    """
    counts = {}
    for k, f in fns.items():
        f()  # warm-up (compile, allocate, fault pages in)
        t = time.perf_counter()
        f()
        one = max(time.perf_counter() - t, 1e-7)
        counts[k] = max(1, int(batch / one))
    rounds = int(min(max_rounds, max(min_rounds, budget / (batch * len(fns)))))
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            n = counts[k]
            t = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def measure(shape, axis, dtype=np.float32, budget=1.0, torch_too=True):
    """Time training forward, eval forward and backward of one shape; return a dict of
    seconds per call.

    ``train``, ``eval`` and ``backward`` write into preallocated arrays, as the copy, the
    triad and PyTorch's ``out=`` variants (``torch_*``) do; ``train_alloc`` and
    ``torch_train_alloc`` allocate their output, as users mostly call them (arrays over
    32 MB then pay the OS zero-filling fresh pages, the same for both)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    g = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    c = shape[axis]
    w, b = np.ones(c, dtype), np.zeros(c, dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y = np.empty_like(x)
    flat_x, flat_y, flat_g = x.reshape(-1), y.reshape(-1), g.reshape(-1)
    _, mean, invstd = F.batch_norm_forward(x, w, b, axis=axis)
    fns = {
        "np_copy": lambda: _np_copy(flat_x, flat_y),
        "nb_copy": lambda: _copy(flat_x, flat_y),
        "triad": lambda: _triad(flat_x, flat_g, 0.5, flat_y),
        "train": lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis=axis, out=y),
        "eval": lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, axis=axis, out=y),
        "backward": lambda: F.batch_norm_backward(g, x, w, mean, invstd, axis=axis, out=y),
    }
    # What a user calls, allocating the result (as torch.nn.functional.batch_norm does).
    alloc = {"train_alloc": lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis=axis)}
    torch = _torch() if torch_too else None
    if torch is not None:
        tx, tg = torch.from_numpy(x), torch.from_numpy(g)
        if axis != 1:  # channels-last: PyTorch's own NHWC memory format, same bytes
            perm = (0, x.ndim - 1, *range(1, x.ndim - 1))
            tx, tg = tx.permute(perm), tg.permute(perm)
        tw, tb, trm, trv = (torch.from_numpy(a.copy()) for a in (w, b, rm, rv))
        ty, tgi = torch.empty_like(tx), torch.empty_like(tx)  # keep tx's memory format
        tsm, tsi, tgw, tgb = (torch.empty(c, dtype=tx.dtype) for _ in range(4))
        _, tmean, tinv = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
        aten = torch.ops.aten
        fns.update(alloc)
        # PyTorch's out= variants: kernel against kernel, both writing preallocated arrays.
        fns["torch_train"] = lambda: aten.native_batch_norm.out(
            tx, tw, tb, trm, trv, True, 0.1, 1e-5, out=ty, save_mean=tsm, save_invstd=tsi
        )
        fns["torch_eval"] = lambda: aten.native_batch_norm.out(
            tx, tw, tb, trm, trv, False, 0.1, 1e-5, out=ty, save_mean=tsm, save_invstd=tsi
        )
        fns["torch_backward"] = lambda: aten.native_batch_norm_backward.out(
            tg, tx, tw, trm, trv, tmean, tinv, True, 1e-5, [True, True, True], out0=tgi, out1=tgw, out2=tgb
        )
        # What users call, allocating every result.
        fns["torch_train_alloc"] = lambda: torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
    with _torch_threads(torch):
        out = interleaved(fns, budget=budget)
    out["copy"] = min(out["np_copy"], out["nb_copy"])
    return out


class _torch_threads:
    """Run PyTorch with as many threads as numba, so neither side gets more cores."""

    def __init__(self, torch):
        self.torch = torch

    def __enter__(self):
        if self.torch is not None:
            self.old = self.torch.get_num_threads()
            self.torch.set_num_threads(numba.get_num_threads())

    def __exit__(self, *exc):
        if self.torch is not None:
            self.torch.set_num_threads(self.old)


def table(shapes=SHAPES, dtype=np.float32, budget=1.0, torch_too=True, file=None):
    """Print the ratio table, one row per shape as it is measured, then the median
    speed-ups over PyTorch; return the rows (dicts of seconds)."""
    missing_torch = torch_too and _torch() is None
    torch_too = torch_too and not missing_torch
    head = f"{'shape':>20} {'lay':>4} {'MB':>7} | {'train/copy':>10} {'eval/copy':>9} {'bwd/triad':>9}"
    if torch_too:
        head += f" | {'speed-up vs torch: train':>24} {'eval':>6} {'bwd':>6} {'train alloc':>11}"
    print(head, file=file)
    print("-" * len(head), file=file)
    rows = []
    for shape, axis, label in shapes:
        t = measure(shape, axis, dtype, budget, torch_too)
        mb = np.prod(shape) * np.dtype(dtype).itemsize / 1e6
        line = (
            f"{str(shape):>20} {label:>4} {mb:7.1f} | {t['train'] / t['copy']:10.2f} {t['eval'] / t['copy']:9.2f}"
            f" {t['backward'] / t['triad']:9.2f}"
        )
        if torch_too:
            s = {k: t["torch_" + k] / t[k] for k in SPEEDUPS}
            line += f" | {s['train']:24.2f} {s['eval']:6.2f} {s['backward']:6.2f} {s['train_alloc']:11.2f}"
        print(line, file=file, flush=True)
        rows.append({"shape": shape, "axis": axis, "layout": label, "MB": mb, **t})
    if torch_too:
        med = {k: statistics.median(r["torch_" + k] / r[k] for r in rows) for k in SPEEDUPS}
        print(
            f"{'median speed-up vs torch':>58} | {med['train']:24.2f} {med['eval']:6.2f} {med['backward']:6.2f}"
            f" {med['train_alloc']:11.2f}",
            file=file,
        )
    elif missing_torch:
        print("(PyTorch is not installed: no speed-up columns)", file=file)
    return rows


#: numbabn / PyTorch pairs timed side by side (``torch_<name>`` against ``<name>``).
SPEEDUPS = ("train", "eval", "backward", "train_alloc")
