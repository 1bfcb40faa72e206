"""What the error tests share: one call's arrays and their snapshot (:class:`State`), both
forward entry points (``FORWARD``) and :func:`raises`."""

import re

import numpy as np
import pytest
from conftest import assert_bitwise, make_input, make_params

import numbabn

C = 3


SHAPE = (4, C, 5)


class State:
    """Arrays for one call, and a snapshot to check that a failed call wrote nothing."""

    def __init__(self, rng, dtype=np.float32):
        self.x = make_input(rng, SHAPE, 1, dtype)
        self.weight, self.bias, self.running_mean, self.running_var = make_params(rng, C, dtype)
        self.out = np.full(SHAPE, 123.0, dtype)
        self.g = rng.standard_normal(SHAPE).astype(dtype)
        self._snap = {k: v.copy() for k, v in vars(self).items()}

    def kwargs(self, **override):
        kw = {
            "input": self.x,
            "weight": self.weight,
            "bias": self.bias,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
            "training": True,
            "momentum": 0.1,
            "eps": 1e-5,
            "axis": 1,
            "out": self.out,
        }
        kw.update(override)
        return kw

    def assert_unchanged(self):
        for name, before in self._snap.items():
            assert_bitwise(getattr(self, name), before, err_msg=name)


def _forward_calls():
    """Both forward entry points, taking the same keyword arguments."""

    def via_batch_norm(kw):
        kw = dict(kw)
        x, rm, rv = kw.pop("input"), kw.pop("running_mean"), kw.pop("running_var")
        return numbabn.batch_norm(x, rm, rv, **kw)

    def via_forward(kw):
        kw = dict(kw)
        x = kw.pop("input")
        w, b = kw.pop("weight"), kw.pop("bias")
        return numbabn.batch_norm_forward(x, w, b, **kw)

    return [pytest.param(via_batch_norm, id="batch_norm"), pytest.param(via_forward, id="batch_norm_forward")]


FORWARD = _forward_calls()


def raises(exc, *parts):
    """pytest.raises whose message contains every part, in order."""
    return pytest.raises(exc, match=".*".join(re.escape(str(p)) for p in parts))


def other_dtype(dtype):
    """The other float dtype of the two the input takes."""
    return np.float64 if dtype == np.float32 else np.float32
