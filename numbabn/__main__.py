"""``python -m numbabn``: a self-check against a float64 oracle plus a quick timing.

``python -m numbabn bench`` prints the full ratio table (numbabn vs a streaming copy, a
triad and PyTorch CPU when installed) and the cold start.
"""

import argparse
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
    parser = argparse.ArgumentParser(prog="python -m numbabn", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="check", choices=["check", "bench"])
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of timing per shape (bench)")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="check: 'cuda' checks the GPU backend against the CPU kernels and times it (CUDA events)",
    )
    args = parser.parse_args(argv)
    if args.command == "check" and args.device == "cuda":
        return _check_cuda()
    import numba

    from numbabn import _bench

    print(f"numbabn self-check (numba {numba.__version__}, {numba.get_num_threads()} threads)")
    print("  (a first run compiles the kernels, up to a minute; numba's cache keeps them for later runs)", flush=True)
    t = time.perf_counter()
    if not self_check():
        print("self-check FAILED")
        return 1
    print(f"self-check passed in {time.perf_counter() - t:.1f} s (includes compiling on first use)")
    shapes = _bench.SHAPES if args.command == "bench" else _bench.SHAPES[:1] + _bench.SHAPES[-1:]
    print("\nratios (lower is better on the left, higher is better on the right), float32:")
    _bench.table(shapes, budget=args.budget if args.command == "bench" else 0.3)
    if args.command == "bench":
        print("\ncold start, import + first forward and backward:")
        for k, v in cold_start().items():
            print(f"  {k}: {v:.2f} s")
    return 0


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
