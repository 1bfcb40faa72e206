"""The fused activation and residual add: ``y = act(bn(x) + residual)``, ``act`` the identity
or a ReLU.

A checked forward call carries the mode bits (``RELU``, ``RESIDUAL``) and the checked
residual; each backend's forward applies them in its normalize pass.  The backward needs no
kernel of its own: the ReLU's gradient is ``grad_output`` where the saved output is positive
(:func:`masked_grad`, one elementwise pass), which is also the residual's gradient; batch
normalization's backward then runs on it unchanged, whatever the variant (masked, ghost
batches, Batch Renormalization, SyncBatchNorm).
"""

from __future__ import annotations

import numpy as np

from . import _checks

#: ``mode`` bits, as the kernels take them (``numbabn.cpu.activation``).
RELU = 1
RESIDUAL = 2

ACTIVATIONS = (None, "relu")


def check(activation) -> bool:
    """``activation`` checked (None or ``"relu"``): whether there is a ReLU."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def mode(relu, residual):
    """The mode bits of a forward with a ReLU (``relu``) and a checked ``residual`` (or None)."""
    return (RELU if relu else 0) | (RESIDUAL if residual is not None else 0)


def check_backward(inp, activation, output, residual):
    """The backward's activation arguments checked against its checked input ``inp``:
    ``(relu, output, residual)``; ``output`` (the forward's, required with a ReLU) as the
    backend takes it, ``residual`` whether the caller takes the residual's gradient."""
    relu = check(activation)
    residual = _checks.check_flag(residual, "residual")
    if relu:
        if output is None:
            raise ValueError(
                "output (the forward's output) is required with activation='relu': the ReLU's gradient is "
                "grad_output where output > 0, got output=None"
            )
        output = inp.like_input(output, "output")
    elif output is not None:
        raise ValueError(
            "output is only read with activation='relu' (the ReLU's gradient), got an output with activation=None"
        )
    return relu, output, residual


def incoming(inp, grad_output, relu, output):
    """The gradient reaching batch normalization: ``grad_output`` checked, then with a ReLU
    (``relu``, the checked forward ``output``) a new array of the input's kind holding
    ``grad_output`` where ``output > 0`` and 0 elsewhere (a NaN output passes the gradient,
    as in PyTorch): the residual's gradient too."""
    g = inp.like_input(grad_output, "grad_output")
    return inp.backend.relu_grad(inp, g, output) if relu else g


def reuse_gradient(call, relu, residual):
    """Let a checked backward call whose ``grad_output`` is :func:`incoming`'s write
    ``grad_input`` over it when it is a temporary: a ReLU's masked gradient on the host, with
    no residual to hand it back to and no ``out``."""
    g = call.grad_output
    if relu and not residual and call.out is None and type(g) is np.ndarray:
        call.out = g
