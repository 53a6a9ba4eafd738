"""Optimizer step time: curvlib NaturalGradient(kfac) vs ASDL KfacGradientMaker + SGD vs SGD+momentum.

MLP 784-512-256-10 (ReLU), batch 256, float32, CrossEntropy. One process, interleaved
repetitions, medians (benchmarks/common.py). Each timed call runs a block of steps so that
amortized costs are included: 10 steps for ``T_cov=1, T_inv=10``, 100 steps for
``T_cov=10, T_inv=100``; "plain" times one step without a curvature update.

    pip install --no-deps asdfghjkl==0.1a5     # ASDL (import asdl)
    python benchmarks/bench_optim.py
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import interleaved_medians, peak_memories, table  # noqa: E402
from curvlib import extend  # noqa: E402
from curvlib.optim import NaturalGradient  # noqa: E402

B = 256


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


X, Y = torch.randn(B, 784), torch.randint(0, 10, (B,))


def sgd_runner(steps):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()

    return run


def curvlib_runner(fisher_type, T_cov, T_inv, steps, plain=False):
    model = extend(make_model())
    loss_fn = extend(nn.CrossEntropyLoss())
    big = 10**9 if plain else None
    opt = NaturalGradient(model.parameters(), lr=1e-3, curvature="kfac", fisher_type=fisher_type,
                          damping=1e-3, momentum=0.9, T_cov=big or T_cov, T_inv=big or T_inv, seed=0,
                          curvature_warmup=0, kl_clip=None)  # the README's settings (before the defaults changed)

    def one():
        opt.zero_grad()
        loss = loss_fn(model(X), Y)
        with opt.capture():
            loss.backward()
        opt.step()

    if plain:
        one()  # the first step captures; every later one is plain

    def run():
        for _ in range(steps):
            one()

    return run


def asdl_runner(fisher_type, T_cov, T_inv, steps):
    from asdl import KfacGradientMaker, PreconditioningConfig

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    cfg = PreconditioningConfig(data_size=B, damping=1e-3, curvature_upd_interval=T_cov, preconditioner_upd_interval=T_inv)
    gm = KfacGradientMaker(model, cfg, fisher_type={"empirical": "fisher_emp", "mc": "fisher_mc"}[fisher_type])

    def run():
        for _ in range(steps):
            opt.zero_grad()
            dummy_y = gm.setup_model_call(model, X)
            gm.setup_loss_call(F.cross_entropy, dummy_y, Y)
            gm.forward_and_backward()
            opt.step()

    return run


def main():
    torch.set_num_threads(2)
    rows = []
    for ft in ("empirical", "mc"):
        fns = {"curvlib": curvlib_runner(ft, 1, 10, 10), "asdl": asdl_runner(ft, 1, 10, 10), "sgd": sgd_runner(10)}
        t = interleaved_medians(fns, reps=7, warmup=1)
        mem = peak_memories(f"t1_10_{ft}", fns)
        rows.append([f"kfac {ft}, T_cov=1 T_inv=10 (10 steps)", f"{t['curvlib']*1e3:.0f}", f"{t['asdl']*1e3:.0f}",
                     f"{t['sgd']*1e3:.0f}", f"{t['curvlib']/t['asdl']:.2f}", f"{t['curvlib']/t['sgd']:.2f}",
                     f"{mem['curvlib']:.0f}/{mem['asdl']:.0f}/{mem['sgd']:.0f}"])
    # amortized: a block of 100 steps holds one inverse and ten curvature updates (the pattern repeats)
    fns = {"curvlib": curvlib_runner("mc", 10, 100, 100), "sgd": sgd_runner(100)}
    t = interleaved_medians(fns, reps=3, warmup=0)
    rows.append(["kfac mc, T_cov=10 T_inv=100 (100 steps)", f"{t['curvlib']*1e3:.0f}", "-",
                 f"{t['sgd']*1e3:.0f}", "-", f"{t['curvlib']/t['sgd']:.2f}", "-"])
    fns = {"curvlib": curvlib_runner("mc", 1, 1, 1, plain=True), "sgd": sgd_runner(1)}
    t = interleaved_medians(fns, reps=31, warmup=3)
    rows.append(["step without curvature update (1 step)", f"{t['curvlib']*1e3:.1f}", "-", f"{t['sgd']*1e3:.1f}", "-",
                 f"{t['curvlib']/t['sgd']:.2f}", "-"])
    # the backward of a step without curvature update: extended model inside opt.capture() vs plain model
    ext_model, plain_model = extend(make_model()), make_model()
    ext_loss = extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(ext_model.parameters(), lr=1e-3, T_cov=10**9, T_inv=10**9, seed=0, curvature_warmup=0)
    with opt.capture():
        ext_loss(ext_model(X), Y).backward()
    opt.step()

    def ext_fb():
        ext_model.zero_grad()
        with opt.capture():
            ext_loss(ext_model(X), Y).backward()

    def plain_fb():
        plain_model.zero_grad()
        F.cross_entropy(plain_model(X), Y).backward()

    t = interleaved_medians({"curvlib": ext_fb, "sgd": plain_fb}, reps=31, warmup=3)
    rows.append(["forward+backward of that step (no optimizer step)", f"{t['curvlib']*1e3:.1f}", "-",
                 f"{t['sgd']*1e3:.1f}", "-", f"{t['curvlib']/t['sgd']:.2f}", "-"])
    print(table(rows, ["workload", "curvlib ms", "ASDL ms", "SGD ms", "curvlib/ASDL", "curvlib/SGD", "peak MiB c/A/S"]))


if __name__ == "__main__":
    main()
