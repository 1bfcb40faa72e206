"""The command line, ``python -m numbabn [check | bench] [options]``.

``check`` (the default): the self-check against the float64 oracle, then a quick table.
``bench``: the self-check, then numbabn side by side with plain NumPy, PyTorch (CPU and CUDA,
when installed and present) and a streaming copy, in time, GB/s, ratio to the copy and
speed-up, then the cold start.  ``--quick`` (three small shapes) for CI, ``--json`` for
machines, ``--plot FILE.png`` for a bandwidth-vs-size chart, ``--floor`` for how close the
CPU kernels come to the memory floor (:mod:`numbabn.bench.floor`), ``--device`` to choose the
CPU or the GPU columns.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

#: The cold-start cases: ``(label, shape, axis)``, float32.
COLD_CASES = [("NCHW (32, 64, 16, 16)", (32, 64, 16, 16), 1), ("(N, C) (256, 512)", (256, 512), 1)]


def cold_start(cases=COLD_CASES):
    """Seconds for ``import numbabn`` plus a first training forward, backward and eval forward
    of a ``BatchNorm``, in a fresh process per case: with numba's on-disk cache empty
    (compile) and warm (load)."""
    code = (
        "import sys, time; t = time.perf_counter(); import numpy as np, numbabn; "
        "shape, axis = eval(sys.argv[1]), int(sys.argv[2]); "
        "x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32); "
        "bn = numbabn.BatchNorm(shape[axis], axis=axis); y = bn(x); bn.backward(y); bn.eval()(x); "
        "print(time.perf_counter() - t)"
    )
    out = {}
    for name, shape, axis in cases:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            for label in ("cold (compile)", "warm (cached)"):
                args = [sys.executable, "-c", code, repr(shape), str(axis)]
                res = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
                out[f"{name}, {label}"] = float(res.stdout.strip())
    return out


def parser():
    p = argparse.ArgumentParser(
        prog="python -m numbabn", description="numbabn's self-check and benchmarks against NumPy and PyTorch."
    )
    p.add_argument(
        "command",
        nargs="?",
        default="check",
        choices=["check", "bench", "compile"],
        help="check (default): the self-check and a quick table; bench: the full side-by-side table; "
        "compile: compile every CPU kernel into numba's on-disk cache (for images), then say where it is",
    )
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per shape (bench)")
    p.add_argument("--quick", action="store_true", help="bench: three 2-4 MB shapes, short budgets (CI)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float64"],
        help="bench: input dtype (default float32); compile: only this dtype (default both)",
    )
    p.add_argument("--json", action="store_true", help="bench: print the results as JSON on stdout only")
    p.add_argument(
        "--plot", metavar="FILE.png", help="bench: also sweep sizes and chart GB/s vs size (needs matplotlib)"
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="bench: how close the CPU kernels come to the memory floor: each pass's time over a streaming copy"
        " (or triad) of the same bytes, call overhead on small arrays, time per element across sizes, peak memory",
    )
    p.add_argument(
        "--floor-mb",
        type=float,
        default=1024,
        metavar="MB",
        help="bench --floor: array size beyond the cache (default 1024; 4 arrays of it are allocated)",
    )
    p.add_argument(
        "--dask",
        action="store_true",
        help="bench: numbabn on in-memory Dask arrays (threaded scheduler) against Dask's own mean and var "
        "and against numbabn on the same array in memory (needs numbabn[dask]; --dask-mb sets the size)",
    )
    p.add_argument("--dask-mb", type=float, default=256, metavar="MB", help="bench --dask: array size (default 256)")
    p.add_argument(
        "--out-of-core",
        action="store_true",
        help="bench --dask: the Zarr-to-Zarr pipeline on a 2-worker LocalCluster of 512 MB workers and a store 4x "
        "their memory instead (needs numbabn[dask]; minutes, several GB in the temp dir)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="check: 'cuda' checks the GPU backend against the float64 oracle and times it (CUDA events); "
        "bench: only the CPU columns, or only the GPU ones (an error where no GPU can run); "
        "default: the host check, and every column that can run here",
    )
    return p


def main(argv=None):
    """Run the command line; returns the exit status (0 ok, 1 a failed check, 2 cannot run)."""
    p = parser()
    args = p.parse_args(argv)
    if args.command == "compile":
        return _compile(args)
    if args.command == "check" and args.device == "cuda":
        return _check_cuda()
    if args.floor and (args.command == "check" or args.quick or args.plot):
        p.error("--floor goes with bench alone: python -m numbabn bench --floor [--floor-mb MB]")
    if args.floor and args.device == "cuda":
        p.error("--floor measures the CPU kernels; for the GPU: python -m numbabn check --device cuda")
    if args.dask and (args.command == "check" or args.floor or args.plot or args.device == "cuda"):
        p.error("--dask goes with bench alone: python -m numbabn bench --dask [--dask-mb MB]")
    if args.out_of_core and not args.dask:
        p.error("--out-of-core goes with --dask: python -m numbabn bench --dask --out-of-core")
    if args.dask:
        try:
            import dask.array  # noqa: F401
        except ImportError:
            p.error("--dask needs Dask, which numbabn does not require: pip install 'numbabn[dask]'")
    if args.plot and args.command == "check":
        p.error("--plot goes with bench: python -m numbabn bench --plot FILE.png")
    if args.plot:  # fail before minutes of timing, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib, which numbabn does not require: pip install 'numbabn[plot]'")
    if args.device == "cuda":
        from .contenders import cuda_unavailable

        why = cuda_unavailable()
        if why is not None:
            why = " ".join(why.split())  # driver errors come on several lines
            print(f"numbabn: bench --device cuda: no GPU column can run here: {why}", file=sys.stderr)
            return 2
    # With --json, stdout carries the JSON alone; everything for people goes to stderr.
    human = sys.stderr if args.json else sys.stdout
    with contextlib.redirect_stdout(human):
        results = _run(args)
    if results is None:
        return 1
    if args.json:
        from . import report

        report.to_json(results, sys.stdout)
    return 0


def _backend_names(device):
    """Names of the contenders of ``device`` ("cpu", "cuda"), or None for all."""
    from .contenders import BACKENDS

    if device is None:
        return None
    want = "gpu" if device == "cuda" else "cpu"
    return [n for n, b in BACKENDS.items() if b.device == want]


def _run(args):
    """The human-readable part of :func:`main`; returns the results, or None on a failed
    self-check."""
    import numba

    from . import check, report

    print(f"numbabn self-check (numba {numba.__version__}, {numba.get_num_threads()} threads)")
    print("  (a first run compiles the kernels it uses; numba's cache keeps them for later runs)", flush=True)
    t = time.perf_counter()
    if not check.self_check(out=lambda line: print(line, flush=True)):
        print("self-check FAILED")
        return None
    print(f"self-check passed in {time.perf_counter() - t:.1f} s (includes compiling on first use)")
    if args.floor:
        from . import floor

        print()
        budget = args.budget if args.budget is not None else 3.0
        # Peak memory is measured on 512 MB; smaller runs (tests) shrink it too.
        peak_mb = min(512, args.floor_mb)
        return {"floor": floor.run(mb=args.floor_mb, budget=budget, peak_mb=peak_mb), "self_check": True}
    if args.dask:
        from . import dask_bench

        print()
        if args.out_of_core:
            results = dask_bench.run_out_of_core(budget=min(args.budget if args.budget is not None else 1.0, 1.0))
            dask_bench.report_out_of_core(results)
            return {"dask_out_of_core": results, "self_check": True}
        results = dask_bench.run(mb=args.dask_mb, budget=args.budget if args.budget is not None else 2.0)
        dask_bench.report(results)
        return {"dask": results, "self_check": True}
    args.dtype = args.dtype or "float32"
    full = args.command == "bench" and not args.quick
    shapes = report.SHAPES if full else report.QUICK_SHAPES
    budget = args.budget if args.budget is not None else (0.6 if full else 0.15)
    names = _backend_names(args.device)
    print(f"\nnumbabn against the alternatives installed here (results checked first), {args.dtype}:")
    results = report.run(shapes, dtype=np.dtype(args.dtype), budget=budget, names=names, progress_file=sys.stderr)
    results["self_check"] = True
    if args.plot:
        sizes = report.SWEEP_MB if full else report.SWEEP_MB[:2]
        print(f"\nsweeping {', '.join(map(str, sizes))} MB for {args.plot} ...", flush=True)
        results["sweep"] = report.sweep(sizes, dtype=np.dtype(args.dtype), budget=budget / 2, names=names)
        report.plot(results["sweep"], args.plot)
        print(f"wrote {args.plot}")
    if full:
        print("\ncold start, import + first training forward, backward and eval (in a fresh process):")
        results["cold_start_seconds"] = cold_start()
        for k, v in results["cold_start_seconds"].items():
            print(f"  {k}: {v:.2f} s")
    return results


def _compile(args):
    """``python -m numbabn compile``: every kernel family's serial and parallel twins, in
    float32 and float64 (or ``--dtype`` alone when given)."""
    from .. import _compile as comp

    dtypes = (args.dtype,) if args.dtype else ("float32", "float64")
    bar = Progress(len(comp.signatures(dtypes)))
    t = time.perf_counter()
    comp.compile_all(dtypes, progress=bar)
    print(f"compiled in {time.perf_counter() - t:.1f} s; {comp.cache_note()}")
    return 0


class Progress:
    """A one-line progress bar on stdout: ``[####    ] 3/12 label (1.2 s)``."""

    def __init__(self, total, width=24):
        self.total, self.width = total, width

    def __call__(self, done, total, label, seconds):
        filled = self.width * done // total
        end = "\n" if done == total else ""
        bar = "#" * filled + " " * (self.width - filled)
        print(f"\r[{bar}] {done}/{total} {label} ({seconds:.1f} s)\033[K", end=end, flush=True)


def _check_cuda():
    from . import check

    try:
        ok = check.gpu_check()
    except RuntimeError as e:  # no numba-cuda, no driver or no device: say which
        print(f"numbabn: {e}", file=sys.stderr)
        return 2
    print("GPU check passed" if ok else "GPU check FAILED")
    return 0 if ok else 1
