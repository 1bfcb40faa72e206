"""Run numbabn's asv benchmarks directly, without asv, on part of their grid.

For machines where asv is not installed (a lent GPU machine with no package index): every
generated class of ``asv_bench/benchmarks`` is set up (which checks its results against the
float64 oracle), timed once and, for ``track_`` methods, measured against the copy,
exactly as asv would call them.  Prints one line per grid point; exits 1 when any point
failed (a skip, asv's ``NotImplementedError``, is reported, not failed).

    python tools/asv_grid.py --backend cuda torch-cuda --size small medium --dtype float32 float64
"""

import argparse
import itertools
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "asv_bench"))

from benchmarks import PARAMS, batchnorm  # noqa: E402


def main(argv=None):
    layouts, sizes, dtypes, backends = PARAMS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", nargs="+", default=layouts, choices=layouts)
    parser.add_argument("--size", nargs="+", default=["small"], choices=sizes)
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=dtypes)
    parser.add_argument("--backend", nargs="+", default=["numbabn"], choices=backends)
    args = parser.parse_args(argv)
    classes = [getattr(batchnorm, n) for n in sorted(dir(batchnorm)) if isinstance(getattr(batchnorm, n), type)]
    classes = [c for c in classes if issubclass(c, batchnorm._Stage) and c is not batchnorm._Stage]
    failed = 0
    for cls, point in itertools.product(classes, itertools.product(args.layout, args.size, args.dtype, args.backend)):
        name = f"{cls.__name__}{list(point)}"
        bench = cls()
        t0 = time.perf_counter()
        try:
            bench.setup(*point)
        except NotImplementedError as e:
            print(f"skip {name}: {' '.join(str(e).split())}", flush=True)
            continue
        except Exception:  # noqa: BLE001 - report every failing point, then fail at the end
            failed += 1
            print(f"FAIL {name} setup:\n{traceback.format_exc()}", flush=True)
            continue
        results = []
        for method in sorted(m for m in dir(cls) if m.startswith(("time_", "track_", "peakmem_"))):
            try:
                t = time.perf_counter()
                value = getattr(bench, method)(*point)
                took = time.perf_counter() - t
                results.append(f"{method}={value}" if value is not None else f"{method} ran ({took * 1e3:.3f} ms)")
            except Exception:  # noqa: BLE001
                failed += 1
                print(f"FAIL {name}.{method}:\n{traceback.format_exc()}", flush=True)
        print(f"ok   {name} ({time.perf_counter() - t0:.1f} s): {', '.join(results)}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
