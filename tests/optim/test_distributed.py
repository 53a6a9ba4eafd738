"""Data-parallel optimizers over gloo on CPU: 2 processes on half-batches against 1 process on the
whole batch (float64, 1e-10), inverse sharding, non-finite values, checkpoints, CG-Newton.

All cases run in one ``torch.multiprocessing.spawn`` of 2 processes (file:// rendezvous in a
temporary directory); each rank also computes the 1-process reference on the concatenated batch
itself (``process_group=None``) and asserts. An assertion in a worker fails the test.
"""
from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from curvlib import extend
from curvlib.optim import CGNewton, NaturalGradient, Preconditioner
from curvlib.optim.distributed import assign, pack, unpack
from tests.utils import mark_rank_done, spawn_ranks

W = 2
TOL = 1e-10


def _net(seed=0):
    torch.manual_seed(seed)
    return extend(nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 3),
    ).double())


def _batches(steps, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for _ in range(steps)]


def _local(x, rank):
    n = x.shape[0] // W
    return x[rank * n:(rank + 1) * n]


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


HYPER = dict(curvature="kfac", damping=1e-2, T_cov=1, T_inv=2, ema_decay=0.9, momentum=0.9, kl_clip=1e-2, seed=3,
             curvature_warmup=0)


def _train(model, opt, batches, rank=None, micro=1, ddp=None):
    loss_fn = extend(nn.CrossEntropyLoss())
    run = ddp if ddp is not None else model
    for x, y in batches:
        if rank is not None:
            x, y = _local(x, rank), _local(y, rank)
        opt.zero_grad()
        xs, ys = x.chunk(micro), y.chunk(micro)
        with opt.capture():
            for i, (xm, ym) in enumerate(zip(xs, ys)):
                last = i == micro - 1
                ctx = ddp.no_sync() if (ddp is not None and not last) else _null()
                with ctx:
                    loss_fn(run(xm), ym).backward()
        opt.step()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _case_matches_one_process(rank, tmp):
    """type-2 / empirical x (no DDP, DDP) x damping modes; DDP with no_sync accumulation."""
    batches = _batches(4)
    total_inv = 0
    for fisher, ddp, mode, micro in [
        ("type-2", False, "pi", 1), ("empirical", False, "exact", 1),
        ("type-2", True, "exact", 1), ("empirical", True, "pi", 2),
    ]:
        ref = _net()
        ref_opt = NaturalGradient(ref.parameters(), lr=0.1, fisher_type=fisher, damping_mode=mode, process_group=None, **HYPER)
        # 1 process, same micro-batches (each the concatenation of the ranks' micro-batches)
        ref_batches = []
        for x, y in batches:
            parts = [(_local(x, r).chunk(micro), _local(y, r).chunk(micro)) for r in range(W)]
            ref_batches.append((torch.cat([torch.cat([parts[r][0][m] for r in range(W)]) for m in range(micro)]),
                                torch.cat([torch.cat([parts[r][1][m] for r in range(W)]) for m in range(micro)])))
        _train(ref, ref_opt, ref_batches, micro=micro)
        model = _net()
        opt = NaturalGradient(model.parameters(), lr=0.1, fisher_type=fisher, damping_mode=mode, check_sync=True, **HYPER)
        assert opt.distributed is not None and opt.distributed.world == W
        wrapped = DDP(model) if ddp else None
        before = opt.distributed.stats["inverses"]
        # rank r's micro-batch m must be the r-th slice of the reference's micro-batch m
        mine = []
        for xr, yr in ref_batches:
            xs, ys = xr.chunk(micro), yr.chunk(micro)
            mine.append((torch.cat([_local(a, rank) for a in xs]), torch.cat([_local(b, rank) for b in ys])))
        _train(model, opt, mine, micro=micro, ddp=wrapped)
        err = float((_params(model) - _params(ref)).abs().max())
        assert err < TOL, f"{fisher} ddp={ddp} mode={mode} micro={micro}: max |2 proc - 1 proc| = {err:.3g}"
        print(f"rank {rank}: {fisher} ddp={ddp} {mode} micro={micro}: max |2 proc - 1 proc| = {err:.2g}", flush=True)
        built = opt.distributed.stats["inverses"] - before
        n = torch.tensor([built])
        dist.all_reduce(n)
        # 6 parameters with curvature, inverses at steps 0 and 2: each built once in the group
        assert int(n) == 6 * 2, int(n)
        assert 0 < built < 12, built  # shared between the ranks
        total_inv += built
        last = opt.distributed.last
        assert last["bucket_bytes"] > 0 and last["grads_synced"] == ddp


def _case_factor_scaling(rank, tmp):
    """Unequal local batches (3 and 5 samples): A is the concatenated batch's (weighted by rows,
    here samples x 16 conv positions), G the mean of the ranks' G (the curvature of the averaged
    loss), not their sum."""
    from curvlib import curvature
    from curvlib.extensions import KFAC

    x, y = _batches(1)[0]
    sl = [slice(0, 3), slice(3, 8)]
    model = _net()
    opt = NaturalGradient(model.parameters(), lr=0.0, fisher_type="type-2", damping=1.0, process_group="auto")
    loss_fn = extend(nn.CrossEntropyLoss())
    opt.zero_grad()
    with opt.capture():
        loss_fn(model(x[sl[rank]]), y[sl[rank]]).backward()
    opt.step()
    got = {n: [t.clone() for t in opt.state[p]["running"]] for n, p in model.named_parameters()}

    def factors(xs, ys):
        ref = _net()
        with curvature(KFAC("type-2")):
            loss_fn(ref(xs), ys).backward()
        return {n: p.kfac for n, p in ref.named_parameters()}

    whole, parts = factors(x, y), [factors(x[s], y[s]) for s in sl]
    for name in ("0.weight", "3.weight", "5.weight"):
        G, A = got[name]
        assert torch.allclose(A, whole[name][1], rtol=1e-12, atol=1e-14), name
        assert torch.allclose(G, (parts[0][name][0] + parts[1][name][0]) / 2, rtol=1e-12, atol=1e-14), name
    assert torch.allclose(got["5.bias"][0], (parts[0]["5.bias"][0] + parts[1]["5.bias"][0]) / 2, rtol=1e-12)
    # "mc" in distribution: with many targets per datum (drawn per rank) G approaches type-2's
    model = _net()
    opt = NaturalGradient(model.parameters(), lr=0.0, fisher_type="mc", mc_samples=4000, damping=1.0, seed=5)
    opt.zero_grad()
    with opt.capture():
        loss_fn(model(x[sl[rank]]), y[sl[rank]]).backward()
    opt.step()
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            G, want = opt.state[p]["running"][0], (parts[0][name][0] + parts[1][name][0]) / 2
            assert float((G - want).norm() / want.norm()) < 0.1, name


def _case_preconditioner(rank, tmp):
    batches = _batches(3, seed=5)
    out = []
    for r in (None, rank):
        model = _net()
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        pre = Preconditioner(model.parameters(), optimizer=sgd, fisher_type="type-2", damping=1e-2, T_inv=2,
                             kl_clip=1e-2, process_group=None if r is None else "auto")
        loss_fn = extend(nn.CrossEntropyLoss())
        for x, y in batches:
            if r is not None:
                x, y = _local(x, r), _local(y, r)
            sgd.zero_grad()
            with pre.capture():
                loss_fn(model(x), y).backward()
            pre.step()
            sgd.step()
        out.append(_params(model))
    assert float((out[0] - out[1]).abs().max()) < TOL


def _case_cg_newton(rank, tmp):
    batches = _batches(2, seed=7)
    out = []
    for r in (None, rank):
        for block in (True, False):
            model = _net()
            opt = CGNewton(model.parameters(), lr=0.5, damping=1e-1, maxiter=50, tol=1e-12, atol=0.0,
                           block_diagonal=block, precondition="kfac", process_group=None if r is None else "auto")
            _train(model, opt, batches, rank=r)
            out.append(_params(model))
    for a, b in zip(out[:2], out[2:]):
        assert float((a - b).abs().max()) < TOL


def _case_non_finite(rank, tmp):
    model = _net()
    opt = NaturalGradient(model.parameters(), lr=0.1, fisher_type="type-2", **HYPER)
    ddp = DDP(model)
    x, y = _batches(1)[0]
    _train(model, opt, [(x, y)], rank=rank, ddp=ddp)
    before = _params(model).clone()
    state = copy.deepcopy(opt.state_dict())
    # rank 1 alone gets a NaN in its curvature (not in its gradient: DDP would spread that one)
    loss_fn = extend(nn.CrossEntropyLoss())
    xl, yl = _local(x, rank), _local(y, rank)
    opt.zero_grad()
    with opt.capture():
        loss_fn(ddp(xl), yl).backward()
    if rank == 1:
        model[3].weight.kfac[1][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"rank\(s\) \[1\] of 2"):
        opt.step()
    assert torch.equal(_params(model), before)
    assert str(opt.state_dict()["curvlib"]) == str(state["curvlib"])
    # without DDP a NaN gradient on rank 0 likewise stops both ranks
    model2 = _net()
    opt2 = NaturalGradient(model2.parameters(), lr=0.1, fisher_type="empirical", **HYPER)
    opt2.zero_grad()
    xb = xl.clone()
    if rank == 0:
        xb[0, 0, 0, 0] = float("inf")
    with opt2.capture():
        nn.CrossEntropyLoss()(model2(xb), yl).backward()
    with pytest.raises(FloatingPointError, match=r"rank\(s\) \[0\] of 2"):
        opt2.step()
    # mc: NaN logits on rank 1 alone used to fail inside its own backward (torch.multinomial)
    # while rank 0 waited in step(); now both raise in step()
    model4 = _net()
    opt4 = NaturalGradient(model4.parameters(), lr=0.1, fisher_type="mc", **HYPER)
    xm = xl.clone()
    if rank == 1:
        xm[0, 0, 0, 0] = float("nan")
    opt4.zero_grad()
    with opt4.capture():
        loss_fn(model4(xm), yl).backward()
    with pytest.raises(FloatingPointError, match=r"rank\(s\) \[1\] of 2"):
        opt4.step()
    # the next batch trains on both ranks (no deadlock)
    _train(model, opt, _batches(1, seed=9), rank=rank, ddp=ddp)
    # check_sync catches parameters that drifted apart
    model3 = _net()
    opt3 = NaturalGradient(model3.parameters(), lr=0.1, fisher_type="type-2", check_sync=True, **HYPER)
    if rank == 1:
        with torch.no_grad():
            model3[0].bias.add_(1e-3)
    with pytest.raises(RuntimeError, match="check_sync"):
        _train(model3, opt3, _batches(1), rank=rank)


def _case_checkpoint(rank, tmp):
    batches = _batches(5, seed=11)
    model = _net()
    opt = NaturalGradient(model.parameters(), lr=0.1, fisher_type="mc", **HYPER)
    _train(model, opt, batches[:2], rank=rank)
    path = os.path.join(tmp, "ckpt.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    _train(model, opt, batches[2:], rank=rank)
    model2 = _net(seed=42)
    opt2 = NaturalGradient(model2.parameters(), lr=0.1, fisher_type="mc", **dict(HYPER, seed=99))
    ck = torch.load(path, weights_only=True)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    _train(model2, opt2, batches[2:], rank=rank)
    assert torch.equal(_params(model), _params(model2))
    # mc: identical parameters on every rank (per-rank MC draws, shared state)
    p = _params(model)
    q = p.clone()
    dist.broadcast(q, src=0)
    assert torch.equal(p, q)


def _case_example(rank, tmp):
    """examples/distributed_mnist.py, briefly, in the spawned group (as torchrun would run it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "distributed_mnist.py"
    spec = importlib.util.spec_from_file_location("distributed_mnist", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    res = ex.run(ex.parse_args(["--steps", "3", "--batch-size", "32", "--inv-every", "2", "--warmup", "0",
                                   "--check-sync"]))
    assert res["world"] == 2 and len(res["losses"]) == 3 and all(l == l for l in res["losses"])
    # CNN: 8 parameters, inverses at steps 0 and 2, each built on one rank
    assert sum(res["inverses_per_rank"]) == 16 and min(res["inverses_per_rank"]) > 0
    assert res["bucket_bytes"] > 0 and res["grad_bytes"] > 0


CASES = [_case_example, _case_matches_one_process, _case_factor_scaling, _case_preconditioner, _case_cg_newton, _case_non_finite, _case_checkpoint]


def _worker(rank, tmp, names):
    sys.path.insert(0, os.getcwd())
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank, world_size=W)
    try:
        for fn in CASES:
            if fn.__name__ in names:
                with open(os.path.join(tmp, f"rank{rank}.case"), "w") as f:
                    f.write(fn.__name__)
                fn(rank, tmp)
                dist.barrier()
        mark_rank_done(tmp, rank)
    except BaseException:
        import traceback

        with open(os.path.join(tmp, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    spawn_ranks(_worker, (str(tmp_path), [f.__name__ for f in CASES]), W, tmp_path, lambda e: _report(tmp_path, e))


def _report(tmp_path, e: BaseException) -> str:
    """What each rank was doing (its case) and its Python exception, if any (a rank that failed
    makes the other abort)."""
    report = []
    for r in range(W):
        case = tmp_path / f"rank{r}.case"
        err = tmp_path / f"rank{r}.err"
        report.append(f"rank {r} in {case.read_text() if case.exists() else '?'}: "
                      + (err.read_text() if err.exists() else "no Python exception (killed or aborted)"))
    return f"{e}\n" + "\n".join(report)


def test_pack_unpack_and_assign():
    S = torch.randn(5, 5, dtype=torch.float64)
    S = S + S.T
    assert pack(S).numel() == 15 and torch.equal(unpack(pack(S), S), S)
    B = torch.randn(3, 4, 4)
    B = B + B.mT
    assert torch.equal(unpack(pack(B), B), B)
    V = torch.randn(4, 4)  # not symmetric: sent whole
    assert torch.equal(unpack(pack(V, sym=False), V, sym=False), V)
    # largest first to the least loaded: 8 -> 0, 5 -> 1, 4 -> 1, 3 -> 0, 1 -> 0 (8+3=11 > 9: 1 -> 1)
    assert assign([3, 8, 1, 5, 4], 2) == [0, 0, 1, 1, 1]
    assert assign([1.0] * 4, 4) == [0, 1, 2, 3]
