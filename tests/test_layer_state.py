"""What the layer's state methods leave behind, its repr, and argument errors of the layer and
the statistics functions that no numerical test reaches.

``device="cuda"`` cases run in numba's CUDA simulator (``conftest.py``), or on a GPU with
``NUMBA_ENABLE_CUDASIM=0``.
"""

import numpy as np
import pytest
from conftest import assert_bitwise, make_input
from numba import cuda

import numbabn

DEVICES = ["cpu", "cuda"]


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _trained(device, dtype=np.float32, **kwargs):
    """A layer after two training steps and a backward, every buffer and gradient set away
    from its initial value, and a snapshot of those values."""
    rng = np.random.default_rng(7)
    bn = numbabn.BatchNorm(3, dtype=dtype, device=device, **kwargs)
    to = cuda.to_device if device == "cuda" else np.asarray
    if bn.affine:
        bn.load_state_dict({**bn.state_dict(), "weight": np.full(3, 2.5), "bias": np.full(3, -0.5)}, strict=False)
    x = make_input(rng, (6, 3, 5), 1, dtype)
    for _ in range(2):
        bn(to(x))
    bn.backward(to(rng.standard_normal(x.shape).astype(dtype)))
    names = ["grad_weight", "grad_bias", "update_threshold", "weight", "bias", "running_mean", "running_var"]
    snapshot = {k: _host(getattr(bn, k)).copy() for k in names if getattr(bn, k) is not None}
    return bn, snapshot


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_reset_running_stats_leaves_zeros_ones_and_no_batches(device, dtype):
    """Running mean 0, running variance 1, count 0, in place (the same arrays, the layer's
    dtype); weight, bias, grad_weight, grad_bias and update_threshold are left alone."""
    bn, before = _trained(device, dtype)
    assert bn.num_batches_tracked == 2 and not np.all(before["running_var"] == 1)
    rm, rv = bn.running_mean, bn.running_var
    bn.reset_running_stats()
    assert bn.running_mean is rm and bn.running_var is rv
    assert_bitwise(_host(rm), np.zeros(3, dtype))
    assert_bitwise(_host(rv), np.ones(3, dtype))
    assert bn.num_batches_tracked == 0 and type(bn.num_batches_tracked) is int
    for name in ("weight", "bias", "grad_weight", "grad_bias", "update_threshold"):
        assert_bitwise(_host(getattr(bn, name)), before[name], err_msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_reset_parameters_leaves_ones_zeros_and_keeps_gradients(device):
    """Weight 1, bias 0 and the running statistics reset; the gradients and update_threshold
    of the last backward are left alone (they describe that pass, as the docstring says)."""
    bn, before = _trained(device)
    assert not np.all(before["weight"] == 1) and not np.all(before["grad_weight"] == 0)
    bn.reset_parameters()
    assert_bitwise(_host(bn.weight), np.ones(3, np.float32))
    assert_bitwise(_host(bn.bias), np.zeros(3, np.float32))
    assert_bitwise(_host(bn.running_mean), np.zeros(3, np.float32))
    assert_bitwise(_host(bn.running_var), np.ones(3, np.float32))
    assert bn.num_batches_tracked == 0
    for name in ("grad_weight", "grad_bias", "update_threshold"):
        assert_bitwise(_host(getattr(bn, name)), before[name], err_msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_resets_without_buffers_or_parameters(device):
    """Without running statistics there is nothing to reset (they stay None); without affine
    parameters reset_parameters resets the running statistics only."""
    bn, _ = _trained(device, track_running_stats=False)
    bn.reset_parameters()
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert_bitwise(_host(bn.weight), np.ones(3, np.float32))
    plain, before = _trained(device, affine=False)
    plain.reset_parameters()
    assert plain.weight is None and plain.bias is None and plain.grad_weight is None
    assert_bitwise(_host(plain.running_var), np.ones(3, np.float32))
    assert_bitwise(_host(plain.update_threshold), before["update_threshold"])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "BatchNorm(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, axis=1, dtype=float32)"),
        (
            {"eps": 1e-3, "momentum": None, "affine": False, "track_running_stats": False, "axis": -1},
            "BatchNorm(3, eps=0.001, momentum=None, affine=False, track_running_stats=False, axis=-1, dtype=float32)",
        ),
        (
            {"decay": 0.75, "dtype": np.float64},
            "BatchNorm(3, eps=1e-05, momentum=0.25, affine=True, track_running_stats=True, axis=1, dtype=float64)",
        ),
        (
            {"momentum": 0.5, "dtype": np.float16, "device": "cuda"},
            "BatchNorm(3, eps=1e-05, momentum=0.5, affine=True, track_running_stats=True, axis=1, dtype=float16, "
            "device='cuda')",
        ),
    ],
    ids=["default", "no-buffers", "decay-float64", "cuda-float16"],
)
def test_repr(kwargs, expected):
    assert repr(numbabn.BatchNorm(3, **kwargs)) == expected


@pytest.mark.parametrize("momentum", [0.1, 0.2, None])
def test_momentum_and_decay_together_are_refused_whatever_the_momentum(momentum):
    """Any explicit pair is an error, 0.1 (momentum's default value) and None included."""
    with pytest.raises(ValueError, match=r"give momentum .* or decay .*, not both"):
        numbabn.BatchNorm(3, momentum=momentum, decay=0.5)


def test_momentum_is_checked_in_eval_mode_too(rng):
    """Eval mode does not use momentum, but a wrong one is still a wrong call."""
    x = make_input(rng, (4, 3, 5), 1, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for bad in (7.0, -0.5):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            numbabn.batch_norm(x, rm, rv, training=False, momentum=bad)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        numbabn.batch_norm_forward(x, None, None, rm, rv, training=False, momentum=7.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        numbabn.BatchNorm(3, momentum=7.0)


# -- statistics: stream= on the host, host and GPU parts mixed ---------------------------------------


def test_host_stream_is_refused_by_welford_and_merge_stats(rng):
    x = make_input(rng, (4, 3, 5), 1, np.float64)
    with pytest.raises(ValueError, match=r"stream applies to GPU arrays only, got stream=0"):
        numbabn.welford(x, stream=0)
    s = numbabn.welford(x)
    with pytest.raises(ValueError, match=r"stream applies to GPU arrays only, got stream=0 with host statistics"):
        numbabn.merge_stats(s, s, stream=0)


@pytest.mark.parametrize("host_part", [0, 1], ids=["host-first", "host-second"])
@pytest.mark.parametrize("field", ["mean", "m2"])
def test_gpu_merge_with_a_host_part_is_a_type_error(rng, host_part, field):
    """Parts whose arrays are on the GPU merge there; one host (NumPy) array among them is a
    TypeError naming the part and the field, whichever part it is."""
    x = make_input(rng, (6, 3, 5), 1, np.float64)
    parts = [numbabn.welford(cuda.to_device(p)) for p in np.array_split(x, 2)]
    p = parts[host_part]
    parts[host_part] = p._replace(**{field: _host(getattr(p, field))})
    with pytest.raises(TypeError, match=rf"stats\[{host_part}\]\.{field} is a host array .* not mixed"):
        numbabn.merge_stats(*parts)


def test_gpu_merge_of_gpu_parts_matches_the_host(rng):
    x = make_input(rng, (6, 3, 5), 1, np.float64)
    pieces = np.array_split(x, 3)
    gpu = numbabn.merge_stats(*[numbabn.welford(cuda.to_device(p)) for p in pieces])
    cpu = numbabn.merge_stats(*[numbabn.welford(p) for p in pieces])
    assert gpu.count == cpu.count
    np.testing.assert_allclose(_host(gpu.mean), cpu.mean, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(_host(gpu.m2), cpu.m2, rtol=1e-13)


def test_gpu_merge_with_a_list_part_is_a_type_error(rng):
    x = make_input(rng, (6, 3, 5), 1, np.float64)
    gpu = numbabn.welford(cuda.to_device(x))
    host = numbabn.welford(x)
    with pytest.raises(TypeError, match=r"stats\[1\]"):
        numbabn.merge_stats(gpu, numbabn.Stats(host.count, list(host.mean), list(host.m2)))


def test_load_state_dict_of_the_layers_own_buffers_swapped(rng):
    """Values that are the layer's own buffers are read before any is written: swapping the
    running statistics through ``load_state_dict`` swaps them."""
    bn = numbabn.BatchNorm(4)
    bn.running_mean[:] = rng.normal(size=4)
    bn.running_var[:] = rng.uniform(1, 2, size=4)
    mean, var = bn.running_mean.copy(), bn.running_var.copy()
    bn.load_state_dict({"running_mean": bn.running_var, "running_var": bn.running_mean}, strict=False)
    np.testing.assert_array_equal(bn.running_mean, var)
    np.testing.assert_array_equal(bn.running_var, mean)
