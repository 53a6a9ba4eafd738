"""The MNIST demo trains: KFAC-SGD lowers the loss faster than SGD (short run in CI)."""
import importlib
import os

import pytest

SLOW = os.environ.get("CURVLIB_SLOW") == "1"


def load_demo():
    return importlib.import_module("examples.train_mnist_kfac")


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


@pytest.mark.parametrize("mode", ["lines", "tqdm"])
def test_demo_shows_progress_and_final_table(mode, capsys):
    """The demo reports progress while it trains (stderr) and prints the table at the end (stdout)."""
    if mode == "tqdm":
        pytest.importorskip("tqdm")
    demo = load_demo()
    demo.main(["--steps", "4", "--every", "2", "--progress", mode])
    out, err = capsys.readouterr()
    for name in ("SGD+momentum", "KFAC-SGD"):
        if mode == "lines":
            assert f"{name}: step    2/4" in err and f"{name}: step    4/4" in err, err
        else:
            assert name in err and "4/4" in err, err
    assert "| step | SGD+momentum | KFAC-SGD |" in out and "test accuracy" in out, out
    assert "|    4 |" in out


def test_demo_progress_off_is_silent(capsys):
    demo = load_demo()
    bar = demo.Progress(3, "x", every=1, mode="off")
    for loss in (1.0, 2.0, 3.0):
        bar.update(loss)
    bar.close()
    assert capsys.readouterr() == ("", "")
