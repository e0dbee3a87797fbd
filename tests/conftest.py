"""Shared test helpers: run a script under torchrun (2 ranks, gloo, CPU) from inside pytest."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the component files live at top level (no package)


@pytest.fixture(scope="session")
def torchrun():
    """Returns run(script, *args, nproc=2, timeout=300, codes=(0,)) -> CompletedProcess; fails the test on an
    exit code not in `codes` (torchrun itself exits 1 when a worker exits non-zero, e.g. train.py's 75 = stopped).

    Launched as `python -m torch.distributed.run` so the ranks use this interpreter and environment."""

    def run(script, *args, nproc=2, timeout=300, codes=(0,)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script), *map(str, args)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
        if p.returncode not in codes:
            pytest.fail(f"torchrun failed ({p.returncode}):\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}")
        return p

    return run
