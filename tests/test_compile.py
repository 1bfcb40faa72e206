"""What a first call compiles: its own (stage, layout) driver and twin, nothing else, so a
change that makes a call compile more fails here, not for a user waiting on a first call.
And ``python -m numbabn compile`` fills numba's cache, also where the install is read-only.

Each case runs in a fresh interpreter: the drivers a process has compiled (or loaded from the
cache) are those with signatures.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import numbabn

PROBE = """
import json, sys
import numpy as np
import numbabn
from numbabn import _jit
shape, axis, steps = json.loads(sys.argv[1])
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
relu = "relu" if "relu" in steps else None
ghosts = shape[0] // 8 if "ghosts" in steps else None
bn = numbabn.BatchNorm(shape[axis], axis=axis, activation=relu, virtual_batch_size=ghosts)
y = bn(x)
if "backward" in steps:
    bn.backward(y)
if "eval" in steps:
    bn.eval()(x)
drivers = sorted(f"{t.__name__}.{k}" for t in _jit.TWINS for k in ("serial", "parallel") if getattr(t, k).signatures)
print(json.dumps(drivers))
"""


def _compiled(shape, axis, steps):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([shape, axis, steps])], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


@pytest.mark.parametrize(
    ("shape", "axis", "steps", "drivers"),
    [
        ((32, 64, 16, 16), 1, [], ["train_fused.parallel"]),
        (
            (32, 64, 16, 16),
            1,
            ["backward", "eval"],
            ["backward_fused.parallel", "eval_strided.parallel", "train_fused.parallel"],
        ),
        ((2, 4, 8192), 1, ["backward"], ["backward_strided.parallel", "train_strided.parallel"]),
        ((2, 16, 64), 1, [], ["train_fused.serial"]),
        ((32, 16, 16, 64), -1, ["eval"], ["eval_minor.parallel", "train_minor.parallel"]),
        ((256, 512), 1, ["backward"], ["backward_minor.parallel", "train_minor.parallel"]),
        ((32, 64), 1, [], ["train_minor.serial"]),
        (
            (32, 64, 16, 16),
            1,
            ["relu", "backward"],
            ["backward_fused.parallel", "relu_grad_flat.parallel", "train_act_fused.parallel"],
        ),
        ((256, 512), 1, ["relu"], ["train_act_minor.parallel"]),
        # Ghost batches of a channel-minor input: their own drivers, nothing of batch norm's.
        ((256, 512), 1, ["ghosts", "backward"], ["backward_ghosts_minor.parallel", "train_ghosts_minor.parallel"]),
        ((64, 64), 1, ["ghosts"], ["train_ghosts_minor.serial"]),
    ],
    ids=[
        "nchw",
        "nchw-step",
        "nchw-rows",
        "nchw-small",
        "nhwc",
        "nc",
        "nc-small",
        "nchw-relu",
        "nc-relu",
        "nc-ghosts",
        "nc-ghosts-small",
    ],
)
def test_a_first_call_compiles_its_own_path(shape, axis, steps, drivers):
    assert _compiled(list(shape), axis, steps) == drivers


COMPILE_AND_INSPECT = """
import json, sys
from numbabn import _jit
from numbabn.bench.cli import main
main(["compile", "--dtype", "float32"])  # what ``python -m numbabn compile --dtype float32`` runs
leaves = {}
for leaf in _jit.BY_ADDRESS:
    for cres in leaf.overloads.values():
        leaves[id(cres.library)] = leaf.__name__


def linked(library):
    # The libraries numba links into ``library`` (its parallel regions' too), recursively.
    for lib in library._linking_libraries:
        yield lib
        yield from linked(lib)


copies = {}
for t in _jit.TWINS:
    for k in ("serial", "parallel"):
        for cres in getattr(t, k).overloads.values():
            copies[f"{t.__name__}.{k}"] = sorted({leaves[id(lib)] for lib in linked(cres.library) if id(lib) in leaves})
print("LEAVES " + json.dumps(copies))
"""

LOAD_CHECK = """
import numpy as np, numbabn
from numba.core import event
rec = event.RecordingListener()
event.register("numba:compile", rec)
for shape in [(32, 64), (2048, 64), (2, 16, 2048), (2, 2, 16384)]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    bn = numbabn.BatchNorm(shape[1]); y = bn(x); bn.backward(y); bn.eval()(x); numbabn.welford(x)
    if len(shape) == 2:  # channel-minor: ghost batches' drivers too
        bn = numbabn.BatchNorm(shape[1], virtual_batch_size=shape[0] // 2); bn.backward(bn(x))
print(sum(1 for _, e in rec.buffer if e.is_start))
"""


def test_compile_command_fills_the_cache_and_links_no_big_leaf(tmp_path):
    """``python -m numbabn compile`` into an empty cache, one process: it says where the
    cache is, every kernel it compiled calls the per-block leaves (``_jit.by_address``)
    through their address (numba links their code into no driver nor its parallel regions,
    to optimize and compile again there), and a later process loads every kernel from the
    cache (numba's dispatchers then hold no compiled-here code).  An empty cache, so every
    library is compiled here and can be inspected."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", COMPILE_AND_INSPECT], env=env, capture_output=True, text=True, check=True
    )
    assert "12/12" not in run.stdout and "6/6" in run.stdout
    assert f"NUMBA_CACHE_DIR={tmp_path}" in run.stdout
    assert any(f.endswith(".nbi") for _, _, files in os.walk(tmp_path) for f in files)
    copies = json.loads(run.stdout.split("LEAVES ", 1)[1])
    # Every family's training, backward and welford drivers, both twins, ghost batches too.
    for name in ("train_fused", "train_strided", "train_minor", "backward_fused", "backward_strided"):
        assert {f"{name}.serial", f"{name}.parallel"} <= set(copies), name
    assert {"train_ghosts_minor.parallel", "backward_ghosts_minor.parallel", "welford_minor.parallel"} <= set(copies)
    # And the drivers of arrays beyond the cache (streaming stores).
    streaming = {"apply_strided_stream", "grad_apply_strided_stream", "apply_minor"}
    streaming |= {"apply_act_strided_stream"}
    assert {f"{name}.{twin}" for name in streaming for twin in ("serial", "parallel")} <= set(copies)
    assert copies == {name: [] for name in copies}
    out = subprocess.run([sys.executable, "-c", LOAD_CHECK], env=env, capture_output=True, text=True, check=True)
    # Loading from the cache fires no compile event for numbabn's own functions; numba may
    # still compile a few of its internal helpers on the way.
    assert int(out.stdout) < 5, out.stdout


def test_cache_falls_back_when_the_install_is_read_only(tmp_path):
    """A copy of numbabn whose source tree cannot take a ``__pycache__`` (as in a read-only
    site-packages) caches in numba's user-wide directory instead, and a second process loads
    from there."""
    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(numbabn.__file__), site / "numbabn", ignore=shutil.ignore_patterns("__pycache__"))
    for root, _, _ in os.walk(site / "numbabn"):
        open(os.path.join(root, "__pycache__"), "w").close()  # a file: no cache directory can go there
    home = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(site), XDG_CACHE_HOME=str(home), HOME=str(tmp_path))
    env.pop("NUMBA_CACHE_DIR", None)
    code = (
        "import numpy as np, numbabn; "
        f"assert numbabn.__file__.startswith({str(site)!r}), numbabn.__file__; "
        "x = np.ones((32, 64), np.float32); x[0] = 2; numbabn.BatchNorm(64)(x); print('ok')"
    )
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    cached = [f for _, _, files in os.walk(home) for f in files if f.endswith(".nbi")]
    assert cached, f"nothing cached under {home}"


def test_indirect_refuses_arguments_that_do_not_fit():
    """A call through an address must match the leaf's fixed signature: a compile error, not a
    call with the wrong arguments."""
    import numba
    import numpy as np

    from numbabn import _jit
    from numbabn.cpu import stats

    @numba.njit
    def driver(at, x3):
        return _jit.indirect(stats.strided_rows, at, (x3, 0, 0))  # r1 missing

    with pytest.raises(numba.core.errors.TypingError, match="strided_rows: arguments"):
        driver(0, np.zeros((1, 1, 1)))


@pytest.mark.parametrize(
    "shape, axis", [((256, 512), 1), ((8, 32, 64), 1), ((4, 8, 8, 16), -1)], ids=["nc", "ncl", "nhwc"]
)
def test_read_only_inputs_share_the_leaves_of_writable_ones(shape, axis):
    """A read-only input (a memory map opened for reading, ``np.broadcast_to``, an array
    marked so) runs the leaves compiled for writable ones: every leaf called through its
    address takes its inputs typed read-only, so no input compiles one twice; and the results
    are the writable input's."""
    import numpy as np

    from numbabn import _jit

    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    xr = x.copy()
    xr.flags.writeable = False
    out = {}
    for name, a in (("writable", x), ("read-only", xr)):
        bn = numbabn.BatchNorm(shape[axis], axis=axis)
        y = bn(a)
        g = np.ones_like(y)
        g.flags.writeable = a.flags.writeable
        out[name] = (y, bn.backward(g), bn.running_var.copy(), bn.eval()(a))
    for got, want in zip(out["read-only"], out["writable"], strict=True):
        np.testing.assert_array_equal(got, want)
    for leaf in _jit.BY_ADDRESS:
        for sig in leaf.overloads:
            assert not any(t.mutable for t in sig[: leaf.inputs]), (leaf.__name__, sig)
