"""Data-parallel ``check_sync=True`` compares the hyper-parameters across ranks: ranks given
different damping (each rank builds some of the inverses, so the result depended on which rank
built which) fail on every rank, naming the value; equal ones train."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from curvlib import extend
from curvlib.optim import CGNewton, NaturalGradient
from tests.utils import mark_rank_done, spawn_ranks

W = 2


def _step(model, opt, rank):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)
    x, y = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
    opt.zero_grad()
    with opt.capture():
        extend(nn.CrossEntropyLoss())(model(x), y).backward()
    opt.step()


def _net():
    torch.manual_seed(0)
    return extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double())


def _worker(rank, tmp):
    sys.path.insert(0, os.getcwd())
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank, world_size=W)
    try:
        # the same hyper-parameters: trains
        model = _net()
        opt = NaturalGradient(model.parameters(), lr=0.1, curvature="kfac", damping=1e-2, check_sync=True, seed=0)
        _step(model, opt, rank)
        # damping differs at construction
        model = _net()
        opt = NaturalGradient(model.parameters(), lr=0.1, curvature="kfac", damping=1e-2 * (1 + rank),
                              check_sync=True, seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match=r"param group 0 has damping = rank 0: 0.01, rank 1: 0.02"):
            _step(model, opt, rank)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        # lr changed on one rank between steps (a scheduler stepped on one rank only)
        model = _net()
        opt = CGNewton(model.parameters(), lr=0.1, check_sync=True, seed=0)
        _step(model, opt, rank)
        if rank == 1:
            opt.param_groups[0]["lr"] = 0.05
        with pytest.raises(RuntimeError, match=r"check_sync: param group 0 has lr"):
            _step(model, opt, rank)
        # the error follows an all_gather_object: wait for the other rank to leave it before
        # tearing the group down (a rank that exits first aborts gloo's peer with SIGABRT)
        dist.barrier()
        mark_rank_done(tmp, rank)
    except BaseException as e:
        with open(os.path.join(tmp, f"rank{rank}.err"), "w") as f:
            f.write(repr(e))
        raise
    finally:
        dist.destroy_process_group()


def test_check_sync_names_hyperparameters_that_differ(tmp_path):
    spawn_ranks(_worker, (str(tmp_path),), W, tmp_path, lambda e: _report(tmp_path, e))


def _report(tmp_path, e: BaseException) -> str:
    errs = [(tmp_path / f"rank{r}.err") for r in range(W)]
    done = [r for r in range(W) if (tmp_path / f"rank{r}.ok").exists()]
    return "; ".join(f"rank {r}: {p.read_text()}" for r, p in enumerate(errs) if p.exists()) or f"{e} (ranks done: {done})"
