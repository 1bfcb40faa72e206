"""``python -m numbabn bench``: numbabn side by side with NumPy, PyTorch and a streaming copy.

Every contender of :mod:`numbabn.bench.contenders` that can run here is timed on the same
arrays, after its results were checked against the float64 oracle.  Every ratio is measured in one run,
rounds interleaved (each contender once per round, median over rounds), because these
machines are shared and noisy.
"""

import json
import math
import os
import platform
import statistics
import sys

import numba
import numpy as np

from . import contenders
from .cases import BYTES_PER_ELEMENT, Case, bytes_moved, shape_of_mb
from .timing import Progress, interleaved, torch_threads

#: The table's shapes: ImageNet-sized NCHW and NHWC activations, and (N, C) batches from
#: large to tiny: (shape, axis, label).
SHAPES = [
    ((64, 64, 56, 56), 1, "NCHW"),
    ((32, 256, 28, 28), 1, "NCHW"),
    ((64, 56, 56, 64), -1, "NHWC"),
    ((65536, 512), 1, "NC"),
    ((8192, 256), 1, "NC"),
    ((256, 1024), 1, "NC"),
    ((32, 64), 1, "NC"),
]

#: ``--quick``: one shape per layout, 1 to 4 MB (CI runs this in seconds).
QUICK_SHAPES = [
    ((8, 64, 32, 32), 1, "NCHW"),
    ((8, 32, 32, 64), -1, "NHWC"),
    ((4096, 256), 1, "NC"),
]

#: Stages of the table, with the streaming copy that every ratio is taken against.
TABLE_STAGES = ("train", "eval", "backward")

#: ``--plot``: NCHW float32 arrays of about these many MB; ``--quick`` keeps the first two.
#: 256 MB is as far as the NumPy backend goes in about a minute on two cores.
SWEEP_MB = (1, 4, 16, 64, 256)


def measure(case, backends, stages=TABLE_STAGES, budget=0.6, progress=None, ref=None):
    """Check, then time ``stages`` and the streaming copy of every backend on ``case``.

    Parameters
    ----------
    case : Case
    backends : list of Backend
        Those that can run here (:func:`numbabn.bench.contenders.available`).
    progress : callable (fraction, label), optional
    ref : dict, optional
        :func:`numbabn.bench.contenders.expected` of ``case``, when the caller has it already.

    Returns
    -------
    dict
        ``seconds[backend name][stage]``: median seconds per call (stages a backend lacks
        are absent).
    """
    progress = progress or (lambda frac, label: None)
    ref = contenders.expected(case) if ref is None else ref
    fns, sync = {}, {}
    for i, b in enumerate(backends):
        progress(0.3 * i / len(backends), f"{case.shape} {b.name}: checking")
        prepared = b.prepare(case)
        chosen = {s: prepared[s] for s in ("copy", *stages) if s in prepared}
        contenders.check(b, {s: f for s, f in chosen.items() if s != "copy"}, case, ref)
        for s, f in chosen.items():
            fns[b.name, s] = f
            sync[b.name, s] = b.synchronize
    with torch_threads():
        t = interleaved(fns, budget=budget, sync=sync, progress=lambda f: progress(0.3 + 0.7 * f, f"{case.shape}"))
    seconds = {b.name: {} for b in backends}
    for (name, stage), v in t.items():
        seconds[name][stage] = v
    return seconds


def summarize(case, seconds, backends):
    """Seconds -> the table's numbers for one case: per backend and stage ``seconds``,
    ``GBps`` (:data:`numbabn.bench.cases.BYTES_PER_ELEMENT`) and ``x_copy`` (time over the
    fastest streaming copy of ``x`` on the same device), and ``speedup``: an alternative's time
    over numbabn's on the same device."""
    copy = {}
    for b in backends:
        if "copy" in seconds[b.name]:
            copy[b.device] = min(copy.get(b.device, math.inf), seconds[b.name]["copy"])
    ours = {b.device: b.name for b in backends if b.ours}
    out = {}
    for b in backends:
        stages = {}
        for stage, t in seconds[b.name].items():
            stages[stage] = {
                "seconds": t,
                "GBps": bytes_moved(stage, case) / t / 1e9,
                "x_copy": t / copy[b.device],
            }
            mine = ours.get(b.device)
            if stage != "copy" and mine not in (None, b.name) and stage in seconds[mine]:
                stages[stage]["speedup"] = t / seconds[mine][stage]
        out[b.name] = {"device": b.device, "stages": stages}
    return {
        "shape": list(case.shape),
        "axis": case.axis,
        "layout": case.layout,
        "dtype": case.dtype.name,
        "MB": case.nbytes / 1e6,
        "copy_seconds": copy,
        "backends": out,
    }


def run(shapes=SHAPES, dtype=np.float32, budget=0.6, names=None, file=None, progress_file=None):
    """Measure ``shapes`` with every available backend (or those in ``names``), printing one
    table per device as rows finish; return the JSON-ready results."""
    file = sys.stdout if file is None else file
    backends = contenders.available(names)
    skipped = {  # why, on one line (driver errors come with several)
        n: " ".join(b.unavailable().split())
        for n, b in contenders.BACKENDS.items()
        if (names is None or n in names) and b not in backends
    }
    bar = Progress(len(shapes), progress_file)
    print(_legend(dtype), file=file)
    for name, why in skipped.items():
        print(f"  ({name} skipped: {why})", file=file)
    rows = []
    by_device = {}
    for b in backends:
        by_device.setdefault(b.device, []).append(b)
    for i, (shape, axis, label) in enumerate(shapes):
        row = _measure_devices(Case(shape, axis, dtype, label), backends, budget, bar, i)
        rows.append(row)
        bar.clear()
        _print_rows(row, by_device, file, header=(i == 0))
    bar.clear()
    medians = median_speedups(rows)
    _print_medians(medians, by_device, file)
    return {"cases": rows, "median_speedup": medians, "skipped": skipped}


def _measure_devices(case, backends, budget, bar, done, prefix=""):
    """:func:`measure` each device's backends apart (each syncs its own queue), then
    :func:`summarize`; ``bar`` shows ``done`` cases plus this one's progress."""
    seconds, ref = {}, contenders.expected(case)

    def progress(frac, text):
        bar.update(done + frac, prefix + text)

    for device in dict.fromkeys(b.device for b in backends):
        group = [b for b in backends if b.device == device]
        seconds.update(measure(case, group, budget=budget, progress=progress, ref=ref))
    return summarize(case, seconds, backends)


def median_speedups(rows):
    """``{backend: {stage: median speed-up of numbabn over it}}`` across ``rows``."""
    acc = {}
    for row in rows:
        for name, b in row["backends"].items():
            for stage, v in b["stages"].items():
                if "speedup" in v:
                    acc.setdefault(name, {}).setdefault(stage, []).append(v["speedup"])
    return {n: {s: statistics.median(v) for s, v in st.items()} for n, st in acc.items()}


def _legend(dtype):
    model = ", ".join(f"{s} {BYTES_PER_ELEMENT[s]}" for s in ("copy", *TABLE_STAGES))
    return (
        f"{np.dtype(dtype).name}, {numba.get_num_threads()} numba threads.\n"
        "  ms: median time per call.\n"
        "  GB/s: the bytes the operation cannot avoid moving, over that time (per element, in itemsizes:"
        f" {model};\n    a training forward reads x twice, for the statistics and to normalize, and writes y).\n"
        "  x copy: time over the fastest streaming copy of the same array on that device.  At memory speed a"
        " training\n    forward takes 1.5x a copy, an eval forward 1.0x, a backward 2.5x; beyond the cache,"
        " where each output line\n    is read before it is written, about 2.0x, 1.5x and 3x.\n"
        "  speed-up: the alternative's time over numbabn's (above 1: numbabn is faster)."
    )


def _print_rows(row, by_device, file, header):
    for device, group in by_device.items():
        others = [b.name for b in group if not b.ours]
        if header:
            names = "".join(f" | {b.name:^22}" for b in group) + (" | speed-up vs" if others else "")
            head = f"{'shape':>20} {'lay':>4} {'MB':>6} {'stage':>8}" + " | {:>8} {:>6} {:>6}".format(
                "ms", "GB/s", "x copy"
            ) * len(group)
            head += " | " + " ".join(f"{n:>7}" for n in others) if others else ""
            print(f"\n{device.upper()}\n{' ' * 41}{names}\n{head}\n{'-' * len(head)}", file=file)
        first = True
        for stage in ("copy", *TABLE_STAGES):
            line = f"{str(tuple(row['shape'])):>20} {row['layout']:>4} {row['MB']:6.1f}" if first else " " * 32
            line += f" {stage:>8}"
            for b in group:
                v = row["backends"][b.name]["stages"].get(stage)
                line += f" | {v['seconds'] * 1e3:8.3f} {v['GBps']:6.1f} {v['x_copy']:6.2f}" if v else f" | {'-':>22}"
            if others and stage != "copy":
                sp = (row["backends"][n]["stages"].get(stage, {}).get("speedup") for n in others)
                line += " | " + " ".join(f"{v:7.2f}" if v else f"{'-':>7}" for v in sp)
            print(line, file=file, flush=True)
            first = False


def _print_medians(medians, by_device, file):
    for device, group in by_device.items():
        others = [b.name for b in group if not b.ours and b.name in medians]
        if not others:
            continue
        print(f"\nmedian speed-up of numbabn on {device.upper()} (alternative's time / numbabn's):", file=file)
        for n in others:
            cells = "  ".join(f"{s} {medians[n][s]:.2f}" for s in TABLE_STAGES if s in medians[n])
            print(f"  vs {n:<10} {cells}", file=file)


def machine_info():
    """What the numbers were measured on: CPU model, cores, threads and library versions."""
    from numbabn import __version__

    info = {
        "numbabn": __version__,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    torch = contenders._torch()
    info["torch"] = None if torch is None else torch.__version__
    try:
        info["threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        info["threading_layer"] = None
    if contenders.cuda_unavailable() is None:
        from numba import cuda

        name = cuda.get_current_device().name
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sweep(sizes_mb=SWEEP_MB, dtype=np.float32, budget=0.3, progress_file=None, names=None):
    """GB/s of every stage and backend (or those in ``names``) over NCHW arrays of about
    ``sizes_mb`` MB (64 channels of 32 x 32); returns one :func:`summarize` row per size."""
    backends = contenders.available(names)
    bar = Progress(len(sizes_mb), progress_file)
    rows = []
    for i, mb in enumerate(sizes_mb):
        shape = shape_of_mb((64, 32, 32), mb, np.dtype(dtype).itemsize)
        rows.append(_measure_devices(Case(shape, 1, dtype, "NCHW"), backends, budget, bar, i, "sweep "))
    bar.clear()
    return rows


def plot(rows, path):
    """Write a bandwidth-vs-size chart of :func:`sweep` ``rows`` to ``path`` (PNG)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib, which numbabn does not require: pip install 'numbabn[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mb = [r["MB"] for r in rows]
    fig, axes = plt.subplots(1, len(TABLE_STAGES), figsize=(5 * len(TABLE_STAGES), 4), sharey=True)
    names = list(rows[0]["backends"])
    for ax, stage in zip(axes, TABLE_STAGES, strict=True):
        for name in names:
            gbps = [r["backends"][name]["stages"].get(stage, {}).get("GBps", np.nan) for r in rows]
            ax.plot(mb, gbps, marker="o", label=name)
        for device in dict.fromkeys(rows[0]["copy_seconds"]):
            copy = [BYTES_PER_ELEMENT["copy"] * r["MB"] / 1e3 / r["copy_seconds"][device] for r in rows]
            ax.plot(mb, copy, "k--", label=f"copy ({device})")
        ax.set(xscale="log", xlabel="array size (MB)", title=f"{stage} (bytes: {BYTES_PER_ELEMENT[stage]} x size)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s (bytes the operation must move / time)")
    axes[-1].legend()
    info = machine_info()
    fig.suptitle(f"numbabn batch norm, {rows[0]['dtype']} NCHW: {info['cpu']}, {info['numba_threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_json(results, file):
    """Write ``results`` (with :func:`machine_info` and the byte model) as JSON to ``file``."""
    doc = {"machine": machine_info(), "bytes_per_element": dict(BYTES_PER_ELEMENT), **results}
    json.dump(doc, file, indent=1, default=float)
    file.write("\n")
