"""``python -m numbabn bench --floor``: how close the CPU kernels come to the bandwidth floor.

Measures, in one run, each figure that the benchmarks issue sets a target for:

- beyond the cache (arrays of ``mb`` MB, 1 GB by default: more than the last-level cache of
  the machines numbabn is tuned on), per layout: training forward and eval forward over a
  streaming copy of the same array, backward over a triad ``out = a + k * b`` of the same size;
- small arrays: the whole ``numbabn.batch_norm`` training call against
  ``torch.nn.functional.batch_norm`` (call overhead counts);
- time per element of the training forward from 1 MB to ``mb`` MB (flat means no size falls
  off a cliff);
- peak memory of a training forward on a 512 MB array, beyond its input and output (in a
  fresh process, so nothing else counts).

Every ratio is timed side by side, rounds interleaved (:func:`numbabn._bench.interleaved`):
these machines are shared and noisy.
"""

import json
import subprocess
import sys

import numba
import numpy as np
from numba import prange

from . import _backends
from . import functional as F
from ._bench import _torch_threads, interleaved, shape_of_mb
from ._jit import OPTIONS

#: Targets of the benchmarks issue: (key, description, bound, "<=" or ">=").
TARGETS = {
    "train_over_copy": ("training forward / copy, beyond the cache", 1.25, "<="),
    "eval_over_copy": ("eval forward / copy, beyond the cache", 1.1, "<="),
    "backward_over_triad": ("backward / triad, beyond the cache", 1.5, "<="),
    "small_speedup": ("whole training call, torch's time / numbabn's", 2.0, ">="),
    "per_element_spread": ("slowest / fastest time per element, 1 MB to the largest", 1.3, "<="),
    "peak_extra": ("peak memory beyond input + output, fraction of both", 0.01, "<="),
}

#: Layouts beyond the cache: 64 channels of 64 x 64 (NCHW and NHWC) and 512 features (N, C).
LAYOUTS = (("NCHW", (64, 64, 64), 1), ("NHWC", (64, 64, 64), -1), ("NC", (512,), 1))

#: The small arrays of the issue, (N, C), training.
SMALL = ((32, 64), (256, 1024))


@numba.njit(parallel=True, **OPTIONS)
def _triad(a, b, k, out):
    """``out = a + k * b`` over flat arrays: the reference of the backward pass (it reads two
    arrays and writes one, as the backward's elementwise pass does)."""
    for i in prange(a.shape[0]):
        out[i] = a[i] + k * b[i]


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
    _, mean, invstd = F.batch_norm_forward(x, w, b, axis=axis, out=y)
    fx, fg, fy = x.reshape(-1), g.reshape(-1), y.reshape(-1)
    fns = {
        "copy": lambda: _backends._copy(fx, fy),
        "triad": lambda: _triad(fx, fg, 0.5, fy),
        "train": lambda: F.batch_norm(x, rm, rv, w, b, True, axis=axis, out=y),
        "eval": lambda: F.batch_norm(x, rm, rv, w, b, False, axis=axis, out=y),
        "backward": lambda: F.batch_norm_backward(g, x, w, mean, invstd, axis=axis, out=gi),
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
    torch = _backends._torch()
    c = x.shape[1]
    w, b, rm, rv = np.ones(c, x.dtype), np.zeros(c, x.dtype), np.zeros(c, x.dtype), np.ones(c, x.dtype)
    fns = {"numbabn": lambda: F.batch_norm(x, rm, rv, w, b, True)}
    if torch is not None:
        tx, tw, tb, trm, trv = (torch.from_numpy(a.copy()) for a in (x, w, b, rm, rv))
        fns["torch"] = lambda: torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, True)
    with _torch_threads():
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
    return interleaved({"train": lambda: F.batch_norm(x, rm, rv, None, None, True, out=y)}, budget=budget)["train"]


_PEAK = """
import resource, sys, numpy as np, numbabn
mb = float(sys.argv[1])
n = max(16, round(mb * 1e6 / (4 * 64 * 64 * 64)))
x = np.ones((n, 64, 64, 64), np.float32)
numbabn.batch_norm(x[:16].copy(), None, None, training=True)  # compile both twins first
numbabn.batch_norm(x[:1, :, :2].copy(), None, None, training=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
y = numbabn.batch_norm(x, None, None, training=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(x.nbytes, y.nbytes, before * 1024, after * 1024)
"""


def peak_memory(mb=512):
    """Peak resident memory of ``batch_norm(x, training=True)`` on an ``mb`` MB float32 array,
    in a fresh process: how far it rose beyond the output it returns (``ru_maxrss``)."""
    done = subprocess.run([sys.executable, "-c", _PEAK, str(mb)], capture_output=True, text=True, check=True)
    nx, ny, before, after = map(int, done.stdout.split())
    extra = max(0, after - before - ny)
    return {"input_bytes": nx, "output_bytes": ny, "extra_bytes": extra, "peak_extra": extra / (nx + ny)}


def run(mb=1024, dtype=np.float32, budget=3.0, small_budget=1.0, file=None, peak_mb=512, sizes_mb=None):
    """Measure every target (``mb``: the size beyond the cache), print a table that says which
    are met, and return the JSON-ready results."""
    file = sys.stdout if file is None else file

    def say(text):
        print(text, file=file, flush=True)

    sizes_mb = sizes_mb or tuple(s for s in (1, 4, 16, 64, 256, 1024) if s < mb) + (mb,)
    dtype = np.dtype(dtype)
    say(f"bandwidth floor, {dtype.name}, {numba.get_num_threads()} numba threads")
    say(f"beyond the cache: {mb} MB arrays (copy: numbabn's parallel copy; triad: out = a + k * b)")
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
        say(f"peak memory, training forward on {p['input_bytes'] / 1e6:.0f} MB float32:")
        say(f"  {p['extra_bytes'] / 1e6:.1f} MB beyond input + output  " + _cell("peak_extra", p["peak_extra"]))
    res["met"] = met(res)
    say(f"targets met: {sum(res['met'].values())} of {len(res['met'])}")
    return res


def met(res):
    """``{figure: bool}``: each measured figure against its target."""
    out = {}
    for label, r in res.get("beyond_cache", {}).items():
        for k in ("train_over_copy", "eval_over_copy", "backward_over_triad"):
            out[f"{label} {k}"] = _ok(k, r[k])
    for shape, r in res.get("small", {}).items():
        if "small_speedup" in r:
            out[f"{shape} small_speedup"] = _ok("small_speedup", r["small_speedup"])
    if "per_element" in res:
        out["per_element_spread"] = _ok("per_element_spread", res["per_element"]["per_element_spread"])
    if "peak_memory" in res:
        out["peak_extra"] = _ok("peak_extra", res["peak_memory"]["peak_extra"])
    return out


def _ok(key, value):
    _, bound, op = TARGETS[key]
    return bool(value <= bound) if op == "<=" else bool(value >= bound)


def _cell(key, value):
    name, bound, op = TARGETS[key]
    short = key.replace("_over_", "/").replace("_", " ")
    return f"{short} {value:.3g} ({op} {bound}: {'met' if _ok(key, value) else 'MISSED'})"


def to_json(res, file):
    json.dump(res, file, indent=1, default=float)
    file.write("\n")
