"""One checked description of each call, made once at the public boundary, and the one
place that picks the backend.

A backend is a module that satisfies :class:`numbabn._backend.Backend`
(``numbabn.cpu.api`` for NumPy arrays, ``numbabn.cuda.api`` for GPU arrays,
``numbabn._dask_backend`` for Dask arrays); the host and GPU backends also satisfy
:class:`numbabn._backend.PartBackend`, the stages SyncBatchNorm runs between its exchanges.
Each backend is loaded here, once (the GPU and Dask ones on first use), and bound to its
checked inputs: ``Input.backend`` is the module that runs their calls.

Backends receive checked calls only: they never validate arguments again.
"""

import sys

import numpy as np

from . import _activation, _checks, _mask
from ._backend import Backend
from ._device import is_device
from .cpu import api as _cpu_api
from .cpu import quick as _quick


def _bound(backend: Backend) -> Backend:
    """``backend``, a backend module, bound to its checked inputs: ``backend.Input.backend``
    is the module."""
    backend.Input.backend = backend
    return backend


_host = _bound(_cpu_api)


def backend_of(x):
    """The backend module for input ``x``: GPU arrays, Dask arrays, or the host (NumPy and
    anything ``numpy.asarray`` takes).  ``numba.cuda`` and Dask are imported only when an
    input of theirs is seen."""
    if type(x) is np.ndarray:
        return _host
    if is_device(x):
        return cuda_backend()
    if is_dask(x):
        return dask_backend()
    return _host


def is_dask(a):
    """True for a ``dask.array.Array`` (checked without importing Dask unless it is loaded)."""
    if "dask.array" not in sys.modules or a is None:
        return False
    return isinstance(a, sys.modules["dask.array"].Array)


_CUDA = []  # the GPU backend module, once cuda.require() has passed


def cuda_backend():
    """numbabn's GPU backend (imported and checked on first use), or a RuntimeError saying
    why not."""
    if _CUDA:
        return _CUDA[0]
    from . import cuda

    cuda.require()
    from .cuda import api

    _CUDA.append(_bound(api))
    return api


_DASK = []  # the Dask backend module, once loaded


def dask_backend():
    """numbabn's Dask backend (imported on first use: Dask is an optional dependency)."""
    if not _DASK:
        from . import _dask_backend

        _DASK.append(_bound(_dask_backend))
    return _DASK[0]


def check_input(x, axis, stream, name="input"):
    """The checked ``Input`` of ``x`` on its backend."""
    return backend_of(x).Input(x, axis, stream, name)


#: ``quick_forward(x, facts, weight, bias, running_mean, running_var, training, momentum,
#: eps, out=None)``: ``(output, save)`` of a forward call that asks for nothing past these
#: arguments, run at once when it is a common host call on the ndarray ``x`` of ``facts``
#: (:func:`known_input`, :func:`input_facts`); else None, and the caller takes the general
#: path (:func:`forward_call`), which checks every argument (:func:`numbabn.cpu.quick.forward`:
#: bound here, not wrapped, as small calls spend their time in Python).
quick_forward = _quick.forward

#: ``quick_backward(x, facts, grad_output, weight, save_mean, save_invstd, training,
#: out=None)``: the same for a backward call, ``(grad_input, grad_weight, grad_bias,
#: abs_grad_sum)`` or None, and the caller takes :func:`backward_call`
#: (:func:`numbabn.cpu.quick.backward`).
quick_backward = _quick.backward

#: ``known_input(x, axis)``: the facts of ``x`` where it is a host ndarray of a kind checked
#: before, for the quick calls; else None (:func:`numbabn.cpu.api.known`).
known_input = _cpu_api.known


def input_facts(inp):
    """The facts of the checked input ``inp`` for the quick calls (its ``x``): those of a host
    ndarray used as given, else None."""
    return inp.facts if inp.backend is _host else None


class ForwardCall:
    """A checked forward call: the ``Input`` and every other argument, checked."""

    __slots__ = (
        "inp",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "out",
        "saved",
        "limits",
        "m2",
        "extra",
        "mask",
        "kept",
        "act",
        "residual",
    )

    def __init__(self, inp, weight, bias, running_mean, running_var, training, momentum, eps, out, saved=True):
        self.inp = inp
        self.weight = weight
        self.bias = bias
        self.running_mean = running_mean
        self.running_var = running_var
        self.training = training
        self.momentum = momentum
        self.eps = eps
        self.out = out
        self.saved = saved  # whether the caller takes save_mean and save_invstd
        # Training extras: Batch Renormalization's (rmax, dmax) (numbabn.renorm), None for
        # batch norm, and whether the caller wants each channel's M2 (ghost batches merge
        # them).  The backend then leaves the rows of ``_math.save_rows`` past the mean and
        # invstd (M2, then r and d) in ``extra``, a host float64 array.
        self.limits = None
        self.m2 = False
        self.extra = None
        self.mask = None  # masked statistics in training (numbabn._mask), and its True count
        self.kept = None
        # The fused activation's mode bits (numbabn._activation: 0 for none) and the checked
        # residual (None for none).
        self.act = 0
        self.residual = None

    def run(self):
        """``(output, save_mean, save_invstd)`` from the input's backend (the last two None
        where the backend skips them for a call that is not ``saved``)."""
        return self.inp.backend.forward(self)


class BackwardCall:
    """A checked backward call."""

    __slots__ = (
        "inp",
        "grad_output",
        "weight",
        "save_mean",
        "save_invstd",
        "training",
        "out",
        "abs_sum",
        "mask",
        "kept",
    )

    def __init__(self, inp, grad_output, weight, save_mean, save_invstd, training, out, abs_sum=True):
        self.inp = inp
        self.grad_output = grad_output
        self.weight = weight
        self.save_mean = save_mean
        self.save_invstd = save_invstd
        self.training = training
        self.out = out
        self.abs_sum = abs_sum  # whether the caller takes abs_grad_sum
        self.mask = None  # the training forward's mask (numbabn._mask), and its True count
        self.kept = None

    def run(self):
        """``(grad_input, grad_weight, grad_bias, abs_grad_sum)`` from the input's backend
        (the last None where the backend skips it for a call without ``abs_sum``)."""
        return self.inp.backend.backward(self)


_OUT_INPUT = (frozenset(("out", "input")), frozenset(("out", "residual")))


def forward_call(
    inp,
    weight,
    bias,
    running_mean,
    running_var,
    training,
    momentum,
    eps,
    out,
    *,
    part=False,
    saved=True,
    mask=None,
    activation=None,
    residual=None,
):
    """Check a forward call's arguments against its checked input ``inp``; ``part``: ``inp``
    is one process's part of a global batch, whose count the caller checks once the parts'
    statistics are exchanged (SyncBatchNorm), not the part's own; ``saved``: whether the
    caller takes the saved mean and invstd; ``activation`` and ``residual``: the fused
    ``act(bn(x) + residual)`` (:mod:`numbabn._activation`)."""
    training = _checks.check_flag(training, "training")
    relu = _activation.check(activation)
    if residual is not None:
        if getattr(residual, "dtype", None) == np.bool_:
            raise TypeError(
                f"residual must have the input's dtype {inp.dtype}, got a bool array: a mask goes in as mask= "
                "(forward(x, residual=None, mask=None))"
            )
        residual = inp.like_input(residual, "residual")
    # (None passes every per-channel check: skipped here, as small calls spend their time in
    # Python.)
    if weight is not None:
        weight = inp.per_channel(weight, "weight")
    if bias is not None:
        bias = inp.per_channel(bias, "bias")
    if running_mean is not None:
        running_mean = inp.per_channel(running_mean, "running_mean", writable=training)
    if running_var is not None:
        running_var = inp.per_channel(running_var, "running_var", writable=training)
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"running_mean and running_var must be given together, got {missing}=None")
    # Checked in eval mode too, where it is unused, so a bad value never waits for training.
    momentum = _checks.check_momentum(momentum)
    kept = None
    if mask is not None:
        mask, kept = _mask.check(mask, inp, training)
    if training:
        if part:  # a part's count is checked once the parts' are merged
            pass
        elif kept is not None:
            _mask.check_kept(kept)
        else:
            _checks.check_training_count(inp.shape, inp.axis)
    elif running_mean is None:
        raise ValueError("running_mean and running_var are required in eval mode (training=False), got None")
    eps = _checks.check_eps(eps)
    if out is not None:
        out = inp.like_input(out, "out", writable=True)
    # Buffers written in place must not overlap the call's other arrays, except out and the
    # input, which the backend copies around (out may be the input: the elementwise pass runs
    # in place safely).
    written = (("out", out),) if out is not None else ()
    if training:
        written += (("running_mean", running_mean), ("running_var", running_var))
    if written:
        read = (("weight", weight), ("bias", bias), ("input", inp.original), ("residual", residual))
        if not training:
            read += (("running_mean", running_mean), ("running_var", running_var))
        _checks.check_disjoint(written, read, _OUT_INPUT)
    call = ForwardCall(inp, weight, bias, running_mean, running_var, training, momentum, eps, out, saved)
    if training and mask is not None:  # eval: the mask changes nothing
        call.mask, call.kept = mask, kept
    call.act = _activation.mode(relu, residual)
    call.residual = residual
    return call


def backward_call(inp, grad_output, weight, save_mean, save_invstd, training, out, *, abs_sum=True, mask=None):
    """Check a backward call's arguments against its checked input ``inp``; ``abs_sum``:
    whether the caller takes the per-channel ``sum |grad_output|``."""
    grad_output = inp.like_input(grad_output, "grad_output")
    training = _checks.check_flag(training, "training")
    weight = inp.per_channel(weight, "weight")
    save_mean = inp.per_channel(save_mean, "save_mean", save=True)
    save_invstd = inp.per_channel(save_invstd, "save_invstd", save=True)
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean and save_invstd are required (as returned by batch_norm_forward), got None")
    if out is not None:
        out = inp.like_input(out, "out", writable=True)
        # grad_output and the input may overlap out: the backend copies around them.
        _checks.check_disjoint(
            (("out", out),), (("weight", weight), ("save_mean", save_mean), ("save_invstd", save_invstd))
        )
    kept = None
    if mask is not None:
        mask, kept = _mask.check(mask, inp, training)
    call = BackwardCall(inp, grad_output, weight, save_mean, save_invstd, training, out, abs_sum)
    if training and mask is not None:
        call.mask, call.kept = mask, kept
    return call
