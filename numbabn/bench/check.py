"""``python -m numbabn check``: numbabn against the float64 oracle (:mod:`.reference`).

:func:`self_check` runs the host functions on a few layouts in both dtypes, serial and
parallel kernels.  :func:`gpu_check` (``check --device cuda``) runs the GPU backend on real
shapes, then times it with CUDA events: each kernel's time over a device-to-device copy of
the same array measured in the same run (1.0 is the speed of a copy; a kernel at the memory
floor reads 1.5x, 1.0x and 2.5x a copy for training forward, eval forward and backward), and
PyTorch CUDA's (cuDNN's) time over ours when PyTorch with CUDA is installed.  Sized to finish
in well under 3 minutes on one GPU.
"""

import functools

import numpy as np

import numbabn

from . import reference
from .cases import EPS
from .timing import median_ms

#: The self-check's cases: (shape, axis), each in float32 and float64.
SELF_CHECK_CASES = [((16, 8), 1), ((8, 4, 100), 1), ((4, 6, 5, 5), 1), ((4, 5, 5, 6), -1)]

#: The self-check's float32-only cases: large enough for the parallel kernels (compiling every
#: kernel twice per dtype would double a first run's time).
SELF_CHECK_PARALLEL = [((300, 3, 500), 1)]

#: Relative error allowed per dtype (to ``max(1, max |expected|)``).
TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-11}

#: The GPU check's timing shapes: (label, shape, axis).
TIMING_SHAPES = [
    ("NCHW", (256, 64, 112, 112), 1),
    ("NCHW", (32, 256, 56, 56), 1),
    ("NHWC", (32, 56, 56, 256), -1),
    ("NC", (65536, 1024), 1),
]

#: The GPU check's correctness shapes: both kernel families, several splits per channel.
CHECK_SHAPES = [((32, 64, 28, 28), 1), ((16, 28, 28, 64), -1), ((4096, 256), 1), ((8, 3, 7, 7), 1)]


def errors(x, g, weight, bias, axis, run=None):
    """Relative errors of numbabn's training forward and backward on ``(x, g)`` against the
    oracle: ``{"output", "mean", "invstd", "grad_input", "grad_weight", "grad_bias": error}``.

    ``run(x, g, weight, bias)`` computes numbabn's ``(y, mean, invstd, grad_input,
    grad_weight, grad_bias)`` as NumPy arrays; by default the host functions.
    """
    run = run or _host_run(axis)
    got = run(x, g, weight, bias)
    y, mean, invstd, _, _ = reference.forward(x, weight, bias, None, None, True, 0.1, EPS, axis)
    want = (y, mean, invstd, *reference.backward(g, x, weight, mean, invstd, True, axis))
    names = ("output", "mean", "invstd", "grad_input", "grad_weight", "grad_bias")
    return {k: reference.relative_error(a, r) for k, a, r in zip(names, got, want, strict=True)}


def _host_run(axis):
    def run(x, g, weight, bias):
        y, mean, invstd = numbabn.batch_norm_forward(x, weight, bias, axis=axis)
        return (y, mean, invstd, *numbabn.batch_norm_backward(g, x, weight, mean, invstd, axis=axis))

    return run


def _verdict(errs, tol):
    bad = {k: v for k, v in errs.items() if not v <= tol}
    return not bad, "ok" if not bad else "FAIL " + ", ".join(f"{k} {v:.1e}" for k, v in bad.items())


def self_check(dtypes=("float32", "float64"), out=print):
    """Compare the host functions with the oracle on :data:`SELF_CHECK_CASES` in ``dtypes``
    (and :data:`SELF_CHECK_PARALLEL` in float32); print one line per case, return True when
    all agree to the dtype's precision (:data:`TOL`)."""
    rng = np.random.default_rng(0)
    cases = [(s, a, np.dtype(d)) for s, a in SELF_CHECK_CASES for d in dtypes]
    if "float32" in dtypes:
        cases += [(s, a, np.dtype(np.float32)) for s, a in SELF_CHECK_PARALLEL]
    ok = True
    for shape, axis, dtype in cases:
        x = rng.normal(3.0, 2.0, shape).astype(dtype)
        g = rng.normal(0.0, 1.0, shape).astype(dtype)
        c = shape[axis]
        w = rng.normal(1.0, 0.1, c).astype(dtype)
        b = rng.normal(0.0, 0.1, c).astype(dtype)
        good, verdict = _verdict(errors(x, g, w, b, axis), TOL[dtype])
        out(f"  {str(shape):>16} axis={axis:>2} {dtype.name:>7}: {verdict}")
        ok &= good
    return ok


def gpu_check(
    timing_shapes=TIMING_SHAPES, check_shapes=CHECK_SHAPES, dtypes=("float32", "float16"), reps=20, out=print
):
    """The GPU backend against the oracle on ``check_shapes`` (float32, float64, float16),
    then its timing table; returns True when every check passed.  Raises ``RuntimeError``
    saying why when the GPU backend cannot run here."""
    from numbabn.cuda import require

    cuda = require()
    ok = _check_gpu(cuda, check_shapes, out)
    out("")
    out("timing (median of CUDA-event times; ratio = time / device-to-device copy of the same array)")
    out(f"{'shape':<24}{'dtype':<9}{'train':>8}{'eval':>8}{'bwd':>8}{'copy ms':>9}   torch/numbabn: train eval bwd")
    for label, shape, axis in timing_shapes:
        for dtype in dtypes:
            out(_time_row(cuda, label, shape, axis, np.dtype(dtype), reps))
    return ok


def _check_gpu(cuda, shapes, out):
    rng = np.random.default_rng(0)
    ok = True
    for shape, axis in shapes:
        for dtype in (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)):
            x = rng.normal(3.0, 2.0, shape).astype(dtype)
            g = rng.normal(0.0, 1.0, shape).astype(dtype)
            pdt = np.float32 if dtype == np.float16 else dtype
            w = rng.normal(1.0, 0.1, shape[axis]).astype(pdt)

            def run(x, g, w, b, axis=axis):
                dx, dg, dw = (cuda.to_device(a) for a in (x, g, w))
                y, m, s = numbabn.batch_norm_forward(dx, dw, None, axis=axis)
                grads = numbabn.batch_norm_backward(dg, dx, dw, m, s, axis=axis)
                return tuple(a.copy_to_host() for a in (y, m, s, *grads))

            errs = errors(x, g, w, None, axis, run)
            good, verdict = _verdict(errs, TOL[dtype])
            ok &= good
            worst = max(errs.values())
            out(f"check {str(shape):<22} axis {axis:>2} {dtype.name:<8} worst rel. error {worst:.1e}  {verdict}")
    return ok


def _time_row(cuda, label, shape, axis, dtype, reps):
    c = shape[axis]
    pdt = np.float32 if dtype == np.float16 else dtype
    x = cuda.to_device(np.random.default_rng(1).normal(0.0, 1.0, shape).astype(dtype))
    g = cuda.to_device(np.random.default_rng(2).normal(0.0, 1.0, shape).astype(dtype))
    w, rm, rv = (cuda.to_device(np.full(c, v, pdt)) for v in (1.0, 0.0, 1.0))
    y, gi = cuda.device_array_like(x), cuda.device_array_like(x)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, None, axis=axis)
    timed = functools.partial(median_ms, cuda.event, cuda.synchronize, reps=reps)
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
        median_ms, lambda: torch.cuda.Event(enable_timing=True), torch.cuda.synchronize, reps=reps
    )
    with torch.no_grad():
        train = timed(lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, True))
        evalt = timed(lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, False))
    bwd = timed(lambda: torch.autograd.grad(y, (xg, w, b), gy, retain_graph=True))
    return {"train": train, "eval": evalt, "bwd": bwd}
