"""Child processes: a parallel-sized call in a child after one in its parent works, and gives
the parent's bits, under every start method and threading layer, whether the parent's threads
are running numbabn at the fork or not, and in PyTorch ``DataLoader`` workers.

Each case runs ``fork_check.py`` in a fresh interpreter, so numba picks its threading layer as
a user's process does.  GNU OpenMP (numba's choice without TBB) kills a forked child in its
first parallel region, so a child forked after a parallel region runs the serial twins, which
compute the same bits.  TBB (the test extra installs ``tbb``) survives ``fork``, so children
keep the parallel kernels, unless other threads of the parent had joined the pool.
"""

import os
import platform
import subprocess
import sys

import pytest

CHECK = os.path.join(os.path.dirname(__file__), "fork_check.py")
#: Where the test extra installs tbb, so numba can run the TBB layer.
TBB = (sys.platform, platform.machine()) in {("linux", "x86_64"), ("win32", "AMD64")}
LAYERS = [None, "omp", "workqueue", *(["tbb"] if TBB else [])]


def _run(*args, layer=None):
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run(
        [sys.executable, CHECK, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "children agree: [0, 1, 2]" in proc.stdout, proc.stdout
    layer = proc.stdout.split("threading layer: ")[1].split()[0]
    serial = proc.stdout.split("children serial: ")[1].split("\n")[0]
    return layer, serial


@pytest.mark.parametrize("layer", LAYERS, ids=lambda v: v or "default")
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_child_after_parent(method, layer):
    ran, serial = _run(method, layer=layer)
    assert layer in (None, ran)
    # Only a forked child of a GNU OpenMP parent gives up the parallel kernels.
    assert serial == ("[True]" if method == "fork" and ran == "omp" else "[False]")


@pytest.mark.parametrize("layer", LAYERS, ids=lambda v: v or "default")
def test_fork_while_threads_run_numbabn(layer):
    _run("fork", "--threads", layer=layer)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(method):
    ran, serial = _run(method, "--dataloader")
    assert serial == ("[True]" if method == "fork" and ran == "omp" else "[False]")


def test_default_layer_with_tbb_installed():
    """With the ``tbb`` package installed, numba runs TBB (numbabn loads its library, which
    pip puts off the loader's path)."""
    if not TBB:
        pytest.skip("the test extra installs tbb on x86-64 Linux and Windows only")
    assert _run("spawn")[0] == "tbb"
