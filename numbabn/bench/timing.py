"""Timing on shared, noisy machines, the one home of every benchmark path's timing loop:
contenders timed in interleaved rounds (:func:`interleaved`), with equal thread counts, the
best of repeated whole pipelines (:func:`best`, Dask), the median between CUDA events
(:func:`median_ms`), and a progress bar for people at a terminal."""

import random
import statistics
import sys
import time

import numba
import numpy as np

from . import contenders


def _nothing():
    pass


def interleaved(
    fns, budget=0.6, batch=0.01, min_rounds=3, max_rounds=100, sync=None, progress=None, quantile=0.5, clock=None
):
    """Median (or ``quantile``) seconds per call of each of ``fns`` (dict name -> callable).

    Each callable is calibrated to a batch of about ``batch`` seconds of back-to-back calls;
    rounds then time one batch of each callable, so drifts of a shared machine hit every
    contender alike, in an order shuffled each round (seeded, the same every run): what one
    batch leaves behind (its output in the cache or freed to the allocator, its library's
    spinning OpenMP threads) falls on every contender alike, not always on the one timed
    after it.  In a fixed order, the first of two copies of one (16 MB) training forward
    measured 1.2x the second.  Batches also dilute that spin-wait.

    Parameters
    ----------
    sync : dict name -> callable, optional
        Called after each batch before the clock is read, so device work queued by the batch
        is inside its time.
    progress : callable (fraction), optional
        Told after each round how far the rounds have come.
    quantile : float, default 0.5
        Which quantile of the rounds to return: 0.1 is the figure to read on a machine that
        other jobs share, as they only ever add time.
    clock : callable, default ``time.perf_counter``
        The clock (``time.thread_time`` times the calling thread's CPU time).
    """
    sync = sync or {}
    clock = clock or time.perf_counter
    nothing = _nothing
    counts = {}
    for k, f in fns.items():
        s = sync.get(k, nothing)
        f()  # warm-up (compile, allocate, fault pages in)
        s()
        t = clock()
        f()
        s()
        one = max(clock() - t, 1e-7)
        counts[k] = max(1, int(batch / one))
    rounds = int(min(max_rounds, max(min_rounds, budget / (batch * len(fns)))))
    times = {k: [] for k in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for r in range(rounds):
        shuffle(order)
        for k in order:
            f, n, s = fns[k], counts[k], sync.get(k, nothing)
            t = clock()
            for _ in range(n):
                f()
            s()
            times[k].append((clock() - t) / n)
        if progress is not None:
            progress((r + 1) / rounds)
    if quantile == 0.5:
        return {k: statistics.median(v) for k, v in times.items()}
    return {k: float(np.quantile(v, quantile)) for k, v in times.items()}


class torch_threads:
    """Run PyTorch with as many threads as numba, so neither side gets more cores."""

    def __init__(self):
        self.torch = contenders._torch()

    def __enter__(self):
        if self.torch is not None:
            self.old = self.torch.get_num_threads()
            self.torch.set_num_threads(numba.get_num_threads())

    def __exit__(self, *exc):
        if self.torch is not None:
            self.torch.set_num_threads(self.old)


class Progress:
    """A one-line progress bar on ``file`` (stderr), redrawn in place with ``\\r``.

    Drawn only when ``file`` is a terminal: in a pipe or a CI log a redrawn line would land as
    hundreds of lines (or one unreadable one), and there the table rows, printed as each shape
    finishes, show the progress anyway.  Standard library only: numbabn's runtime
    dependencies stay numpy and numba.
    """

    def __init__(self, total, file=None, width=30):
        self.file = sys.stderr if file is None else file
        self.total, self.width, self.done = max(total, 1), width, 0
        self.enabled = hasattr(self.file, "isatty") and self.file.isatty()
        self.label, self.shown = "", False

    def update(self, done, label=None):
        """Set the completed work (in the units of ``total``) and redraw."""
        self.done = min(done, self.total)
        self.label = self.label if label is None else label
        if self.enabled:
            filled = int(self.width * self.done / self.total)
            bar = "#" * filled + "." * (self.width - filled)
            line = f"[{bar}] {100 * self.done / self.total:3.0f}% {self.label}"
            self.file.write("\r" + line[:110].ljust(110))
            self.file.flush()
            self.shown = True

    def clear(self):
        """Erase the bar (before printing a line of results below it)."""
        if self.shown:
            self.file.write("\r" + " " * 110 + "\r")
            self.file.flush()
            self.shown = False


def best(fn, budget, min_runs=3):
    """The best wall time of ``fn()`` over at least ``min_runs`` runs and ``budget`` seconds."""
    fn()  # warm up (compile, caches, thread pools)
    times = []
    t_end = time.perf_counter() + budget
    while len(times) < min_runs or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def median_ms(event, synchronize, fn, reps):
    """Median milliseconds of ``fn`` between two CUDA events (numba's and PyTorch's events
    share this interface)."""
    fn()  # compile, warm up
    synchronize()
    times = []
    for _ in range(reps):
        start, stop = event(), event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))
