"""numbabn on in-memory Dask arrays (threaded scheduler): ``python -m numbabn.bench.dask_bench``.

Measures, on the same array and chunks (float32, chunks of ``chunk_mb`` along the batch
axis, every layout):

- statistics: ``numbabn.welford`` of the Dask array, against Dask's own
  ``dask.compute(x.mean(axes), x.var(axes))`` and against ``numbabn.welford`` of the NumPy
  array in memory;
- the lazy normalize (eval mode, stored into a preallocated NumPy array with
  ``dask.array.store``) against the in-memory eval forward;
- the per-task overhead beyond the kernel: the time per chunk of the statistics of an array
  of many tiny chunks, less the kernel's own time on one such chunk.

Times are the best of repeated runs within a budget.
"""

import time

import numpy as np

LAYOUTS = {"NCHW": 1, "NHWC": -1}


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


def _shape(mb, layout, itemsize):
    c, hw = 64, 32
    n = max(1, int(mb * 2**20 / (itemsize * c * hw * hw)))
    return (n, c, hw, hw) if layout == "NCHW" else (n, hw, hw, c)


def run(mb=256, chunk_mb=16, dtype=np.float32, budget=2.0):
    """The measurements as a dict: per layout, seconds of each contender and their ratios,
    and the per-task overhead in microseconds."""
    import dask

    dtype = np.dtype(dtype)
    results = {"mb": mb, "chunk_mb": chunk_mb, "dtype": dtype.name, "layouts": {}}
    rng = np.random.default_rng(0)
    with dask.config.set(scheduler="threads"):
        for layout, axis in LAYOUTS.items():
            x = (3.0 + rng.standard_normal(_shape(mb, layout, dtype.itemsize), dtype=np.float32)).astype(dtype)
            results["layouts"][layout] = measure(x, axis, chunk_mb, budget)
        results["task_overhead_us"] = task_overhead(budget)
    return results


def measure(x, axis, chunk_mb, budget):
    """Seconds of each contender on ``x``, in chunks of about ``chunk_mb`` along axis 0."""
    import dask
    import dask.array as da

    import numbabn

    rows = max(1, int(chunk_mb * 2**20 // x[0].nbytes))
    dx = da.from_array(x, chunks=(rows,) + x.shape[1:])
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    c = x.shape[axis]
    rm, rv = np.zeros(c, x.dtype), np.ones(c, x.dtype)
    out = np.empty_like(x)
    y = numbabn.batch_norm(dx, rm, rv, axis=axis)
    r = {"shape": x.shape, "chunks": dx.npartitions}
    r["welford_dask"] = best(lambda: numbabn.welford(dx, axis=axis), budget)
    r["mean_var_dask"] = best(lambda: dask.compute(dx.mean(axes), dx.var(axes)), budget)
    r["welford_memory"] = best(lambda: numbabn.welford(x, axis=axis), budget)
    r["normalize_dask"] = best(lambda: da.store(y, out, lock=False), budget)
    r["eval_memory"] = best(lambda: numbabn.batch_norm(x, rm, rv, axis=axis), budget)
    r["speedup_vs_mean_var"] = r["mean_var_dask"] / r["welford_dask"]
    r["welford_over_memory"] = r["welford_dask"] / r["welford_memory"]
    r["normalize_over_memory"] = r["normalize_dask"] / r["eval_memory"]
    return r


def task_overhead(budget=1.0, nchunks=2048, chunk=(4, 8, 8, 8)):
    """Microseconds per chunk that the statistics of an array of ``nchunks`` tiny chunks cost
    beyond the kernel's own time on one chunk (graph building and scheduling included)."""
    import dask.array as da

    import numbabn
    from numbabn import dask as nd

    x = np.random.default_rng(1).standard_normal((nchunks * chunk[0],) + chunk[1:], dtype=np.float32)
    dx = da.from_array(x, chunks=chunk)
    total = best(lambda: numbabn.welford(dx), budget)
    dask_sum = best(lambda: dx.sum(axis=(0, 2, 3)).compute(), budget)
    block = x[: chunk[0]].copy()
    reps = 200
    kernel = best(lambda: [nd._block_stats(block, 1) for _ in range(reps)], budget) / reps
    return {
        "per_chunk_us": 1e6 * total / nchunks,
        "kernel_us": 1e6 * kernel,
        "overhead_us": 1e6 * (total / nchunks - kernel),
        "dask_sum_per_chunk_us": 1e6 * dask_sum / nchunks,
    }


def report(results, out=print):
    """The measurements as a table."""
    out(
        f"Dask (threaded scheduler), {results['dtype']} arrays of {results['mb']} MB in chunks of "
        f"{results['chunk_mb']} MB along the batch axis"
    )
    out(f"{'':6} {'numbabn.welford':>16} {'mean+var':>10} {'speed-up':>9} {'in memory':>10} {'ratio':>6}"
        f" {'normalize':>10} {'in memory':>10} {'ratio':>6}")  # fmt: skip
    for layout, r in results["layouts"].items():
        out(
            f"{layout:6} {1e3 * r['welford_dask']:13.1f} ms {1e3 * r['mean_var_dask']:7.1f} ms"
            f" {r['speedup_vs_mean_var']:8.1f}x {1e3 * r['welford_memory']:7.1f} ms {r['welford_over_memory']:5.2f}x"
            f" {1e3 * r['normalize_dask']:7.1f} ms {1e3 * r['eval_memory']:7.1f} ms {r['normalize_over_memory']:5.2f}x"
        )
    t = results["task_overhead_us"]
    out(
        f"per task: {t['per_chunk_us']:.0f} us per tiny chunk, of which the kernel {t['kernel_us']:.1f} us: "
        f"{t['overhead_us']:.0f} us overhead (Dask's own x.sum() on the same chunks: "
        f"{t['dask_sum_per_chunk_us']:.0f} us per chunk)"
    )


def main(argv=None):
    """``python -m numbabn.bench.dask_bench [--mb MB] [--chunk-mb MB] [--budget S]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m numbabn.bench.dask_bench", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=256, help="array size in MB (default 256)")
    p.add_argument("--chunk-mb", type=float, default=16, help="chunk size in MB (default 16)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per contender (default 2)")
    args = p.parse_args(argv)
    report(run(mb=args.mb, chunk_mb=args.chunk_mb, budget=args.budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
