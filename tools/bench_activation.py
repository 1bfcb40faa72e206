"""The fused ReLU and residual add beside the plain training forward and what users write
instead, on the same arrays, timed in interleaved rounds (:func:`numbabn.bench.timing.interleaved`),
float32:

- ``bn``: ``BatchNorm`` alone; ``relu``: ``BatchNorm(activation="relu")``; ``add+relu``: the
  same with a residual;
- ``numpy``: ``np.maximum(bn(x) + z, 0)``; ``torch``: ``relu(batch_norm(x) + z)`` (PyTorch CPU,
  when installed, on as many threads as numba);
- the backward of ``bn`` and of ``add+relu``.

    .venv/bin/python tools/bench_activation.py [--budget SECONDS]

Ratios are medians over ``bn``'s, measured side by side in one run.  ``bytes`` is the byte
model's bound for ``add+relu``: the plain forward's DRAM traffic plus one read of the residual.
"""

import argparse

import numba
import numpy as np

import numbabn
from numbabn.bench.timing import interleaved

#: (name, shape, axis, DRAM passes of the plain training forward: 2 where a channel's slice
#: is revisited in L2, else 3).
CASES = [
    ("NCHW (64, 64, 56, 56)", (64, 64, 56, 56), 1, 2),
    ("NCHW (256, 64, 16, 16)", (256, 64, 16, 16), 1, 2),
    ("NHWC (64, 56, 56, 64)", (64, 56, 56, 64), -1, 3),
    ("(N, C) (8192, 256)", (8192, 256), 1, 3),
]


def torch_forward(shape, axis):
    """``relu(batch_norm(x) + z)`` in PyTorch on channels-first (or channels-last memory)
    tensors, or None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(numba.get_num_threads())
    xt = torch.randn(shape if axis == 1 else (shape[0], shape[-1], *shape[1:-1]))
    if axis != 1:
        xt = xt.contiguous(memory_format=torch.channels_last)
    zt = torch.randn_like(xt)
    rm, rv = torch.zeros(xt.shape[1]), torch.ones(xt.shape[1])

    def run():
        with torch.no_grad():
            return torch.relu(torch.nn.functional.batch_norm(xt, rm, rv, training=True) + zt)

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=3.0, help="seconds per table row and pass")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    head = ("case", "bn", "relu", "add+relu", "numpy", "torch", "relu/bn", "add/bn", "bytes", "np/add", "pt/add")
    print("{:24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7} {:>6} {:>7} {:>7}".format(*head))
    backward_rows = []
    for name, shape, axis, passes in CASES:
        c = shape[axis]
        x = rng.standard_normal(shape).astype(np.float32)
        z = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        plain, relu, fused = (numbabn.BatchNorm(c, axis=axis, activation=act) for act in (None, "relu", "relu"))
        npbn = numbabn.BatchNorm(c, axis=axis)
        # Each output is kept until the next call's exists, as a network keeps it for the next
        # layer (and the activated layers keep it for their backward): every contender then
        # writes fresh memory alike.
        kept = {}
        fns = {
            "bn": lambda plain=plain, x=x, kept=kept: kept.update(bn=plain(x)),
            "relu": lambda relu=relu, x=x, kept=kept: kept.update(relu=relu(x)),
            "add+relu": lambda fused=fused, x=x, z=z, kept=kept: kept.update(add=fused(x, z)),
            "numpy": lambda npbn=npbn, x=x, z=z, kept=kept: kept.update(numpy=np.maximum(npbn(x) + z, 0)),
        }
        pt = torch_forward(shape, axis)
        if pt is not None:
            fns["torch"] = lambda pt=pt, kept=kept: kept.update(torch=pt())
        t = {k: v * 1e6 for k, v in interleaved(fns, budget=a.budget).items()}
        bound = (passes + 1) / passes
        torch_t = t.get("torch", float("nan"))
        print(
            f"{name:24} {t['bn']:8.0f}u {t['relu']:8.0f}u {t['add+relu']:8.0f}u {t['numpy']:8.0f}u {torch_t:8.0f}u "
            f"{t['relu'] / t['bn']:8.2f} {t['add+relu'] / t['bn']:7.2f} {bound:6.2f} "
            f"{t['numpy'] / t['add+relu']:7.2f} {torch_t / t['add+relu']:7.2f}",
            flush=True,
        )
        bwd = {"bn": lambda plain=plain, g=g: plain.backward(g), "add+relu": lambda fused=fused, g=g: fused.backward(g)}
        tb = {k: v * 1e6 for k, v in interleaved(bwd, budget=a.budget).items()}
        backward_rows.append((name, tb["bn"], tb["add+relu"]))
    print("\n{:24} {:>9} {:>9} {:>8}".format("backward", "bn", "add+relu", "add/bn"))
    for name, b, f in backward_rows:
        print(f"{name:24} {b:8.0f}u {f:8.0f}u {f / b:8.2f}")


if __name__ == "__main__":
    main()
