"""``max_factor_dim`` per param group, and groups without Kronecker curvature (``curvature=None``,
``"diag"``) that get no factors built (docs/design.md §2); the 1 GB memory bound of a vocabulary
model (Embedding(50,000, 64) -> Linear -> Tanh -> Linear(64, 50,000), 8 x 16 tokens)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from curvlib import extend
from curvlib.engine import factors
from curvlib.optim import NaturalGradient
from tests.optim.common import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup(V=300):
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, V)))
    loss_fn = extend(nn.CrossEntropyLoss())
    return model, loss_fn, torch.randn(7, 4), torch.randint(0, V, (7,))


def spy_factor_sides(monkeypatch):
    """Record the last dimension of every KFAC factor the engine builds."""
    seen = []
    for fn in ("kfac_cot_factor", "kfac_act_factor", "gram_rows", "diag_rows"):
        orig = getattr(factors, fn)

        def spy(t, *a, _orig=orig, **k):
            seen.append(t.shape[-1])
            return _orig(t, *a, **k)

        monkeypatch.setattr(factors, fn, spy)
    return seen


@pytest.mark.parametrize("head_curvature", [None, "diag"])
@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_group_without_kronecker_curvature_builds_no_factors(head_curvature, fisher_type, monkeypatch):
    """The 300-way head in a ``curvature=None`` / ``"diag"`` group: no factor over its 300 outputs is
    built and it stores no ``p.kfac``; the body's group gets its KFAC, the head (``"diag"``) its
    diagonal. Before, every extended layer got the KFAC of every capture (a ``Linear(256, 50_000)``
    head: a 10 GB ``G``)."""
    model, loss_fn, x, y = setup()
    opt = NaturalGradient([
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "curvature": head_curvature},
    ], lr=0.1, fisher_type=fisher_type)
    seen = spy_factor_sides(monkeypatch)
    before = model[2].weight.detach().clone()
    train_step(model, loss_fn, opt, x, y)
    assert seen and 300 not in seen, seen
    assert "kfac" in model[0].weight.__dict__ and "kfac" not in model[2].weight.__dict__
    assert "kfac" not in model[2].bias.__dict__
    assert ("diag_ggn" in model[2].weight.__dict__) == (head_curvature == "diag")
    assert "diag_ggn" not in model[0].weight.__dict__
    if head_curvature is None:  # the plain step
        torch.testing.assert_close(model[2].weight.detach(), before - 0.1 * model[2].weight.grad)


def test_group_max_factor_dim_step_is_the_damped_inverse(monkeypatch):
    """A group with ``max_factor_dim=8``: the head's ``G`` (12 outputs) is 1-D, and one step is
    ``-lr (kron(diag(G), A) + λ I)^-1 g`` (reference semantics with ``C_p`` the diagonal-times-dense
    block), with the dense group untouched."""
    torch.set_default_dtype(torch.float64)
    try:
        model, loss_fn, x, y = setup(V=12)
        opt = NaturalGradient([
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "max_factor_dim": 8},
        ], lr=0.5, fisher_type="type-2", damping=1e-2, damping_mode="exact", T_cov=1, T_inv=1, kl_clip=None,
            momentum=0.0)
        W0 = model[2].weight.detach().clone()
        train_step(model, loss_fn, opt, x, y)
        G, A = model[2].weight.kfac
        assert G.shape == (12,) and A.shape == (5, 5)
        assert [f.shape for f in model[0].weight.kfac] == [(5, 5), (4, 4)]
        C = torch.kron(torch.diag(G), A) + 1e-2 * torch.eye(60)
        step = torch.linalg.solve(C, model[2].weight.grad.flatten()).reshape(12, 5)
        torch.testing.assert_close(model[2].weight.detach(), W0 - 0.5 * step)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8"])
def test_group_max_factor_dim_is_validated(bad):
    model, _, _, _ = setup()
    with pytest.raises(ValueError, match=r"param group 1: max_factor_dim"):
        NaturalGradient([{"params": model[0].parameters()}, {"params": model[2].parameters(), "max_factor_dim": bad}],
                        lr=0.1)


def test_kpsvd_group_refuses_a_side_above_max_factor_dim():
    model, loss_fn, x, y = setup(V=12)
    opt = NaturalGradient(model.parameters(), lr=0.1, curvature="kpsvd", fisher_type="type-2", max_factor_dim=8)
    with pytest.raises(NotImplementedError, match=r"KPSVD of the weight of Linear\(in_features=5, out_features=12"):
        train_step(model, loss_fn, opt, x, y)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    from curvlib import extend
    from curvlib.optim import NaturalGradient
    torch.manual_seed(0)
    torch.set_num_threads(1)
    V, D, max_factor_dim = 50_000, 64, json.loads(sys.argv[1])
    model = extend(nn.Sequential(nn.Embedding(V, D), nn.Linear(D, D), nn.Tanh(), nn.Linear(D, V)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randint(0, V, (8, 16)), torch.randint(0, V, (8 * 16,))
    kw = {} if max_factor_dim == "default" else {"max_factor_dim": max_factor_dim}
    opt = NaturalGradient(model.parameters(), lr=1e-2, curvature="kfac", fisher_type="mc", **kw)
    kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS so far (KiB, Linux)
    before = kib()
    for _ in range(2):
        opt.zero_grad()
        loss = loss_fn(model(x).flatten(0, 1), y)
        with opt.capture():
            loss.backward()
        opt.step()
    G, A = model[3].weight.kfac
    print(json.dumps({"before": before, "peak": kib(), "G": list(G.shape), "A": list(A.shape),
                      "finite": all(bool(p.isfinite().all()) for p in model.parameters())}))
""")


def vocabulary_peak(max_factor_dim="default"):
    """Peak RSS growth (bytes) of KFAC + two NaturalGradient steps in a fresh process."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(max_factor_dim)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return (res["peak"] - res["before"]) * 1024, res


def test_vocabulary_model_stays_within_one_gigabyte():
    """The default ``max_factor_dim`` keeps the head's 50,000-dimensional ``G`` diagonal (dense it is
    10 GB in float32, ``max_factor_dim=None``); the Embedding's token factor is 1-D anyway. Peak RSS
    beyond the model (``ru_maxrss`` in a fresh process, which sees torch's CPU allocations; tracemalloc
    does not)."""
    grown, res = vocabulary_peak()
    assert res["G"] == [50_000] and res["A"] == [64, 64] and res["finite"]
    assert grown < 2**30, f"peak RSS grew by {grown / 2**20:.0f} MiB"
