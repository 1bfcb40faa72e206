"""Where a numbabn GPU call's time goes: host overhead of numba-cuda primitives, whole calls,
a cProfile of the small training call, each kernel alone timed with CUDA events, the host
time per call through numbabn's launch layer against numba's own launches (``launch``), and
the first call of a fresh process with the kernel cache warm (``cold``).

    NUMBA_ENABLE_CUDASIM=0 python tools/gpu_profile.py [primitives calls profile_small kernels launch cold]

Figures of ``launch`` and ``cold`` also go to ``$OUT/profile.json`` when ``OUT`` is set.
"""

import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time

_T0 = time.perf_counter()

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

import numbabn  # noqa: E402
from numbabn.bench.timing import median_ms  # noqa: E402
from numbabn.cuda import _arrays, _plan  # noqa: E402
from numbabn.cuda import forward as F  # noqa: E402
from numbabn.cuda import stats as S  # noqa: E402

_IMPORT_S = time.perf_counter() - _T0


def per_call_us(f, n=300):
    f()
    cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def event_ms(f, n=20):
    """Median CUDA-event milliseconds of ``f`` (the GPU check's own timer)."""
    return median_ms(cuda.event, cuda.synchronize, f, n)


@cuda.jit
def noop(a):
    pass


def primitives():
    d = cuda.device_array(16, np.float32)
    s = cuda.default_stream()
    big = cuda.device_array(1 << 20, np.float32)
    other = cuda.device_array(1 << 20, np.float32)
    rows = {
        "launch noop[1, 32]": lambda: noop[1, 32](d),
        "launch noop[1, 32, stream]": lambda: noop[1, 32, s](d),
        "cuda.device_array(16)": lambda: cuda.device_array(16, np.float32),
        "cuda.device_array(16, stream)": lambda: cuda.device_array(16, np.float32, stream=s),
        "_arrays.strided view": lambda: _arrays.strided(big, (1024, 1024), (4096, 4)),
        "d2d copy_to_device 4 MB": lambda: other.copy_to_device(big),
        "d2d copy_to_device 4 MB, stream": lambda: other.copy_to_device(big, stream=s),
        "cuda.default_stream()": cuda.default_stream,
        "numbabn.cuda.require()": __import__("numbabn.cuda", fromlist=["require"]).require,
    }
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError
        tt = torch.zeros(1 << 20, device="cuda")
        rows["cuda.as_cuda_array(torch)"] = lambda: cuda.as_cuda_array(tt, sync=False)
        rows["torch: y.copy_(x) 4 MB"] = lambda: tt.copy_(tt)
    except ImportError:
        pass
    print("host time per call, us (synchronized once after the loop)")
    for k, f in rows.items():
        print(f"  {k:<36}{per_call_us(f):9.1f}")


def calls():
    print("\nwhole calls, us per call (host loop, one sync at the end) and CUDA-event ms")
    for shape, axis in [((32, 64), 1), ((32, 256, 28, 28), 1), ((64, 56, 56, 64), -1), ((256, 64, 112, 112), 1)]:
        _calls_row(shape, axis)


def _calls_row(shape, axis):
    rng = np.random.default_rng(0)
    x = cuda.to_device(rng.standard_normal(shape, dtype=np.float32))
    g = cuda.to_device(rng.standard_normal(shape, dtype=np.float32))
    c = shape[axis]
    w, rm, rv = (cuda.to_device(np.full(c, v, np.float32)) for v in (1.0, 0.0, 1.0))
    y = cuda.device_array_like(x)
    _, m, s = numbabn.batch_norm_forward(x, w, None, axis=axis)
    fs = {
        "train": lambda: numbabn.batch_norm(x, rm, rv, w, None, True, axis=axis, out=y),
        "eval": lambda: numbabn.batch_norm(x, rm, rv, w, None, False, axis=axis, out=y),
        "backward": lambda: numbabn.batch_norm_backward(g, x, w, m, s, axis=axis, out=y),
        "copy": lambda: y.copy_to_device(x),
    }
    n = 50 if x.size > 1 << 24 else 300
    cells = [f"{k} {per_call_us(f, n):8.1f} us {event_ms(f):7.3f} ms" for k, f in fs.items()]
    print(f"  {str(shape):<20} " + " | ".join(cells))


def profile_small():
    x = cuda.to_device(np.random.default_rng(0).standard_normal((32, 64), dtype=np.float32))
    rm, rv = cuda.to_device(np.zeros(64, np.float32)), cuda.to_device(np.ones(64, np.float32))
    y = cuda.device_array_like(x)

    def f():
        numbabn.batch_norm(x, rm, rv, None, None, True, out=y)

    f()
    cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        f()
    cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
    print("\ncProfile, 200 training calls on (32, 64), by own time:")
    print("\n".join(s.getvalue().splitlines()[4:40]))


def kernels():
    print("\neach kernel alone, CUDA-event ms, (256, 64, 112, 112) float32 NCHW and (32, 56, 56, 256) NHWC")
    for shape, axis in [((256, 64, 112, 112), 1), ((32, 56, 56, 256), -1)]:
        _kernels_row(shape, axis)


def _kernels_row(shape, axis):
    x = cuda.to_device(np.random.default_rng(1).standard_normal(shape, dtype=np.float32))
    y = cuda.device_array_like(x)
    order = _arrays.dense_order(x)
    x3, y3 = _arrays.view3(x, axis % x.ndim, order), _arrays.view3(y, axis % x.ndim, order)
    c = x3.shape[1]
    stats = cuda.device_array((3, c), np.float64)
    coef = cuda.to_device(np.ones((2, c)))
    part, q = _arrays.one_call(S.partials)(x3, 0)  # work arrays belong to a driver call
    copy_ms = event_ms(lambda: y.copy_to_device(x))
    rows = {
        "copy": copy_ms,
        "partials": event_ms(lambda: _arrays.one_call(S.partials)(x3, 0)),
        "channel_stats": event_ms(
            lambda: _arrays.launch(S.channel_stats, *_plan.per_channel_blocks(c), 0, part, q, stats)
        ),
        "normalize": event_ms(lambda: F.normalize(x3, coef, y3, 0)),
    }
    print(f"  {shape} plan {_plan.plan(*x3.shape)}")
    print("   " + "  ".join(f"{k} {v:.3f} ms ({v / copy_ms:.2f}x copy)" for k, v in rows.items()))


#: The issue's targets for the whole call on (32, 64), host time in us, and the cold start in s.
TARGETS = {"train": 25.0, "eval": 15.0, "backward": 30.0, "cold_start_s": 1.0}


def _small_calls():
    """Host us per whole call on (32, 64) float32 (with ``out=``, running statistics), and a
    launch of one kernel through ``_arrays.launch``: this process's launch mode."""
    rng = np.random.default_rng(0)
    x = cuda.to_device(rng.standard_normal((32, 64), dtype=np.float32))
    g = cuda.to_device(rng.standard_normal((32, 64), dtype=np.float32))
    rm, rv = cuda.to_device(np.zeros(64, np.float32)), cuda.to_device(np.ones(64, np.float32))
    y = cuda.device_array_like(x)
    _, m, s = numbabn.batch_norm_forward(x)
    a, b = cuda.device_array(64), cuda.device_array(64, np.float32)
    fs = {
        "train": lambda: numbabn.batch_norm(x, rm, rv, None, None, True, out=y),
        "eval": lambda: numbabn.batch_norm(x, rm, rv, None, None, False, out=y),
        "backward": lambda: numbabn.batch_norm_backward(g, x, None, m, s, out=y),
        "one launch": lambda: _arrays.launch(S.copy_cast, 1, 128, 0, a, 2.0, b),
    }
    return {k: min(per_call_us(f, 500) for _ in range(3)) for k, f in fs.items()}


def _child(mode, part):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", NUMBABN_CUDA_LAUNCH=mode)
    run = subprocess.run(
        [sys.executable, __file__, part], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    if run.returncode != 0:
        raise RuntimeError(f"{part} ({mode}) failed:\n{run.stdout}\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _record(name, figures):
    out = os.environ.get("OUT")
    if not out:
        return
    path = os.path.join(out, "profile.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    data[name] = figures
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def launch():
    """Host us per call on (32, 64), numbabn's launch layer against numba's launches, each in
    a process of its own (the mode is read at import)."""
    fast, slow = _child("fast", "_small_calls_json"), _child("numba", "_small_calls_json")
    print("\nhost us per call on (32, 64) float32: launch layer | numba's launches | target")
    for k in fast:
        target = TARGETS.get(k)
        print(f"  {k:<12}{fast[k]:9.1f} | {slow[k]:9.1f} | " + (f"<= {target:.0f}" if target else "-"))
    targets = {k: TARGETS[k] for k in ("train", "eval", "backward")}
    _record("launch_us", {"fast": fast, "numba": slow, "targets": targets})


def cold():
    """Seconds from a fresh process's start to the end of its first training forward, eval
    and backward (synchronized), the kernel cache warmed by a process before it."""
    warm = _child("fast", "_first_calls_json")
    timed = _child("fast", "_first_calls_json")
    print(
        f"\nfirst GPU calls in a fresh process, cache warm: {timed['first_calls_s']:.2f} s "
        f"(import {timed['import_s']:.2f} s; target <= {TARGETS['cold_start_s']:.0f} s; "
        f"the warming process took {warm['first_calls_s']:.2f} s)"
    )
    _record("cold_start_s", {"warm_cache": timed, "warming_run": warm, "target": TARGETS["cold_start_s"]})


def _first_calls_json():
    x = cuda.to_device(np.random.default_rng(0).standard_normal((32, 64), dtype=np.float32))
    cuda.synchronize()
    t = time.perf_counter()
    y, m, s = numbabn.batch_norm_forward(x)
    numbabn.batch_norm_forward(x, None, None, m, s, training=False)
    numbabn.batch_norm_backward(x, x, None, m, s)
    cuda.synchronize()
    calls = time.perf_counter() - t
    print(json.dumps({"first_calls_s": calls, "import_s": _IMPORT_S}))


def _small_calls_json():
    print(json.dumps(_small_calls()))


if __name__ == "__main__":
    for part in sys.argv[1:] or ["primitives", "calls", "profile_small", "kernels"]:
        globals()[part]()
