"""The benchmark machinery (``numbabn.bench``: contenders, report, floor, self-check and the
command line; the asv helpers) run in-process on tiny shapes.  No assertion here is about
speed: timings on shared machines are noise; what is checked is that every number exists, is
positive, finite and consistent with its definition, that the plain-NumPy contender computes
batch norm correctly, and that the command line says what it does and fails when a check
fails."""

import importlib
import importlib.util
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import reference
from conftest import assert_close, by_tag, dtype_params, layout_params, make_input, make_params

import numbabn
from numbabn.bench import cases, check, cli, contenders, floor, report, timing, yardsticks

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
            x, w, b, rm, rv, training, cases.MOMENTUM, cases.EPS, lay.axis
        )
        got_rm, got_rv = rm.copy(), rv.copy()
        y, mean, invstd = contenders.numpy_forward(x, w, b, got_rm, got_rv, training, axis=lay.axis)
        assert_close(y, ref_y, dtype)
        assert_close(mean, ref_mean, dtype)
        assert_close(invstd, ref_invstd, dtype)
        assert_close(got_rm, ref_rm, dtype)
        assert_close(got_rv, ref_rv, dtype)
    _, mean, var = reference.stats(x, lay.axis)
    got_mean, got_var = contenders.numpy_stats(x, lay.axis)
    assert_close(got_mean, mean, dtype)
    assert_close(got_var, var, dtype)
    _, mean, invstd, _, _ = reference.forward(x, w, b, None, None, True, 0.1, cases.EPS, lay.axis)
    for got, want in zip(
        contenders.numpy_backward(g, x, w, mean, invstd, axis=lay.axis),
        reference.backward(g, x, w, mean, invstd, True, lay.axis),
        strict=True,
    ):
        assert_close(got, want, dtype, rtol=1e-4 if dtype == np.float32 else None)


@pytest.mark.parametrize("name", ["numbabn", "numpy", "torch"])
@pytest.mark.parametrize("shape, axis, label", TINY_SHAPES)
def test_cpu_backends_pass_their_check(name, shape, axis, label):
    backend = contenders.BACKENDS[name]
    if backend.unavailable():
        pytest.skip(backend.unavailable())
    case = cases.Case(shape, axis, np.float32, label)
    stages = backend.prepare(case)
    # numbabn's running-statistic update is fused into its training forward: no ema call
    assert set(stages) == set(cases.STAGES) - ({"ema"} if name == "numbabn" else set())
    contenders.check(backend, stages, case)


def test_numbabn_cuda_stages_pass_their_check():
    """The GPU entry against numbabn's GPU API: in numba's CUDA simulator (as the tests run by
    default), or on a real GPU with NUMBA_ENABLE_CUDASIM=0."""
    from numba import cuda

    if not cuda.config.ENABLE_CUDASIM and contenders.cuda_unavailable() is not None:
        pytest.skip(contenders.cuda_unavailable())
    backend = contenders.BACKENDS["numbabn-cuda"]
    case = cases.Case((4, 8, 16), 1, np.float32)
    stages = backend.prepare(case)
    assert set(stages) == set(cases.STAGES) - {"ema"}
    contenders.check(backend, stages, case)


def test_check_catches_a_wrong_result():
    case = cases.Case((4, 8, 16), 1, np.float64)
    backend = contenders.BACKENDS["numpy"]
    stages = backend.prepare(case)
    eval_ = stages["eval"]
    with pytest.raises(AssertionError, match="numpy eval"):
        contenders.check(backend, {"eval": lambda: eval_() * (1 + 1e-6)}, case)


def test_checks_use_the_oracle(monkeypatch):
    """The contenders' check compares with numbabn.bench.reference, the oracle the tests
    import as tests/reference.py: a wrong oracle fails a right contender."""
    assert reference.forward is numbabn.bench.reference.forward
    case = cases.Case((4, 8, 16), 1, np.float64)
    backend = contenders.BACKENDS["numpy"]
    real = numbabn.bench.reference.forward

    def wrong(*args):
        y, *rest = real(*args)
        return (y + 1e-3, *rest)

    monkeypatch.setattr(numbabn.bench.reference, "forward", wrong)
    with pytest.raises(AssertionError, match="numpy eval"):
        contenders.check(backend, {"eval": backend.prepare(case)["eval"]}, case)


def test_cuda_entries_are_registered_and_skip_cleanly():
    for name in ("numbabn-cuda", "torch-cuda"):
        assert contenders.BACKENDS[name].device == "gpu"
    reason = contenders.cuda_unavailable()
    if reason is not None:
        assert contenders.BACKENDS["numbabn-cuda"] not in contenders.available()


def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(report, "QUICK_SHAPES", TINY_SHAPES)
    monkeypatch.setattr(report, "SWEEP_MB", (0.05, 0.2))


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
    expected = {"numbabn", "numpy"} | ({"torch"} if contenders._torch() else set())
    for case in doc["cases"]:
        assert set(case["backends"]) == expected
        assert _positive(case["copy_seconds"]["cpu"])
        for name, b in case["backends"].items():
            assert set(b["stages"]) == {"copy", *report.TABLE_STAGES}
            for stage, v in b["stages"].items():
                assert all(_positive(v[k]) for k in ("seconds", "GBps", "x_copy")), (name, stage, v)
                assert ("speedup" in v) == (name != "numbabn" and stage != "copy")
                assert "speedup" not in v or _positive(v["speedup"])
    assert set(doc["median_speedup"]) == expected - {"numbabn"}
    if contenders.cuda_unavailable() is not None:
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
    bar = timing.Progress(4, pipe)
    bar.update(2, "half")
    bar.clear()
    assert pipe.getvalue() == ""
    tty = _Tty()
    bar = timing.Progress(4, tty)
    bar.update(2, "half")
    assert tty.getvalue().startswith("\r[") and " 50% half" in tty.getvalue() and "\n" not in tty.getvalue()
    bar.clear()
    assert tty.getvalue().endswith("\r")


def test_interleaved_syncs_every_batch():
    calls = []
    t = timing.interleaved({"a": lambda: calls.append("a")}, budget=0.001, sync={"a": lambda: calls.append("s")})
    assert _positive(t["a"]) and calls.count("s") >= 3 + 2  # min_rounds batches + warm-up + calibration
    assert calls[-1] == "s" and calls[0] == "a"


def test_interleaved_shuffles_the_order_each_round_the_same_every_run():
    """Every contender runs once per round, in an order shuffled each round (so none always
    follows the same one) and seeded (the same every run)."""

    def run():
        log = []
        fns = {k: (lambda k=k: log.append(k)) for k in "abcd"}
        timing.interleaved(fns, budget=0.0, batch=1e-12, min_rounds=12, max_rounds=12)  # one call a batch
        rounds = [log[i : i + 4] for i in range(2 * 4, len(log), 4)]  # after warm-up, calibration
        return rounds

    first, second = run(), run()
    assert first == second and len(first) == 12
    assert all(sorted(r) == list("abcd") for r in first)
    assert len({tuple(r) for r in first}) > 1


ASV = pathlib.Path(__file__).resolve().parents[1] / "asv_bench"


@pytest.fixture
def asv_benchmarks():
    """asv's suite, imported as "asv_benchmarks" ("benchmarks" is the pytest-benchmark
    suite's name here), and removed again afterwards."""
    path = ASV / "benchmarks"
    if not path.is_dir():
        pytest.skip("no asv_bench/ beside the tests")
    spec = importlib.util.spec_from_file_location(
        "asv_benchmarks", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    suite = importlib.util.module_from_spec(spec)
    sys.modules["asv_benchmarks"] = suite
    try:
        spec.loader.exec_module(suite)
        suite.batchnorm = importlib.import_module("asv_benchmarks.batchnorm")
        yield suite
    finally:
        sys.modules.pop("asv_benchmarks", None)
        sys.modules.pop("asv_benchmarks.batchnorm", None)


def test_asv_grid_and_skips(asv_benchmarks):
    b = asv_benchmarks
    assert b.PARAM_NAMES == ["layout", "size", "dtype", "backend"]
    assert set(b.BACKENDS) == {"numbabn", "numpy", "torch", "cuda", "torch-cuda"}
    for layout in b.LAYOUTS:
        for size, n in b.SIZES.items():
            case = b.make_case(layout, size, "float32")
            assert case.size == n
    if contenders.cuda_unavailable() is not None:
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
    monkeypatch.setitem(contenders.TOL, np.dtype(np.float32), -1.0)  # nothing passes
    with pytest.raises(AssertionError, match="numbabn eval"):
        asv_benchmarks.batchnorm.EvalForward().setup("NCHW", "small", "float32", "numbabn")


# -- the command line ------------------------------------------------------------------------------


def test_python_m_numbabn_is_the_cli():
    """``python -m numbabn`` runs numbabn.bench's command line (its help, without timing)."""
    done = subprocess.run([sys.executable, "-m", "numbabn", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m numbabn") and "{check,bench,compile}" in done.stdout


def test_default_command_is_the_check_and_a_quick_table(tiny, capsys):
    assert cli.main(["--budget", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "self-check passed" in out and "FAIL" not in out
    # both dtypes, serial and parallel kernels: one line per case
    assert out.count(": ok") == 2 * len(check.SELF_CHECK_CASES) + len(check.SELF_CHECK_PARALLEL)
    for shape, _, _ in TINY_SHAPES:
        assert str(shape) in out
    assert "cold start" not in out  # the full bench alone measures it


def test_failing_self_check_exits_1_before_any_timing(tiny, monkeypatch, capsys):
    real = numbabn.batch_norm_forward

    def broken(x, *args, **kwargs):  # a kernel off by 1e-3 of the output's scale
        y, mean, invstd = real(x, *args, **kwargs)
        return y + 1e-3, mean, invstd

    monkeypatch.setattr(numbabn, "batch_norm_forward", broken)
    for argv in ([], ["bench", "--quick"]):
        assert cli.main(argv) == 1
        out = capsys.readouterr().out
        assert "self-check FAILED" in out and "FAIL output" in out
        assert "GB/s" not in out  # nothing was timed


def test_self_check_tolerance_catches_a_float64_rounding_to_float32(monkeypatch):
    """The float64 cases are held to float64 precision: a kernel that computed in float32
    would fail them."""
    real = numbabn.batch_norm_forward

    def in_float32(x, *args, **kwargs):
        y, mean, invstd = real(x, *args, **kwargs)
        return y.astype(np.float32).astype(x.dtype), mean, invstd

    monkeypatch.setattr(numbabn, "batch_norm_forward", in_float32)
    lines = []
    assert not check.self_check(dtypes=("float64",), out=lines.append)
    assert all("FAIL output" in line for line in lines)


def test_bench_float64(tiny, capsys):
    doc = _bench_json(capsys, "--dtype", "float64")
    assert [c["dtype"] for c in doc["cases"]] == ["float64"] * len(TINY_SHAPES)
    case = doc["cases"][0]
    # GB/s counts 8-byte elements: bytes of the copy over its time
    copy = case["backends"]["numbabn"]["stages"]["copy"]
    assert copy["GBps"] == pytest.approx(2 * case["MB"] * 1e6 / copy["seconds"] / 1e9)
    assert case["MB"] == pytest.approx(math.prod(case["shape"]) * 8 / 1e6)


def test_bench_device_cpu_has_cpu_columns_only(tiny, capsys):
    doc = _bench_json(capsys, "--device", "cpu")
    for case in doc["cases"]:
        assert {b["device"] for b in case["backends"].values()} == {"cpu"}
    assert "numbabn-cuda" not in doc["skipped"]  # not asked for, so not skipped either


def test_bench_device_cuda(tiny, capsys):
    """``bench --device cuda`` times the GPU columns alone, or says why it cannot."""
    why = contenders.cuda_unavailable()
    if why is not None:
        assert cli.main(["bench", "--quick", "--device", "cuda", "--budget", "0.01"]) == 2
        err = capsys.readouterr().err
        assert "bench --device cuda: no GPU column can run here" in err and " ".join(why.split()) in err
        return
    doc = _bench_json(capsys, "--device", "cuda")
    for case in doc["cases"]:
        assert "numbabn-cuda" in case["backends"]
        assert {b["device"] for b in case["backends"].values()} == {"gpu"}


def test_cli_and_legend_say_what_the_figures_mean(capsys):
    help_text = cli.parser().format_help()
    assert "issue" not in help_text and "target" not in help_text
    assert "streaming copy" in help_text  # --floor: what the ratio is taken against
    legend = report._legend(np.float32)
    assert "DESIGN" not in legend and "section" not in legend
    assert "1.5x a copy" in legend and "train 3" in legend


# -- bench --floor ---------------------------------------------------------------------------------


def test_floor_json(capsys):
    assert cli.main(["bench", "--floor", "--floor-mb", "2", "--budget", "0.05", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "MB beyond input + output" in err
    assert "target" not in err and "met" not in err.split()
    for name, meaning in floor.FIGURES.values():  # each figure is printed with its meaning
        assert f"{name}; {meaning}" in err
    doc = json.loads(out)["floor"]
    assert set(doc["beyond_cache"]) == {label for label, _, _ in floor.LAYOUTS}
    for r in doc["beyond_cache"].values():
        t = r["seconds"]
        assert set(t) == {"copy", "triad", "train", "eval", "backward"}
        assert all(_positive(v) for v in t.values())
        assert r["train_over_copy"] == pytest.approx(t["train"] / t["copy"])
        assert r["eval_over_copy"] == pytest.approx(t["eval"] / t["copy"])
        assert r["backward_over_triad"] == pytest.approx(t["backward"] / t["triad"])
    assert set(doc["small"]) == {str(s) for s in floor.SMALL}
    for r in doc["small"].values():
        assert _positive(r["seconds"]["numbabn"])
        assert ("small_speedup" in r) == (contenders._torch() is not None)
    per = doc["per_element"]["seconds_per_element"]
    assert list(per) == ["1", "2"]  # JSON keys: MB
    assert all(_positive(v) for v in per.values())
    assert doc["per_element"]["per_element_spread"] == pytest.approx(max(per.values()) / min(per.values()))
    peak = doc["peak_memory"]
    assert peak["input_bytes"] == peak["output_bytes"] >= 2e6
    assert peak["extra_bytes"] == peak["peak"] - peak["rss_before"] - peak["output_bytes"]
    if peak["method"] == "VmHWM":  # the high-water mark restarted after the warm-up compile
        # the output was written, so the peak rose by at least its size (to page accounting) ...
        assert peak["peak"] - peak["rss_before"] >= 0.9 * peak["output_bytes"]
        # ... and the call held no temporary of the input's size (the floor is 0)
        assert peak["peak_extra"] < 0.25
    # 13 figures with torch (3 layouts x 3, two small calls, spread, peak), 11 without
    assert len(doc["figures"]) == 11 + 2 * (contenders._torch() is not None)
    assert doc["figures"]["NCHW train_over_copy"] == doc["beyond_cache"]["NCHW"]["train_over_copy"]


def test_floor_goes_with_bench_alone(capsys):
    for argv in (["check", "--floor"], ["bench", "--floor", "--quick"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert "--floor goes with bench alone" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--floor", "--device", "cuda"])
    assert exc.value.code == 2 and "--floor measures the CPU kernels" in capsys.readouterr().err


def test_yardsticks_and_figures():
    a, b = np.arange(1000.0), np.linspace(-1.0, 1.0, 1000)
    out = np.empty_like(a)
    yardsticks.triad(a, b, 0.5, out)
    np.testing.assert_array_equal(out, a + 0.5 * b)
    for n in (10, yardsticks.SERIAL_BELOW + 3):  # the serial and the parallel copy
        x, y = np.arange(float(n)).reshape(-1, 1), np.zeros((n, 1))
        yardsticks.copy_of(x, y)()
        np.testing.assert_array_equal(y, x)
    res = {"small": {"(1, 2)": {"seconds": {}, "small_speedup": 2.5}}, "per_element": {"per_element_spread": 1.4}}
    assert floor.figures(res) == {"(1, 2) small_speedup": 2.5, "per_element_spread": 1.4}


def test_bench_dask_json(capsys):
    pytest.importorskip("dask.array", reason="bench --dask needs numbabn[dask]")
    assert cli.main(["bench", "--dask", "--dask-mb", "4", "--budget", "0.05", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["dask"]
    assert doc["mb"] == 4 and doc["dtype"] == "float32"
    assert set(doc["layouts"]) == {"NCHW", "NHWC"}
    for r in doc["layouts"].values():
        names = ("welford_dask", "mean_var_dask", "welford_memory", "normalize_dask", "eval_memory")
        assert all(_positive(r[k]) for k in names)
        assert r["speedup_vs_mean_var"] == pytest.approx(r["mean_var_dask"] / r["welford_dask"])
        assert r["welford_over_memory"] == pytest.approx(r["welford_dask"] / r["welford_memory"])
        assert r["normalize_over_memory"] == pytest.approx(r["normalize_dask"] / r["eval_memory"])
    t = doc["task_overhead_us"]
    assert t["overhead_us"] == pytest.approx(t["per_chunk_us"] - t["kernel_us"])


def test_dask_goes_with_bench_alone(capsys):
    for argv in (["check", "--dask"], ["bench", "--dask", "--floor"], ["bench", "--dask", "--device", "cuda"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert "--dask goes with bench alone" in capsys.readouterr().err


def test_dask_out_of_core_figures(tmp_path, capsys):
    """``run_out_of_core`` on a tiny store (a real 2-worker LocalCluster): every figure there,
    the ratios consistent with the times, nothing spilled, the temporary stores removed."""
    pytest.importorskip("distributed", reason="the out-of-core bench needs numbabn[dask]")
    pytest.importorskip("zarr", reason="the out-of-core bench needs numbabn[dask]")
    from numbabn.bench import dask_bench

    lines = []
    r = dask_bench.run_out_of_core(
        8, 512, 1, str(tmp_path), runs=1, overhead_chunks=16, budget=0.02, progress=lines.append
    )
    assert list(tmp_path.iterdir()) == []  # stores and worker spill space removed
    assert r["total_mb"] == 8 and r["chunk_mb"] == 1 and r["chunks"] == 8 and r["n_workers"] == 2
    assert r["worker_numba_threads"] == ["1"]
    assert r["worker_config"] == [tuple(dask_bench.MEMORY_CONFIG.values())]
    passes = {"stats", "read", "normalize", "copy"}
    assert set(r["seconds"]) == set(r["peak_worker_bytes"]) == set(r["spilled"]) == passes
    assert all(_positive(v) for v in r["seconds"].values())
    assert r["stats_over_read"] == pytest.approx(r["seconds"]["stats"] / r["seconds"]["read"])
    assert r["normalize_over_copy"] == pytest.approx(r["seconds"]["normalize"] / r["seconds"]["copy"])
    limit = 512 * 2**20
    for name in passes:
        assert r["peak_over_limit"][name] == pytest.approx(r["peak_worker_bytes"][name] / limit)
        assert r["peak_worker_bytes"][name] >= r["worker_rss_after_warmup"] * 0.5
    assert not r["spilled_any"] and all(v["bytes"] == 0 for v in r["spilled"].values())
    assert r["within_limit"] == (max(r["peak_over_limit"].values()) < 1)
    t = r["task_overhead_us"]
    assert t["overhead_us"] == pytest.approx(t["per_chunk_us"] - t["kernel_us"])
    assert len(r["load_average"]) == 3 and len(lines) == 2 + 4
    dask_bench.report_out_of_core(r, out=lines.append)
    assert "stats" in lines[-5] and "target <= 1.25" in lines[-5]
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--out-of-core"])
    assert exc.value.code == 2 and "--out-of-core goes with --dask" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "10000"),  # the bench's short spin
        ({"GOMP_SPINCOUNT": "300000"}, "300000"),  # the user's choice stays
        ({"OMP_WAIT_POLICY": "PASSIVE"}, None),  # so does a wait policy, which GOMP_SPINCOUNT would override
    ],
)
def test_bench_shortens_openmp_spin_unless_the_user_chose(env, expected):
    # In a child process: GNU OpenMP reads the variable when it loads, before any test's torch.
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, numbabn.bench; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)
