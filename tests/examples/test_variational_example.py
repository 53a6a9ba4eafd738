"""Smoke test of examples/variational_digits.py: two epochs of every method (IVON only where
``ivon-opt`` is installed), the table and the reliability-diagram PNG are written, every method
beats chance (10 classes) on the test set, the metrics are in range, and a rerun with the same
seed reproduces the numbers exactly."""
import importlib.util

import pytest

pytest.importorskip("sklearn")


def load_example():
    return importlib.import_module("examples.variational_digits")


def test_variational_example_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ex = load_example()
    methods = [m for m in ex.METHODS if m != "ivon" or importlib.util.find_spec("ivon") is not None]
    argv = ["--epochs", "2", "--samples", "3", "--no-progress", "--out", str(tmp_path), "--methods", *methods]
    res = ex.run(ex.parse_args(argv))
    out = capsys.readouterr().out
    table = (tmp_path / "variational_digits.md").read_text()
    assert (tmp_path / "variational_digits.png").stat().st_size > 5000
    for m in methods:
        assert f"| {m} |" in table and f"| {m} |" in out
        r = res[m]
        assert r["acc"] > 0.5, (m, r["acc"])  # chance is 0.1
        assert 0 < r["nll"] < 2.3 and 0 <= r["ece"] <= 1  # log(10) = 2.30: beats the uniform predictive
        assert int(r["count"].sum()) == 540  # every test point in one bin

    again = ex.run(ex.parse_args(argv[:-len(methods)] + ["vogn"]))
    assert again["vogn"]["nll"] == res["vogn"]["nll"]  # seeded and deterministic


def test_ece_matches_a_loop_reference():
    import torch

    ex = load_example()
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 10, generator=g), -1)
    y = torch.randint(0, 10, (500,), generator=g)
    conf, pred = probs.max(-1)
    ece = 0.0
    for k in range(15):
        inside = (conf > k / 15) & (conf <= (k + 1) / 15)
        if inside.any():
            ece += inside.sum().item() / 500 * abs((pred[inside] == y[inside]).double().mean().item()
                                                  - conf[inside].double().mean().item())
    r = ex.metrics(probs, y)
    assert r["ece"] == pytest.approx(ece, rel=1e-6)
    assert r["nll"] == pytest.approx(torch.nn.functional.nll_loss(probs.log(), y).item(), rel=1e-5)
