"""Smoke test of ``benchmarks/time_to_loss.py --quick``: torch peers and curvlib only (the
benchmark-only peers may be absent), the CSV, PNG and table written, a diverging run recorded
instead of crashing the benchmark, an absent peer skipped."""
import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "time_to_loss.py"


def load(monkeypatch):
    spec = importlib.util.spec_from_file_location("time_to_loss", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "time_to_loss", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_quick_cnn(tmp_path, monkeypatch, capsys):
    ttl = load(monkeypatch)
    exploding = ttl.Method(
        lambda m, pb, lr: ttl.TorchTrainer(m, pb, torch.optim.SGD(m.parameters(), lr=lr)), [dict(lr=1e12)]
    )
    monkeypatch.setitem(ttl.METHODS, "exploding", exploding)
    unbuildable = ttl.Method(lambda m, pb, lr: ttl.TorchTrainer(m, pb, torch.optim.SGD(m.parameters(), lr=lr, nesterov=1, x=2)),
                             [dict(lr=0.1)])
    monkeypatch.setitem(ttl.METHODS, "unbuildable", unbuildable)
    monkeypatch.setattr(ttl.METHODS["soap"], "needs", "a_package_that_is_not_installed")
    methods = ["adamw", "sgd", "kfac", "exploding", "soap", "unbuildable", "eigen-adam"]
    # a point may override a setting the method fixes (eigen-adam's T_inv=10)
    results = ttl.main(["--quick", "--problems", "cnn", "--methods", *methods, "--out", str(tmp_path),
                        "--points", "eigen-adam:lr=0.003,T_inv=5"])
    out = capsys.readouterr().out
    assert "skipping soap" in out

    with open(tmp_path / "cnn.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"adamw", "sgd", "kfac", "exploding", "unbuildable", "eigen-adam"}
    for m in ("adamw", "kfac", "eigen-adam"):
        mine = [r for r in rows if r["method"] == m]
        assert [int(r["epoch"]) for r in mine] == [0, 1, 2]
        losses = [float(r["train_loss"]) for r in mine]
        assert losses[-1] < losses[0], (m, losses)
        assert float(mine[-1]["seconds"]) > float(mine[1]["seconds"]) > 0
        assert mine[-1]["status"] == "ok"
    boom = [r for r in rows if r["method"] == "exploding"]
    assert boom[-1]["status"].startswith("diverged at step"), boom[-1]
    assert math.isnan(float(boom[-1]["train_loss"]))
    # an error that is not a non-finite value is a failure, not a divergence
    broken = [r for r in rows if r["method"] == "unbuildable"]
    assert broken[-1]["status"].startswith("failed to build: TypeError"), broken[-1]

    table = (tmp_path / "cnn.md").read_text()
    for m in ("adamw", "sgd", "kfac"):
        assert f"| {m} |" in table
    assert "| exploding (diverged) |" in table and "1/1" in table
    assert "| unbuildable (failed) |" in table
    assert (tmp_path / "cnn.png").stat().st_size > 5000

    summary = results["cnn"]["summary"]
    adamw = next(r for r in summary["rows"] if r["method"] == "adamw")
    assert adamw["final_loss"] == pytest.approx(summary["adam_final"])
    assert adamw["step_ratio"] == pytest.approx(1.0)
