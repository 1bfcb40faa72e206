"""Argument kinds beyond plain ndarrays, and PyTorch's rules at the edges."""

import warnings

import numpy as np
import pytest
import reference
import torch
from conftest import assert_bitwise, assert_close, make_input

import numbabn


def test_array_likes_are_converted(rng):
    x = make_input(rng, (6, 4), 1, np.float64)
    expected = numbabn.batch_norm_forward(x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        matrix = np.asmatrix(x)
    assert_bitwise(numbabn.batch_norm_forward(matrix)[0], expected)
    assert_bitwise(numbabn.batch_norm_forward(x.tolist())[0], expected)
    assert_bitwise(numbabn.batch_norm_forward(torch.from_numpy(x))[0], expected)


def test_masked_arrays_are_refused(rng):
    x = np.ma.masked_array(make_input(rng, (6, 4), 1, np.float32), mask=False)
    with pytest.raises(TypeError, match="input must not be a masked array"):
        numbabn.batch_norm_forward(x)
    w = np.ma.masked_array(np.ones(4, np.float32), mask=[0, 1, 0, 0])
    with pytest.raises(TypeError, match="weight must not be a masked array"):
        numbabn.batch_norm_forward(x.data, w)


def test_ragged_input_names_the_argument():
    with pytest.raises(TypeError, match="input must be an array of numbers"):
        numbabn.batch_norm_forward([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize("training", [np.array([True, False]), "yes", 2])
def test_training_must_be_a_bool(training, rng):
    x = make_input(rng, (6, 4), 1, np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(TypeError, match="training must be a bool"):
        numbabn.batch_norm(x, rm, rv, training=training)
    assert_bitwise(rm, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="training must be a bool"):
        numbabn.batch_norm_backward(x, x, None, np.zeros(4), np.ones(4), training=training)


@pytest.mark.parametrize("count", [float("nan"), float("inf"), -1, 2.5, "3"])
def test_merge_stats_rejects_bad_counts(count):
    good = numbabn.Stats(3, np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match=r"stats\[1\]\.count must be an integer >= 0"):
        numbabn.merge_stats(good, (count, np.zeros(2), np.ones(2)))


def test_merge_stats_rejects_non_numeric_means():
    with pytest.raises(TypeError, match=r"stats\[0\]\.mean and \.m2 must be arrays of numbers"):
        numbabn.merge_stats((2, ["a"], [0.0]))


def test_layer_constructor_errors():
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got 'foo'"):
        numbabn.BatchNorm(3, dtype="foo")
    with pytest.raises(TypeError, match="num_features must be an int >= 1, got float 3.0"):
        numbabn.BatchNorm(3.0)


def test_load_state_dict_casts_like_pytorch():
    """PyTorch's copy_ casts integer values and float counters; parameters need no detach."""
    tb = torch.nn.BatchNorm1d(3)
    state = {
        "weight": torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0])),
        "bias": np.array([1, 0, -1], np.int64),
        "running_mean": np.array([0, 1, 2], np.int32),
        "running_var": torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64),
        "num_batches_tracked": np.array(5.0),
    }
    tb.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    bn = numbabn.BatchNorm(3)
    bn.load_state_dict(state)
    for key, value in tb.state_dict().items():
        np.testing.assert_array_equal(getattr(bn, key), value.numpy())
    assert bn.weight.dtype == np.float32 and bn.num_batches_tracked == 5


def test_empty_batch_in_training_matches_pytorch():
    """An empty batch: an empty output, running statistics untouched, the counter advanced."""
    tb = torch.nn.BatchNorm1d(3)
    bn = numbabn.BatchNorm(3)
    x = np.zeros((0, 3), np.float32)
    ty = tb(torch.from_numpy(x))
    y = bn(x)
    assert y.shape == tuple(ty.shape) == (0, 3)
    for key, value in tb.state_dict().items():
        np.testing.assert_array_equal(np.asarray(getattr(bn, key)), value.numpy())

    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, invstd = numbabn.batch_norm_forward(x, None, None, rm, rv)
    assert y.shape == (0, 3) and np.isnan(mean).all() and np.isnan(invstd).all()
    assert_bitwise(rm, np.zeros(3, np.float32))
    assert_bitwise(rv, np.ones(3, np.float32))


def test_backward_follows_input_memory_order(rng):
    """A Fortran-ordered input with a C-ordered grad_output: grad_input is Fortran-ordered
    (only grad_output is copied) and exact."""
    x = np.asfortranarray(make_input(rng, (5, 4, 70), 1, np.float32))
    g = np.ascontiguousarray(rng.standard_normal(x.shape).astype(np.float32))
    _, mean, invstd = numbabn.batch_norm_forward(x)
    gi = numbabn.batch_norm_backward(g, x, None, mean, invstd)[0]
    expected = reference.backward(g, x, None, mean, invstd, True, 1)[0]
    assert gi.flags.f_contiguous and not gi.flags.c_contiguous
    assert_close(gi, expected, np.float32)


def test_decay_is_keras_spelling_of_momentum(rng):
    """``decay=0.9`` (Keras/Flax) is ``momentum=0.1`` (PyTorch): same running statistics."""
    x = make_input(rng, (8, 3, 5), 1, np.float32)
    a, b = numbabn.BatchNorm(3, decay=0.9), numbabn.BatchNorm(3, momentum=0.1)
    a(x)
    b(x)
    np.testing.assert_allclose(a.running_mean, b.running_mean, rtol=1e-6)
    np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-6)
    assert a.decay == pytest.approx(0.9) and b.decay == pytest.approx(0.9)
    assert numbabn.BatchNorm(3, momentum=None).decay is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": 0.2, "decay": 0.9}, ValueError, "give momentum .* or decay .*, not both"),
        ({"decay": 1.5}, ValueError, r"decay must be in \[0, 1\] \(the weight of the running statistics\), got 1.5"),
        ({"decay": "0.9"}, TypeError, r"decay must be a float in \[0, 1\], got str"),
    ],
)
def test_decay_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        numbabn.BatchNorm(3, **kwargs)


def test_numbabn_dask_loads_on_first_use():
    """``numbabn.dask`` after ``import numbabn`` alone, as the docs show it."""
    import subprocess
    import sys

    code = (
        "import sys, numbabn; assert 'dask' not in sys.modules; "
        "import dask.array as da, numpy as np; "
        "x = da.from_array(np.arange(32.0).reshape(8, 4), chunks=4); "
        "assert numbabn.dask.welford(x).count == 8; print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr
