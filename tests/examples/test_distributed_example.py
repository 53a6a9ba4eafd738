"""``examples.distributed_mnist`` launched exactly as the README says, with torchrun (slow: a
launcher and two fresh interpreters). The default suite runs the example briefly inside the
spawned group of tests/optim/test_distributed.py instead."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_two_processes():
    if os.environ.get("CURVLIB_SLOW") != "1":
        pytest.skip("long run: set CURVLIB_SLOW=1")
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "examples.distributed_mnist", "--steps", "4", "--every", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stdout and "inverses built per rank" in out.stdout, out.stdout
