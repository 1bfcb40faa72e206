"""Child processes: a parallel-sized call in a child after one in its parent works, and gives
the parent's bits, under every start method, whether the parent's threads are running numbabn
at the fork or not, and in PyTorch ``DataLoader`` workers.

Each case runs ``fork_check.py`` in a fresh interpreter, so numba picks its threading layer as
a user's process does: TBB (numbabn depends on the ``tbb`` package), which survives ``fork``,
so children keep the parallel kernels.  The GNU OpenMP layer does not (a child's first
parallel region would kill it), nor a TBB pool that other threads had joined at the fork:
there, a forked child runs the serial twins, which compute the same bits.
"""

import os
import platform
import subprocess
import sys

import pytest

CHECK = os.path.join(os.path.dirname(__file__), "fork_check.py")


def _run(*args, layer=None):
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run(
        [sys.executable, CHECK, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "children agree: [0, 1, 2]" in proc.stdout, proc.stdout
    return proc.stdout


TBB = sys.platform.startswith("linux") and platform.machine() == "x86_64"  # where numbabn installs tbb


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_child_after_parent(method):
    out = _run(method)
    if TBB:
        assert "threading layer: tbb" in out, "numba did not start TBB from numbabn's tbb dependency"
        assert "children serial: [False]" in out, "children lost the parallel kernels"


def test_fork_while_threads_run_numbabn():
    _run("fork", "--threads")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(method):
    out = _run(method, "--dataloader")
    if TBB:
        assert "children serial: [False]" in out


@pytest.mark.parametrize("args", [["fork"], ["fork", "--threads"], ["fork", "--dataloader"]], ids=" ".join)
def test_gnu_openmp_children_run_serial(args):
    """Where the user picks GNU OpenMP, forked children still work, serially."""
    out = _run(*args, layer="omp")
    assert "threading layer: omp" in out
    assert "children serial: [True]" in out


def test_workqueue_children():
    assert "threading layer: workqueue" in _run("fork", "--threads", layer="workqueue")
