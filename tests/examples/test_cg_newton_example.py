"""Smoke test of examples/cg_newton_mnist.py: a few iterations of each method family, the
table and the PNG; Newton-CG on the GGN lowers the minibatch loss below SGD's."""
import importlib

import pytest


def load_example():
    return importlib.import_module("examples.cg_newton_mnist")


def test_cg_newton_example_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ex = load_example()
    png = tmp_path / "curves.png"
    args = ex.parse_args([
        "--iterations", "2", "--methods", "ggn", "hessian", "pch-clip", "sgd-0.1",
        "--png", str(png), "--no-progress", "--batch-size", "32",
    ])
    res = ex.run(args)
    out = capsys.readouterr().out
    assert "ggn" in out and "sgd-0.1" in out and png.stat().st_size > 1000
    assert all(len(h["loss"]) == 2 for h in res.values())
    assert all(0 < it <= 20 * 10 for it in res["ggn"]["cg_iters"])  # 10 parameters, maxiter 20
