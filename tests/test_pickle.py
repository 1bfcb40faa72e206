"""BatchNorm and Stats survive pickle and deepcopy with their state; the Stats payload
round-trips; a strided grad_output beside an F-ordered input is copied once."""

import copy
import pickle

import numpy as np
import pytest

import numbabn


def _trained(rng, **kw):
    bn = numbabn.BatchNorm(4, **kw)
    for _ in range(3):
        x = rng.normal(2.0, 3.0, (16, 4, 5)).astype(np.float32)
        bn.backward(bn(x))
    return bn


STATE = ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias", "update_threshold")


@pytest.mark.parametrize("kw", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}])
@pytest.mark.parametrize(
    "clone", [lambda bn: pickle.loads(pickle.dumps(bn)), copy.deepcopy], ids=["pickle", "deepcopy"]
)
def test_layer_state_survives_and_training_continues_alike(rng, kw, clone):
    bn = _trained(rng, **kw)
    twin = clone(bn)
    assert repr(twin) == repr(bn)
    assert twin.num_batches_tracked == bn.num_batches_tracked
    for name in STATE:
        a, b = getattr(bn, name), getattr(twin, name)
        if a is None:
            assert b is None, name
        else:
            assert b is not a, name  # a copy, not the same buffer
            np.testing.assert_array_equal(b, a, err_msg=name)
    # The last forward's saved input is not carried: backward needs a new forward.
    with pytest.raises(RuntimeError, match="forward pass first"):
        twin.backward(np.ones((16, 4, 5), np.float32))
    x = rng.normal(size=(8, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(twin(x), bn(x))
    if bn.running_mean is not None:
        np.testing.assert_array_equal(twin.running_mean, bn.running_mean)
        np.testing.assert_array_equal(twin.running_var, bn.running_var)


def test_deepcopy_is_independent(rng):
    bn = _trained(rng)
    twin = copy.deepcopy(bn)
    before = twin.running_mean.copy()
    bn(rng.normal(size=(8, 4, 5)).astype(np.float32))
    np.testing.assert_array_equal(twin.running_mean, before)
    assert twin.num_batches_tracked == 3 and bn.num_batches_tracked == 4


def test_decay_layer_pickles_with_its_momentum():
    bn = numbabn.BatchNorm(2, decay=0.9)
    twin = pickle.loads(pickle.dumps(bn))
    assert twin.momentum == pytest.approx(0.1) and twin.decay == pytest.approx(0.9)


def test_stats_pickle_and_payload(rng):
    x = rng.normal(5.0, 2.0, (32, 3, 7))
    s = numbabn.welford(x)
    for t in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s), numbabn.Stats.from_array(s.to_array())):
        assert type(t) is numbabn.Stats and t.count == s.count
        np.testing.assert_array_equal(t.mean, s.mean)
        np.testing.assert_array_equal(t.m2, s.m2)
    payload = s.to_array()
    assert payload.dtype == np.float64 and payload.shape == (7,)
    assert payload[0] == 32 * 7
    np.testing.assert_array_equal(payload[1:4], s.mean)
    np.testing.assert_array_equal(payload[4:], s.m2)
    payload[1] = -1.0  # from_array copies: the Stats do not alias the payload
    assert numbabn.Stats.from_array(s.to_array()).mean[0] == s.mean[0]


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(4), "length 2 C \\+ 1"),
        (np.zeros((3, 1)), "1-d float64"),
        (np.zeros(3, np.float32), "float64"),
        (np.array([-1.0, 0.0, 0.0]), "integer >= 0"),
        (np.array([1.5, 0.0, 0.0]), "integer >= 0"),
        (np.array([np.inf, 0.0, 0.0]), "integer >= 0"),
    ],
)
def test_stats_from_array_refuses_bad_payloads(bad, match):
    with pytest.raises(ValueError, match=match):
        numbabn.Stats.from_array(bad)


@pytest.mark.parametrize(
    "count, mean, m2, match",
    [
        (4, np.zeros(3), np.ones(1), r"stats.mean and .m2 must both have shape \(C,\), got \(3,\) and \(1,\)"),
        (4, np.zeros(3), np.float64(1.0), r"must both have shape \(C,\), got \(3,\) and \(\)"),
        (4, np.zeros((1, 3)), np.zeros((1, 3)), r"must both have shape \(C,\), got \(1, 3\)"),
        (-1, np.zeros(3), np.zeros(3), "stats.count must be an integer >= 0, got -1"),
        (1.5, np.zeros(3), np.zeros(3), "stats.count must be an integer >= 0, got 1.5"),
        (float("nan"), np.zeros(3), np.zeros(3), "stats.count must be an integer >= 0, got nan"),
    ],
    ids=["shapes differ", "0-d m2", "2-d", "negative count", "fractional count", "nan count"],
)
def test_stats_to_array_refuses_malformed_stats(count, mean, m2, match):
    with pytest.raises(ValueError, match=match):
        numbabn.Stats(count, mean, m2).to_array()


def test_strided_grad_output_with_fortran_input_is_copied_once(rng, monkeypatch):
    x = np.asfortranarray(rng.normal(size=(6, 3, 8)))
    g = rng.normal(size=(6, 3, 16))[:, :, ::2]  # neither C- nor F-contiguous
    y, mean, invstd = numbabn.batch_norm_forward(x)
    expected = numbabn.batch_norm_backward(np.asfortranarray(g), x, None, mean, invstd)
    copies = []
    real_c, real_f = np.ascontiguousarray, np.asfortranarray

    def counting(real):
        def f(a, *args, **kw):
            if isinstance(a, np.ndarray) and a.shape == g.shape and np.shares_memory(a, g):
                copies.append(real.__name__)
            return real(a, *args, **kw)

        return f

    monkeypatch.setattr(np, "ascontiguousarray", counting(real_c))
    monkeypatch.setattr(np, "asfortranarray", counting(real_f))
    got = numbabn.batch_norm_backward(g, x, None, mean, invstd)
    assert copies == ["asfortranarray"]  # one copy, straight into x's memory order
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
