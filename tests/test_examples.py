"""The example scripts run to the end on their small settings (``NUMBABN_DOCS_QUICK=1``),
each in a fresh process with matplotlib's non-interactive Agg backend.

They need scikit-learn and matplotlib, which the ``test`` extra installs (outside it they
are skipped); the documentation build runs them again, embedding their plots."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import numbabn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("plot_*.py"))


def test_examples_found():
    assert len(SCRIPTS) >= 3


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_example_runs(script):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    # The numbabn these tests import (installed or the checkout's), not whatever the
    # script's directory would give.
    here = str(Path(numbabn.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, NUMBABN_DOCS_QUICK="1", MPLBACKEND="Agg", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
