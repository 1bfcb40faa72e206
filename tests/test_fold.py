"""``numbabn.fold``: a batch-norm layer's eval transform folded into the linear or
convolution layer before it.

The folded layer is checked against the two layers run one after the other: a NumPy linear
layer (float64) or ``torch.nn.functional.conv2d``, then ``bn.eval()``.  The numbabn layers
run on ``(N, C)`` float32 arrays and small NCHW ones, both through the channel-minor
kernels, so the file compiles two of them: the float32 training and eval forwards.
"""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_bitwise, assert_close

import numbabn

C_IN, C_OUT = 3, 4
F32 = np.dtype(np.float32)
WEIGHT_DTYPES = [pytest.param(np.dtype(d), id=np.dtype(d).name) for d in (np.float32, np.float64)]


def _train(bn, rng, steps=3):
    """A few training steps on (N, C) float32 batches with per-channel means and scales."""
    loc, scale = rng.uniform(-3.0, 3.0, bn.num_features), rng.uniform(0.5, 3.0, bn.num_features)
    for _ in range(steps):
        bn(rng.normal(loc, scale, (16, bn.num_features)).astype(np.float32))
    return bn.eval()


@pytest.fixture(scope="module")
def bn():
    """A float32 BatchNorm trained a few steps, with weights of both signs and a bias: no
    part of its eval transform is trivial.  Shared by the tests, which only read it."""
    rng = np.random.default_rng(20240611)
    layer = numbabn.BatchNorm(C_OUT, momentum=0.3)
    state = layer.state_dict()
    state["weight"] = rng.uniform(0.5, 1.5, C_OUT) * rng.choice([-1.0, 1.0], C_OUT)
    state["bias"] = rng.normal(0.0, 1.0, C_OUT)
    layer.load_state_dict(state)
    return _train(layer, rng)


def _snapshot(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def _bn_arrays(bn):
    return [bn.running_mean, bn.running_var, bn.weight, bn.bias]


def _assert_unchanged(before, arrays):
    for a, b in zip(before, _snapshot(*arrays), strict=True):
        if a is None:
            assert b is None
        else:
            assert_bitwise(b, a)


def _eval64(bn, y, axis=1):
    """bn's eval transform of ``y`` in float64 NumPy, from its state (None: 1 and 0)."""
    shape = [1] * y.ndim
    shape[axis] = -1
    c = y.shape[axis]

    def per_channel(a, fill):
        return (np.full(c, fill) if a is None else np.asarray(a, np.float64)).reshape(shape)

    mean, var = per_channel(bn.running_mean, 0.0), per_channel(bn.running_var, 1.0)
    return (y - mean) / np.sqrt(var + bn.eps) * per_channel(bn.weight, 1.0) + per_channel(bn.bias, 0.0)


def _linear_params(rng, dtype, transposed=False):
    w = rng.normal(0.0, 1.0, (C_IN, C_OUT) if transposed else (C_OUT, C_IN)).astype(dtype)
    return w, rng.normal(0.0, 1.0, C_OUT).astype(dtype)


# -- against the two layers ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_out_in(rng, bn, dtype, with_bias):
    w, b = _linear_params(rng, dtype)
    if not with_bias:
        b = None
    before = _snapshot(w, b, *_bn_arrays(bn))
    fw, fb = numbabn.fold(bn, w, b)
    _assert_unchanged(before, [w, b, *_bn_arrays(bn)])
    assert fw.dtype == dtype and fb.dtype == dtype and fw.shape == w.shape and fb.shape == (C_OUT,)
    assert not np.shares_memory(fw, w) and (b is None or not np.shares_memory(fb, b))

    x = rng.normal(0.0, 2.0, (9, C_IN))
    y = x @ w.astype(np.float64).T + (0.0 if b is None else b.astype(np.float64))
    folded = x @ fw.astype(np.float64).T + fb
    assert_close(folded, bn(y.astype(np.float32)), F32)
    # The arithmetic is float64: float64 weights agree with the float64 eval transform closely.
    assert_close(folded, _eval64(bn, y), dtype)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_x_at_w_in_out(rng, bn, dtype, axis):
    w, b = _linear_params(rng, dtype, transposed=True)
    fw, fb = numbabn.fold(bn, w, b, axis=axis)
    x = rng.normal(0.0, 2.0, (9, C_IN))
    y = x @ w.astype(np.float64) + b
    folded = x @ fw.astype(np.float64) + fb
    assert_close(folded, bn(y.astype(np.float32)), F32)
    assert_close(folded, _eval64(bn, y), dtype)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("axis", [0, -4])
def test_conv2d(rng, bn, dtype, axis):
    w = rng.normal(0.0, 0.5, (C_OUT, C_IN, 3, 3)).astype(dtype)
    b = rng.normal(0.0, 1.0, C_OUT).astype(dtype)
    before = _snapshot(w, b)
    fw, fb = numbabn.fold(bn, w, b, axis=axis)
    _assert_unchanged(before, [w, b])
    assert fw.dtype == dtype and fw.shape == w.shape and fb.dtype == dtype

    x = torch.from_numpy(rng.normal(0.0, 2.0, (2, C_IN, 6, 5)))
    conv = torch.nn.functional.conv2d

    def layer(weight, bias):
        return conv(x, torch.from_numpy(weight.astype(np.float64)), torch.from_numpy(bias.astype(np.float64))).numpy()

    y = layer(w, b)
    folded = layer(fw, fb)
    assert_close(folded, bn(y.astype(np.float32)), F32)
    assert_close(folded, _eval64(bn, y), dtype)


def test_non_affine_batchnorm(rng):
    bn = _train(numbabn.BatchNorm(C_OUT, affine=False), rng)
    assert bn.weight is None and bn.bias is None
    w, b = _linear_params(rng, np.float32)
    fw, fb = numbabn.fold(bn, w, b)
    x = rng.normal(0.0, 2.0, (9, C_IN))
    y = x @ w.astype(np.float64).T + b
    assert_close(x @ fw.astype(np.float64).T + fb, bn(y.astype(np.float32)), F32)


def test_float64_batchnorm_matches_the_formula(rng):
    """A float64 layer (state loaded, no kernel run): the folded arrays are the formula's,
    computed in float64, to the last bits."""
    bn = numbabn.BatchNorm(C_OUT, dtype=np.float64, eps=1e-3)
    state = bn.state_dict()
    state.update(
        weight=rng.normal(0.0, 1.0, C_OUT),
        bias=rng.normal(0.0, 1.0, C_OUT),
        running_mean=rng.normal(0.0, 1.0, C_OUT),
        running_var=rng.uniform(0.1, 4.0, C_OUT),
    )
    bn.load_state_dict(state)
    w, b = _linear_params(rng, np.float64)
    fw, fb = numbabn.fold(bn, w, b)
    s = state["weight"] / np.sqrt(state["running_var"] + 1e-3)
    np.testing.assert_allclose(fw, w * s[:, None], rtol=1e-15)
    np.testing.assert_allclose(fb, (b - state["running_mean"]) * s + state["bias"], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_duck_typed_bn(rng, affine):
    bn = SimpleNamespace(
        running_mean=rng.normal(0.0, 1.0, C_OUT),
        running_var=rng.uniform(0.5, 2.0, C_OUT).astype(np.float32),
        weight=rng.normal(0.0, 1.0, C_OUT) if affine else None,
        bias=rng.normal(0.0, 1.0, C_OUT) if affine else None,
        eps=np.float32(1e-4),
    )
    before = _snapshot(*_bn_arrays(bn))
    w, b = _linear_params(rng, np.float64, transposed=True)
    fw, fb = numbabn.fold(bn, w, b, axis=1)
    _assert_unchanged(before, _bn_arrays(bn))
    x = rng.normal(0.0, 2.0, (9, C_IN))
    assert_close(x @ fw + fb, _eval64(bn, x @ w + b), np.float64)
    # float16 weights stay float16 (the arithmetic is float64 all the same).
    hw, hb = numbabn.fold(bn, w.astype(np.float16), None, axis=1)
    assert hw.dtype == hb.dtype == np.float16
    assert_close(hb, _eval64(bn, np.zeros((1, C_OUT)))[0], np.float64, rtol=1e-3)


def test_torch_batchnorm_and_conv():
    """A torch.nn.BatchNorm2d (a duck-typed bn whose weight requires grad) after a Conv2d:
    the folded Conv2d matches PyTorch's two layers in eval mode."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C_IN, C_OUT, 3).double()
    tbn = torch.nn.BatchNorm2d(C_OUT, momentum=0.5).double()
    with torch.no_grad():
        tbn.weight.uniform_(-1.5, 1.5)
        tbn.bias.normal_()
        for _ in range(3):
            tbn(conv(3.0 * torch.randn(4, C_IN, 6, 6, dtype=torch.float64) + 1.0))
    tbn.eval()
    fw, fb = numbabn.fold(tbn, conv.weight.detach().numpy(), conv.bias.detach().numpy())
    x = torch.randn(2, C_IN, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = tbn(conv(x)).numpy()
    folded = torch.nn.functional.conv2d(x, torch.from_numpy(fw), torch.from_numpy(fb)).numpy()
    assert_close(folded, expected, np.float64)


def test_batchnorm_on_the_gpu(bn):
    """A BatchNorm on device="cuda" (numba's CUDA simulator in the tests): its statistics come
    to the host, and fold gives the bits of the same state on the CPU.  No kernel runs."""
    from numba import cuda

    gpu = numbabn.BatchNorm(C_OUT, device="cuda")
    gpu.load_state_dict(bn.state_dict())
    w = np.random.default_rng(5).normal(0.0, 1.0, (C_OUT, C_IN, 3, 3)).astype(np.float32)
    b = np.arange(C_OUT, dtype=np.float32)
    for got, expected in zip(numbabn.fold(gpu, w, b), numbabn.fold(bn, w, b), strict=True):
        assert type(got) is np.ndarray
        assert_bitwise(got, expected)
    with pytest.raises(TypeError, match="weight must be a host array .*got a GPU array"):
        numbabn.fold(gpu, cuda.to_device(w))


# -- bad input ---------------------------------------------------------------------------------------


def _set(name, value):
    def change(bn, kw):
        setattr(bn, name, value)

    return change


def _poke(name, index, value):
    def change(bn, kw):
        getattr(bn, name)[index] = value

    return change


def _arg(name, value):
    def change(bn, kw):
        kw[name] = value(kw) if callable(value) else value

    return change


def _bad(case_id, change, exc, match):
    return pytest.param(change, exc, match, id=case_id)


BAD = [
    _bad(
        "no-running-mean",
        _set("running_mean", None),
        ValueError,
        r"bn must have running statistics .*track_running_stats=True.* got running_mean None",
    ),
    _bad(
        "no-running-var",
        _set("running_var", None),
        ValueError,
        "bn must have running statistics .* got running_var None",
    ),
    _bad(
        "channels",
        _arg("weight", lambda kw: kw["weight"][:3]),
        ValueError,
        r"weight must have 4 output channels along axis 0 .*got 3",
    ),
    _bad("channels-axis", _arg("axis", 1), ValueError, r"weight must have 4 output channels along axis 1 .*got 3"),
    _bad(
        "bn-shapes", _set("running_var", np.ones(5)), ValueError, r"bn.running_var must have shape \(4,\) .*got \(5,\)"
    ),
    _bad(
        "bn-2d", _set("running_mean", np.zeros((4, 1))), ValueError, r"bn.running_mean must be 1-d .*got shape \(4, 1\)"
    ),
    _bad("bias-len", _arg("bias", np.zeros(5, np.float32)), ValueError, r"bias must have shape \(4,\) .*got \(5,\)"),
    _bad(
        "bias-2d", _arg("bias", np.zeros((1, 4), np.float32)), ValueError, r"bias must have shape \(4,\) .*got \(1, 4\)"
    ),
    _bad(
        "bias-complex",
        _arg("bias", np.zeros(4, np.complex64)),
        TypeError,
        "bias must be a real-valued array .*got dtype complex64",
    ),
    _bad("axis-high", _arg("axis", 2), ValueError, r"axis must be in \[-2, 2\) for a weight with ndim 2, got 2"),
    _bad("axis-low", _arg("axis", -3), ValueError, r"axis must be in \[-2, 2\) .*got -3"),
    _bad("axis-float", _arg("axis", 1.0), TypeError, "axis must be an int, got float"),
    _bad(
        "weight-int",
        _arg("weight", lambda kw: kw["weight"].astype(np.int64)),
        TypeError,
        "weight must have a floating dtype .*got int64",
    ),
    _bad(
        "weight-complex",
        _arg("weight", lambda kw: kw["weight"].astype(np.complex128)),
        TypeError,
        "weight must have a floating dtype",
    ),
    _bad(
        "weight-0d",
        _arg("weight", np.float32(1.0)),
        ValueError,
        r"weight must have at least 1 dimension .*got shape \(\)",
    ),
    _bad("weight-none", _arg("weight", None), TypeError, "weight must be an array, got NoneType"),
    _bad(
        "var-nan",
        _poke("running_var", 2, np.nan),
        ValueError,
        "bn.running_var must be finite .*1 non-finite value.*nan at channel 2",
    ),
    _bad("mean-inf", _poke("running_mean", 0, np.inf), ValueError, "bn.running_mean must be finite .*inf at channel 0"),
    _bad("bn-weight-nan", _poke("weight", 1, np.nan), ValueError, "bn.weight must be finite"),
    _bad("bn-bias-inf", _poke("bias", 3, -np.inf), ValueError, "bn.bias must be finite"),
    _bad(
        "var-negative",
        _poke("running_var", 1, -0.5),
        ValueError,
        r"bn.running_var must be >= 0 \(a variance\), got -0.5 at channel 1",
    ),
    _bad("eps-negative", _set("eps", -1e-5), ValueError, "bn.eps must be a finite float >= 0, got -1e-05"),
    _bad("eps-none", _set("eps", None), TypeError, "bn.eps must be a float >= 0, got NoneType"),
    _bad(
        "var-complex",
        _set("running_var", np.ones(4, np.complex128)),
        TypeError,
        "bn.running_var must be a real-valued array",
    ),
]


@pytest.mark.parametrize("change,exc,match", BAD)
def test_bad_input_is_refused_and_nothing_changes(rng, change, exc, match):
    bn = SimpleNamespace(
        running_mean=rng.normal(0.0, 1.0, C_OUT).astype(np.float32),
        running_var=rng.uniform(0.5, 2.0, C_OUT).astype(np.float32),
        weight=rng.normal(0.0, 1.0, C_OUT).astype(np.float32),
        bias=rng.normal(0.0, 1.0, C_OUT).astype(np.float32),
        eps=1e-5,
    )
    w, b = _linear_params(rng, np.float32)
    kw = {"weight": w, "bias": b, "axis": 0}
    change(bn, kw)
    before_bn, before_kw = copy.deepcopy(vars(bn)), copy.deepcopy(kw)
    with pytest.raises(exc, match=match):
        numbabn.fold(bn, kw["weight"], kw["bias"], axis=kw["axis"])
    for before, after in ((before_bn, vars(bn)), (before_kw, kw)):
        assert before.keys() == after.keys()
        for key, value in before.items():
            if isinstance(value, np.ndarray):
                assert_bitwise(after[key], value, err_msg=key)
            else:
                assert after[key] == value or (value is None and after[key] is None), key


def test_zero_variance_without_eps_is_refused():
    bn = SimpleNamespace(running_mean=np.zeros(2), running_var=np.array([1.0, 0.0]), weight=None, bias=None, eps=0.0)
    with pytest.raises(ValueError, match=r"bn.running_var \+ bn.eps must be > 0 .*channel 1"):
        numbabn.fold(bn, np.ones((2, 3)))


def test_batchnorm_without_running_statistics_is_refused():
    bn = numbabn.BatchNorm(C_OUT, track_running_stats=False)
    w = np.ones((C_OUT, C_IN), np.float32)
    with pytest.raises(ValueError, match="bn must have running statistics .*track_running_stats=True"):
        numbabn.fold(bn, w)
    assert_bitwise(w, np.ones((C_OUT, C_IN), np.float32))


def test_an_object_that_is_not_a_bn_is_refused():
    with pytest.raises(TypeError, match="bn must be a BatchNorm or an object with the attributes .* without eps"):
        numbabn.fold(SimpleNamespace(running_mean=None, running_var=None, weight=None, bias=None), np.ones((2, 2)))
