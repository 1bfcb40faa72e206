"""What the benchmarks measure: the stages, one input (:class:`Case`) and the byte model.

Stages (what a contender's callable does, and what it returns for checking):

- ``copy``: a streaming copy of ``x`` into a preallocated array, the yardstick every ratio is
  taken against (returns nothing);
- ``stats``: per-channel mean and biased variance of ``x`` -> ``(mean, var)``;
- ``train``: training forward, running statistics updated -> ``y``;
- ``eval``: eval forward with the running statistics -> ``y``;
- ``backward``: training backward -> ``(grad_input, grad_weight, grad_bias)``;
- ``ema``: one running-statistic step, ``(1 - m) * running + m * batch``, on (C,) arrays ->
  the new value: O(C) work, so it times the call overhead a library adds to it;
- ``layer``: the layer's round trip, training forward then backward -> ``grad_input``.
"""

import math

import numpy as np

STAGES = ("copy", "stats", "train", "eval", "backward", "ema", "layer")

#: Bytes per element each stage must move to and from memory, in units of the itemsize,
#: when nothing stays in cache: ``copy`` reads ``x`` and writes ``y``; ``stats`` reads ``x``;
#: ``train`` reads ``x`` for the statistics, again to normalize, and writes ``y``; ``eval``
#: reads ``x`` and writes ``y``; ``backward`` reads ``g`` and ``x`` to reduce, again for
#: ``grad_input``, and writes it; ``layer`` is ``train`` plus ``backward``.  So a training
#: forward at memory speed takes 1.5x a copy of the same array, an eval forward 1x, a
#: backward 2.5x.  ``ema`` is O(C), see :func:`bytes_moved`.
BYTES_PER_ELEMENT = {"copy": 2, "stats": 1, "train": 3, "eval": 2, "backward": 5, "layer": 8}

MOMENTUM = 0.1
EPS = 1e-5


class Case:
    """One benchmark input: ``x``, ``g`` (a grad_output) and the per-channel arrays, as NumPy
    arrays, made from a fixed seed.

    Parameters
    ----------
    shape : tuple of int
    axis : int
        The feature axis (``-1`` for channels-last).
    dtype : numpy dtype
    layout : str, optional
        A label for tables ("NCHW", "NHWC", "NC").
    """

    def __init__(self, shape, axis=1, dtype=np.float32, layout=""):
        self.shape, self.axis, self.dtype, self.layout = tuple(shape), axis, np.dtype(dtype), layout
        self.ax = axis % len(shape)
        self.channels = shape[self.ax]
        self.reduce = tuple(i for i in range(len(shape)) if i != self.ax)
        rng = np.random.default_rng(0)
        # Per-channel offsets and scales, so channels differ and the mean is not zero.
        cs = [1] * len(shape)
        cs[self.ax] = -1
        mu = rng.uniform(-3.0, 3.0, self.channels).astype(self.dtype).reshape(cs)
        self.x = rng.standard_normal(shape, dtype=np.float32).astype(self.dtype)
        self.x *= 2  # in place: no temporaries to inflate peak-memory benchmarks
        self.x += mu
        self.g = rng.standard_normal(shape, dtype=np.float32).astype(self.dtype)
        c = self.channels
        self.weight = rng.uniform(0.5, 1.5, c).astype(self.dtype)
        self.bias = rng.normal(0.0, 0.5, c).astype(self.dtype)
        self.running_mean = rng.normal(0.0, 1.0, c).astype(self.dtype)
        self.running_var = rng.uniform(0.5, 2.0, c).astype(self.dtype)

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    def astype(self, dtype):
        """The same case (same values, rounded) in another dtype."""
        other = Case.__new__(Case)
        other.__dict__.update(self.__dict__)
        other.dtype = np.dtype(dtype)
        for k in ("x", "g", "weight", "bias", "running_mean", "running_var"):
            setattr(other, k, getattr(self, k).astype(dtype))
        return other

    def __repr__(self):
        return f"Case({self.shape}, axis={self.axis}, dtype={self.dtype.name})"


def bytes_moved(stage, case):
    """Bytes ``stage`` must move on ``case`` (the byte model of GB/s figures)."""
    if stage == "ema":  # read running and batch value, write running: 3 per channel
        return 3 * case.channels * case.dtype.itemsize
    return BYTES_PER_ELEMENT[stage] * case.nbytes


def shape_of_mb(per_row, mb, itemsize):
    """``(n, *per_row)`` with ``n >= 2`` rows, about ``mb`` MB of ``itemsize``-byte values."""
    return (max(2, round(mb * 1e6 / (itemsize * math.prod(per_row)))), *per_row)
