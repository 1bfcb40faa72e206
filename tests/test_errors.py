"""Bad arguments raise TypeError or ValueError naming the argument and the value received,
and nothing is written: running statistics, ``out``, the layer's buffers and counter stay
bitwise unchanged."""

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


def _raises(exc, *parts):
    """pytest.raises whose message contains every part, in order."""
    return pytest.raises(exc, match=".*".join(re.escape(str(p)) for p in parts))


def _other(dtype):
    return np.float64 if dtype == np.float32 else np.float32


# -- input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("shape", [(5,), ()], ids=["1-d", "0-d"])
def test_input_needs_two_dims(call, shape, rng):
    s = State(rng)
    x = np.ones(shape, np.float32)
    with _raises(ValueError, "input", "at least 2 dimensions", f"got {len(shape)}", f"shape {shape}"):
        call(s.kwargs(input=x, out=None, weight=None, bias=None, running_mean=None, running_var=None))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128, np.complex64, np.float16])
def test_input_dtype_must_be_float32_or_float64(call, dtype, rng):
    s = State(rng)
    x = np.ones(SHAPE, dtype)
    with _raises(TypeError, "input", f"got {np.dtype(dtype)}"):
        call(s.kwargs(input=x))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("value", [None, 3.0, "abc"], ids=["None", "float", "str"])
def test_input_must_be_an_array(call, value, rng):
    s = State(rng)
    with _raises(TypeError, "input", f"got {type(value).__name__}"):
        call(s.kwargs(input=value))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)], ids=str)
def test_training_needs_more_than_one_value_per_channel(call, shape, rng):
    s = State(rng)
    x = np.ones(shape, np.float32)
    with _raises(ValueError, "more than 1 value per channel", f"input of shape {shape}"):
        call(s.kwargs(input=x, out=None))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_one_value_per_channel_is_fine_in_eval(call, rng):
    s = State(rng)
    x = make_input(rng, (1, C), 1, np.float32)
    y = call(s.kwargs(input=x, out=None, training=False))
    assert (y if isinstance(y, np.ndarray) else y[0]).shape == (1, C)


# -- per-channel arrays ------------------------------------------------------------------------
PER_CHANNEL = ["weight", "bias", "running_mean", "running_var"]


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("length", [C - 1, C + 1, 0])
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_wrong_length(call, name, length, rng):
    s = State(rng)
    bad = np.ones(length, np.float32)
    with _raises(ValueError, name, f"({C},)", f"got ({length},)"):
        call(s.kwargs(**{name: bad}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_wrong_ndim(call, name, rng):
    s = State(rng)
    bad = np.ones((1, C), np.float32)
    with _raises(ValueError, name, f"got {(1, C)}"):
        call(s.kwargs(**{name: bad}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64])
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_non_float(call, name, dtype, rng):
    s = State(rng)
    bad = np.ones(C, dtype)
    with _raises(TypeError, name, f"got {np.dtype(dtype)}"):
        call(s.kwargs(**{name: bad}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_mixed_dtypes(call, name, dtype, rng):
    """A per-channel array of the other float dtype than the input: no silent casts."""
    s = State(rng, dtype)
    other = _other(dtype)
    bad = np.ones(C, other)
    with _raises(TypeError, name, f"dtype {np.dtype(dtype)}", f"got {np.dtype(other)}"):
        call(s.kwargs(**{name: bad}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_must_be_ndarray(call, name, rng):
    s = State(rng)
    with _raises(TypeError, name, "got list"):
        call(s.kwargs(**{name: [1.0] * C}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stats_only_one_given(call, name, rng):
    s = State(rng)
    with _raises(ValueError, "running_mean and running_var must be given together", f"{name}=None"):
        call(s.kwargs(**{name: None}))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_read_only_running_stats_in_training(call, name, rng):
    s = State(rng)
    getattr(s, name).flags.writeable = False
    with _raises(ValueError, name, "writable"):
        call(s.kwargs())
    getattr(s, name).flags.writeable = True
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_eval_without_running_stats(call, rng):
    s = State(rng)
    with _raises(ValueError, "running_mean", "eval", "got None"):
        call(s.kwargs(training=False, running_mean=None, running_var=None))
    s.assert_unchanged()


# -- scalars --------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), float("inf")])
def test_momentum_out_of_range(call, momentum, rng):
    s = State(rng)
    with _raises(ValueError, "momentum", f"got {momentum}"):
        call(s.kwargs(momentum=momentum))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize(
    ("momentum", "shown"), [(None, "None"), ("0.1", "str"), (True, "bool"), (np.array([0.1]), "ndarray")]
)
def test_momentum_wrong_type(call, momentum, shown, rng):
    """The functional API has no cumulative average: ``momentum=None`` is BatchNorm's."""
    s = State(rng)
    with _raises(TypeError, "momentum", f"got {shown}"):
        call(s.kwargs(momentum=momentum))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_eps_out_of_range(call, eps, rng):
    s = State(rng)
    with _raises(ValueError, "eps", f"got {eps}"):
        call(s.kwargs(eps=eps))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize(("eps", "shown"), [(None, "NoneType"), ("1e-5", "str")])
def test_eps_wrong_type(call, eps, shown, rng):
    s = State(rng)
    with _raises(TypeError, "eps", f"got {shown}"):
        call(s.kwargs(eps=eps))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("axis", [4, -5, 10])
def test_axis_out_of_range(call, axis, rng):
    s = State(rng)
    x = make_input(rng, (2, 3, 4, 5), 1, np.float32)
    with _raises(ValueError, "axis", "[-4, 4)", f"got {axis}"):
        call(s.kwargs(input=x, out=None, weight=None, bias=None, running_mean=None, running_var=None, axis=axis))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize(("axis", "shown"), [(1.0, "float"), (None, "NoneType"), (True, "bool")])
def test_axis_wrong_type(call, axis, shown, rng):
    s = State(rng)
    with _raises(TypeError, "axis", f"got {shown}"):
        call(s.kwargs(axis=axis))
    s.assert_unchanged()


# -- out --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("shape", [(4, C), (4, C, 6), (5, C, 4)], ids=str)
def test_out_wrong_shape(call, shape, rng):
    s = State(rng)
    out = np.full(shape, 7.0, np.float32)
    before = out.copy()
    with _raises(ValueError, "out", f"shape {SHAPE}", f"got {shape}"):
        call(s.kwargs(out=out))
    assert_bitwise(out, before)
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_out_wrong_dtype(call, dtype, rng):
    s = State(rng)
    out = np.full(SHAPE, 7, dtype)
    before = out.copy()
    with _raises(TypeError, "out", f"got {np.dtype(dtype)}"):
        call(s.kwargs(out=out))
    assert_bitwise(out, before)
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_out_not_an_array(call, rng):
    s = State(rng)
    with _raises(TypeError, "out", "got list"):
        call(s.kwargs(out=s.x.tolist()))
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_out_read_only(call, rng):
    s = State(rng)
    s.out.flags.writeable = False
    with _raises(ValueError, "out", "writable"):
        call(s.kwargs())
    s.out.flags.writeable = True
    s.assert_unchanged()


@pytest.mark.parametrize("call", FORWARD)
def test_in_place_call_with_bad_argument_leaves_input(call, rng):
    """``out=input`` and a bad argument: the input is not normalized halfway."""
    s = State(rng)
    with _raises(ValueError, "momentum", "got 2.0"):
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
    with _raises(ValueError, pair, "must not share memory", written, "got overlapping arrays"):
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


# -- backward ----------------------------------------------------------------------------------------
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
    other = _other(dtype)
    with _raises(TypeError, "grad_output", f"dtype {np.dtype(dtype)}", f"got {np.dtype(other)}"):
        _bwd(s, grad_output=s.g.astype(other))
    s.assert_unchanged()


@pytest.mark.parametrize("shape", [(4, C), (4, C, 6), SHAPE[::-1]], ids=str)
def test_backward_grad_output_wrong_shape(shape, rng):
    s = State(rng)
    with _raises(ValueError, "grad_output", f"shape {SHAPE}", f"got {shape}"):
        _bwd(s, grad_output=np.ones(shape, np.float32))
    s.assert_unchanged()


@pytest.mark.parametrize("dtype", [np.int64, np.complex128])
def test_backward_input_dtype(dtype, rng):
    s = State(rng)
    with _raises(TypeError, "input", f"got {np.dtype(dtype)}"):
        _bwd(s, input=np.ones(SHAPE, dtype))


def test_backward_input_ndim(rng):
    s = State(rng)
    with _raises(ValueError, "input", "at least 2 dimensions", "got 1"):
        _bwd(s, input=np.ones(5, np.float32), grad_output=np.ones(5, np.float32))


@pytest.mark.parametrize("name", ["weight", "save_mean", "save_invstd"])
def test_backward_per_channel_wrong_length(name, rng):
    s = State(rng)
    with _raises(ValueError, name, f"({C},)", f"got ({C + 2},)"):
        _bwd(s, **{name: np.ones(C + 2, np.float32)})
    s.assert_unchanged()


def test_backward_weight_mixed_dtype(rng):
    s = State(rng, np.float32)
    with _raises(TypeError, "weight", "got float64"):
        _bwd(s, weight=s.weight.astype(np.float64))


@pytest.mark.parametrize("name", ["save_mean", "save_invstd"])
def test_backward_saved_stats_required(name, rng):
    s = State(rng)
    with _raises(ValueError, "save_mean and save_invstd are required", "got None"):
        _bwd(s, **{name: None})


@pytest.mark.parametrize("axis", [3, -4])
def test_backward_axis_out_of_range(axis, rng):
    s = State(rng)
    with _raises(ValueError, "axis", "[-3, 3)", f"got {axis}"):
        _bwd(s, axis=axis)


# -- welford --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x", "exc", "parts"),
    [
        (np.ones(5), ValueError, ("x", "at least 2 dimensions", "got 1")),
        (np.ones((3, 4), np.int64), TypeError, ("x", "got int64")),
        (np.ones((3, 4), np.complex128), TypeError, ("x", "got complex128")),
        (None, TypeError, ("x", "got NoneType")),
    ],
    ids=["1-d", "int", "complex", "None"],
)
def test_welford_bad_input(x, exc, parts):
    with _raises(exc, *parts):
        numbabn.welford(x)


@pytest.mark.parametrize("axis", [2, -3])
def test_welford_axis_out_of_range(axis):
    with _raises(ValueError, "axis", "[-2, 2)", f"got {axis}"):
        numbabn.welford(np.ones((3, 4)), axis=axis)


# -- BatchNorm ----------------------------------------------------------------------------------------
def _layer(rng, dtype=np.float32, steps=2, **kw):
    bn = numbabn.BatchNorm(C, dtype=dtype, **kw)
    if bn.affine:
        w, b, _, _ = make_params(rng, C, dtype)
        bn.weight[...], bn.bias[...] = w, b
    for _ in range(steps):
        bn(make_input(rng, SHAPE, 1, dtype))
    return bn


def _snapshot(bn):
    return {
        k: (None if getattr(bn, k) is None else np.array(getattr(bn, k)))
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }


def _assert_layer_unchanged(bn, snap):
    for k, before in snap.items():
        now = getattr(bn, k)
        if before is None:
            assert now is None, k
        else:
            assert_bitwise(np.array(now), before, err_msg=k)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_wrong_float_dtype(dtype, momentum, rng):
    bn = _layer(rng, dtype, momentum=momentum)
    snap = _snapshot(bn)
    other = _other(dtype)
    with _raises(TypeError, "input", f"dtype {np.dtype(dtype)}", f"got {np.dtype(other)}"):
        bn(make_input(rng, SHAPE, 1, other))
    _assert_layer_unchanged(bn, snap)
    assert bn.num_batches_tracked == 2


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64])
def test_layer_non_float_input(dtype, rng):
    bn = _layer(rng)
    snap = _snapshot(bn)
    with _raises(TypeError, "input", f"got {np.dtype(dtype)}"):
        bn(np.ones(SHAPE, dtype))
    _assert_layer_unchanged(bn, snap)


def test_layer_wrong_channel_count(rng):
    """The input is the bad argument (the layer has C features): the message names the input
    and gives both channel counts, the input's (received) and the layer's (expected)."""
    bn = _layer(rng)
    snap = _snapshot(bn)
    x = make_input(rng, (4, C + 1, 5), 1, np.float32)
    with pytest.raises(ValueError, match=rf"(?s)^(?=.*\binput\b)(?=.*\b{C + 1}\b)(?=.*\b{C}\b)"):
        bn(x)
    _assert_layer_unchanged(bn, snap)


def test_layer_one_value_per_channel_in_training(rng):
    bn = _layer(rng, momentum=None)
    snap = _snapshot(bn)
    with _raises(ValueError, "more than 1 value per channel", f"shape {(1, C)}"):
        bn(np.ones((1, C), np.float32))
    _assert_layer_unchanged(bn, snap)
    bn.eval()
    assert bn(np.ones((1, C), np.float32)).shape == (1, C)
    _assert_layer_unchanged(bn, snap)


def test_layer_backward_before_forward():
    bn = numbabn.BatchNorm(C)
    with pytest.raises(RuntimeError, match="forward"):
        bn.backward(np.ones(SHAPE, np.float32))
    assert bn.grad_weight is None and bn.grad_bias is None


def test_layer_backward_wrong_shape(rng):
    bn = _layer(rng)
    with _raises(ValueError, "grad_output", f"got {(4, C)}"):
        bn.backward(np.ones((4, C), np.float32))


@pytest.mark.parametrize(
    ("kwargs", "exc", "parts"),
    [
        ({"num_features": 0}, ValueError, ("num_features", "got 0")),
        ({"num_features": -2}, ValueError, ("num_features", "got -2")),
        ({"num_features": 2.0}, TypeError, ("num_features", "got float 2.0")),
        ({"num_features": True}, TypeError, ("num_features", "got bool True")),
        ({"num_features": 3, "dtype": np.int32}, TypeError, ("dtype", "got int32")),
        ({"num_features": 3, "dtype": np.float16}, TypeError, ("dtype", "got float16")),
        ({"num_features": 3, "momentum": 1.5}, ValueError, ("momentum", "got 1.5")),
        ({"num_features": 3, "momentum": -0.1}, ValueError, ("momentum", "got -0.1")),
        ({"num_features": 3, "eps": -1.0}, ValueError, ("eps", "got -1.0")),
        ({"num_features": 3, "axis": 1.5}, TypeError, ("axis", "got float")),
        ({"num_features": 3, "dtype": None}, TypeError, ("dtype", "got None")),
        ({"num_features": 3, "affine": "no"}, TypeError, ("affine", "must be a bool", "got str 'no'")),
        ({"num_features": 3, "track_running_stats": 2}, TypeError, ("track_running_stats", "got int 2")),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v),
)
def test_layer_constructor_errors(kwargs, exc, parts):
    with _raises(exc, *parts):
        numbabn.BatchNorm(**kwargs)


@pytest.mark.parametrize("mode", ["eval", None, 0.0, 2], ids=repr)
def test_layer_train_mode_must_be_a_bool(mode, rng):
    bn = _layer(rng)
    with _raises(TypeError, "mode must be a bool", f"{mode!r}"):
        bn.train(mode)
    assert bn.training is True


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    ("count", "exc", "shown"),
    [
        (None, TypeError, "NoneType None"),
        ("3", TypeError, "str '3'"),
        (2.5, TypeError, "float 2.5"),
        (True, TypeError, "bool True"),
        (-1, ValueError, "got -1"),
    ],
    ids=repr,
)
def test_layer_bad_num_batches_tracked_stops_the_call_before_any_write(count, exc, shown, momentum, rng):
    """An assigned ``num_batches_tracked`` that is not an int >= 0 raises before the running
    statistics move (the count is worked out first; with ``momentum=None`` it sets the
    momentum)."""
    bn = _layer(rng, momentum=momentum)
    bn.num_batches_tracked = count
    snap = _snapshot(bn)
    with _raises(exc, "num_batches_tracked must be an int >= 0", shown):
        bn(make_input(rng, SHAPE, 1, np.float32))
    _assert_layer_unchanged(bn, snap)
    bn.num_batches_tracked = np.int64(2)  # numpy integers count
    bn(make_input(rng, SHAPE, 1, np.float32))
    assert bn.num_batches_tracked == 3 and type(bn.num_batches_tracked) is int


def test_layer_training_attribute_must_be_a_bool(rng):
    bn = _layer(rng)
    bn.training = ""
    snap = _snapshot(bn)
    with _raises(TypeError, "training must be a bool", "got str ''"):
        bn(make_input(rng, SHAPE, 1, np.float32))
    _assert_layer_unchanged(bn, snap)


# -- load_state_dict -------------------------------------------------------------------------------
def _state(bn):
    return {k: np.array(v) for k, v in bn.state_dict().items()}


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(C + 1,), (1, C), ()], ids=str)
def test_load_state_dict_wrong_shape(name, shape, rng):
    """A bad value, wherever it is in the dict, leaves every parameter and buffer as it was."""
    bn = _layer(rng)
    snap = _snapshot(bn)
    state = {k: v + 1 for k, v in _state(bn).items()}
    state[name] = np.ones(shape, np.float32)
    with _raises(ValueError, name, f"({C},)", f"got {shape}"):
        bn.load_state_dict(state)
    _assert_layer_unchanged(bn, snap)


@pytest.mark.parametrize("dtype", [np.complex128, np.str_, object])
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_load_state_dict_non_real(name, strict, dtype, rng):
    """Values PyTorch's ``copy_`` would not cast to a float parameter are refused (bool, int
    and float values are cast, as there: see test_inputs.py)."""
    bn = _layer(rng)
    snap = _snapshot(bn)
    state = {k: v + 1 for k, v in _state(bn).items()}
    state[name] = np.ones(C).astype(dtype)
    with _raises(TypeError, name, f"got dtype {state[name].dtype}"):
        bn.load_state_dict(state, strict=strict)
    _assert_layer_unchanged(bn, snap)


@pytest.mark.parametrize("value", [np.array(-1), np.array(1.5), np.array([1, 2])], ids=["negative", "float", "two"])
def test_load_state_dict_bad_num_batches_tracked(value, rng):
    bn = _layer(rng)
    snap = _snapshot(bn)
    state = {k: v + 1 for k, v in _state(bn).items()}
    state["num_batches_tracked"] = value
    with _raises(ValueError, "num_batches_tracked", repr(value)):
        bn.load_state_dict(state)
    _assert_layer_unchanged(bn, snap)


@pytest.mark.parametrize(
    ("key", "value", "exc", "parts"),
    [
        ("num_batches_tracked", np.array(np.inf), ValueError, ("one integer >= 0", "inf")),
        ("running_var", np.ma.masked_array(np.ones(C), mask=[True] + [False] * (C - 1)), TypeError, ("masked",)),
        ("running_var", [1.0, [2.0, 3.0]] + [0.0] * (C - 2), TypeError, ("an array of numbers", "got list")),
    ],
    ids=["inf count", "masked", "ragged"],
)
def test_load_state_dict_bad_values_name_their_key(key, value, exc, parts, rng):
    bn = _layer(rng)
    snap = _snapshot(bn)
    state = {k: v + 1 for k, v in _state(bn).items()}
    state[key] = value
    with _raises(exc, key, *parts):
        bn.load_state_dict(state)
    _assert_layer_unchanged(bn, snap)


@pytest.mark.parametrize(
    ("buffer", "exc", "shown"),
    [
        (np.ones(C + 2, np.float32), ValueError, f"shape ({C},) to load into, got ({C + 2},)"),
        (np.ones(C, np.float32), ValueError, "writable to load into, got a read-only array"),
        ([1.0] * C, TypeError, "a NumPy array to load into, got list"),
    ],
    ids=["wrong shape", "read-only", "list"],
)
def test_load_state_dict_into_a_bad_buffer_loads_nothing(buffer, exc, shown, rng):
    """The layer's own buffer was replaced by one that cannot take the value: nothing is
    loaded, the keys before it in the dict included."""
    bn = _layer(rng)
    if isinstance(buffer, np.ndarray) and buffer.shape == (C,):
        buffer.flags.writeable = False
    bn.running_var = buffer
    snap = {k: v for k, v in _snapshot(bn).items() if k != "running_var"}
    state = {k: v + 1 for k, v in _state(_layer(rng)).items()}
    with _raises(exc, "the layer's running_var must", shown):
        bn.load_state_dict(state)
    _assert_layer_unchanged(bn, snap)


def _check_key_error(info, pattern):
    """Bad input is a TypeError or ValueError (README: "Bad input raises TypeError or
    ValueError naming the argument, the expected and the received value"), here naming the
    state dict and the offending keys.  Checked last, after the state checks."""
    assert isinstance(info.value, (TypeError, ValueError)), f"got {type(info.value).__name__}: {info.value}"
    info.match(pattern)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_load_state_dict_missing_key_strict(name, rng):
    bn = _layer(rng)
    snap = _snapshot(bn)
    state = {k: v + 1 for k, v in _state(bn).items() if k != name}
    with pytest.raises(Exception) as info:  # noqa: B017 - the type is checked below
        bn.load_state_dict(state)
    _assert_layer_unchanged(bn, snap)
    # Not strict: reported, and the others load.
    result = bn.load_state_dict(state, strict=False)
    assert list(result.missing_keys) == [name] and list(result.unexpected_keys) == []
    np.testing.assert_array_equal(getattr(bn, name), snap[name])
    for k in state:
        np.testing.assert_array_equal(np.array(getattr(bn, k)), state[k])
    _check_key_error(info, rf"state_dict.*missing keys \['{name}'\]")


def test_load_state_dict_unexpected_key_strict(rng):
    bn = _layer(rng)
    snap = _snapshot(bn)
    state = {k: v + 1 for k, v in _state(bn).items()}
    state["running_std"] = np.ones(C, np.float32)
    with pytest.raises(Exception) as info:  # noqa: B017 - the type is checked below
        bn.load_state_dict(state)
    _assert_layer_unchanged(bn, snap)
    result = bn.load_state_dict(state, strict=False)
    assert list(result.unexpected_keys) == ["running_std"] and list(result.missing_keys) == []
    assert bn.num_batches_tracked == snap["num_batches_tracked"] + 1
    _check_key_error(info, r"state_dict.*unexpected keys \['running_std'\]")


def test_load_state_dict_affine_keys_into_non_affine_layer(rng):
    bn = _layer(rng, affine=False)
    snap = _snapshot(bn)
    state = _state(_layer(rng))
    with pytest.raises(Exception) as info:  # noqa: B017 - the type is checked below
        bn.load_state_dict(state)
    _assert_layer_unchanged(bn, snap)
    _check_key_error(info, r"state_dict.*unexpected keys \['weight', 'bias'\]")


def test_load_state_dict_not_a_mapping(rng):
    bn = _layer(rng)
    snap = _snapshot(bn)
    with _raises(TypeError, "state_dict", "got list"):
        bn.load_state_dict([("weight", np.ones(C))])
    _assert_layer_unchanged(bn, snap)


def test_backward_out_must_not_overlap_what_it_reads(rng):
    """The probe's case: ``out`` over the memory of the backward's ``weight`` is refused,
    as the forward refuses it; ``out`` over the input or ``grad_output`` is allowed."""
    s = State(rng)
    buf = np.zeros(s.x.size, s.x.dtype)
    weight = buf[:C]
    weight[:] = s.weight
    _, mean, invstd = numbabn.batch_norm_forward(s.x.copy(), s.weight)
    with _raises(ValueError, "out and weight must not share memory", "out is written"):
        numbabn.batch_norm_backward(s.g, s.x, weight, mean, invstd, out=buf.reshape(SHAPE))
    assert_bitwise(weight, s.weight)
    for name in ("save_mean", "save_invstd"):
        saved = {"save_mean": mean.copy(), "save_invstd": invstd.copy()}
        out = np.zeros(SHAPE, np.float64).astype(s.x.dtype)
        saved[name] = out.reshape(-1)[:C].astype(np.float64)  # a copy: no overlap
        numbabn.batch_norm_backward(s.g, s.x, s.weight, out=out, **saved)
        f64 = np.zeros(s.x.size, np.float64)
        saved[name] = f64[:C]
        with _raises(ValueError, f"out and {name} must not share memory"):
            numbabn.batch_norm_backward(s.g, s.x, s.weight, out=f64.view(s.x.dtype)[: s.x.size].reshape(SHAPE), **saved)
    s.assert_unchanged()


@pytest.mark.parametrize("where", ["out", "running_mean", "running_var"])
def test_written_arrays_that_overlap_themselves_are_refused(where, rng):
    """A writable view whose elements share memory (a zero stride) would receive several
    results in one place."""
    from numpy.lib.stride_tricks import as_strided

    s = State(rng)
    one = np.zeros(1, s.x.dtype)
    shape = SHAPE if where == "out" else (C,)
    with _raises(ValueError, f"{where} must not overlap itself", "got a view with shape", "strides"):
        numbabn.batch_norm(**s.kwargs(**{where: as_strided(one, shape, (0,) * len(shape))}))
    assert not one.any()
    s.assert_unchanged()


def test_input_that_requires_grad_names_the_fix(rng):
    import torch

    t = torch.zeros(SHAPE, requires_grad=True)
    with _raises(TypeError, "input must be an array without autograd history", "requires grad", "input.detach()"):
        numbabn.batch_norm_forward(t)


def test_dtype_names_in_messages(rng):
    s = State(rng)
    _, mean, invstd = numbabn.batch_norm_forward(s.x.copy(), s.weight)
    with _raises(TypeError, "save_mean must have dtype float32 or float64", "got float16"):
        numbabn.batch_norm_backward(s.g, s.x, s.weight, mean.astype(np.float16), invstd)
