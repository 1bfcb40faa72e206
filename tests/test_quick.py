"""The common host forward's quick path (numbabn.cpu.quick): taken for the common call, bit
for bit the general path's results, and never a way around a check: each argument that is
not in its common form, on a call whose input facts and per-channel arrays are remembered,
still gets the general path's error with nothing written."""

import numpy as np
import pytest
from conftest import assert_bitwise
from hypothesis import event, given, settings
from hypothesis import strategies as st

import numbabn
from numbabn import _call

LAYOUTS = [((32, 64), 1), ((8, 6, 5, 5), 1), ((4, 5, 5, 6), -1), ((16, 3, 40), 1)]


def _general(monkeypatch, stage="forward"):
    """Make every call of ``stage`` ("forward" or "backward") take the general path."""
    monkeypatch.setattr(_call, f"quick_{stage}", lambda *args: None)


def _no_general(monkeypatch, stage="forward"):
    """Make the general path of ``stage`` fail, so a call that passes took the quick path."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the general {stage} ran")

    monkeypatch.setattr(_call, f"{stage}_call", refuse)


def _every_case(test):
    """Parametrize ``test`` over every layout, dtype, mode, memory order and affine setting."""
    cases = [
        ("shape,axis", LAYOUTS),
        ("dtype", [np.float32, np.float64, np.float16]),
        ("training", [True, False]),
        ("order", ["C", "F"]),
        ("affine", [True, False]),
    ]
    for names, values in reversed(cases):
        test = pytest.mark.parametrize(names, values)(test)
    return test


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    c = shape[axis]
    pdt = np.float32 if dtype == np.float16 else dtype
    params = [rng.standard_normal(c).astype(pdt) for _ in range(2)]
    stats = [rng.standard_normal(c).astype(pdt), rng.uniform(0.5, 2, c).astype(pdt)]
    return x, params, stats


@_every_case
def test_quick_path_gives_the_general_path_bits(shape, axis, dtype, training, order, affine, monkeypatch):
    x, (w, b), (rm, rv) = _data(shape, axis, dtype)
    x = np.asarray(x, order=order)
    if not affine:
        w = b = None
    rm2, rv2 = rm.copy(), rv.copy()
    numbabn.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training=training, axis=axis)  # facts known
    with monkeypatch.context() as m:
        _no_general(m)
        quick = numbabn.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis, momentum=0.3)
        fn = numbabn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, axis=axis, momentum=0.3)
    with monkeypatch.context() as m:
        _general(m)
        general = numbabn.batch_norm_forward(x, w, b, rm2, rv2, training=training, axis=axis, momentum=0.3)
    for a, e in zip(quick, general, strict=True):
        assert_bitwise(a, e)
    assert_bitwise(fn, general[0])
    assert_bitwise(rm, rm2)
    assert_bitwise(rv, rv2)


def _out_cases(test):
    """Parametrize ``test`` over layouts, dtypes, modes, memory orders and where ``out`` is."""
    cases = [
        ("shape,axis", LAYOUTS),
        ("dtype", [np.float32, np.float16]),
        ("training", [True, False]),
        ("order", ["C", "F"]),
    ]
    for names, values in reversed(cases):
        test = pytest.mark.parametrize(names, values)(test)
    return test


@_out_cases
@pytest.mark.parametrize("where", ["new", "input"])
def test_quick_path_writes_out_with_the_general_path_bits(shape, axis, dtype, training, order, where, monkeypatch):
    x, (w, b), (rm, rv) = _data(shape, axis, dtype)
    x = np.asarray(x, order=order)
    numbabn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, axis=axis)  # facts known
    with monkeypatch.context() as m:
        _general(m)
        expected = numbabn.batch_norm_forward(
            x.copy(order="K"), w, b, rm.copy(), rv.copy(), training=training, axis=axis
        )
    rm2, rv2 = rm.copy(), rv.copy()
    xq = x.copy(order="K")
    out = xq if where == "input" else np.full_like(x, np.nan)
    with monkeypatch.context() as m:
        _no_general(m)
        got = numbabn.batch_norm_forward(xq, w, b, rm, rv, training=training, axis=axis, out=out)
        assert got[0] is out
        out2 = np.full_like(x, np.nan)
        again = numbabn.batch_norm(x, rm2, rv2, w, b, training=training, axis=axis, out=out2)  # remembered
        assert again is out2
    for a, e in zip(got, expected, strict=True):
        assert_bitwise(a, e)
    assert_bitwise(out2, expected[0])
    assert_bitwise(rm, rm2)
    assert_bitwise(rv, rv2)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
def test_layer_quick_path_keeps_the_layer_state(momentum, track, monkeypatch):
    x, _, _ = _data((32, 64), 1, np.float32)
    layers = [numbabn.BatchNorm(64, momentum=momentum, track_running_stats=track) for _ in range(2)]
    for layer in layers:
        layer(x)  # facts known
    with monkeypatch.context() as m:
        _no_general(m)
        ys = [layers[0](x * 2), layers[0].eval()(x)]
    with monkeypatch.context() as m:
        _general(m)
        expected = [layers[1](x * 2), layers[1].eval()(x)]
    for a, e in zip(ys, expected, strict=True):
        assert_bitwise(a, e)
    assert layers[0].state_dict().keys() == layers[1].state_dict().keys()
    for key, value in layers[0].state_dict().items():
        assert_bitwise(value, layers[1].state_dict()[key])
    g = np.ones_like(x)
    assert_bitwise(layers[0].backward(g), layers[1].backward(g))
    assert_bitwise(layers[0].grad_weight, layers[1].grad_weight)


def test_subclasses_that_change_the_call_do_not_take_it():
    from numbabn.renorm import BatchRenorm
    from numbabn.sync import SyncBatchNorm

    assert numbabn.BatchNorm._QUICK
    assert not BatchRenorm._QUICK
    assert not SyncBatchNorm._QUICK

    class Plain(numbabn.BatchNorm):
        pass

    assert Plain._QUICK


def _remembered(x, rm, rv, w=None, b=None):
    """One common training call, so the input's facts and this set of per-channel arrays are
    remembered by the quick path."""
    numbabn.batch_norm(x, rm, rv, w, b, training=True)


def test_an_input_over_remembered_running_statistics_is_refused():
    x0, _, (rm, rv) = _data((8, 16), 1, np.float32)
    buf = np.zeros(16 * 9, np.float32)
    rm = buf[:16]
    rm[:] = 0.5
    _remembered(x0, rm, rv)  # rm, rv remembered as disjoint
    x = buf[8:136].reshape(8, 16)  # overlaps rm's last 8 values
    x[...] = x0
    before = rm.copy(), rv.copy()
    with pytest.raises(ValueError, match="running_mean and input must not share memory"):
        numbabn.batch_norm(x, rm, rv, training=True)
    assert_bitwise(rm, before[0])
    assert_bitwise(rv, before[1])


def test_a_view_of_the_same_shape_is_not_taken_for_the_contiguous_input():
    x, _, (rm, rv) = _data((8, 16), 1, np.float32)
    _remembered(x, rm.copy(), rv.copy())
    big = np.repeat(x, 2, axis=1)
    view = big[:, ::2]  # x's shape and values, other strides
    assert view.shape == x.shape and not view.flags.c_contiguous
    assert_bitwise(numbabn.batch_norm(view, rm, rv), numbabn.batch_norm(x, rm, rv))


def _bad_calls(x, rm, rv, w, b):
    """``(call, error type, message)``: calls whose one argument leaves the common form."""
    ro = rm.copy()
    ro.flags.writeable = False
    return [
        (lambda: numbabn.batch_norm(x, ro, rv, w, b, training=True), ValueError, "running_mean must be writable"),
        (lambda: numbabn.batch_norm(x, rm, rm, w, b, training=True), ValueError, "must not share memory"),
        (lambda: numbabn.batch_norm(x, rm, rv, rv, b, training=True), ValueError, "must not share memory"),
        (lambda: numbabn.batch_norm(x, rm, rv, w.astype(np.float64), b, training=True), TypeError, "weight"),
        (lambda: numbabn.batch_norm(x, rm, rv, w[:-1], b, training=True), ValueError, "weight must have shape"),
        (lambda: numbabn.batch_norm(x, rm, None, w, b, training=True), ValueError, "running_var=None"),
        (lambda: numbabn.batch_norm(x, None, None, w, b, training=False), ValueError, "required in eval"),
        (lambda: numbabn.batch_norm(x, rm, rv, w, b, training="yes"), TypeError, "training must be a bool"),
        (lambda: numbabn.batch_norm(x, rm, rv, w, b, training=True, momentum=1.5), ValueError, "momentum"),
        (lambda: numbabn.batch_norm(x, rm, rv, w, b, training=True, eps=-1.0), ValueError, "eps"),
        (lambda: numbabn.batch_norm(x, rm, rv, w, b, training=True, eps=float("nan")), ValueError, "eps"),
        (lambda: numbabn.batch_norm(x[:1], rm, rv, w, b, training=True), ValueError, "more than 1 value"),
        (lambda: numbabn.batch_norm(x, rm, rv, w, b, training=True, axis=2), ValueError, "axis"),
        (lambda: numbabn.batch_norm(x, rm, rv, w, b, training=True, axis=True), TypeError, "axis must be an int"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_arguments_after_remembered_calls_still_raise_and_write_nothing(case):
    x, (w, b), (rm, rv) = _data((8, 16), 1, np.float32)
    _remembered(x, rm, rv, w, b)
    _remembered(x[:1].repeat(2, 0), rm, rv, w, b)  # x[:1]'s shape is not remembered: (2, 16) is
    call, error, message = _bad_calls(x, rm, rv, w, b)[case]
    before = [a.copy() for a in (x, rm, rv, w, b)]
    with pytest.raises(error, match=message):
        call()
    for a, e in zip((x, rm, rv, w, b), before, strict=True):
        assert_bitwise(a, e)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_an_out_over_a_per_channel_array_is_refused(name, training):
    x, (w, b), (rm, rv) = _data((8, 16), 1, np.float32)
    arrays = {"running_mean": rm, "running_var": rv, "weight": w, "bias": b}
    numbabn.batch_norm(x, **arrays, training=training, out=np.empty_like(x))  # remembered with an out
    buf = np.zeros(8 * 16 + 8, np.float32)
    buf[:16] = arrays[name]
    arrays[name] = buf[:16]
    out = buf[8:136].reshape(8, 16)  # over the per-channel array's last 8 values
    before = [a.copy() for a in (x, buf, *arrays.values())]
    with pytest.raises(ValueError, match=f"(out and {name}|{name} and out) must not share memory"):
        numbabn.batch_norm(x, **arrays, training=training, out=out)
    for a, e in zip((x, buf, *arrays.values()), before, strict=True):
        assert_bitwise(a, e)


@pytest.mark.parametrize("name", ["weight", "save_mean", "save_invstd"])
def test_a_backward_out_over_a_per_channel_array_is_refused(name):
    x, (w, _), (rm, rv) = _data((8, 16), 1, np.float64)
    g = np.ones_like(x)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, None, rm, rv)
    arrays = {"weight": w, "save_mean": mean, "save_invstd": invstd}
    numbabn.batch_norm_backward(g, x, *arrays.values(), out=np.empty_like(x))  # remembered with an out
    buf = np.zeros(8 * 16 + 8)
    buf[:16] = arrays[name]
    arrays[name] = buf[:16]
    out = buf[8:136].reshape(8, 16)
    before = [a.copy() for a in (g, x, buf)]
    with pytest.raises(ValueError, match=f"(out and {name}|{name} and out) must not share memory"):
        numbabn.batch_norm_backward(g, x, *arrays.values(), out=out)
    for a, e in zip((g, x, buf), before, strict=True):
        assert_bitwise(a, e)


def test_layer_with_a_bad_count_or_parameter_after_quick_calls_raises():
    x, _, _ = _data((32, 64), 1, np.float32)
    bn = numbabn.BatchNorm(64)
    bn(x)
    bn(x)
    state = bn.state_dict()
    bn.num_batches_tracked = -1
    with pytest.raises(ValueError, match="num_batches_tracked must be an int >= 0"):
        bn(x)
    bn.num_batches_tracked = 2
    bn.weight = bn.running_mean  # the update would write what the output reads
    with pytest.raises(ValueError, match="running_mean and weight must not share memory"):
        bn(x)
    for key, value in bn.state_dict().items():
        if key != "weight":
            assert_bitwise(value, state[key])


@_every_case
def test_quick_backward_gives_the_general_path_bits(shape, axis, dtype, training, order, affine, monkeypatch):
    x, (w, b), (rm, rv) = _data(shape, axis, dtype)
    x = np.asarray(x, order=order)
    g = np.asarray(np.random.default_rng(1).standard_normal(shape).astype(dtype), order=order)
    if not affine:
        w = b = None
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis)
    with monkeypatch.context() as m:
        _no_general(m, "backward")
        quick = numbabn.batch_norm_backward(g, x, w, mean, invstd, training=training, axis=axis)
    with monkeypatch.context() as m:
        _general(m, "backward")
        general = numbabn.batch_norm_backward(g, x, w, mean, invstd, training=training, axis=axis)
    for a, e in zip(quick, general, strict=True):
        assert_bitwise(a, e)


@_out_cases
@pytest.mark.parametrize("where", ["new", "grad_output", "input"])
def test_quick_backward_writes_out_with_the_general_path_bits(shape, axis, dtype, training, order, where, monkeypatch):
    x, (w, _), (rm, rv) = _data(shape, axis, dtype)
    x = np.asarray(x, order=order)
    g = np.asarray(np.random.default_rng(1).standard_normal(shape).astype(dtype), order=order)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, None, rm, rv, training=training, axis=axis)
    with monkeypatch.context() as m:
        _general(m, "backward")
        expected = numbabn.batch_norm_backward(g, x, w, mean, invstd, training=training, axis=axis)
    g, x = g.copy(order="K"), x.copy(order="K")
    out = {"new": np.full_like(x, np.nan), "grad_output": g, "input": x}[where]
    with monkeypatch.context() as m:
        _no_general(m, "backward")
        got = numbabn.batch_norm_backward(g, x, w, mean, invstd, training=training, axis=axis, out=out)
    assert got[0] is out
    for a, e in zip(got, expected, strict=True):
        assert_bitwise(a, e)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_quick_backward_keeps_the_layer_gradients(affine, monkeypatch):
    x, _, _ = _data((32, 64), 1, np.float32)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    layers = [numbabn.BatchNorm(64, affine=affine) for _ in range(2)]
    for layer in layers:
        layer(x)
    with monkeypatch.context() as m:
        _no_general(m, "backward")
        quick = layers[0].backward(g)
    with monkeypatch.context() as m:
        _general(m, "backward")
        general = layers[1].backward(g)
    assert_bitwise(quick, general)
    for name in ("grad_weight", "grad_bias", "update_threshold", "grad_residual"):
        a, e = getattr(layers[0], name), getattr(layers[1], name)
        assert (a is None) == (e is None), name
        if a is not None:
            assert_bitwise(a, e)


def test_a_gradient_in_the_other_memory_order_takes_the_general_path(monkeypatch):
    x, _, (rm, rv) = _data((16, 8), 1, np.float32)
    g = np.asfortranarray(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))
    _, mean, invstd = numbabn.batch_norm_forward(x, None, None, rm, rv)
    expected = numbabn.batch_norm_backward(np.ascontiguousarray(g), x, None, mean, invstd)
    calls = []
    real = _call.backward_call
    monkeypatch.setattr(_call, "backward_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = numbabn.batch_norm_backward(g, x, None, mean, invstd)
    assert calls == [1]
    for a, e in zip(got, expected, strict=True):
        assert_bitwise(a, e)


def _bad_backward_calls(g, x, w, mean, invstd):
    return [
        (lambda: numbabn.batch_norm_backward(g[:-1], x, w, mean, invstd), ValueError, "grad_output must have shape"),
        (lambda: numbabn.batch_norm_backward(g.astype(np.float64), x, w, mean, invstd), TypeError, "grad_output"),
        (lambda: numbabn.batch_norm_backward(g, x, w.astype(np.float64), mean, invstd), TypeError, "weight"),
        (lambda: numbabn.batch_norm_backward(g, x, w, mean[:-1], invstd), ValueError, "save_mean must have shape"),
        (lambda: numbabn.batch_norm_backward(g, x, w, mean, None), ValueError, "save_invstd"),
        (lambda: numbabn.batch_norm_backward(g, x, w, mean, invstd, training=2), TypeError, "training must be a bool"),
        (lambda: numbabn.batch_norm_backward(g.tolist(), x, w, mean, invstd), TypeError, "grad_output"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_backward_arguments_after_quick_calls_still_raise(case):
    x, (w, b), (rm, rv) = _data((8, 16), 1, np.float32)
    g = np.ones_like(x)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, rm, rv)
    numbabn.batch_norm_backward(g, x, w, mean, invstd)  # a quick call first
    call, error, message = _bad_backward_calls(g, x, w, mean, invstd)[case]
    with pytest.raises(error, match=message):
        call()


# -- the quick path never changes an outcome ---------------------------------------------------
# Each argument of a forward is drawn from its common form and from forms the quick path must
# hand to the general one; the same call runs with the quick path and without it, on fresh
# copies, and must give the same bits, or the same error, and leave every array the same.

X_FORMS = ["c", "f", "strided", "float64", "float16", "list", "1d"]
PARAM_FORMS = ["none", "plain", "float64", "strided", "short", "read-only", "list"]
STAT_FORMS = ["none", "plain", "read-only", "strided", "float64", "view-of-x", "same"]
TRAINING = [True, False, 1, np.bool_(True), "yes"]
MOMENTA = [0.1, 1.0, np.float64(0.1), 1.5, None]
EPSILONS = [1e-5, 0.0, -1.0, float("nan")]
AXES = [1, -1, np.int64(1), True, 5]
OUT_FORMS = ["none", "plain", "input", "f", "strided", "read-only", "float64", "overlap-x", "unaligned", "list"]


def _draw_x(form, rng):
    x = (rng.standard_normal((16, 8)) * 2 + 3).astype(np.float32)
    buf = np.zeros(16 * 8 + 8, np.float32)  # x's memory for "view-of-x" running statistics
    if form == "c":
        buf[:128] = x.ravel()
        return buf[:128].reshape(16, 8), buf
    if form == "f":
        return np.asfortranarray(x), buf
    if form == "strided":
        return np.repeat(x, 2, axis=1)[:, ::2], buf
    if form == "float64":
        return x.astype(np.float64), buf
    if form == "float16":
        return x.astype(np.float16), buf
    if form == "list":
        return x.tolist(), buf
    return x[0], buf  # 1-d


def _draw_per_channel(form, fill, rng, buf):
    a = (fill + 0.1 * rng.standard_normal(8)).astype(np.float32)
    if form == "none":
        return None
    if form in ("plain", "same"):
        return a
    if form == "float64":
        return a.astype(np.float64)
    if form == "strided":
        return np.repeat(a, 2)[::2]
    if form == "short":
        return a[:-1]
    if form == "read-only":
        a.flags.writeable = False
        return a
    if form == "view-of-x":
        return buf[120:128]  # x's last row where x is a view of buf
    return a.tolist()


def _draw_out(form, x, buf):
    """``out`` for the input ``x`` (of ``_draw_x``'s (16, 8) float32 values in ``buf``)."""
    shape = (16, 8)
    if form == "none":
        return None
    if form == "input":
        return x
    if form == "f":
        return np.full(shape, np.nan, np.float32, order="F")
    if form == "strided":
        return np.full((16, 16), np.nan, np.float32)[:, ::2]
    if form == "read-only":
        out = np.full(shape, np.nan, np.float32)
        out.flags.writeable = False
        return out
    if form == "float64":
        return np.full(shape, np.nan)
    if form == "overlap-x":
        return buf[8:136].reshape(shape)  # all of x's rows but the first, where x is a view of buf
    if form == "unaligned":
        return np.frombuffer(np.zeros(16 * 8 * 4 + 1, np.uint8)[1:].data, np.float32).reshape(shape)
    if form == "list":
        return np.full(shape, np.nan).tolist()
    return np.full(shape, np.nan, np.float32)


def _outcome(call):
    try:
        return "ok", call()
    except Exception as e:  # compared between the two paths, type and message
        return type(e).__name__, str(e)


COMMON = ("c", "plain", "plain", "plain", "plain", True, 0.1, 1e-5, 1, "none")
MENUS = (X_FORMS, PARAM_FORMS, PARAM_FORMS, STAT_FORMS, STAT_FORMS, TRAINING, MOMENTA, EPSILONS, AXES, OUT_FORMS)


@st.composite
def calls(draw):
    """Every argument in its common form but up to two, drawn from their menus."""
    args = list(COMMON)
    for i in draw(st.sets(st.integers(0, len(COMMON) - 1), max_size=2)):
        args[i] = draw(st.sampled_from(MENUS[i]))
    return args


@settings(max_examples=300, deadline=None)
@given(calls(), st.booleans())
def test_the_quick_path_changes_no_outcome(args, functional):
    xf, wf, bf, rmf, rvf, training, momentum, eps, axis, outf = args

    def run(quick):
        rng = np.random.default_rng(7)
        x, buf = _draw_x(xf, rng)
        w, b = _draw_per_channel(wf, 1.0, rng, buf), _draw_per_channel(bf, 0.0, rng, buf)
        rm = _draw_per_channel(rmf, 0.0, rng, buf)
        rv = rm if rvf == "same" else _draw_per_channel(rvf, 1.0, rng, buf)
        out = _draw_out(outf, x, buf)
        arrays = [a for a in (x, w, b, rm, rv, out, buf) if isinstance(a, np.ndarray)]
        if functional:
            call = lambda: numbabn.batch_norm_forward(  # noqa: E731
                x, w, b, rm, rv, training=training, momentum=momentum, eps=eps, axis=axis, out=out
            )
        else:
            call = lambda: numbabn.batch_norm(x, rm, rv, w, b, training, momentum, eps, axis=axis, out=out)  # noqa: E731
        numbabn.batch_norm(np.ones((16, 8), np.float32) * np.arange(16)[:, None], None, None, training=True)
        taken = []
        real = _call.quick_forward
        with pytest.MonkeyPatch.context() as m:
            if quick:
                m.setattr(_call, "quick_forward", lambda *args: taken.append(real(*args)) or taken[-1])
            else:
                m.setattr(_call, "quick_forward", lambda *args: None)
            kind, value = _outcome(call)
        if quick:
            event("quick path taken" if any(t is not None for t in taken) else "general path")
        return kind, value, [a.copy() for a in arrays]

    quick, general = run(True), run(False)
    assert quick[0] == general[0], (quick[:2], general[:2])
    if quick[0] == "ok":
        results = [r if isinstance(r, tuple) else (r,) for r in (quick[1], general[1])]
        for a, e in zip(*results, strict=True):
            assert_bitwise(a, e)
    else:
        assert quick[1] == general[1]
    for a, e in zip(quick[2], general[2], strict=True):
        assert_bitwise(a, e)
