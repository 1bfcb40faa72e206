"""SyncBatchNorm across real processes: ``mpiexec -n 2`` and ``-n 3`` run
``mpi_sync_check.py`` (mpi4py and MPICH from PyPI, the ``mpi`` extra, which the ``test``
extra includes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import numbabn

CHECK = Path(__file__).resolve().parent / "mpi_sync_check.py"


def mpiexec():
    """MPICH's ``mpiexec`` installed beside this Python (the ``mpich`` wheel puts it in the
    environment's ``bin``), or a skip saying what is missing."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'numbabn[mpi]')")
    path = Path(sys.executable).parent / ("mpiexec.exe" if os.name == "nt" else "mpiexec")
    if not path.exists():
        pytest.skip(f"no mpiexec beside {sys.executable} (pip install 'numbabn[mpi]' installs MPICH's)")
    return str(path)


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batchnorm_over_mpi(ranks):
    here = str(Path(numbabn.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    # One numba thread per rank: the ranks share the machine's cores.  The fork launcher
    # starts the ranks on this machine without ssh, and "localhost" needs no resolvable host name.
    env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [mpiexec(), "-launcher", "fork", "-hosts", "localhost", "-n", str(ranks), sys.executable, str(CHECK)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert f"{ranks} ranks: 0 mismatches" in proc.stderr
