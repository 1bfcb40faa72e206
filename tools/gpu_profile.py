"""Where a numbabn GPU call's time goes: host overhead of numba-cuda primitives, whole calls,
a cProfile of the small training call, and each kernel alone timed with CUDA events.

    NUMBA_ENABLE_CUDASIM=0 python tools/gpu_profile.py
"""

import cProfile
import io
import pstats
import sys
import time

import numpy as np
from numba import cuda

import numbabn
from numbabn.bench.check import _median_ms
from numbabn.cuda import _arrays, _plan
from numbabn.cuda import forward as F
from numbabn.cuda import stats as S


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
    return _median_ms(cuda.event, cuda.synchronize, f, n)


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
    part, q = S.partials(x3, 0)
    copy_ms = event_ms(lambda: y.copy_to_device(x))
    rows = {
        "copy": copy_ms,
        "partials": event_ms(lambda: S.partials(x3, 0)),
        "channel_stats": event_ms(
            lambda: _arrays.launch(S.channel_stats, *_plan.per_channel_blocks(c), 0, part, q, stats)
        ),
        "normalize": event_ms(lambda: F.normalize(x3, coef, y3, 0)),
    }
    print(f"  {shape} plan {_plan.plan(*x3.shape)}")
    print("   " + "  ".join(f"{k} {v:.3f} ms ({v / copy_ms:.2f}x copy)" for k, v in rows.items()))


if __name__ == "__main__":
    for part in sys.argv[1:] or ["primitives", "calls", "profile_small", "kernels"]:
        globals()[part]()
