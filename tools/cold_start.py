"""The first call's cost, case by case: each case in a fresh process with an empty numba
cache (compile), then again with the cache it left (load).

    .venv/bin/python tools/cold_start.py              # every case
    .venv/bin/python tools/cold_start.py --events     # also the slowest compiles of each case

Cases: import plus a first ``BatchNorm`` training forward, backward and eval forward, NCHW,
NHWC and ``(N, C)``, float32 and float64; ``welford`` alone; a Dask worker's first task
(``numbabn._dask_backend.block_stats`` on one chunk: the serial statistics kernel, timed from
import numbabn on, as a worker already holds NumPy, Dask and the chunk); and the floor:
the same three first calls of the plainest numba batch norm (``tools/compile_floor.py``), its
statistics alone beside ``welford``, and numba by itself (a cached one-line function).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

STEP = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
kind, shape, axis, dtype = json.loads(sys.argv[1])
x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
if kind == "task":  # a worker has NumPy, Dask and its chunk before numbabn's first task
    import dask.array
    t0 = time.perf_counter()
from numba.core import event
rec = event.RecordingListener()
event.register("numba:compile", rec)
if kind.startswith("floor"):  # the textbook kernels of tools/compile_floor.py, without numbabn
    sys.path.insert(0, sys.argv[2])
    import compile_floor
    if kind == "floor-welford":  # the statistics alone
        compile_floor.welford(x, np.empty((3, x.shape[1])))
    elif kind == "floor-numba":  # numba by itself
        compile_floor.plus_one(1)
    else:
        compile_floor.first_calls(x)
else:
    import numbabn
if kind == "layer":
    bn = numbabn.BatchNorm(shape[axis], axis=axis, dtype=dtype)
    y = bn(x); bn.backward(y); bn.eval()(x)
elif kind == "welford":
    numbabn.welford(x, axis=axis)
elif kind == "task":  # a Dask worker's first task: the serial kernel on one chunk
    from numbabn import _dask_backend
    _dask_backend.block_stats(x, axis, ((0,) * x.ndim, x.shape, x.dtype))
total = time.perf_counter() - t0
starts, took = {}, []
for ts, e in rec.buffer:
    key = (e.data["dispatcher"].py_func.__qualname__, str(e.data.get("args")))
    if e.is_start:
        starts[key] = ts
    else:
        took.append((round(ts - starts[key], 2), key[0]))
print(json.dumps({"total": total, "compiles": sorted(took, reverse=True)[:6]}))
"""

CASES = [
    ("NCHW (32, 64, 16, 16)", "layer", [32, 64, 16, 16], 1),
    ("NHWC (32, 16, 16, 64)", "layer", [32, 16, 16, 64], -1),
    ("(N, C) (256, 512)", "layer", [256, 512], 1),
]


def run(case, cache):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", STEP, json.dumps(case), here], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", action="store_true", help="also print each case's slowest compiles")
    a = p.parse_args()
    dtypes = ("float32", "float64")
    cases = [(f"{name} {dt}", [kind, shape, axis, dt]) for dt in dtypes for name, kind, shape, axis in CASES]
    cases += [("welford (256, 512) float32", ["welford", [256, 512], 1, "float32"])]
    cases += [("Dask worker's first task, (64, 64, 32, 32) chunk", ["task", [64, 64, 32, 32], 1, "float32"])]
    cases += [("floor: tools/compile_floor.py, (256, 512) float32", ["floor", [256, 512], 1, "float32"])]
    cases += [("floor: its welford alone, (256, 512) float32", ["floor-welford", [256, 512], 1, "float32"])]
    cases += [("numba alone: a cached x + 1", ["floor-numba", [1], 0, "float32"])]
    print(f"{'case':52} {'cold s':>7} {'warm s':>7}")
    for name, case in cases:
        with tempfile.TemporaryDirectory() as cache:
            cold, warm = run(case, cache), run(case, cache)
        print(f"{name:52} {cold['total']:7.2f} {warm['total']:7.2f}", flush=True)
        if a.events:
            for seconds, fn in cold["compiles"]:
                print(f"    {seconds:6.2f} {fn}")


if __name__ == "__main__":
    main()
