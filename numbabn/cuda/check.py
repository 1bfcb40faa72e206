"""``python -m numbabn check --device cuda``: the GPU backend against the CPU kernels on real
shapes, then a timing table with CUDA events.

Each kernel's time is quoted over a device-to-device copy of the same array measured in the
same run (so 1.0 is the speed of a copy), and PyTorch CUDA's (cuDNN's) time over ours when
PyTorch with CUDA is installed.  Sized to finish in well under 3 minutes on one GPU.
"""

import functools

import numpy as np

#: The issue's timing shapes: (label, shape, axis).
TIMING_SHAPES = [
    ("NCHW", (256, 64, 112, 112), 1),
    ("NCHW", (32, 256, 56, 56), 1),
    ("NHWC", (32, 56, 56, 256), -1),
    ("NC", (65536, 1024), 1),
]

#: Correctness shapes: both kernel families, several splits per channel.
CHECK_SHAPES = [((32, 64, 28, 28), 1), ((16, 28, 28, 64), -1), ((4096, 256), 1), ((8, 3, 7, 7), 1)]


def run(timing_shapes=TIMING_SHAPES, check_shapes=CHECK_SHAPES, dtypes=("float32", "float16"), reps=20, out=print):
    """Check, then time; returns True when every check passed."""
    from . import require

    cuda = require()
    ok = _check(cuda, check_shapes, out)
    out("")
    out("timing (median of CUDA-event times; ratio = time / device-to-device copy of the same array)")
    out(f"{'shape':<24}{'dtype':<9}{'train':>8}{'eval':>8}{'bwd':>8}{'copy ms':>9}   torch/numbabn: train eval bwd")
    for label, shape, axis in timing_shapes:
        for dtype in dtypes:
            out(_time_row(cuda, label, shape, axis, np.dtype(dtype), reps))
    return ok


def _check(cuda, shapes, out):
    import numbabn

    rng = np.random.default_rng(0)
    ok = True
    for shape, axis in shapes:
        for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12), (np.float16, 2e-3)):
            x = rng.normal(3.0, 2.0, shape).astype(dtype)
            g = rng.normal(0.0, 1.0, shape).astype(dtype)
            c = shape[axis]
            pdt = np.float32 if dtype == np.float16 else dtype
            w = rng.normal(1.0, 0.1, c).astype(pdt)
            x64, g64, w64 = x.astype(np.float64), g.astype(np.float64), w.astype(np.float64)
            y_ref, m_ref, s_ref = numbabn.batch_norm_forward(x64, w64, None, axis=axis)
            gi_ref, gw_ref, _ = numbabn.batch_norm_backward(g64, x64, w64, m_ref, s_ref, axis=axis)
            y, m, s = numbabn.batch_norm_forward(cuda.to_device(x), cuda.to_device(w), None, axis=axis)
            dg, dx, dw = (cuda.to_device(a) for a in (g, x, w))
            gi, gw, _ = numbabn.batch_norm_backward(dg, dx, dw, m, s, axis=axis)
            errors = {
                "y": _err(y.copy_to_host(), y_ref),
                "mean": _err(m.copy_to_host(), m_ref),
                "grad_input": _err(gi.copy_to_host(), gi_ref),
                "grad_weight": _err(gw.copy_to_host(), gw_ref),
            }
            bad = {k: v for k, v in errors.items() if not v <= tol}
            ok &= not bad
            verdict = "ok" if not bad else "FAIL " + ", ".join(f"{k} {v:.1e}" for k, v in bad.items())
            worst = max(errors.values())
            name = np.dtype(dtype).name
            out(f"check {str(shape):<22} axis {axis:>2} {name:<8} worst rel. error {worst:.1e}  {verdict}")
    return ok


def _err(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(actual - expected)) / scale)


def _median_ms(event, synchronize, fn, reps):
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


def _time_row(cuda, label, shape, axis, dtype, reps):
    import numbabn

    c = shape[axis]
    pdt = np.float32 if dtype == np.float16 else dtype
    x = cuda.to_device(np.random.default_rng(1).normal(0.0, 1.0, shape).astype(dtype))
    g = cuda.to_device(np.random.default_rng(2).normal(0.0, 1.0, shape).astype(dtype))
    w, rm, rv = (cuda.to_device(np.full(c, v, pdt)) for v in (1.0, 0.0, 1.0))
    y, gi = cuda.device_array_like(x), cuda.device_array_like(x)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, None, axis=axis)
    timed = functools.partial(_median_ms, cuda.event, cuda.synchronize, reps=reps)
    t = {
        "copy": timed(lambda: y.copy_to_device(x)),
        "train": timed(lambda: numbabn.batch_norm(x, rm, rv, w, None, True, axis=axis, out=y)),
        "eval": timed(lambda: numbabn.batch_norm(x, rm, rv, w, None, False, axis=axis, out=y)),
        "bwd": timed(lambda: numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis, out=gi)),
    }
    row = f"{label + ' ' + 'x'.join(map(str, shape)):<24}{dtype.name:<9}"
    row += "".join(f"{t[k] / t['copy']:>8.2f}" for k in ("train", "eval", "bwd")) + f"{t['copy']:>9.3f}"
    torch_t = _torch_times(shape, axis, dtype, reps)
    if torch_t:
        row += "   " + " ".join(f"{torch_t[k] / t[k]:.2f}" for k in ("train", "eval", "bwd"))
    else:
        row += "   (PyTorch with CUDA not installed)"
    return row


def _torch_times(shape, axis, dtype, reps):
    """PyTorch CUDA (cuDNN) train/eval/backward times in ms, or None without it."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    tdt = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}.get(dtype, torch.float64)
    if axis == 1 or len(shape) == 2:
        x = torch.randn(shape, device="cuda", dtype=tdt)
    else:  # channels-last: the same NHWC memory, seen by PyTorch as NCHW
        n, *spatial, c = shape
        x = torch.randn((n, c, *spatial), device="cuda", dtype=tdt).contiguous(memory_format=torch.channels_last)
    c = x.shape[1]
    w = torch.ones(c, device="cuda", requires_grad=True)
    b = torch.zeros(c, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    xg = x.detach().requires_grad_(True)
    y = torch.nn.functional.batch_norm(xg, rm, rv, w, b, True)
    gy = torch.randn_like(y)

    timed = functools.partial(
        _median_ms, lambda: torch.cuda.Event(enable_timing=True), torch.cuda.synchronize, reps=reps
    )
    with torch.no_grad():
        train = timed(lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, True))
        evalt = timed(lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, False))
    bwd = timed(lambda: torch.autograd.grad(y, (xg, w, b), gy, retain_graph=True))
    return {"train": train, "eval": evalt, "bwd": bwd}
