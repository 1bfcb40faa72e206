"""The contenders the benchmarks time side by side: a small registry of backends.

A backend is an entry of :data:`BACKENDS`: a name, the device it runs on, a check that says
whether it can run here, a ``prepare`` that puts one :class:`~numbabn.bench.cases.Case`'s
arrays where the backend wants them and returns a zero-argument callable per stage (the
stages of :mod:`numbabn.bench.cases`), a ``synchronize`` for devices that run asynchronously,
and a ``to_numpy`` that brings a result back for checking.  ``python -m numbabn bench``, the
asv suite (``asv_bench/``) and the pytest-benchmark suite (``tests/benchmarks/``) all time
these entries, so they never disagree on what "the NumPy version" or "PyTorch" means.

numbabn's entries call its public API only.  Outputs go to preallocated arrays (``out=``)
wherever a library offers it, so kernels are compared with kernels, not with the OS
zero-filling fresh pages.  :func:`check` compares every stage with the float64 oracle of
:mod:`numbabn.bench.reference` before anything is timed.
"""

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import reference
from .cases import EPS, MOMENTUM
from .yardsticks import copy_of

#: Relative tolerance (to the float64 result's scale) of each dtype in :func:`check`.
TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def _nothing():
    pass


@dataclass(frozen=True)
class Backend:
    """A registry entry; see the module docstring.

    Attributes
    ----------
    name : str
        As shown in tables and JSON ("numbabn", "numpy", "torch", "numbabn-cuda", ...).
    device : str
        ``"cpu"`` or ``"gpu"``: ratios and speed-ups compare backends of one device.
    ours : bool
        numbabn's own entry of its device, the one speed-ups are taken against.
    unavailable : callable () -> str or None
        Why the backend cannot run here, or None when it can.
    prepare : callable (Case) -> dict of stage -> callable ()
        Arrays are placed (and compiled code warmed) here, never in the timed callables.
        A stage the backend lacks is absent from the dict.
    synchronize : callable ()
        Waits for queued device work; timings call it before reading the clock.
    to_numpy : callable (array) -> numpy.ndarray
    """

    name: str
    device: str
    unavailable: Callable
    prepare: Callable
    ours: bool = False
    synchronize: Callable = _nothing
    to_numpy: Callable = np.asarray


#: Name -> Backend, in table order.  Entries for devices that are missing stay registered;
#: ``Backend.unavailable`` says why they are skipped.
BACKENDS = {}


def register(backend):
    """Add ``backend`` to :data:`BACKENDS` (replacing one of the same name); return it."""
    BACKENDS[backend.name] = backend
    return backend


def available(names=None):
    """The registered backends (or those of ``names``) that can run here, in order."""
    chosen = BACKENDS.values() if names is None else (BACKENDS[n] for n in names)
    return [b for b in chosen if b.unavailable() is None]


# -- numbabn ----------------------------------------------------------------------------------
def _prepare_numbabn(case, to_device=None, copy=None):
    """numbabn's stages on NumPy arrays, or (with ``to_device``) on device arrays, which its
    functions accept and return in kind.  It has no ``ema`` stage: numbabn's running-statistic
    update is fused into the training forward, with no public call of its own."""
    import numbabn

    on_device = to_device is not None
    put = to_device or (lambda a: a)
    c = case
    x, g, w, b = put(c.x), put(c.g), put(c.weight), put(c.bias)
    rm, rv = put(c.running_mean.copy()), put(c.running_var.copy())
    erm, erv = put(c.running_mean), put(c.running_var)  # eval's, never written
    y, gi = put(np.empty_like(c.x)), put(np.empty_like(c.x))
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=c.axis)
    bn = numbabn.BatchNorm(c.channels, axis=c.axis, dtype=c.dtype, device="cuda" if on_device else "cpu")
    bn.weight, bn.bias = put(c.weight.copy()), put(c.bias.copy())
    return {
        "copy": copy(x, y) if copy else copy_of(c.x, y),
        "stats": lambda: numbabn.welford(x, axis=c.axis),  # Stats(count, mean, m2): see check()
        "train": lambda: numbabn.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, axis=c.axis, out=y),
        "eval": lambda: numbabn.batch_norm(x, erm, erv, w, b, False, MOMENTUM, EPS, axis=c.axis, out=y),
        "backward": lambda: numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=c.axis, out=gi),
        "layer": lambda: (bn(x), bn.backward(g))[1],
    }


register(Backend("numbabn", "cpu", ours=True, unavailable=lambda: None, prepare=_prepare_numbabn))


# -- plain NumPy: what a user writes ----------------------------------------------------------
def numpy_stats(x, axis=1):
    """Per-channel mean and biased variance with ``np.mean`` and ``np.var``."""
    red = _reduce_axes(x.ndim, axis)
    return x.mean(axis=red), x.var(axis=red)


def numpy_forward(x, weight, bias, running_mean, running_var, training, momentum=MOMENTUM, eps=EPS, axis=1):
    """Batch-norm forward the way a NumPy user writes it: two passes (``np.mean``, then
    ``np.var``) over the reduce axes, then ``(x - mean) * invstd * weight + bias``.

    Updates ``running_mean`` and ``running_var`` in place in training mode (PyTorch's
    semantics: the unbiased variance feeds ``running_var``).

    Returns
    -------
    y, mean, invstd : ndarray
        ``y`` has ``x``'s shape; ``mean`` and ``invstd`` are per channel, in ``x``'s dtype.
    """
    cs = _channel_shape(x.ndim, axis)
    if training:
        mean, var = numpy_stats(x, axis)
        n = x.size // x.shape[axis]
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * var * (n / (n - 1))
    else:
        mean, var = running_mean, running_var
    invstd = 1 / np.sqrt(var + eps)
    y = (x - mean.reshape(cs)) * (invstd * weight).reshape(cs) + bias.reshape(cs)
    return y, mean, invstd


def numpy_backward(g, x, weight, mean, invstd, axis=1):
    """Training-mode backward, as a NumPy user writes it::

        grad_bias   = sum(g);  grad_weight = sum(g * xhat)
        grad_input  = weight * invstd / n * (n * g - grad_bias - xhat * grad_weight)

    Returns ``(grad_input, grad_weight, grad_bias)``.
    """
    red = _reduce_axes(x.ndim, axis)
    cs = _channel_shape(x.ndim, axis)
    n = x.size // x.shape[axis]
    xhat = (x - mean.reshape(cs)) * invstd.reshape(cs)
    grad_bias = g.sum(axis=red)
    grad_weight = (g * xhat).sum(axis=red)
    scale = (weight * invstd / n).reshape(cs)
    grad_input = scale * (n * g - grad_bias.reshape(cs) - xhat * grad_weight.reshape(cs))
    return grad_input, grad_weight, grad_bias


def numpy_ema(running, value, momentum=MOMENTUM):
    """One EMA step, ``(1 - momentum) * running + momentum * value``."""
    return (1 - momentum) * running + momentum * value


def _reduce_axes(ndim, axis):
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def _channel_shape(ndim, axis):
    cs = [1] * ndim
    cs[axis % ndim] = -1
    return tuple(cs)


def _prepare_numpy(case):
    c = case
    x, g, w, b = c.x, c.g, c.weight, c.bias
    rm, rv = c.running_mean.copy(), c.running_var.copy()
    y = np.empty_like(x)
    _, mean, invstd = numpy_forward(x, w, b, rm.copy(), rv.copy(), True, axis=c.axis)

    def layer():
        _, m, s = numpy_forward(x, w, b, rm, rv, True, axis=c.axis)
        return numpy_backward(g, x, w, m, s, axis=c.axis)[0]

    return {
        "copy": lambda: np.copyto(y, x),
        "stats": lambda: numpy_stats(x, c.axis),
        "train": lambda: numpy_forward(x, w, b, rm, rv, True, axis=c.axis)[0],
        "eval": lambda: numpy_forward(x, w, b, c.running_mean, c.running_var, False, axis=c.axis)[0],
        "backward": lambda: numpy_backward(g, x, w, mean, invstd, axis=c.axis),
        "ema": lambda: numpy_ema(c.running_mean, mean),
        "layer": layer,
    }


register(Backend("numpy", "cpu", unavailable=lambda: None, prepare=_prepare_numpy))


# -- PyTorch ------------------------------------------------------------------------------------
def _torch():
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def _torch_unavailable(device):
    torch = _torch()
    if torch is None:
        return "PyTorch is not installed"
    if device == "cuda" and not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return None


def _torch_perm(case):
    """The permutation putting the features on axis 1, as PyTorch wants them (a feature axis
    of at least 1), and its inverse.  A channels-last array so becomes PyTorch's own
    channels-last memory format: a permuted view of the same bytes."""
    others = (i for i in range(1, len(case.shape)) if i != case.ax)
    perm = (0, case.ax, *others)
    return perm, tuple(int(i) for i in np.argsort(perm))


def _prepare_torch(case, device="cpu"):
    torch = _torch()
    aten = torch.ops.aten
    c = case
    perm, inverse = _torch_perm(c)

    def put(a):  # a copy: the train stage updates its running statistics in place
        return torch.from_numpy(np.array(a)).to(device)

    tx, tg = put(c.x).permute(perm), put(c.g).permute(perm)
    tw, tb = put(c.weight), put(c.bias)
    trm, trv, erm, erv = put(c.running_mean), put(c.running_var), put(c.running_mean), put(c.running_var)
    ty, tgi = torch.empty_like(tx), torch.empty_like(tx)  # keep tx's memory format
    tsm, tsi, tgw, tgb = (torch.empty(c.channels, dtype=tx.dtype, device=device) for _ in range(4))
    _, tmean, tinv = aten.native_batch_norm(tx, tw, tb, trm.clone(), trv.clone(), True, MOMENTUM, EPS)
    red = tuple(i for i in range(tx.ndim) if i != 1)
    lx = tx.detach().clone().requires_grad_(True)
    lw, lb = tw.clone().requires_grad_(True), tb.clone().requires_grad_(True)
    lrm, lrv = trm.clone(), trv.clone()

    def back(t):
        return t.permute(inverse)

    def layer():  # what a PyTorch user runs: autograd through the functional batch norm
        lx.grad = lw.grad = lb.grad = None
        out = torch.nn.functional.batch_norm(lx, lrm, lrv, lw, lb, True, MOMENTUM, EPS)
        out.backward(tg)
        return back(lx.grad)

    def stats():
        var, mean = torch.var_mean(tx, dim=red, correction=0)
        return mean, var

    return {
        "copy": lambda: ty.copy_(tx),
        "stats": stats,
        "train": lambda: back(
            aten.native_batch_norm.out(
                tx, tw, tb, trm, trv, True, MOMENTUM, EPS, out=ty, save_mean=tsm, save_invstd=tsi
            )[0]
        ),
        "eval": lambda: back(
            aten.native_batch_norm.out(
                tx, tw, tb, erm, erv, False, MOMENTUM, EPS, out=ty, save_mean=tsm, save_invstd=tsi
            )[0]
        ),
        "backward": lambda: (
            back(
                aten.native_batch_norm_backward.out(
                    tg, tx, tw, trm, trv, tmean, tinv, True, EPS, [True, True, True], out0=tgi, out1=tgw, out2=tgb
                )[0]
            ),
            tgw,
            tgb,
        ),
        "ema": lambda: torch.lerp(erm, tmean.to(erm.dtype), MOMENTUM),
        "layer": layer,
    }


def _torch_to_numpy(t):
    return t.detach().cpu().numpy()


def _torch_cuda_sync():
    _torch().cuda.synchronize()


register(
    Backend(
        "torch",
        "cpu",
        unavailable=lambda: _torch_unavailable("cpu"),
        prepare=_prepare_torch,
        to_numpy=_torch_to_numpy,
    )
)


# -- GPU: numbabn's CUDA backend and PyTorch on CUDA ----------------------------------------------
# Written against the CUDA backend's contract (numbabn's functions take numba device arrays,
# anything with __cuda_array_interface__, and return the same kind); skipped cleanly where
# numbabn.cuda cannot be imported or numba sees no GPU.
def cuda_unavailable():
    """Why numbabn's CUDA backend cannot run here, or None when it can.

    The CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) counts as unavailable: it runs kernels on
    the CPU, one block at a time, so its timings mean nothing (the tests still run the
    ``numbabn-cuda`` stages there, for correctness)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "the CUDA simulator is on (NUMBA_ENABLE_CUDASIM): nothing to time"
    try:
        backend = importlib.import_module("numbabn.cuda")
    except ImportError as e:
        return f"numbabn.cuda cannot be imported ({e})"
    try:
        backend.require()  # numba-cuda, a driver and a device, or why not
    except RuntimeError as e:
        return str(e)
    return None


def _prepare_numbabn_cuda(case):
    from numba import cuda

    def copy(x, y):
        return lambda: y.copy_to_device(x)

    return _prepare_numbabn(case, to_device=cuda.to_device, copy=copy)


def _cuda_to_numpy(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _numba_cuda_sync():
    from numba import cuda

    cuda.synchronize()


register(
    Backend(
        "numbabn-cuda",
        "gpu",
        ours=True,
        unavailable=cuda_unavailable,
        prepare=_prepare_numbabn_cuda,
        synchronize=_numba_cuda_sync,
        to_numpy=_cuda_to_numpy,
    )
)
register(
    Backend(
        "torch-cuda",
        "gpu",
        unavailable=lambda: _torch_unavailable("cuda"),
        prepare=lambda case: _prepare_torch(case, "cuda"),
        synchronize=_torch_cuda_sync,
        to_numpy=_torch_to_numpy,
    )
)


# -- checking -----------------------------------------------------------------------------------
def expected(case):
    """The float64 oracle's result of every stage on ``case`` (what :func:`check` compares
    with), in the shapes the stages return."""
    c = case
    _, mean, var = reference.stats(c.x, c.axis)
    train = reference.forward(c.x, c.weight, c.bias, c.running_mean, c.running_var, True, MOMENTUM, EPS, c.axis)
    evald = reference.forward(c.x, c.weight, c.bias, c.running_mean, c.running_var, False, MOMENTUM, EPS, c.axis)
    grads = reference.backward(c.g, c.x, c.weight, train[1], train[2], True, c.axis)
    return {
        "stats": (mean, var),
        "train": train[0],
        "eval": evald[0],
        "backward": grads,
        "ema": reference.ema(c.running_mean, mean, MOMENTUM),
        "layer": grads[0],
    }


def check(backend, stages, case, ref=None):
    """Run each stage once and compare it with the float64 oracle (:func:`expected`); raise
    ``AssertionError`` naming the backend, stage and error on a mismatch."""
    ref = expected(case) if ref is None else ref
    for stage, fn in stages.items():
        if stage != "copy":
            got = fn()
            backend.synchronize()
            check_result(backend, stage, got, case, ref)


def check_result(backend, stage, got, case, ref=None):
    """Compare what ``backend``'s ``stage`` returned on ``case`` with the float64 oracle, to
    :data:`TOL` of the case's dtype; raise ``AssertionError`` naming the backend, stage and
    error on a mismatch.

    ``stats`` results may be numbabn's ``Stats(count, mean, m2)``, compared as
    ``(mean, m2 / count)``.
    """
    ref = expected(case) if ref is None else ref
    tol = TOL[case.dtype]
    if hasattr(got, "m2"):
        got = (got.mean, backend.to_numpy(got.m2) / got.count)
    got = got if isinstance(got, tuple) else (got,)
    want = ref[stage] if isinstance(ref[stage], tuple) else (ref[stage],)
    for i, (a, r) in enumerate(zip(got, want, strict=True)):
        err = reference.relative_error(backend.to_numpy(a), r)
        if not err <= tol:
            raise AssertionError(f"{backend.name} {stage} (output {i}) on {case}: relative error {err:.2e} > {tol:.0e}")
