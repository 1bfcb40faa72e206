"""Bad arguments of the forward functions (``batch_norm``, ``batch_norm_forward``) raise
TypeError or ValueError naming the argument and the value received, and nothing is written:
running statistics and ``out`` stay bitwise unchanged."""

import numpy as np
import pytest
from _bad_calls import FORWARD, SHAPE, C, State, other_dtype, raises
from conftest import assert_bitwise, make_input

import numbabn


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("shape", [(5,), ()], ids=["1-d", "0-d"])
def test_input_needs_two_dims(call, shape, rng):
    s = State(rng)
    x = np.ones(shape, np.float32)
    with raises(ValueError, "input", "at least 2 dimensions", f"got {len(shape)}", f"shape {shape}"):
        call(s.kwargs(input=x, out=None, weight=None, bias=None, running_mean=None, running_var=None))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128, np.complex64])
def test_input_dtype_must_be_floating(call, dtype, rng):
    s = State(rng)
    x = np.ones(SHAPE, dtype)
    with raises(TypeError, "input", f"got {np.dtype(dtype)}"):
        call(s.kwargs(input=x))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("value", [None, 3.0, "abc"], ids=["None", "float", "str"])
def test_input_must_be_an_array(call, value, rng):
    s = State(rng)
    with raises(TypeError, "input", f"got {type(value).__name__}"):
        call(s.kwargs(input=value))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)], ids=str)
def test_training_needs_more_than_one_value_per_channel(call, shape, rng):
    s = State(rng)
    x = np.ones(shape, np.float32)
    with raises(ValueError, "more than 1 value per channel", f"input of shape {shape}"):
        call(s.kwargs(input=x, out=None))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_one_value_per_channel_is_fine_in_eval(call, rng):
    s = State(rng)
    x = make_input(rng, (1, C), 1, np.float32)
    y = call(s.kwargs(input=x, out=None, training=False))
    assert (y if isinstance(y, np.ndarray) else y[0]).shape == (1, C)


PER_CHANNEL = ["weight", "bias", "running_mean", "running_var"]


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("length", [C - 1, C + 1, 0])
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_wrong_length(call, name, length, rng):
    s = State(rng)
    bad = np.ones(length, np.float32)
    with raises(ValueError, name, f"({C},)", f"got ({length},)"):
        call(s.kwargs(**{name: bad}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_wrong_ndim(call, name, rng):
    s = State(rng)
    bad = np.ones((1, C), np.float32)
    with raises(ValueError, name, f"got {(1, C)}"):
        call(s.kwargs(**{name: bad}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64])
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_non_float(call, name, dtype, rng):
    s = State(rng)
    bad = np.ones(C, dtype)
    with raises(TypeError, name, f"got {np.dtype(dtype)}"):
        call(s.kwargs(**{name: bad}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_mixed_dtypes(call, name, dtype, rng):
    """A per-channel array of the other float dtype than the input: no silent casts."""
    s = State(rng, dtype)
    other = other_dtype(dtype)
    bad = np.ones(C, other)
    with raises(TypeError, name, f"dtype {np.dtype(dtype)}", f"got {np.dtype(other)}"):
        call(s.kwargs(**{name: bad}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_must_be_ndarray(call, name, rng):
    s = State(rng)
    with raises(TypeError, name, "got list"):
        call(s.kwargs(**{name: [1.0] * C}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stats_only_one_given(call, name, rng):
    s = State(rng)
    with raises(ValueError, "running_mean and running_var must be given together", f"{name}=None"):
        call(s.kwargs(**{name: None}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_read_only_running_stats_in_training(call, name, rng):
    s = State(rng)
    getattr(s, name).flags.writeable = False
    with raises(ValueError, name, "writable"):
        call(s.kwargs())
    getattr(s, name).flags.writeable = True
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_eval_without_running_stats(call, rng):
    s = State(rng)
    with raises(ValueError, "running_mean", "eval", "got None"):
        call(s.kwargs(training=False, running_mean=None, running_var=None))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), float("inf")])
def test_momentum_out_of_range(call, momentum, rng):
    s = State(rng)
    with raises(ValueError, "momentum", f"got {momentum}"):
        call(s.kwargs(momentum=momentum))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize(
    ("momentum", "shown"), [(None, "None"), ("0.1", "str"), (True, "bool"), (np.array([0.1]), "ndarray")]
)
def test_momentum_wrong_type(call, momentum, shown, rng):
    """The functional API has no cumulative average: ``momentum=None`` is BatchNorm's."""
    s = State(rng)
    with raises(TypeError, "momentum", f"got {shown}"):
        call(s.kwargs(momentum=momentum))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_eps_out_of_range(call, eps, rng):
    s = State(rng)
    with raises(ValueError, "eps", f"got {eps}"):
        call(s.kwargs(eps=eps))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize(("eps", "shown"), [(None, "NoneType"), ("1e-5", "str")])
def test_eps_wrong_type(call, eps, shown, rng):
    s = State(rng)
    with raises(TypeError, "eps", f"got {shown}"):
        call(s.kwargs(eps=eps))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("axis", [4, -5, 10])
def test_axis_out_of_range(call, axis, rng):
    s = State(rng)
    x = make_input(rng, (2, 3, 4, 5), 1, np.float32)
    with raises(ValueError, "axis", "[-4, 4)", f"got {axis}"):
        call(s.kwargs(input=x, out=None, weight=None, bias=None, running_mean=None, running_var=None, axis=axis))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize(("axis", "shown"), [(1.0, "float"), (None, "NoneType"), (True, "bool")])
def test_axis_wrong_type(call, axis, shown, rng):
    s = State(rng)
    with raises(TypeError, "axis", f"got {shown}"):
        call(s.kwargs(axis=axis))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("shape", [(4, C), (4, C, 6), (5, C, 4)], ids=str)
def test_out_wrong_shape(call, shape, rng):
    s = State(rng)
    out = np.full(shape, 7.0, np.float32)
    before = out.copy()
    with raises(ValueError, "out", f"shape {SHAPE}", f"got {shape}"):
        call(s.kwargs(out=out))
    assert_bitwise(out, before)
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_out_wrong_dtype(call, dtype, rng):
    s = State(rng)
    out = np.full(SHAPE, 7, dtype)
    before = out.copy()
    with raises(TypeError, "out", f"got {np.dtype(dtype)}"):
        call(s.kwargs(out=out))
    assert_bitwise(out, before)
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_out_not_an_array(call, rng):
    s = State(rng)
    with raises(TypeError, "out", "got list"):
        call(s.kwargs(out=s.x.tolist()))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_out_read_only(call, rng):
    s = State(rng)
    s.out.flags.writeable = False
    with raises(ValueError, "out", "writable"):
        call(s.kwargs())
    s.out.flags.writeable = True
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_in_place_call_with_bad_argument_leaves_input(call, rng):
    """``out=input`` and a bad argument: the input is not normalized halfway."""
    s = State(rng)
    with raises(ValueError, "momentum", "got 2.0"):
        call(s.kwargs(out=s.x, momentum=2.0))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize(
    ("override", "names"),
    [
        (lambda s: dict(running_var=s.running_mean), ("running_mean and running_var", "running_mean is written")),
        (lambda s: dict(running_mean=s.x[0, :, 0]), ("running_mean and input", "running_mean is written")),
        (lambda s: dict(weight=s.running_var), ("running_var and weight", "running_var is written")),
        (lambda s: dict(bias=s.out.reshape(-1)[:C]), ("out and bias", "out is written")),
        (lambda s: dict(running_mean=s.out[1, :, 1]), ("out and running_mean", "out is written")),
    ],
    ids=[
        "running stats one array",
        "running_mean in the input",
        "weight is running_var",
        "bias in out",
        "running_mean in out",
    ],
)
def test_buffers_written_in_place_must_not_overlap_other_arguments(call, override, names, rng):
    """A buffer written in place (running statistics in training, ``out``) that shares memory
    with another argument is refused before anything is written; ``out`` may be the input."""
    s = State(rng)
    pair, written = names
    with raises(ValueError, pair, "must not share memory", written, "got overlapping arrays"):
        call(s.kwargs(**override(s)))
    s.assert_unchanged()


def test_overlap_checks_allow_what_is_safe(rng):
    """Running statistics packed in one array, the same array for both in eval, and ``out``
    as the input itself are fine."""
    s = State(rng)
    packed = np.stack([s.running_mean, s.running_var])
    y = numbabn.batch_norm(s.x, packed[0], packed[1], s.weight, s.bias, training=True)
    y_ref = numbabn.batch_norm(s.x, s.running_mean.copy(), s.running_var.copy(), s.weight, s.bias, training=True)
    assert_bitwise(y, y_ref)
    both = s.running_var.copy()
    numbabn.batch_norm(s.x, both, both, training=False)
    x = s.x.copy()
    assert numbabn.batch_norm(x, s.running_mean.copy(), s.running_var.copy(), training=True, out=x) is x


@pytest.mark.parametrize("where", ["out", "running_mean", "running_var"])
def test_written_arrays_that_overlap_themselves_are_refused(where, rng):
    """A writable view whose elements share memory (a zero stride) would receive several
    results in one place."""
    from numpy.lib.stride_tricks import as_strided

    s = State(rng)
    one = np.zeros(1, s.x.dtype)
    shape = SHAPE if where == "out" else (C,)
    with raises(ValueError, f"{where} must not overlap itself", "got a view with shape", "strides"):
        numbabn.batch_norm(**s.kwargs(**{where: as_strided(one, shape, (0,) * len(shape))}))
    assert not one.any()
    s.assert_unchanged()


def test_input_that_requires_grad_names_the_fix(rng):
    import torch

    t = torch.zeros(SHAPE, requires_grad=True)
    with raises(TypeError, "input must be an array without autograd history", "requires grad", "input.detach()"):
        numbabn.batch_norm_forward(t)
