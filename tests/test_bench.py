"""The benchmark machinery (``numbabn._backends``, ``numbabn._bench``, ``python -m numbabn
bench``, the asv helpers) run in-process on tiny shapes.  No assertion here is about speed:
timings on shared machines are noise; what is checked is that every number exists, is
positive and finite, and that the plain-NumPy contender computes batch norm correctly."""

import io
import json
import math
import pathlib
import sys

import numpy as np
import pytest
import reference
from conftest import assert_close, by_tag, dtype_params, layout_params, make_input, make_params

from numbabn import __main__ as cli
from numbabn import _backends, _bench

TINY_SHAPES = [((4, 8, 16), 1, "NCL"), ((3, 4, 4, 8), -1, "NHWC"), ((64, 16), 1, "NC")]
NUMPY_LAYOUTS = by_tag("NC", "NCHW", "NHWC", "axis0", "NC-many-rows")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("lay", layout_params(NUMPY_LAYOUTS))
def test_numpy_backend_agrees_with_the_oracle(rng, lay, dtype):
    x = make_input(rng, lay.shape, lay.axis, dtype)
    g = rng.standard_normal(lay.shape).astype(dtype)
    w, b, rm, rv = make_params(rng, lay.channels, dtype)
    for training in (True, False):
        ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(
            x, w, b, rm, rv, training, _backends.MOMENTUM, _backends.EPS, lay.axis
        )
        got_rm, got_rv = rm.copy(), rv.copy()
        y, mean, invstd = _backends.numpy_forward(x, w, b, got_rm, got_rv, training, axis=lay.axis)
        assert_close(y, ref_y, dtype)
        assert_close(mean, ref_mean, dtype)
        assert_close(invstd, ref_invstd, dtype)
        assert_close(got_rm, ref_rm, dtype)
        assert_close(got_rv, ref_rv, dtype)
    _, mean, var = reference.stats(x, lay.axis)
    got_mean, got_var = _backends.numpy_stats(x, lay.axis)
    assert_close(got_mean, mean, dtype)
    assert_close(got_var, var, dtype)
    _, mean, invstd, _, _ = reference.forward(x, w, b, None, None, True, 0.1, _backends.EPS, lay.axis)
    for got, want in zip(
        _backends.numpy_backward(g, x, w, mean, invstd, axis=lay.axis),
        reference.backward(g, x, w, mean, invstd, True, lay.axis),
        strict=True,
    ):
        assert_close(got, want, dtype, rtol=1e-4 if dtype == np.float32 else None)


@pytest.mark.parametrize("name", ["numbabn", "numpy", "torch"])
@pytest.mark.parametrize("shape, axis, label", TINY_SHAPES)
def test_cpu_backends_pass_their_check(name, shape, axis, label):
    backend = _backends.BACKENDS[name]
    if backend.unavailable():
        pytest.skip(backend.unavailable())
    case = _backends.Case(shape, axis, np.float32, label)
    stages = backend.prepare(case)
    assert set(stages) == set(_backends.STAGES)
    _backends.check(backend, stages, case)


def test_numbabn_cuda_stages_pass_their_check():
    """The GPU entry against numbabn's GPU API: in numba's CUDA simulator (as the tests run by
    default), or on a real GPU with NUMBA_ENABLE_CUDASIM=0."""
    from numba import cuda

    if not cuda.config.ENABLE_CUDASIM and _backends.cuda_unavailable() is not None:
        pytest.skip(_backends.cuda_unavailable())
    backend = _backends.BACKENDS["numbabn-cuda"]
    case = _backends.Case((4, 8, 16), 1, np.float32)
    stages = backend.prepare(case)
    assert set(stages) == set(_backends.STAGES) - {"ema"}
    _backends.check(backend, stages, case)


def test_check_catches_a_wrong_result():
    case = _backends.Case((4, 8, 16), 1, np.float64)
    backend = _backends.BACKENDS["numpy"]
    stages = backend.prepare(case)
    eval_ = stages["eval"]
    with pytest.raises(AssertionError, match="numpy eval"):
        _backends.check(backend, {"eval": lambda: eval_() * (1 + 1e-6)}, case)


def test_cuda_entries_are_registered_and_skip_cleanly():
    for name in ("numbabn-cuda", "torch-cuda"):
        assert _backends.BACKENDS[name].device == "gpu"
    reason = _backends.cuda_unavailable()
    if reason is not None:
        assert _backends.BACKENDS["numbabn-cuda"] not in _backends.available()


def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(_bench, "QUICK_SHAPES", TINY_SHAPES)
    monkeypatch.setattr(_bench, "SWEEP_MB", (0.05, 0.2))


def _bench_json(capsys, *extra):
    assert cli.main(["bench", "--quick", "--json", "--budget", "0.01", *extra]) == 0
    out, err = capsys.readouterr()
    assert "self-check passed" in err  # people's output goes to stderr with --json
    return json.loads(out)


def test_bench_json(tiny, capsys):
    doc = _bench_json(capsys)
    assert {"machine", "bytes_per_element", "cases", "median_speedup", "skipped", "self_check"} <= set(doc)
    for key in ("numbabn", "cpu", "cores", "numba_threads", "numpy", "numba", "torch", "python"):
        assert key in doc["machine"]
    assert doc["bytes_per_element"]["train"] == 3 and doc["bytes_per_element"]["backward"] == 5
    assert [tuple(c["shape"]) for c in doc["cases"]] == [s for s, _, _ in TINY_SHAPES]
    expected = {"numbabn", "numpy"} | ({"torch"} if _backends._torch() else set())
    for case in doc["cases"]:
        assert set(case["backends"]) == expected
        assert _positive(case["copy_seconds"]["cpu"])
        for name, b in case["backends"].items():
            assert set(b["stages"]) == {"copy", *_bench.TABLE_STAGES}
            for stage, v in b["stages"].items():
                assert all(_positive(v[k]) for k in ("seconds", "GBps", "x_copy")), (name, stage, v)
                assert ("speedup" in v) == (name != "numbabn" and stage != "copy")
                assert "speedup" not in v or _positive(v["speedup"])
    assert set(doc["median_speedup"]) == expected - {"numbabn"}
    if _backends.cuda_unavailable() is not None:
        assert "numbabn-cuda" in doc["skipped"]


def test_bench_table(tiny, capsys):
    assert cli.main(["bench", "--quick", "--budget", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "x copy" in out and "median speed-up of numbabn on CPU" in out
    for shape, _, _ in TINY_SHAPES:
        assert str(shape) in out


def test_bench_plot(tiny, capsys, tmp_path):
    pytest.importorskip("matplotlib")  # in the test extra; optional elsewhere
    path = tmp_path / "bw.png"
    doc = _bench_json(capsys, "--plot", str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(doc["sweep"]) == 2


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "pip install 'numbabn[plot]'" in capsys.readouterr().err


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    pipe = io.StringIO()
    bar = _bench.Progress(4, pipe)
    bar.update(2, "half")
    bar.clear()
    assert pipe.getvalue() == ""
    tty = _Tty()
    bar = _bench.Progress(4, tty)
    bar.update(2, "half")
    assert tty.getvalue().startswith("\r[") and " 50% half" in tty.getvalue() and "\n" not in tty.getvalue()
    bar.clear()
    assert tty.getvalue().endswith("\r")


def test_interleaved_syncs_every_batch():
    calls = []
    t = _bench.interleaved({"a": lambda: calls.append("a")}, budget=0.001, sync={"a": lambda: calls.append("s")})
    assert _positive(t["a"]) and calls.count("s") >= 3 + 2  # min_rounds batches + warm-up + calibration
    assert calls[-1] == "s" and calls[0] == "a"


ASV = pathlib.Path(__file__).resolve().parents[1] / "asv_bench"


@pytest.fixture
def asv_benchmarks(monkeypatch):
    if not (ASV / "benchmarks").is_dir():
        pytest.skip("no asv_bench/ beside the tests")
    monkeypatch.syspath_prepend(str(ASV))
    for mod in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, mod)
    import benchmarks
    import benchmarks.batchnorm

    return benchmarks


def test_asv_grid_and_skips(asv_benchmarks):
    b = asv_benchmarks
    assert b.PARAM_NAMES == ["layout", "size", "dtype", "backend"]
    assert set(b.BACKENDS) == {"numbabn", "numpy", "torch", "cuda", "torch-cuda"}
    for layout in b.LAYOUTS:
        for size, n in b.SIZES.items():
            case = b.make_case(layout, size, "float32")
            assert case.size == n
    if _backends.cuda_unavailable() is not None:
        with pytest.raises(NotImplementedError):
            b.requires_cuda()
    suite = b.batchnorm
    for stage, name in suite.STAGES.items():
        cls, mem = getattr(suite, name), getattr(suite, name + "Memory")
        assert hasattr(cls, f"time_{stage}") and hasattr(mem, f"peakmem_{stage}")
        assert hasattr(cls, f"track_{stage}_over_copy") == (stage != "ema")
        assert not hasattr(mem, f"time_{stage}") and not hasattr(cls, f"peakmem_{stage}")


def test_asv_setup_checks_then_times(asv_benchmarks):
    suite = asv_benchmarks.batchnorm
    bench = suite.TrainingForward()
    bench.setup("NC", "small", "float32", "numpy")
    bench.time_train()
    assert _positive(float(bench.track_train_over_copy()))
    mem = suite.BackwardMemory()
    mem.setup("NHWC", "small", "float64", "numbabn")
    mem.peakmem_backward()


def test_asv_setup_fails_on_a_wrong_result(asv_benchmarks, monkeypatch):
    monkeypatch.setitem(_backends.TOL, np.dtype(np.float32), -1.0)  # nothing passes
    with pytest.raises(AssertionError, match="numbabn eval"):
        asv_benchmarks.batchnorm.EvalForward().setup("NCHW", "small", "float32", "numbabn")


# -- bench --floor ---------------------------------------------------------------------------------


def test_floor_json(capsys):
    from numbabn import _floor

    assert cli.main(["bench", "--floor", "--floor-mb", "2", "--budget", "0.05", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "targets met:" in err and "MB beyond input + output" in err
    doc = json.loads(out)["floor"]
    assert set(doc["beyond_cache"]) == {label for label, _, _ in _floor.LAYOUTS}
    for r in doc["beyond_cache"].values():
        assert set(r["seconds"]) == {"copy", "triad", "train", "eval", "backward"}
        assert all(_positive(r[k]) for k in ("train_over_copy", "eval_over_copy", "backward_over_triad"))
    assert set(doc["small"]) == {str(s) for s in _floor.SMALL}
    for r in doc["small"].values():
        assert _positive(r["seconds"]["numbabn"])
        assert ("small_speedup" in r) == (_backends._torch() is not None)
    assert list(doc["per_element"]["seconds_per_element"]) == ["1", "2"]  # JSON keys: MB
    assert doc["per_element"]["per_element_spread"] >= 1.0
    peak = doc["peak_memory"]
    assert peak["input_bytes"] == peak["output_bytes"] >= 2e6 and peak["extra_bytes"] >= 0
    # 13 figures with torch (3 layouts x 3, two small calls, spread, peak), 11 without
    assert len(doc["met"]) == 11 + 2 * (_backends._torch() is not None)
    assert all(isinstance(v, bool) for v in doc["met"].values())


def test_floor_goes_with_bench_alone(capsys):
    for argv in (["check", "--floor"], ["bench", "--floor", "--quick"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert "--floor goes with bench alone" in capsys.readouterr().err


def test_floor_triad_and_targets():
    from numbabn import _floor

    a, b = np.arange(1000.0), np.linspace(-1.0, 1.0, 1000)
    out = np.empty_like(a)
    _floor._triad(a, b, 0.5, out)
    np.testing.assert_array_equal(out, a + 0.5 * b)
    # a figure equal to its bound meets it; beyond it (either way) misses
    assert _floor._ok("train_over_copy", 1.25) and not _floor._ok("train_over_copy", 1.26)
    assert _floor._ok("small_speedup", 2.0) and not _floor._ok("small_speedup", 1.99)
    res = {"small": {"(1, 2)": {"seconds": {}, "small_speedup": 2.5}}, "per_element": {"per_element_spread": 1.4}}
    assert _floor.met(res) == {"(1, 2) small_speedup": True, "per_element_spread": False}
