"""``python -m numbabn``: a self-check against a float64 oracle plus a quick timing.

``python -m numbabn bench`` is the main job: the self-check, then numbabn side by side with
plain NumPy, PyTorch (CPU and CUDA, when installed and present) and a streaming copy, in time,
GB/s, ratio to the copy and speed-up; then the cold start.  ``--quick`` (three small shapes)
for CI, ``--json`` for machines, ``--plot FILE.png`` for a bandwidth-vs-size chart,
``--floor`` for the figures the benchmarks issue sets targets for (``numbabn._floor``).
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def self_check():
    """Compare every function with a float64 NumPy oracle on a few layouts; return True
    when all agree to the dtype's precision."""
    import numbabn

    rng = np.random.default_rng(0)
    f32, f64 = (np.float32, 2e-5), (np.float64, 1e-11)
    # Small arrays run the serial kernels; (300, 3, 500) the parallel ones, float32 only, as
    # compiling every kernel twice per dtype would double a first run's time.
    cases = [((16, 8), 1), ((8, 4, 100), 1), ((4, 6, 5, 5), 1), ((4, 5, 5, 6), -1)]
    cases = [(s, a, d) for s, a in cases for d in (f32, f64)] + [((300, 3, 500), 1, f32)]
    ok = True
    for shape, axis, (dtype, tol) in cases:
        x = rng.normal(3.0, 2.0, shape).astype(dtype)
        g = rng.normal(0.0, 1.0, shape).astype(dtype)
        ax = axis % x.ndim
        c = shape[ax]
        w = rng.normal(1.0, 0.1, c).astype(dtype)
        b = rng.normal(0.0, 0.1, c).astype(dtype)
        y, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis)
        gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis)
        red = tuple(i for i in range(x.ndim) if i != ax)
        bshape = [1] * x.ndim
        bshape[ax] = c
        x64, g64 = x.astype(np.float64), g.astype(np.float64)
        m = x64.mean(red, keepdims=True)
        inv = 1.0 / np.sqrt(((x64 - m) ** 2).mean(red, keepdims=True) + 1e-5)
        xhat = (x64 - m) * inv
        w64 = w.astype(np.float64).reshape(bshape)
        y_ref = xhat * w64 + b.astype(np.float64).reshape(bshape)
        n = x.size // c
        gb_ref = g64.sum(red)
        gw_ref = (g64 * xhat).sum(red)
        gi_ref = w64 * inv / n * (n * g64 - gb_ref.reshape(bshape) - xhat * gw_ref.reshape(bshape))
        errs = {
            "output": _rel(y, y_ref),
            "grad_input": _rel(gi, gi_ref),
            "grad_weight": _rel(gw, gw_ref),
            "grad_bias": _rel(gb, gb_ref),
        }
        bad = {k: v for k, v in errs.items() if not v <= tol}
        status = "ok" if not bad else "FAIL " + ", ".join(f"{k} {v:.1e}" for k, v in bad.items())
        print(f"  {str(shape):>16} axis={axis:>2} {np.dtype(dtype).name:>7}: {status}", flush=True)
        ok &= not bad
    return ok


def _rel(a, ref):
    return float(np.max(np.abs(a - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def cold_start():
    """Seconds for ``import numbabn`` plus a first training forward and backward, in a fresh
    process: with numba's on-disk cache empty (compile) and warm (load)."""
    code = (
        "import time; t = time.perf_counter(); import numpy as np, numbabn; "
        "x = np.random.default_rng(0).standard_normal((8, 4, 32), dtype=np.float32); "
        "y, m, s = numbabn.batch_norm_forward(x); numbabn.batch_norm_backward(y, x, None, m, s); "
        "print(time.perf_counter() - t)"
    )
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold (compile)", "warm (cached)"):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out[label] = float(res.stdout.strip())
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m numbabn", description="numbabn's self-check and benchmarks against NumPy and PyTorch."
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="check",
        choices=["check", "bench"],
        help="check (default): the self-check and a quick table; bench: the full side-by-side table",
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per shape (bench)")
    parser.add_argument("--quick", action="store_true", help="bench: three 2-4 MB shapes, short budgets (CI)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="bench: input dtype")
    parser.add_argument("--json", action="store_true", help="bench: print the results as JSON on stdout only")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="bench: also sweep sizes and chart GB/s vs size (needs matplotlib)"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="bench: how close the CPU kernels come to the bandwidth floor, against the benchmarks issue's targets",
    )
    parser.add_argument(
        "--floor-mb",
        type=float,
        default=1024,
        metavar="MB",
        help="bench --floor: array size beyond the cache (default 1024; 4 arrays of it are allocated)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="check: 'cuda' checks the GPU backend against the CPU kernels and times it (CUDA events)",
    )
    args = parser.parse_args(argv)
    if args.command == "check" and args.device == "cuda":
        return _check_cuda()
    if args.floor and (args.command == "check" or args.quick or args.plot):
        parser.error("--floor goes with bench alone: python -m numbabn bench --floor [--floor-mb MB]")
    if args.plot and args.command == "check":
        parser.error("--plot goes with bench: python -m numbabn bench --plot FILE.png")
    if args.plot:  # fail before minutes of timing, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which numbabn does not require: pip install 'numbabn[plot]'")
    # With --json, stdout carries the JSON alone; everything for people goes to stderr.
    human = sys.stderr if args.json else sys.stdout
    with contextlib.redirect_stdout(human):
        results = _run(args)
    if results is None:
        return 1
    if args.json:
        from numbabn import _bench

        _bench.to_json(results, sys.stdout)
    return 0


def _run(args):
    """The human-readable part of :func:`main`; returns the results, or None on a failed
    self-check."""
    import numba

    from numbabn import _bench

    print(f"numbabn self-check (numba {numba.__version__}, {numba.get_num_threads()} threads)")
    print("  (a first run compiles the kernels, up to a minute; numba's cache keeps them for later runs)", flush=True)
    t = time.perf_counter()
    if not self_check():
        print("self-check FAILED")
        return None
    print(f"self-check passed in {time.perf_counter() - t:.1f} s (includes compiling on first use)")
    if args.floor:
        from numbabn import _floor

        print()
        budget = args.budget if args.budget is not None else 3.0
        # The issue measures peak memory on 512 MB; smaller runs (tests) shrink it too.
        peak_mb = min(512, args.floor_mb)
        return {"floor": _floor.run(mb=args.floor_mb, budget=budget, peak_mb=peak_mb), "self_check": True}
    full = args.command == "bench" and not args.quick
    shapes = _bench.SHAPES if full else _bench.QUICK_SHAPES
    budget = args.budget if args.budget is not None else (0.6 if full else 0.15)
    print(f"\nnumbabn against the alternatives installed here (results checked first), {args.dtype}:")
    results = _bench.run(shapes, dtype=np.dtype(args.dtype), budget=budget, progress_file=sys.stderr)
    results["self_check"] = True
    if args.plot:
        sizes = _bench.SWEEP_MB if full else _bench.SWEEP_MB[:2]
        print(f"\nsweeping {', '.join(map(str, sizes))} MB for {args.plot} ...", flush=True)
        results["sweep"] = _bench.sweep(sizes, dtype=np.dtype(args.dtype), budget=budget / 2)
        _bench.plot(results["sweep"], args.plot)
        print(f"wrote {args.plot}")
    if full:
        print("\ncold start, import + first forward and backward:")
        results["cold_start_seconds"] = cold_start()
        for k, v in results["cold_start_seconds"].items():
            print(f"  {k}: {v:.2f} s")
    return results


def _check_cuda():
    from numbabn.cuda import check

    try:
        ok = check.run()
    except RuntimeError as e:  # no numba-cuda, no driver or no device: say which
        print(f"numbabn: {e}", file=sys.stderr)
        return 2
    print("GPU check passed" if ok else "GPU check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
