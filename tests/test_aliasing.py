"""Aliasing: the arrays of a call drawn as views of one buffer.

Every array of a call (input, ``out``, weight, bias, running statistics, saved statistics,
``grad_output``) is either an array of its own or a view of one shared buffer, made the ways
users make views: slices and reshapes, ``np.frombuffer``, ``as_strided`` (strided, or with a
zero stride), PyTorch's ``.numpy()``.  Each call must either raise the overlap error, leaving
the buffer and every array as they were, or return bitwise what the same call on disjoint
copies returns; and it raises exactly when an array it writes overlaps itself or another of
its arrays (``out`` may overlap the input and ``grad_output``: the backend copies around them).
"""

import itertools

import numpy as np
import pytest
import torch
from conftest import assert_bitwise
from hypothesis import event, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import as_strided

import numbabn

N, C, L = 4, 8, 8
SHAPE = (N, C, L)
BUFFER_BYTES = 4096  # the input is 1 or 2 KB: views of the buffer overlap often, not always
KINDS = ["own", "slice", "frombuffer", "as_strided", "torch"]
ALLOWED = {frozenset(("out", "input")), frozenset(("out", "grad_output"))}
OVERLAP = "must not share memory|must not overlap itself"


@st.composite
def placements(draw, names, per_channel, dtype):
    """``{name: (kind, byte offset, element step)}`` for the call's arrays: per-channel ones
    may be strided (``step`` elements apart; 0 only through ``as_strided``)."""
    out = {}
    for name in names:
        kind = draw(st.sampled_from(KINDS))
        step = 1
        itemsize = 8 if name.startswith("save_") else np.dtype(dtype).itemsize
        if name in per_channel:
            step = draw(st.sampled_from([0, 1, 2] if kind == "as_strided" else [1, 2]))
        span = SHAPE_OF(name, per_channel) * itemsize * max(step, 1)
        offset = 8 * draw(st.integers(0, (BUFFER_BYTES - span) // 8))
        out[name] = (kind, offset, step)
    return out


def SHAPE_OF(name, per_channel):  # noqa: N802 - used like a table
    return C if name in per_channel else N * C * L


def _view(buf, kind, offset, step, shape, dtype):
    """An array of ``shape`` and ``dtype`` at ``offset`` bytes into ``buf``, made as ``kind``
    says, ``step`` elements apart along a 1-d ``shape``."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    if kind == "own":
        return np.zeros(shape, dtype)
    if step == 2 and kind == "slice":
        return buf[offset : offset + 2 * count * dtype.itemsize].view(dtype)[::2]
    if step != 1:
        base = buf[offset:]
        base = base[: (len(base) // dtype.itemsize) * dtype.itemsize].view(dtype)
        return as_strided(base, shape, (step * dtype.itemsize,))
    if kind == "slice":
        return buf[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)
    if kind == "frombuffer":
        return np.frombuffer(buf.data, dtype, count, offset).reshape(shape)
    if kind == "as_strided":
        base = buf[offset : offset + count * dtype.itemsize].view(dtype)
        return as_strided(base, shape, np.empty(shape, dtype).strides)
    t = torch.from_numpy(buf)[offset : offset + count * dtype.itemsize]
    return t.view(torch.float32 if dtype == np.float32 else torch.float64).reshape(shape).numpy()


def _elements_overlap(a):
    """Whether two elements of ``a`` share memory, by listing every element's offset."""
    offsets = np.asarray(a.strides) @ np.indices(a.shape).reshape(a.ndim, -1)
    return np.unique(offsets).size < a.size


def _must_refuse(arrays, written):
    """The oracle: a written array overlaps itself, or shares memory (exactly) with another
    array of the call, other than the pairs the backend copies around."""
    for name in written:
        a = arrays.get(name)
        if a is None:
            continue
        if _elements_overlap(a):
            return True
        for other, b in arrays.items():
            if other != name and b is not None and frozenset((name, other)) not in ALLOWED:
                if np.shares_memory(a, b):
                    return True
    return False


class Case:
    """The drawn arrays of one call over a fresh buffer, with values that make sense where
    the views do not overlap (positive variances, weights near 1)."""

    def __init__(self, data, names, per_channel, dtype, seed, own=()):
        rng = np.random.default_rng(seed)
        self.buf = np.zeros(BUFFER_BYTES, np.uint8)
        where = data.draw(placements(names, per_channel, dtype))
        self.arrays = {}
        for name in names:
            kind, offset, step = ("own", 0, 1) if name in own else where[name]
            dt = np.float64 if name.startswith("save_") else dtype
            shape = (C,) if name in per_channel else SHAPE
            self.arrays[name] = _view(self.buf, kind, offset, step, shape, dt)
        for name, a in self.arrays.items():
            if name in ("running_var", "save_invstd"):
                values = rng.uniform(0.5, 1.5, a.shape)
            elif name == "weight":
                values = rng.uniform(0.5, 1.5, a.shape)
            else:
                values = rng.normal(0.3, 1.0, a.shape)
            if not _elements_overlap(a):
                a[...] = values
        self.before = self.snapshot()

    def snapshot(self):
        return self.buf.copy(), {k: a.copy() for k, a in self.arrays.items()}

    def copies(self):
        """The same values in disjoint arrays of their own."""
        return {k: np.array(a) for k, a in self.arrays.items()}

    def assert_unchanged(self):
        buf, arrays = self.before
        assert_bitwise(self.buf, buf)
        for k, a in arrays.items():
            assert_bitwise(self.arrays[k], a, err_msg=k)


def _check(case, run, written):
    """Run ``run(arrays)`` on the drawn arrays and on disjoint copies: the overlap error with
    nothing changed, exactly where the oracle refuses; else the same results, bitwise, in the
    returned arrays and in every written array."""
    expected = _copy_results(run, case.copies(), written)
    refuse = _must_refuse(case.arrays, written)
    event("refused" if refuse else "ran")
    if refuse:
        with pytest.raises(ValueError, match=OVERLAP):
            run(case.arrays)
        case.assert_unchanged()
        return
    got = run(case.arrays)
    results = [*got, *(case.arrays[k] for k in written if k in case.arrays)]
    for a, b in zip(results, expected, strict=True):
        assert_bitwise(a, b)


def _copy_results(run, arrays, written):
    got = run(arrays)
    return [*(np.copy(a) for a in got), *(arrays[k] for k in written if k in arrays)]


SETTINGS = settings(max_examples=150, deadline=None)
DTYPES = st.sampled_from([np.float32, np.float64])
FORWARD_NAMES = ["input", "out", "weight", "bias", "running_mean", "running_var"]
PER_CHANNEL = {"weight", "bias", "running_mean", "running_var", "save_mean", "save_invstd"}


@SETTINGS
@given(data=st.data(), dtype=DTYPES, training=st.booleans(), with_out=st.booleans(), seed=st.integers(0, 99))
def test_functional_forward(data, dtype, training, with_out, seed):
    names = [n for n in FORWARD_NAMES if with_out or n != "out"]
    case = Case(data, names, PER_CHANNEL, dtype, seed)

    def run(a):
        return numbabn.batch_norm_forward(
            a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
            training=training, momentum=0.3, out=a.get("out"),
        )  # fmt: skip

    written = ["out", "running_mean", "running_var"] if training else ["out"]
    _check(case, run, written)


@SETTINGS
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # sums of overlapping bytes
@given(data=st.data(), dtype=DTYPES, training=st.booleans(), with_out=st.booleans(), seed=st.integers(0, 99))
def test_functional_backward(data, dtype, training, with_out, seed):
    names = ["grad_output", "input", "weight", "save_mean", "save_invstd"] + (["out"] if with_out else [])
    case = Case(data, names, PER_CHANNEL, dtype, seed)

    def run(a):
        return numbabn.batch_norm_backward(
            a["grad_output"], a["input"], a["weight"], a["save_mean"], a["save_invstd"],
            training=training, out=a.get("out"),
        )  # fmt: skip

    _check(case, run, ["out"])


@SETTINGS
@given(data=st.data(), dtype=DTYPES, training=st.booleans(), seed=st.integers(0, 99))
def test_layer(data, dtype, training, seed):
    """``BatchNorm`` whose parameters and buffers were replaced by the drawn views: its
    forward (which writes the running statistics in training) and backward."""
    names = ["input", "grad_output", "weight", "bias", "running_mean", "running_var"]
    # grad_output of its own: the forward, which writes the running statistics, cannot see it.
    case = Case(data, names, PER_CHANNEL, dtype, seed, own={"grad_output"})

    def run(a):
        bn = numbabn.BatchNorm(C, dtype=dtype).train(training)
        for k in ("weight", "bias", "running_mean", "running_var"):
            setattr(bn, k, a[k])
        y = bn(a["input"])
        return y, bn.backward(a["grad_output"]), bn.grad_weight, bn.grad_bias

    # The layer's backward writes nothing in place: grad_output may overlap anything it reads.
    written = ["running_mean", "running_var"] if training else []
    _check(case, run, written)


@pytest.mark.parametrize(("kind_a", "kind_b"), list(itertools.combinations(KINDS[1:], 2)))
def test_running_statistics_over_one_memory_by_any_route(kind_a, kind_b, rng):
    """The probe's cases: the two running statistics made over the same memory by two routes
    (whose ``base`` objects differ) are refused, with nothing changed."""
    buf = np.zeros(BUFFER_BYTES, np.uint8)
    rm = _view(buf, kind_a, 64, 1, (C,), np.float32)
    rv = _view(buf, kind_b, 64, 1, (C,), np.float32)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    with pytest.raises(ValueError, match="running_mean and running_var must not share memory"):
        numbabn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert not buf.any()
