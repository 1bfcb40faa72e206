"""Helpers of numbabn's asv suite: the parameter grid, the cases and the skip rules.

asv skips a parameter combination whose ``setup`` raises ``NotImplementedError``: every
"cannot run here" (no PyTorch, no GPU, a stage a backend lacks, a commit older than the
backend registry) goes through :func:`skip` so the reason shows in ``asv run`` output.
"""

import importlib.util
import os

import numpy as np

# The contenders the suite times (numbabn through its public API, NumPy, PyTorch), checked
# against numbabn's float64 oracle.  Commits older than numbabn.bench are skipped, not
# failed; an error inside it is raised, so a broken registry fails the run instead of
# skipping everything.
if importlib.util.find_spec("numbabn.bench") is None:  # pragma: no cover - older commits
    contenders = Case = None
else:
    from numbabn.bench import contenders
    from numbabn.bench.cases import Case

#: ``NUMBABN_ASV_QUICK=1`` keeps the small size and float32 only: CI runs every benchmark once
#: on it (every stage, layout and backend; float64 goes through the same code).  asv starts
#: a process per grid point, about a second each, so the full grid would take CI 15 minutes.
QUICK = os.environ.get("NUMBABN_ASV_QUICK", "") not in ("", "0")

#: Elements per array.  small: 64 Ki elements (256 KB of float32), in a core's L2;
#: medium: 4 Mi (16 MB), beyond L2 and the L3 of most desktops; large: 64 Mi (256 MB),
#: beyond most servers' L3 (32 MB on a 2-socket EPYC).  Some machines have an L3 of
#: hundreds of MB, where nothing practical streams from DRAM: "large" is as big as the NumPy
#: and float64 cases allow in reasonable time and memory.
SIZES = {"small": 1 << 16, "medium": 1 << 22, "large": 1 << 26}

#: Layout -> (feature axis, shape of one batch row); the batch size fills the size.
LAYOUTS = {
    "NCHW": (1, (64, 16, 16)),
    "NHWC": (-1, (16, 16, 64)),
    "NC": (1, (256,)),
}

DTYPES = ["float32", "float64"]

#: Backend parameter -> entry of ``numbabn.bench.contenders.BACKENDS``: numbabn and the alternatives
#: a user would pick instead, on the CPU and (``cuda``: numbabn's CUDA backend) on a GPU.
BACKENDS = {
    "numbabn": "numbabn",
    "numpy": "numpy",
    "torch": "torch",
    "cuda": "numbabn-cuda",
    "torch-cuda": "torch-cuda",
}

#: The grid every stage runs over, and its names.
PARAMS = [list(LAYOUTS), ["small"] if QUICK else list(SIZES), DTYPES[:1] if QUICK else DTYPES, list(BACKENDS)]
PARAM_NAMES = ["layout", "size", "dtype", "backend"]


def skip(reason):
    """Skip this parameter combination (asv's convention: ``NotImplementedError``)."""
    raise NotImplementedError(reason)


def requires_cuda():
    """Skip unless numba sees a CUDA GPU and ``numbabn.cuda`` imports."""
    if contenders is None:
        skip("this numbabn has no numbabn.bench")
    reason = contenders.cuda_unavailable()
    if reason is not None:
        skip(reason)


def make_case(layout, size, dtype):
    """The :class:`numbabn.bench.cases.Case` of one grid point."""
    if contenders is None:
        skip("this numbabn predates numbabn.bench")
    axis, row = LAYOUTS[layout]
    batch = max(2, SIZES[size] // int(np.prod(row)))
    return Case((batch, *row), axis, dtype, layout)


def prepare(backend, case, stages, check=True):
    """Place ``case`` for ``backend``, check ``stages`` against the float64 oracle
    (which also compiles them: compile time stays out of the timings) and return
    ``(Backend, {stage: callable})``; skip where the backend or a stage cannot run.
    ``check=False`` leaves the check to the caller."""
    if backend == "cuda":
        requires_cuda()
    entry = contenders.BACKENDS.get(BACKENDS[backend])
    if entry is None:
        skip(f"no {backend} backend registered")
    reason = entry.unavailable()
    if reason is not None:
        skip(reason)
    fns = entry.prepare(case)
    missing = [s for s in stages if s not in fns]
    if missing:
        skip(f"{entry.name} has no {', '.join(missing)} stage")
    chosen = {s: fns[s] for s in stages}
    if check:
        contenders.check(entry, {s: f for s, f in chosen.items() if s != "copy"}, case)
    return entry, chosen
