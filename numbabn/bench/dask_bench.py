"""numbabn on in-memory Dask arrays (threaded scheduler): ``python -m numbabn.bench.dask_bench``.

Measures, on the same array and chunks (float32, chunks of ``chunk_mb`` along the batch
axis, every layout):

- statistics: ``numbabn.welford`` of the Dask array, against Dask's own
  ``dask.compute(x.mean(axes), x.var(axes))`` and against ``numbabn.welford`` of the NumPy
  array in memory;
- the lazy normalize (eval mode, stored into a preallocated NumPy array with
  ``dask.array.store``) against the in-memory eval forward;
- the per-task overhead beyond the kernel: the time per chunk of the statistics of an array
  of many tiny chunks, less the kernel's own time on one such chunk, under the threaded and
  the synchronous scheduler.

``--out-of-core`` measures the Zarr-to-Zarr pipeline instead (:func:`run_out_of_core`): a
``distributed.LocalCluster`` of worker processes with a memory limit, a Zarr store several
times larger than the workers' memory, the statistics pass against a plain read of the store,
the normalize pass against a read-and-write copy of it, each worker's peak resident memory and
whatever spilled, and the per-task overhead on that cluster.

Times are the best of repeated runs within a budget.
"""

import os
import shutil
import tempfile
import threading
import time
import uuid

import numpy as np

from .timing import best

LAYOUTS = {"NCHW": 1, "NHWC": -1}


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
    with dask.config.set(scheduler="sync"):
        results["task_overhead_sync_us"] = task_overhead(budget)
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


def task_overhead(budget=1.0, nchunks=2048, chunk=(4, 8, 8, 8), fresh=False):
    """Microseconds per chunk that the statistics of an array of ``nchunks`` tiny chunks cost
    beyond the kernel's own time on one chunk (graph building and scheduling included).
    ``fresh``: a new Dask array (new keys) for every run, for dask.distributed, whose
    scheduler would otherwise find the keys of the previous run still in memory."""
    import dask.array as da

    import numbabn
    from numbabn import _dask_backend as nd

    x = np.random.default_rng(1).standard_normal((nchunks * chunk[0],) + chunk[1:], dtype=np.float32)
    dx = da.from_array(x, chunks=chunk)

    def array():
        return da.from_array(x, chunks=chunk, name=False) if fresh else dx

    total = best(lambda: numbabn.welford(array()), budget)
    dask_sum = best(lambda: array().sum(axis=(0, 2, 3)).compute(), budget)
    block = x[: chunk[0]].copy()
    reps = 200
    declared = ((0,) * block.ndim, block.shape, block.dtype)  # what the graph declares for it
    kernel = best(lambda: [nd.block_stats(block, 1, declared) for _ in range(reps)], budget) / reps
    return {
        "per_chunk_us": 1e6 * total / nchunks,
        "kernel_us": 1e6 * kernel,
        "overhead_us": 1e6 * (total / nchunks - kernel),
        "dask_sum_per_chunk_us": 1e6 * dask_sum / nchunks,
    }


# -- out of core: Zarr to Zarr on a LocalCluster with a memory limit ---------------------------

#: The workers' memory thresholds during :func:`run_out_of_core`, fractions of the limit:
#: managed data beyond ``target`` or process memory beyond ``spill`` goes to disk (and is
#: counted); pausing and terminating are off, so a pass that needs more memory shows as a
#: peak above the limit instead of a stalled or killed worker.
MEMORY_CONFIG = {
    "distributed.worker.memory.target": 0.6,
    "distributed.worker.memory.spill": 0.7,
    "distributed.worker.memory.pause": False,
    "distributed.worker.memory.terminate": False,
}


def _rss():
    import psutil

    return psutil.Process().memory_info().rss


def _start_sampler(dask_worker, interval=0.005):
    """In a worker: sample its resident memory every ``interval`` s in a thread until
    :func:`_stop_sampler`."""
    stop = threading.Event()
    peak = [_rss()]

    def sample():
        while not stop.wait(interval):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, daemon=True, name="numbabn-rss-sampler")
    thread.start()
    dask_worker._numbabn_sampler = (stop, thread, peak)


def _stop_sampler(dask_worker):
    """In a worker: the peak resident bytes since :func:`_start_sampler`."""
    stop, thread, peak = dask_worker._numbabn_sampler
    stop.set()
    thread.join()
    return max(peak[0], _rss())


def _spill_metrics(dask_worker):
    """In a worker: ``(count, bytes)`` written to its spill directory so far, and the keys
    on disk now."""
    data = dask_worker.data
    metrics = getattr(data, "cumulative_metrics", {})
    slow = getattr(data, "slow", {})
    return metrics.get(("disk-write", "count"), 0), metrics.get(("disk-write", "bytes"), 0), len(slow)


def _corner(block):
    """The plain read's per-chunk task: one value of the chunk (negligible compute)."""
    return block[:1, :1, :1, :1].copy()


def plain_read(z):
    """Reads every chunk of ``z`` (a Dask array of a Zarr store) with negligible compute."""
    return z.map_blocks(_corner, chunks=tuple((1,) * len(c) for c in z.chunks), dtype=z.dtype).compute()


def write_store(path, shape, chunks, compress=True, seed=0):
    """A float32 Zarr array at ``path``, written chunk by chunk along axis 0 (3 + N(0, 1))."""
    import zarr

    kw = {} if compress else {"compressors": None}
    z = zarr.create_array(store=path, shape=shape, chunks=chunks, dtype="float32", **kw)
    rng = np.random.default_rng(seed)
    for i in range(0, shape[0], chunks[0]):
        n = min(chunks[0], shape[0] - i)
        z[i : i + n] = 3.0 + rng.standard_normal((n,) + tuple(shape[1:]), dtype=np.float32)
    return z


def _du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run_out_of_core(
    total_mb=None,
    worker_memory_mb=512,
    chunk_mb=16,
    tmpdir=None,
    *,
    n_workers=2,
    runs=2,
    compress=True,
    overhead_chunks=256,
    budget=1.0,
    progress=print,
):
    """The out-of-core pipeline on a ``distributed.LocalCluster``, as a dict.

    ``n_workers`` worker processes of one thread each (``NUMBA_NUM_THREADS=1`` in them), each
    with a memory limit of ``worker_memory_mb`` (thresholds: :data:`MEMORY_CONFIG`); a float32
    NCHW Zarr store of ``total_mb`` (default: 4x the workers' total limit) in regular chunks of
    about ``chunk_mb`` along the batch axis, written chunk by chunk under ``tmpdir`` (a new
    temporary directory, removed afterwards); ``compress=False`` stores raw chunks instead of
    Zarr's default codec.  Timed, ``runs`` times each, interleaved, the best kept:

    - ``stats``: ``numbabn.welford(da.from_zarr(src))``, against ``read``: a plain read of
      every chunk (one value kept per chunk);
    - ``normalize``: ``da.to_zarr(numbabn.batch_norm(x, rm, rv, training=False), dst)`` with
      the statistics of the first pass, against ``copy``: ``da.to_zarr(da.from_zarr(src), dst)``
      (each to a new store, removed after the run).

    Per pass: the peak resident memory of the busiest worker (sampled by
    :func:`_start_sampler`'s thread in each worker) over its limit, and the bytes spilled
    to disk.  Also the per-task overhead on the cluster (:func:`task_overhead` on
    ``overhead_chunks`` tiny chunks) and the load average.
    """
    import logging

    import dask
    import dask.array as da
    import distributed

    import numbabn

    limit = int(worker_memory_mb * 2**20)
    if total_mb is None:
        total_mb = 4 * n_workers * worker_memory_mb
    c, hw = 64, 32
    sample = c * hw * hw * 4
    rows = max(1, int(chunk_mb * 2**20 // sample))
    n = max(rows, int(total_mb * 2**20 // sample) // rows * rows)  # whole chunks
    shape, chunks = (n, c, hw, hw), (rows, c, hw, hw)
    load = [os.getloadavg()]
    res = {
        "total_mb": n * sample / 2**20,
        "worker_memory_mb": worker_memory_mb,
        "n_workers": n_workers,
        "chunk_mb": rows * sample / 2**20,
        "shape": shape,
        "chunks": n // rows,
        "compress": compress,
        "store_over_memory": n * sample / (n_workers * limit),
        "memory_config": dict(MEMORY_CONFIG),
    }

    # Compile the serial kernels here: worker processes load them from numba's cache.
    warm = da.from_array(3.0 + np.zeros((4, c, 2, 2), np.float32), chunks=(2, c, 2, 2))
    with dask.config.set(scheduler="sync"):
        s = numbabn.welford(warm)
        numbabn.batch_norm(warm, s.mean.astype(np.float32), s.var().astype(np.float32)).compute()

    root = tempfile.mkdtemp(prefix="numbabn-ooc-", dir=tmpdir)
    try:
        src = os.path.join(root, "x.zarr")
        progress(f"writing a {res['total_mb']:.0f} MB Zarr store of {res['chunks']} chunks to {root} ...")
        t = time.perf_counter()
        write_store(src, shape, chunks, compress)
        res["write_source_s"] = time.perf_counter() - t
        res["store_bytes"] = _du(src)
        small = os.path.join(root, "warm.zarr")
        write_store(small, (2 * rows,) + shape[1:], chunks, compress, seed=1)
        zarr_kw = {} if compress else {"compressors": None}
        outputs = iter(range(10**9))

        def to_new_store(y):
            dst = os.path.join(root, f"out-{next(outputs)}.zarr")
            da.to_zarr(y, dst, **zarr_kw)
            return dst

        with (
            dask.config.set(MEMORY_CONFIG),
            distributed.LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                memory_limit=limit,
                dashboard_address=":0",
                env={"NUMBA_NUM_THREADS": "1"},
                local_directory=os.path.join(root, "workers"),
                silence_logs=logging.ERROR,
            ) as cluster,
            distributed.Client(cluster, set_as_default=False) as client,
            dask.config.set(scheduler=client),
        ):
            res["worker_config"] = sorted(
                set(client.run(lambda: tuple(dask.config.get(k) for k in MEMORY_CONFIG)).values())
            )
            res["worker_numba_threads"] = sorted(set(client.run(lambda: os.environ.get("NUMBA_NUM_THREADS")).values()))
            stats_box = {}

            def passes(path, rm=None, rv=None):
                # Each run reads through new keys: the scheduler must not find the last run's.
                def z():
                    return da.from_zarr(path, name=f"zarr-{uuid.uuid4().hex}")

                out = {
                    "read": lambda: plain_read(z()),
                    "stats": lambda: stats_box.__setitem__(path, numbabn.welford(z())),
                    "copy": lambda: to_new_store(z()),  # the store written, removed untimed
                }
                if rm is not None:
                    out["normalize"] = lambda: to_new_store(numbabn.batch_norm(z(), rm, rv))
                return out

            # Warm up every pass on a two-chunk store: kernels loaded, imports done, in each worker.
            for fn in passes(small, np.zeros(c, np.float32), np.ones(c, np.float32)).values():
                written = fn()
                if isinstance(written, str):
                    shutil.rmtree(written)
            res["worker_rss_after_warmup"] = max(client.run(_rss).values())
            progress(
                f"{n_workers} workers of {worker_memory_mb} MB (resident after warm-up: "
                f"{res['worker_rss_after_warmup'] / 2**20:.0f} MB); timing {runs} runs of each pass ..."
            )
            seconds, peaks, spilled = {}, {}, {}

            def timed(name, fn):
                before = client.run(_spill_metrics)
                client.run(_start_sampler)
                t = time.perf_counter()
                written = fn()
                dt = time.perf_counter() - t
                peak = max(client.run(_stop_sampler).values())
                if isinstance(written, str):
                    shutil.rmtree(written)
                after = client.run(_spill_metrics)
                count = sum(after[w][0] - before[w][0] for w in after)
                nbytes = sum(after[w][1] - before[w][1] for w in after)
                seconds[name] = min(seconds.get(name, dt), dt)
                peaks[name] = max(peaks.get(name, 0), peak)
                old = spilled.get(name, {"count": 0, "bytes": 0, "on_disk": 0})
                on_disk = sum(a[2] for a in after.values())
                spilled[name] = {
                    "count": old["count"] + count,
                    "bytes": old["bytes"] + nbytes,
                    "on_disk": max(old["on_disk"], on_disk),
                }
                progress(f"  {name}: {dt:.2f} s, peak worker memory {peak / 2**20:.0f} MB, {count} spilled")

            first = passes(src)
            for _ in range(runs):  # interleaved: the load changes over minutes
                timed("stats", first["stats"])
                timed("read", first["read"])
            st = stats_box[src]
            rm, rv = st.mean.astype(np.float32), st.var(ddof=1).astype(np.float32)
            second = passes(src, rm, rv)
            for _ in range(runs):
                timed("normalize", second["normalize"])
                timed("copy", second["copy"])
            # The normalize pass wrote what the in-memory path computes (first chunk checked).
            dst = to_new_store(numbabn.batch_norm(da.from_zarr(src), rm, rv))
            import zarr

            got = zarr.open_array(dst, mode="r")[:rows]
            want = numbabn.batch_norm(np.asarray(zarr.open_array(src, mode="r")[:rows]), rm, rv)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            shutil.rmtree(dst)
            load.append(os.getloadavg())
            res["task_overhead_us"] = task_overhead(budget, nchunks=overhead_chunks, fresh=True)
            res["worker_rss_at_end"] = max(client.run(_rss).values())
        load.append(os.getloadavg())
    finally:
        shutil.rmtree(root, ignore_errors=True)

    res["seconds"] = seconds
    res["mb_per_s"] = {k: res["total_mb"] / v for k, v in seconds.items()}
    res["stats_over_read"] = seconds["stats"] / seconds["read"]
    res["normalize_over_copy"] = seconds["normalize"] / seconds["copy"]
    res["peak_worker_bytes"] = peaks
    res["peak_over_limit"] = {k: v / limit for k, v in peaks.items()}
    res["spilled"] = spilled
    res["spilled_any"] = any(v["count"] or v["on_disk"] for v in spilled.values())
    res["within_limit"] = max(res["peak_over_limit"].values()) < 1 and not res["spilled_any"]
    res["load_average"] = load
    return res


def report_out_of_core(r, out=print):
    """The out-of-core measurements as a table."""
    out(
        f"Out of core on a LocalCluster of {r['n_workers']} workers x 1 thread, {r['worker_memory_mb']:.0f} MB each: "
        f"a {r['total_mb']:.0f} MB float32 Zarr store ({r['store_over_memory']:.1f}x the workers' memory, "
        f"{r['chunks']} chunks of {r['chunk_mb']:.0f} MB, {'compressed' if r['compress'] else 'uncompressed'}, "
        f"{r['store_bytes'] / 2**20:.0f} MB on disk)"
    )
    s, peak = r["seconds"], r["peak_over_limit"]
    for name, ref, ratio in (("stats", "read", "stats_over_read"), ("normalize", "copy", "normalize_over_copy")):
        out(
            f"  {name:9} {s[name]:7.2f} s  vs {ref:4} {s[ref]:7.2f} s: {r[ratio]:.2f}x (target <= 1.25); "
            f"peak worker memory {peak[name]:.2f} / {peak[ref]:.2f} of the limit"
        )
    spilled = sum(v["bytes"] for v in r["spilled"].values())
    out(
        f"  within the limit with nothing spilled: {'yes' if r['within_limit'] else 'NO'} "
        f"(spilled {spilled / 2**20:.0f} MB; resident after warm-up {r['worker_rss_after_warmup'] / 2**20:.0f} MB)"
    )
    t = r["task_overhead_us"]
    out(
        f"  per task on the cluster: {t['overhead_us']:.0f} us overhead (kernel {t['kernel_us']:.1f} us; "
        f"Dask's own x.sum(): {t['dask_sum_per_chunk_us']:.0f} us per chunk)"
    )
    out("  load average (1, 5, 15 min) at start, after the passes, at end: " + "; ".join(
        ", ".join(f"{v:.2f}" for v in la) for la in r["load_average"]))  # fmt: skip


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
    if "task_overhead_sync_us" in results:
        t = results["task_overhead_sync_us"]
        out(
            f"per task, synchronous scheduler: {t['overhead_us']:.0f} us overhead (kernel {t['kernel_us']:.1f} us; "
            f"Dask's own x.sum(): {t['dask_sum_per_chunk_us']:.0f} us per chunk)"
        )


def main(argv=None):
    """``python -m numbabn.bench.dask_bench [--mb MB] [--chunk-mb MB] [--budget S]``, or
    ``... --out-of-core [--worker-mb MB] [--store-mb MB] [--chunk-mb MB] [--tmpdir DIR]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m numbabn.bench.dask_bench", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=256, help="array size in MB (default 256)")
    p.add_argument("--chunk-mb", type=float, default=16, help="chunk size in MB (default 16)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per contender (default 2)")
    p.add_argument(
        "--out-of-core",
        action="store_true",
        help="the Zarr-to-Zarr pipeline on a LocalCluster with a memory limit instead (run_out_of_core)",
    )
    p.add_argument("--worker-mb", type=float, default=512, help="--out-of-core: memory limit per worker (default 512)")
    p.add_argument("--store-mb", type=float, default=None, help="--out-of-core: store size (default 4x the workers')")
    p.add_argument("--runs", type=int, default=2, help="--out-of-core: runs of each pass, the best kept (default 2)")
    p.add_argument("--tmpdir", default=None, help="--out-of-core: where the stores go (default: the temp dir)")
    p.add_argument("--no-compression", action="store_true", help="--out-of-core: raw Zarr chunks, no codec")
    args = p.parse_args(argv)
    if args.out_of_core:
        r = run_out_of_core(
            args.store_mb,
            args.worker_mb,
            args.chunk_mb,
            args.tmpdir,
            runs=args.runs,
            compress=not args.no_compression,
            budget=min(args.budget, 1.0),
        )
        report_out_of_core(r)
        return 0
    report(run(mb=args.mb, chunk_mb=args.chunk_mb, budget=args.budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
