"""Bad arguments of :class:`numbabn.BatchNorm` (constructor, calls, attributes,
``load_state_dict``) raise TypeError, ValueError or KeyError naming the argument and the
value received, and nothing is written: the layer's buffers and counter stay bitwise
unchanged."""

import numpy as np
import pytest
from _bad_calls import SHAPE, C, other_dtype, raises
from conftest import assert_bitwise, make_input, make_params

import numbabn


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
    other = other_dtype(dtype)
    with raises(TypeError, "input", f"dtype {np.dtype(dtype)}", f"got {np.dtype(other)}"):
        bn(make_input(rng, SHAPE, 1, other))
    _assert_layer_unchanged(bn, snap)
    assert bn.num_batches_tracked == 2


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64])
def test_layer_non_float_input(dtype, rng):
    bn = _layer(rng)
    snap = _snapshot(bn)
    with raises(TypeError, "input", f"got {np.dtype(dtype)}"):
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
    with raises(ValueError, "more than 1 value per channel", f"shape {(1, C)}"):
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
    with raises(ValueError, "grad_output", f"got {(4, C)}"):
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
    with raises(exc, *parts):
        numbabn.BatchNorm(**kwargs)


@pytest.mark.parametrize("mode", ["eval", None, 0.0, 2], ids=repr)
def test_layer_train_mode_must_be_a_bool(mode, rng):
    bn = _layer(rng)
    with raises(TypeError, "mode must be a bool", f"{mode!r}"):
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
    with raises(exc, "num_batches_tracked must be an int >= 0", shown):
        bn(make_input(rng, SHAPE, 1, np.float32))
    _assert_layer_unchanged(bn, snap)
    bn.num_batches_tracked = np.int64(2)  # numpy integers count
    bn(make_input(rng, SHAPE, 1, np.float32))
    assert bn.num_batches_tracked == 3 and type(bn.num_batches_tracked) is int


def test_layer_training_attribute_must_be_a_bool(rng):
    bn = _layer(rng)
    bn.training = ""
    snap = _snapshot(bn)
    with raises(TypeError, "training must be a bool", "got str ''"):
        bn(make_input(rng, SHAPE, 1, np.float32))
    _assert_layer_unchanged(bn, snap)


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
    with raises(ValueError, name, f"({C},)", f"got {shape}"):
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
    with raises(TypeError, name, f"got dtype {state[name].dtype}"):
        bn.load_state_dict(state, strict=strict)
    _assert_layer_unchanged(bn, snap)


@pytest.mark.parametrize("value", [np.array(-1), np.array(1.5), np.array([1, 2])], ids=["negative", "float", "two"])
def test_load_state_dict_bad_num_batches_tracked(value, rng):
    bn = _layer(rng)
    snap = _snapshot(bn)
    state = {k: v + 1 for k, v in _state(bn).items()}
    state["num_batches_tracked"] = value
    with raises(ValueError, "num_batches_tracked", repr(value)):
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
    with raises(exc, key, *parts):
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
    with raises(exc, "the layer's running_var must", shown):
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
    with raises(TypeError, "state_dict", "got list"):
        bn.load_state_dict([("weight", np.ones(C))])
    _assert_layer_unchanged(bn, snap)
