"""Bad arguments of ``batch_norm_backward`` raise TypeError or ValueError naming the argument
and the value received, and nothing is written."""

import numpy as np
import pytest
from _bad_calls import SHAPE, C, State, other_dtype, raises
from conftest import assert_bitwise

import numbabn


def _bwd(s, **override):
    _, mean, invstd = numbabn.batch_norm_forward(s.x.copy(), s.weight)
    kw = {"grad_output": s.g, "input": s.x, "weight": s.weight, "save_mean": mean, "save_invstd": invstd}
    kw.update(override)
    return numbabn.batch_norm_backward(
        kw.pop("grad_output"), kw.pop("input"), kw.pop("weight"), kw.pop("save_mean"), kw.pop("save_invstd"), **kw
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_grad_output_mixed_dtype(dtype, rng):
    s = State(rng, dtype)
    other = other_dtype(dtype)
    with raises(TypeError, "grad_output", f"dtype {np.dtype(dtype)}", f"got {np.dtype(other)}"):
        _bwd(s, grad_output=s.g.astype(other))
    s.assert_unchanged()


@pytest.mark.parametrize("shape", [(4, C), (4, C, 6), SHAPE[::-1]], ids=str)
def test_backward_grad_output_wrong_shape(shape, rng):
    s = State(rng)
    with raises(ValueError, "grad_output", f"shape {SHAPE}", f"got {shape}"):
        _bwd(s, grad_output=np.ones(shape, np.float32))
    s.assert_unchanged()


@pytest.mark.parametrize("dtype", [np.int64, np.complex128])
def test_backward_input_dtype(dtype, rng):
    s = State(rng)
    with raises(TypeError, "input", f"got {np.dtype(dtype)}"):
        _bwd(s, input=np.ones(SHAPE, dtype))


def test_backward_input_ndim(rng):
    s = State(rng)
    with raises(ValueError, "input", "at least 2 dimensions", "got 1"):
        _bwd(s, input=np.ones(5, np.float32), grad_output=np.ones(5, np.float32))


@pytest.mark.parametrize("name", ["weight", "save_mean", "save_invstd"])
def test_backward_per_channel_wrong_length(name, rng):
    s = State(rng)
    with raises(ValueError, name, f"({C},)", f"got ({C + 2},)"):
        _bwd(s, **{name: np.ones(C + 2, np.float32)})
    s.assert_unchanged()


def test_backward_weight_mixed_dtype(rng):
    s = State(rng, np.float32)
    with raises(TypeError, "weight", "got float64"):
        _bwd(s, weight=s.weight.astype(np.float64))


@pytest.mark.parametrize("name", ["save_mean", "save_invstd"])
def test_backward_saved_stats_required(name, rng):
    s = State(rng)
    with raises(ValueError, "save_mean and save_invstd are required", "got None"):
        _bwd(s, **{name: None})


@pytest.mark.parametrize("axis", [3, -4])
def test_backward_axis_out_of_range(axis, rng):
    s = State(rng)
    with raises(ValueError, "axis", "[-3, 3)", f"got {axis}"):
        _bwd(s, axis=axis)


def test_backward_out_must_not_overlap_what_it_reads(rng):
    """The probe's case: ``out`` over the memory of the backward's ``weight`` is refused,
    as the forward refuses it; ``out`` over the input or ``grad_output`` is allowed."""
    s = State(rng)
    buf = np.zeros(s.x.size, s.x.dtype)
    weight = buf[:C]
    weight[:] = s.weight
    _, mean, invstd = numbabn.batch_norm_forward(s.x.copy(), s.weight)
    with raises(ValueError, "out and weight must not share memory", "out is written"):
        numbabn.batch_norm_backward(s.g, s.x, weight, mean, invstd, out=buf.reshape(SHAPE))
    assert_bitwise(weight, s.weight)
    for name in ("save_mean", "save_invstd"):
        saved = {"save_mean": mean.copy(), "save_invstd": invstd.copy()}
        out = np.zeros(SHAPE, np.float64).astype(s.x.dtype)
        saved[name] = out.reshape(-1)[:C].astype(np.float64)  # a copy: no overlap
        numbabn.batch_norm_backward(s.g, s.x, s.weight, out=out, **saved)
        f64 = np.zeros(s.x.size, np.float64)
        saved[name] = f64[:C]
        with raises(ValueError, f"out and {name} must not share memory"):
            numbabn.batch_norm_backward(s.g, s.x, s.weight, out=f64.view(s.x.dtype)[: s.x.size].reshape(SHAPE), **saved)
    s.assert_unchanged()


def test_dtype_names_in_messages(rng):
    s = State(rng)
    _, mean, invstd = numbabn.batch_norm_forward(s.x.copy(), s.weight)
    with raises(TypeError, "save_mean must have dtype float32 or float64", "got float16"):
        numbabn.batch_norm_backward(s.g, s.x, s.weight, mean.astype(np.float16), invstd)
