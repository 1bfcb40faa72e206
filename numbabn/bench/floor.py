"""``python -m numbabn bench --floor``: how close the CPU kernels come to the memory floor.

Measures, in one run:

- beyond the cache (arrays of ``mb`` MB, 1 GB by default: more than the last-level cache of
  most machines), per layout: training forward and eval forward over a streaming copy of the
  same array, backward over a triad ``out = a + k * b`` of the same size;
- small arrays: the whole ``numbabn.batch_norm`` training call against
  ``torch.nn.functional.batch_norm`` (call overhead counts);
- time per element of the training forward from 1 MB to ``mb`` MB (flat means no size falls
  off a cliff);
- peak memory of a training forward on a 512 MB array, beyond its input and output (in a
  fresh process, so nothing else counts).

Each figure is printed with what it means and the value a kernel at the memory floor would
give (:data:`FIGURES`).  Every ratio is timed side by side, rounds interleaved
(:func:`numbabn.bench.timing.interleaved`): shared machines are noisy.
"""

import json
import os
import subprocess
import sys

import numba
import numpy as np

import numbabn

from . import contenders
from .cases import shape_of_mb
from .timing import interleaved, torch_threads
from .yardsticks import parallel_copy, triad

#: Figure -> (what it is, what it means).  The floors follow from the bytes each pass must
#: move: a copy moves 2 per element (read x, write y), a training forward 3 (x twice, y once),
#: an eval forward 2, a triad 3, a backward 5 (g and x twice, grad_input once).
FIGURES = {
    "train_over_copy": (
        "training forward / copy",
        "1.5 at the floor (3 bytes moved per 2 of the copy); about 2.0 where each output line is read before "
        "it is written",
    ),
    "eval_over_copy": (
        "eval forward / copy",
        "1.0 at the floor (the same bytes as the copy); about 1.5 where each output line is read first",
    ),
    "backward_over_triad": (
        "backward / triad",
        "1.67 at the floor (5 bytes moved per 3 of the triad): the backward reads g and x twice",
    ),
    "small_speedup": (
        "whole training call, torch's time / numbabn's",
        "above 1: numbabn's call, checks included, is faster than PyTorch's",
    ),
    "per_element_spread": (
        "slowest / fastest time per element, 1 MB to the largest",
        "1.0: every size streams at the same rate; cache-sized arrays may be faster, so above 1 is expected",
    ),
    "peak_extra": (
        "peak memory beyond input + output, fraction of both",
        "0: no temporary array (per-channel scratch is a few KB)",
    ),
}

#: Layouts beyond the cache: 64 channels of 64 x 64 (NCHW and NHWC) and 512 features (N, C).
LAYOUTS = (("NCHW", (64, 64, 64), 1), ("NHWC", (64, 64, 64), -1), ("NC", (512,), 1))

#: The small arrays, (N, C), training.
SMALL = ((32, 64), (256, 1024))


def _arrays(shape, dtype, rng):
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    x += 3.0
    return x


def beyond_cache(mb=1024, dtype=np.float32, budget=3.0, layouts=LAYOUTS, progress=print):
    """Per layout: train/copy, eval/copy and backward/triad on arrays of about ``mb`` MB."""
    rng = np.random.default_rng(0)
    out = {}
    for label, per_row, axis in layouts:
        shape = shape_of_mb(per_row, mb, np.dtype(dtype).itemsize)
        progress(f"  {label} {shape}: allocating 4 arrays of {mb:g} MB ...")
        t = _time_large(_arrays(shape, dtype, rng), axis, budget)
        out[label] = {
            "shape": list(shape),
            "axis": axis,
            "seconds": t,
            "train_over_copy": t["train"] / t["copy"],
            "eval_over_copy": t["eval"] / t["copy"],
            "backward_over_triad": t["backward"] / t["triad"],
        }
    return out


def _time_large(x, axis, budget):
    g = np.random.default_rng(3).standard_normal(x.shape, dtype=np.float32).astype(x.dtype, copy=False)
    y, gi = np.empty_like(x), np.empty_like(x)
    c = x.shape[axis]
    w, b = np.ones(c, x.dtype), np.zeros(c, x.dtype)
    rm, rv = np.zeros(c, x.dtype), np.ones(c, x.dtype)
    _, mean, invstd = numbabn.batch_norm_forward(x, w, b, axis=axis, out=y)
    fx, fg, fy = x.reshape(-1), g.reshape(-1), y.reshape(-1)
    fns = {
        "copy": lambda: parallel_copy(fx, fy),
        "triad": lambda: triad(fx, fg, 0.5, fy),
        "train": lambda: numbabn.batch_norm(x, rm, rv, w, b, True, axis=axis, out=y),
        "eval": lambda: numbabn.batch_norm(x, rm, rv, w, b, False, axis=axis, out=y),
        "backward": lambda: numbabn.batch_norm_backward(g, x, w, mean, invstd, axis=axis, out=gi),
    }
    # Calls of 0.05-0.2 s: one call per batch, 5 to 9 rounds of every contender.
    return interleaved(fns, budget=budget, batch=budget / (7 * len(fns)), min_rounds=5, max_rounds=9)


def small_calls(shapes=SMALL, dtype=np.float32, budget=1.0):
    """The whole training call on small ``(N, C)`` arrays: numbabn and, when installed,
    ``torch.nn.functional.batch_norm`` (each with its own running statistics)."""
    rng = np.random.default_rng(1)
    out = {}
    for shape in shapes:
        t = _time_small(_arrays(shape, dtype, rng), budget)
        row = {"seconds": t}
        if "torch" in t:
            row["small_speedup"] = t["torch"] / t["numbabn"]
        out[str(tuple(shape))] = row
    return out


def _time_small(x, budget):
    torch = contenders._torch()
    c = x.shape[1]
    w, b, rm, rv = np.ones(c, x.dtype), np.zeros(c, x.dtype), np.zeros(c, x.dtype), np.ones(c, x.dtype)
    fns = {"numbabn": lambda: numbabn.batch_norm(x, rm, rv, w, b, True)}
    if torch is not None:
        tx, tw, tb, trm, trv = (torch.from_numpy(a.copy()) for a in (x, w, b, rm, rv))
        fns["torch"] = lambda: torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, True)
    with torch_threads():
        return interleaved(fns, budget=budget)


def per_element(sizes_mb=(1, 4, 16, 64, 256, 1024), dtype=np.float32, budget=1.0, progress=print):
    """Seconds per element of the NCHW training forward (64 channels of 32 x 32), keyed by
    the size in MB (as text, as JSON keeps it)."""
    rng = np.random.default_rng(2)
    seconds = {}
    for mb in sizes_mb:
        progress(f"  {mb:g} MB ...")
        x = _arrays(shape_of_mb((64, 32, 32), mb, np.dtype(dtype).itemsize), dtype, rng)
        seconds[f"{mb:g}"] = _time_train(x, budget) / x.size
    per = list(seconds.values())
    return {"seconds_per_element": seconds, "per_element_spread": max(per) / min(per)}


def _time_train(x, budget):
    y = np.empty_like(x)
    rm, rv = np.zeros(x.shape[1], x.dtype), np.ones(x.shape[1], x.dtype)
    fns = {"train": lambda: numbabn.batch_norm(x, rm, rv, None, None, True, out=y)}
    return interleaved(fns, budget=budget)["train"]


_PEAK = """
import resource, sys, numpy as np, numbabn

def status(key):  # bytes of a /proc/self/status line (Linux), or None
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
    except (OSError, StopIteration):
        return None

def reset_peak():  # Linux: restart the high-water mark from the current resident size
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmHWM") is not None
    except OSError:
        return False

mb = float(sys.argv[1])
n = max(16, round(mb * 1e6 / (4 * 64 * 64 * 64)))
x = np.ones((n, 64, 64, 64), np.float32)
numbabn.batch_norm(x[:16].copy(), None, None, training=True)  # compile both twins first
numbabn.batch_norm(x[:1, :, :2].copy(), None, None, training=True)
if reset_peak():  # compiling left a high-water mark far above what the call needs
    method, before = "VmHWM", status("VmRSS")
else:  # elsewhere the high-water mark cannot be reset: the call may hide below it
    method, before = "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
y = numbabn.batch_norm(x, None, None, training=True)
after = status("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(x.nbytes, y.nbytes, before, after, method)
"""


def peak_memory(mb=512):
    """Peak resident memory of ``batch_norm(x, training=True)`` on an ``mb`` MB float32 array,
    in a fresh process.

    Returns ``rss_before`` (resident bytes before the call), ``peak`` (the high-water mark
    after it) and ``extra_bytes = peak - rss_before - output_bytes``: what the call held
    beyond the output it returns (slightly negative from the kernel's page accounting when
    it holds nothing).  On Linux the high-water mark is reset after the warm-up compile
    (``method`` "VmHWM"); elsewhere it is ``ru_maxrss``, which the compile may keep above
    the call's own peak (``extra_bytes`` then reads too low).
    """
    # glibc's malloc serves a large request from memory a freed one left resident (its mmap
    # threshold grows with each large free), which would hide part of the output: a fixed
    # threshold maps every large array afresh.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, "-c", _PEAK, str(mb)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    nx, ny, before, after, method = done.stdout.split()
    nx, ny, before, after = int(nx), int(ny), int(before), int(after)
    extra = after - before - ny
    return {
        "input_bytes": nx,
        "output_bytes": ny,
        "rss_before": before,
        "peak": after,
        "method": method,
        "extra_bytes": extra,
        "peak_extra": extra / (nx + ny),
    }


def run(mb=1024, dtype=np.float32, budget=3.0, small_budget=1.0, file=None, peak_mb=512, sizes_mb=None):
    """Measure every figure of :data:`FIGURES` (``mb``: the size beyond the cache), print
    them with what they mean, and return the JSON-ready results."""
    file = sys.stdout if file is None else file

    def say(text):
        print(text, file=file, flush=True)

    sizes_mb = sizes_mb or tuple(s for s in (1, 4, 16, 64, 256, 1024) if s < mb) + (mb,)
    dtype = np.dtype(dtype)
    say(f"memory floor, {dtype.name}, {numba.get_num_threads()} numba threads; the figures:")
    for key, (name, meaning) in FIGURES.items():
        say(f"  {_short(key)}: {name}; {meaning}")
    say(f"beyond the cache: {mb} MB arrays (copy: a parallel streaming copy; triad: out = a + k * b)")
    res = {"mb": mb, "dtype": dtype.name, "beyond_cache": beyond_cache(mb, dtype, budget, progress=say)}
    for label, r in res["beyond_cache"].items():
        cells = (_cell(k, r[k]) for k in ("train_over_copy", "eval_over_copy", "backward_over_triad"))
        say(f"  {label:5} " + "  ".join(cells))
    say("small arrays, the whole training call:")
    res["small"] = small_calls(dtype=dtype, budget=small_budget)
    for shape, r in res["small"].items():
        t = r["seconds"]
        line = f"  {shape:12} numbabn {t['numbabn'] * 1e6:7.1f} us"
        if "torch" in t:
            line += f"  torch {t['torch'] * 1e6:7.1f} us  " + _cell("small_speedup", r["small_speedup"])
        say(line)
    say(f"time per element, training forward, {sizes_mb[0]} to {sizes_mb[-1]} MB:")
    res["per_element"] = per_element(sizes_mb, dtype, budget / 3, progress=say)
    ns = "  ".join(f"{k} MB {v * 1e9:.3f}" for k, v in res["per_element"]["seconds_per_element"].items())
    say(f"  ns per element: {ns}")
    say("  " + _cell("per_element_spread", res["per_element"]["per_element_spread"]))
    if peak_mb:
        res["peak_memory"] = peak_memory(peak_mb)
        p = res["peak_memory"]
        say(f"peak memory, training forward on {p['input_bytes'] / 1e6:.0f} MB float32 ({p['method']}):")
        say(f"  {p['extra_bytes'] / 1e6:.1f} MB beyond input + output  " + _cell("peak_extra", p["peak_extra"]))
    res["figures"] = figures(res)
    return res


def figures(res):
    """``{"<where> <figure>": value}``: every figure of ``res`` in one flat dict."""
    out = {}
    for label, r in res.get("beyond_cache", {}).items():
        for k in ("train_over_copy", "eval_over_copy", "backward_over_triad"):
            out[f"{label} {k}"] = r[k]
    for shape, r in res.get("small", {}).items():
        if "small_speedup" in r:
            out[f"{shape} small_speedup"] = r["small_speedup"]
    if "per_element" in res:
        out["per_element_spread"] = res["per_element"]["per_element_spread"]
    if "peak_memory" in res:
        out["peak_extra"] = res["peak_memory"]["peak_extra"]
    return out


def _short(key):
    return key.replace("_over_", "/").replace("_", " ")


def _cell(key, value):
    return f"{_short(key)} {value:.3g}"


def to_json(res, file):
    json.dump(res, file, indent=1, default=float)
    file.write("\n")
