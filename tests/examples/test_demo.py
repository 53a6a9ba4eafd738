"""The MNIST demo trains: KFAC-SGD lowers the loss faster than SGD (short run in CI)."""
import importlib.util
import os
from pathlib import Path

import pytest

SLOW = os.environ.get("CURVLIB_SLOW") == "1"


def load_demo():
    path = Path(__file__).resolve().parents[2] / "examples" / "train_mnist_kfac.py"
    spec = importlib.util.spec_from_file_location("train_mnist_kfac", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("steps", [pytest.param(300, marks=pytest.mark.slow), 60])
def test_kfac_demo_beats_sgd(steps):
    if steps == 300 and not SLOW:
        pytest.skip("long run: set CURVLIB_SLOW=1")
    demo = load_demo()
    res = demo.run(demo.parse_args(["--steps", str(steps)]))
    mean = lambda xs: sum(xs) / len(xs)
    first, last_kfac, last_sgd = res["kfac"][0], mean(res["kfac"][-10:]), mean(res["sgd"][-10:])
    assert last_kfac < 0.5 * first
    assert last_kfac < last_sgd
    if steps == 300:
        assert res["acc_kfac"] > 0.95
