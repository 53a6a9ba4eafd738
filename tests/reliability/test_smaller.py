"""Smaller reliability cases: mc_samples outside "mc", KPSVD rank above the block's maximum,
the KPSVD warm-start cache, and the test environment's torchvision."""
from __future__ import annotations

import configparser
import gc
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import GGNMP, KFAC, KPSVD, BatchGrad, ExactBlockFisher

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("ext", [KFAC, KPSVD, GGNMP, ExactBlockFisher])
def test_mc_samples_outside_mc_is_refused(ext, fisher_type):
    with pytest.raises(ValueError, match="mc_samples applies to fisher_type='mc' only"):
        ext(fisher_type=fisher_type, mc_samples=5)
    ext(fisher_type="mc", mc_samples=5)
    ext(fisher_type=fisher_type, mc_samples=1)


def kpsvd_run(model, ext, n=6):
    torch.manual_seed(0)
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    loss = extend(nn.CrossEntropyLoss())(model(x), y)
    with curvature(ext):
        loss.backward()
    return x, y


def test_kpsvd_rank_above_the_block_maximum_is_clamped_with_one_warning(float64):
    model = extend(nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)))
    ext = KPSVD("type-2", rank=40, method="lanczos")
    with pytest.warns(UserWarning, match="KPSVD.rank=40. exceeds the 4 Kronecker terms") as rec:
        kpsvd_run(model, ext)
    assert len([w for w in rec if "exceeds" in str(w.message)]) == 2  # one per weight shape (2x3, 2x2)
    w = model[0].weight  # [2, 3]: at most min(2^2, 3^2) = 4 terms, which are exact
    assert len(w.kpsvd) == 4 and len(model[2].weight.kpsvd) == 4
    F = sum(torch.kron(G, A) for G, A in w.kpsvd)
    ext2 = ExactBlockFisher(fisher_type="type-2")
    model.zero_grad()
    kpsvd_run(model, ext2)
    torch.testing.assert_close(F, w.block_fisher, rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings(record=True) as again:  # announced once per extension
        warnings.simplefilter("always")
        kpsvd_run(model, ext)
    assert not [x for x in again if "exceeds" in str(x.message)]


def test_kpsvd_warm_start_cache_does_not_outlive_its_parameters():
    ext = KPSVD("type-2", rank=1)
    for _ in range(3):  # new models, as in a hyper-parameter sweep
        model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
        kpsvd_run(model, ext)
        assert len(ext._warm) == 2
        del model
        gc.collect()
    assert len(ext._warm) == 0


def test_batch_grad_reuse_condition_is_documented():
    doc = BatchGrad.__doc__
    for needle in ("only Python reference", "shares its", "_storage_Use_Count", "contiguous"):
        assert needle in doc


def test_test_environment_keeps_torchvision_out():
    """BackPACK requires torchvision (it imports it only in ``backpack/utils/examples.py``), whose
    PyPI wheel cannot load next to the CPU torch; the references are installed with
    ``--no-deps`` by the README's test command, which ``.ci/run`` runs verbatim."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extra = cfg["options.extras_require"]["test"]
    assert "backpack" not in extra and "curvlinops" not in extra and "torchvision" not in extra
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in l]
    assert len(ci) == 1 and ci[0] in (ROOT / "README.md").read_text()
    second = re.search(r"pip install (.*?) &&", ci[0].split("&&", 1)[1]).group(1)
    assert "--no-deps" in second and "backpack-for-pytorch==1.7.1" in second
    assert "curvlinops-for-pytorch==3.0.1" in second
