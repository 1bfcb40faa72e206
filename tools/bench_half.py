"""float16 data beside float32 on the CPU, and PyTorch CPU on float16, on the same shapes,
timed in interleaved rounds (:func:`numbabn.bench.timing.interleaved`): the training forward,
the eval forward and the backward of a float32 ``BatchNorm``.

    .venv/bin/python tools/bench_half.py [--budget SECONDS]

``f16/f32`` is the float16 call's median time over the float32 call's (the issue's limit:
at most 1, as float16 moves half the bytes); ``torch/f16`` is PyTorch's float16 time over
numbabn's.
"""

import argparse

import numba
import numpy as np

import numbabn
from numbabn.bench.timing import interleaved

CASES = [
    ("NCHW (64, 64, 56, 56)", (64, 64, 56, 56), 1),
    ("NCHW (256, 64, 16, 16)", (256, 64, 16, 16), 1),
    ("NHWC (64, 56, 56, 64)", (64, 56, 56, 64), -1),
    ("(N, C) (8192, 256)", (8192, 256), 1),
]


def torch_steps(x16, axis):
    """PyTorch's float16 training forward, eval forward and backward (float32 parameters),
    or None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(numba.get_num_threads())
    xt = torch.from_numpy(x16 if axis == 1 else np.moveaxis(x16, -1, 1))
    bn = torch.nn.BatchNorm2d(xt.shape[1]) if xt.ndim == 4 else torch.nn.BatchNorm1d(xt.shape[1])
    xg = xt.clone().requires_grad_(True)
    g = torch.randn_like(xt)

    def train():
        with torch.no_grad():
            return bn.train()(xt)

    def evaluate():
        with torch.no_grad():
            return bn.eval()(xt)

    def backward():
        xg.grad = None
        bn.train()(xg).backward(g)

    return {"train": train, "eval": evaluate, "backward": backward}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=3.0, help="seconds per table row and pass")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    print(
        "{:24} {:9} {:>9} {:>9} {:>9} {:>8} {:>9}".format(
            "case", "pass", "float32", "float16", "torch16", "f16/f32", "torch/f16"
        )
    )
    for name, shape, axis in CASES:
        x32 = rng.standard_normal(shape).astype(np.float32)
        x16 = x32.astype(np.float16)
        g32 = rng.standard_normal(shape).astype(np.float32)
        g16 = g32.astype(np.float16)
        layers = {k: numbabn.BatchNorm(shape[axis], axis=axis) for k in ("float32", "float16")}
        data = {"float32": (x32, g32), "float16": (x16, g16)}
        pt = torch_steps(x16, axis)
        for step in ("train", "eval", "backward"):
            fns = {}
            for k, bn in layers.items():
                x, g = data[k]
                if step == "train":
                    fns[k] = lambda bn=bn, x=x: bn.train()(x)
                elif step == "eval":
                    fns[k] = lambda bn=bn, x=x: bn.eval()(x)
                else:
                    bn.train()(x)
                    fns[k] = lambda bn=bn, g=g: bn.backward(g)
            if pt is not None:
                fns["torch16"] = pt[step]
            t = {k: v * 1e6 for k, v in interleaved(fns, budget=a.budget).items()}
            tt = t.get("torch16", float("nan"))
            print(
                f"{name:24} {step:9} {t['float32']:8.0f}u {t['float16']:8.0f}u {tt:8.0f}u "
                f"{t['float16'] / t['float32']:8.2f} {tt / t['float16']:9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
