"""``numbabn.BatchNorm`` and ``numbabn.batch_norm`` against PyTorch, the semantics they mirror.

PyTorch is a test dependency (``pip install numbabn[test]``), imported plainly: a missing
torch is a failure, not a skip.
"""

import numpy as np
import pytest
import torch
from conftest import assert_close, dtype_params, make_input, make_params

import numbabn

torch.manual_seed(0)

TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

#: PyTorch computes float32 statistics in float32, numbabn in float64: compare float32 to
#: PyTorch more loosely than to the float64 oracle.
TORCH_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}

MODULES = [
    pytest.param(torch.nn.BatchNorm1d, (16, 5), id="1d-NC"),
    pytest.param(torch.nn.BatchNorm1d, (8, 5, 12), id="1d-NCL"),
    pytest.param(torch.nn.BatchNorm2d, (4, 6, 5, 7), id="2d"),
    pytest.param(torch.nn.BatchNorm2d, (3, 4, 9, 9), id="2d-inner-81"),
    pytest.param(torch.nn.BatchNorm3d, (2, 3, 4, 3, 5), id="3d"),
]

CONFIGS = [
    pytest.param({"momentum": 0.1}, id="momentum0.1"),
    pytest.param({"momentum": None}, id="cumulative"),
    pytest.param({"momentum": 0.3, "affine": False}, id="no-affine"),
    pytest.param({"momentum": 0.1, "track_running_stats": False}, id="no-running-stats"),
    pytest.param({"momentum": None, "affine": False, "track_running_stats": False}, id="bare"),
]


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _close(actual, expected, dtype, what):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert_close(actual, expected, dtype, rtol=TORCH_TOL[np.dtype(dtype)], err_msg=what)


def _randomize(tmod, rng, dtype):
    """Non-trivial affine parameters, the same on both sides."""
    C = tmod.num_features
    w, b, _, _ = make_params(rng, C, dtype)
    with torch.no_grad():
        tmod.weight.copy_(_t(w))
        tmod.bias.copy_(_t(b))


def _step(tmod, bn, x, g, dtype, what):
    """One forward + backward on both, then compare everything observable."""
    tx = _t(x).requires_grad_(True)
    if tmod.affine:
        tmod.weight.grad = tmod.bias.grad = None
    ty = tmod(tx)
    ty.backward(_t(g))
    y = bn(x)
    gx = bn.backward(g)
    assert y.dtype == gx.dtype == dtype
    _close(y, ty, dtype, f"{what}: output")
    _close(gx, tx.grad, dtype, f"{what}: grad_input")
    if tmod.affine:
        _close(bn.grad_weight, tmod.weight.grad, dtype, f"{what}: grad_weight")
        _close(bn.grad_bias, tmod.bias.grad, dtype, f"{what}: grad_bias")
    else:
        assert bn.weight is None and bn.bias is None
        assert bn.grad_weight is None and bn.grad_bias is None
    _compare_state(tmod, bn, dtype, what)


def _compare_state(tmod, bn, dtype, what):
    if tmod.track_running_stats:
        _close(bn.running_mean, tmod.running_mean, dtype, f"{what}: running_mean")
        _close(bn.running_var, tmod.running_var, dtype, f"{what}: running_var")
        assert int(bn.num_batches_tracked) == int(tmod.num_batches_tracked), what
    else:
        assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    if tmod.affine:
        _close(bn.weight, tmod.weight, dtype, f"{what}: weight")
        _close(bn.bias, tmod.bias, dtype, f"{what}: bias")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("module", "shape"), MODULES)
def test_layer_matches_torch_over_steps(module, shape, config, dtype, rng):
    C = shape[1]
    tmod = module(C, eps=1e-5, **config)
    if dtype == np.float64:
        tmod = tmod.double()
    bn = numbabn.BatchNorm(C, eps=1e-5, dtype=dtype, **config)
    if tmod.affine:
        _randomize(tmod, rng, dtype)
        bn.weight[...] = tmod.weight.detach().numpy()
        bn.bias[...] = tmod.bias.detach().numpy()
    _compare_state(tmod, bn, dtype, "initial")

    for step in range(4):
        x = make_input(rng, shape, 1, dtype, loc=2.0 + step)
        g = rng.standard_normal(shape).astype(dtype)
        _step(tmod, bn, x, g, dtype, f"train step {step}")
    tmod.eval()
    assert bn.eval() is bn and not bn.training
    for step in range(2):
        x = make_input(rng, shape, 1, dtype)
        g = rng.standard_normal(shape).astype(dtype)
        _step(tmod, bn, x, g, dtype, f"eval step {step}")
    tmod.train()
    bn.train()
    x = make_input(rng, shape, 1, dtype)
    _step(tmod, bn, x, rng.standard_normal(shape).astype(dtype), dtype, "train again")


@pytest.mark.parametrize("dtype", dtype_params())
def test_layer_channels_last_matches_torch(dtype, rng):
    """``BatchNorm(axis=-1)`` on NHWC data is ``BatchNorm2d`` on the NCHW permutation."""
    C = 6
    tmod = torch.nn.BatchNorm2d(C)
    if dtype == np.float64:
        tmod = tmod.double()
    _randomize(tmod, rng, dtype)
    bn = numbabn.BatchNorm(C, axis=-1, dtype=dtype)
    bn.load_state_dict({k: v.numpy() for k, v in tmod.state_dict().items()})
    for step, training in enumerate([True, True, True, False]):
        tmod.train(training)
        bn.train(training)
        x = make_input(rng, (3, 5, 4, C), -1, dtype)
        g = rng.standard_normal(x.shape).astype(dtype)
        tx = _t(x).requires_grad_(True)
        tmod.weight.grad = tmod.bias.grad = None
        ty = tmod(tx.permute(0, 3, 1, 2))
        ty.backward(_t(g).permute(0, 3, 1, 2))
        y = bn(x)
        gx = bn.backward(g)
        _close(y, ty.permute(0, 2, 3, 1), dtype, f"step {step}: output")
        _close(gx, tx.grad, dtype, f"step {step}: grad_input")
        _close(bn.grad_weight, tmod.weight.grad, dtype, f"step {step}: grad_weight")
        _close(bn.grad_bias, tmod.bias.grad, dtype, f"step {step}: grad_bias")
        _compare_state(tmod, bn, dtype, f"step {step}")


def _trained_torch_module(rng, C, dtype, steps=3):
    tmod = torch.nn.BatchNorm2d(C, momentum=0.2)
    if dtype == np.float64:
        tmod = tmod.double()
    _randomize(tmod, rng, dtype)
    for step in range(steps):
        tmod(_t(make_input(rng, (4, C, 5, 5), 1, dtype, loc=3.0 + step)))
    return tmod


@pytest.mark.parametrize("dtype", dtype_params())
def test_load_torch_state_dict(dtype, rng):
    C = 5
    tmod = _trained_torch_module(rng, C, dtype)
    state = {k: v.numpy() for k, v in tmod.state_dict().items()}
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert int(state["num_batches_tracked"]) == 3
    bn = numbabn.BatchNorm(C, momentum=0.2, dtype=dtype)

    result = bn.load_state_dict(state)

    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert bn.num_batches_tracked == 3
    for name in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(bn, name), state[name])
        assert getattr(bn, name).dtype == dtype
    tmod.eval()
    bn.eval()
    x = make_input(rng, (3, C, 4, 6), 1, dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    tx = _t(x).requires_grad_(True)
    ty = tmod(tx)
    ty.backward(_t(g))
    y = bn(x)
    gx = bn.backward(g)
    _close(y, ty, dtype, "output")
    _close(gx, tx.grad, dtype, "grad_input")
    _close(bn.grad_weight, tmod.weight.grad, dtype, "grad_weight")
    _close(bn.grad_bias, tmod.bias.grad, dtype, "grad_bias")
    # Continuing to train from the loaded state agrees too.
    tmod.train()
    bn.train()
    x = make_input(rng, (3, C, 4, 6), 1, dtype)
    _close(bn(x), tmod(_t(x)), dtype, "output after load, training")
    _compare_state(tmod, bn, dtype, "after a training step")


def test_load_torch_tensors_and_cast(rng):
    """Values may be torch tensors, and are cast to the layer's dtype."""
    tmod = _trained_torch_module(rng, 4, np.float64)
    bn = numbabn.BatchNorm(4, dtype=np.float32)
    bn.load_state_dict(tmod.state_dict())
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(bn, name).dtype == np.float32
        np.testing.assert_array_equal(getattr(bn, name), getattr(tmod, name).detach().numpy().astype(np.float32))
    assert bn.num_batches_tracked == 3


LOW_PRECISION = [torch.bfloat16, torch.float16] + ([torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else [])


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("tdtype", LOW_PRECISION, ids=str)
def test_load_low_precision_torch_state_dict(tdtype, dtype, rng):
    """A module's state dict in bfloat16, float16 (or float8) loads as PyTorch loads it into
    a module of the layer's dtype: every value converted exactly (NumPy has no bfloat16)."""
    state = _trained_torch_module(rng, 4, np.float32).to(tdtype).state_dict()
    assert state["running_var"].dtype == tdtype
    bn = numbabn.BatchNorm(4, dtype=dtype)
    bn.load_state_dict(state)
    ref = torch.nn.BatchNorm2d(4, dtype=TORCH_DTYPE[np.dtype(dtype)])
    ref.load_state_dict(state)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(bn, name).dtype == dtype
        np.testing.assert_array_equal(getattr(bn, name), getattr(ref, name).detach().numpy(), err_msg=name)
    assert bn.num_batches_tracked == 3


@pytest.mark.parametrize(
    ("make", "shown"),
    [(lambda: torch.ones(4, device="meta"), "device meta"), (lambda: torch.ones(4).to_sparse(), "Sparse")],
    ids=["meta", "sparse"],
)
@pytest.mark.parametrize("name", ["weight", "running_var"])
def test_unconvertible_torch_tensor_names_its_key(make, shown, name, rng):
    """A tensor that does not convert to a NumPy array is a TypeError naming its key, what was
    expected and what it got, and nothing is loaded."""
    bn = numbabn.BatchNorm(4)
    bn.load_state_dict(_trained_torch_module(rng, 4, np.float32).state_dict())
    before = bn.state_dict()
    state = _trained_torch_module(rng, 4, np.float32).state_dict()
    state[name] = make()
    with pytest.raises(TypeError, match=rf"^{name} must be a tensor that converts to a NumPy array.*{shown}"):
        bn.load_state_dict(state)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_load_state_dict_without_num_batches_tracked(rng):
    """Older PyTorch checkpoints lack ``num_batches_tracked``; it is allowed and kept."""
    tmod = _trained_torch_module(rng, 4, np.float32)
    state = {k: v.numpy() for k, v in tmod.state_dict().items() if k != "num_batches_tracked"}
    bn = numbabn.BatchNorm(4)
    bn.num_batches_tracked = 7
    result = bn.load_state_dict(state)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert bn.num_batches_tracked == 7
    np.testing.assert_array_equal(bn.running_var, state["running_var"])


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="default"),
        pytest.param({"affine": False}, id="no-affine"),
        pytest.param({"track_running_stats": False}, id="no-running-stats"),
    ],
)
def test_state_dict_loads_into_torch(config, dtype, rng):
    C = 4
    bn = numbabn.BatchNorm(C, momentum=0.2, dtype=dtype, **config)
    if bn.affine:
        w, b, _, _ = make_params(rng, C, dtype)
        bn.weight[...], bn.bias[...] = w, b
    for step in range(3):
        bn(make_input(rng, (4, C, 3, 3), 1, dtype, loc=2.0 + step))
    state = bn.state_dict()
    expected_keys = (["weight", "bias"] if bn.affine else []) + (
        ["running_mean", "running_var", "num_batches_tracked"] if bn.track_running_stats else []
    )
    assert sorted(state) == sorted(expected_keys)
    if bn.track_running_stats:
        assert state["num_batches_tracked"].shape == () and state["num_batches_tracked"].dtype == np.int64
        assert int(state["num_batches_tracked"]) == 3
        # A copy: later training does not change the saved state.
        saved_rm = state["running_mean"].copy()
        bn(make_input(rng, (4, C, 3, 3), 1, dtype))
        np.testing.assert_array_equal(state["running_mean"], saved_rm)
        bn.load_state_dict(state)

    tmod = torch.nn.BatchNorm2d(C, momentum=0.2, **config)
    if dtype == np.float64:
        tmod = tmod.double()
    result = tmod.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, value in state.items():
        np.testing.assert_array_equal(getattr(tmod, name).detach().numpy(), value)
    tmod.eval()
    bn.eval()
    x = make_input(rng, (2, C, 5, 5), 1, dtype)
    _close(bn(x), tmod(_t(x)), dtype, "eval output")


# -- functional --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape", [(16, 5), (6, 4, 9), (4, 3, 8, 8), (3, 5, 9, 9), (2, 3, 4, 3, 5), (5, 2, 70)], ids=str
)
def test_functional_matches_torch(shape, training, affine, dtype, rng):
    C = shape[1]
    x = make_input(rng, shape, 1, dtype)
    w, b, rm, rv = make_params(rng, C, dtype)
    if not affine:
        w = b = None
    trm, trv = _t(rm.copy()), _t(rv.copy())
    ty = torch.nn.functional.batch_norm(
        _t(x), trm, trv, None if w is None else _t(w), None if b is None else _t(b), training, 0.2, 1e-4
    )
    y = numbabn.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-4)
    _close(y, ty, dtype, "output")
    _close(rm, trm, dtype, "running_mean")
    _close(rv, trv, dtype, "running_var")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_channels_last_matches_torch(training, dtype, rng):
    """numbabn ``axis=-1`` on NHWC data equals torch on ``x.permute(0, 3, 1, 2)``."""
    C = 7
    x = make_input(rng, (3, 5, 6, C), -1, dtype)
    w, b, rm, rv = make_params(rng, C, dtype)
    trm, trv = _t(rm.copy()), _t(rv.copy())
    ty = torch.nn.functional.batch_norm(_t(x).permute(0, 3, 1, 2), trm, trv, _t(w), _t(b), training, 0.1, 1e-5)
    y = numbabn.batch_norm(x, rm, rv, w, b, training, axis=-1)
    _close(y, ty.permute(0, 2, 3, 1), dtype, "output")
    _close(rm, trm, dtype, "running_mean")
    _close(rv, trv, dtype, "running_var")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 8, 8), (3, 4, 5, 6)], ids=str)
def test_functional_backward_matches_torch_autograd(shape, training, dtype, rng):
    C = shape[1]
    x = make_input(rng, shape, 1, dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w, b, rm, rv = make_params(rng, C, dtype)
    tx, tw, tb = (_t(a).requires_grad_(True) for a in (x, w, b))
    ty = torch.nn.functional.batch_norm(tx, _t(rm.copy()), _t(rv.copy()), tw, tb, training, 0.1, 1e-5)
    ty.backward(_t(g))
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, training=training)
    gi, gw, gb = numbabn.batch_norm_backward(g, x, w, mean, invstd, training=training)
    _close(gi, tx.grad, dtype, "grad_input")
    _close(gw, tw.grad, dtype, "grad_weight")
    _close(gb, tb.grad, dtype, "grad_bias")
