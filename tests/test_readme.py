"""The README's usage block runs as written, in a fresh process: what a new user copies
first must work (the quickstart's two commands are checked by .ci/run)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_usage_block_runs():
    text = README.read_text()
    usage = text[text.index("## Usage") :]
    block = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    assert "load_state_dict" in block and "dtype=np.float64" in block
    run = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
