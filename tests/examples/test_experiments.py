"""Smoke tests of the experiment CLIs (``examples/exp_*.py``): each runs one epoch of a couple of
steps on a small subset, writes its CSV, PNG and table, and lowers the training loss; runs are
seeded and deterministic."""
import csv
import importlib
import math

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def load(name):
    """``examples.<name>``, the module ``python -m examples.<name>`` runs."""
    return importlib.import_module(f"examples.{name}")


def tiny(out, *methods, steps=2, batch=32, subset=128, extra=()):
    return ["--epochs", "1", "--max-steps", str(steps), "--batch-size", str(batch), "--subset", str(subset),
            "--no-progress", "--out", str(out), *extra, "--methods", *methods]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def check_outputs(out, name, methods, decrease=True):
    rows = read_csv(out / f"{name}.csv")
    assert (out / f"{name}.png").stat().st_size > 5000
    table = (out / f"{name}.md").read_text()
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        assert [int(r["epoch"]) for r in mine] == [0, 1], (m, mine)
        assert f"| {m} |" in table
        assert float(mine[1]["wall_time_s"]) > 0
        if decrease:
            first, last = float(mine[0]["train_loss"]), float(mine[1]["train_loss"])
            assert math.isfinite(last) and last < first, (m, first, last)
    return rows


def test_autoencoder(tmp_path, capsys):
    ex = load("exp_autoencoder")
    methods = ["kfac", "kfac-corrected", "adam"]
    ex.main(tiny(tmp_path, *methods))
    check_outputs(tmp_path, "autoencoder", methods)
    assert "0.0692" in capsys.readouterr().out  # the paper's KFAC loss beside ours


def test_autoencoder_paper_hyper_conversion():
    ex = load("exp_autoencoder")
    h = ex.paper_hyper(0.01, 1e-4, 0.01, batch=512)
    assert h == pytest.approx(dict(lr=0.01 / 512, damping=1e-4 / 512, kl_clip=1e-6 / 512))


def test_two_level_cnn(tmp_path):
    ex = load("exp_two_level")
    methods = ["kfac", "2l-nicolaides", "2l-tpselepedis-krylov", "2l-residual-mult"]
    ex.main(tiny(tmp_path, *methods, extra=("--model", "cnn", "--lr", "0.05")))
    rows = check_outputs(tmp_path, "two_level_cnn", methods)
    assert "lr 0.05," in (tmp_path / "two_level_cnn.md").read_text()
    # the additive (default) and multiplicative forms are different methods
    last = {r["method"]: r["train_loss"] for r in rows if r["epoch"] == "1"}
    assert last["2l-residual-mult"] != last["2l-nicolaides"]


def test_two_level_default_methods_are_the_additive_ones():
    ex = load("exp_two_level")
    args = ex.parse_args(["--model", "cnn"])
    assert args.methods[0] == "kfac" and len(args.methods) == 9
    assert not any(m.endswith("-mult") for m in args.methods)


def test_cnn(tmp_path):
    ex = load("exp_cnn")
    methods = ["kfac", "kpsvd", "sgd"]
    ex.main(tiny(tmp_path, *methods, steps=3))
    check_outputs(tmp_path, "cnn", methods)


def test_conv_autoencoder(tmp_path):
    ex = load("exp_conv_autoencoder")
    methods = ["kfac", "kpsvd", "kfac-corrected"]
    ex.main(tiny(tmp_path, *methods))
    check_outputs(tmp_path, "conv_autoencoder", methods)


def test_dcgan(tmp_path):
    ex = load("exp_dcgan")
    methods = ["G-kfac/D-kfac", "G-adam/D-adam"]
    res = ex.run(ex.parse_args(tiny(tmp_path, *methods)))
    rows = read_csv(tmp_path / "dcgan.csv")
    assert {r["method"] for r in rows} == set(methods)
    assert all(r.failure is None for r in res.values())
    for name in ("dcgan.png", "dcgan_samples.png"):
        assert (tmp_path / name).stat().st_size > 5000
    assert all(math.isfinite(float(r["loss_D"])) for r in rows if r["epoch"] == "1")


def test_exact_ng_deterministic(tmp_path):
    ex = load("exp_exact_ng")
    methods = ["exact-ng", "kfac"]
    ex.main(tiny(tmp_path / "a", *methods, batch=64, subset=256))
    rows = check_outputs(tmp_path / "a", "exact_ng", methods)
    ex.main(tiny(tmp_path / "b", *methods, batch=64, subset=256))
    again = read_csv(tmp_path / "b" / "exact_ng.csv")
    key = lambda rs: [(r["method"], r["train_loss"], r["test_metric"]) for r in rs]
    assert key(rows) == key(again)  # seeded and deterministic on CPU


def test_readme_demo(tmp_path, capsys):
    """The README's demo (``python -m examples.demo``): progress, table, PNG, both losses lower; the
    summary line compares KFAC with Adam."""
    ex = load("demo")
    ex.main(tiny(tmp_path, "kfac", "adam", steps=8, batch=32, subset=256))
    check_outputs(tmp_path, "demo", ["kfac", "adam"])
    out = capsys.readouterr().out
    assert "KFAC: " in out and "At KFAC's" in out
