"""Why KFAC diverges on the CNN at damping 0.1 (issue 22, item 4): per-layer quantities per step.

The CNN problem of ``benchmarks/time_to_loss.py`` (same data, initialisation and batches) trained
by ``NaturalGradient(curvature="kfac")`` at ``examples/exp_cnn.py``'s settings (MC Fisher, pi
damping, momentum 0.9, EMA 0.95, T_cov 5, T_inv 10, no KL clip) over a grid of lr and damping,
then with one setting changed at a time (the ablations). Per step and weight it records:

- ``trA``, ``trG``: ``tr(F) / dim F`` of the running factors, and ``newA``, ``newG``: the same
  of the factors captured on that step's batch (``p.kfac``; capture steps only);
- ``pi = sqrt(trA / trG)`` and the damping each factor gets (``pi sqrt(λ)`` on A, ``sqrt(λ) / pi``
  on G), the extreme eigenvalues of the running factors;
- ``|g|``, ``|d|`` (the applied, clipped direction: ``b_k - momentum b_{k-1}``), ``<d, g>``,
  ``|lr b| / |W|`` (the relative update), and ``dCd / dg = d^T C_batch d / <d, g>`` with
  ``C_batch = kron(G, A)`` of the newest captured factors: ``1`` for an undamped Newton direction
  of the current curvature; ``lr / (1 - momentum) * dCd / dg`` is the step taken in units of the
  step that minimises the quadratic model along ``d`` (``> 2``: the model predicts an increase).

Measured (1 thread; the first 93 steps, batch 128): at damping 0.1 without a KL clip, lr 0.1 and
0.3 blow up (loss NaN at steps 10 and 6); every damping-0.01 point too, and lr 0.3 at damping 1.
The first inverse (from the initialisation's batch, kept for T_inv = 10 steps) is damped far
above the curvature (tr A / dim * tr G / dim = 3e-4 .. 2e-3 per layer against λ = 0.1, so
``|d| ≈ 5-6 |g|``), the weights then move 25-30 % per step (``|lr b| / |W|`` at step 4), the layer
inputs' second moments grow 10-690x by step 5 (``newA / trA``: conv2 10.7, fc1 115, fc2 690), the
stale inverse overshoots (``dCd / dg`` 4-142 at step 5, for a step of lr / (1 - momentum) = 1)
and the loss goes 1.3 -> 2.3 -> 10 -> 676 -> 5e8 -> 6e24. Exact damping, no EMA, no momentum (same
lr / (1 - momentum)) or a fresh inverse every step do not prevent it; ``kl_clip`` 1e-2 or 1e-3 does
(full training loss after 93 steps: 0.122 / 0.0595; with 1e-3 the clip is active at every step,
so lr 0.1 and 0.3 give the same run). With the clip, inverting at every capture (``T_inv 5``)
gives 0.0363; a bias-corrected EMA start 0.0560.

    python benchmarks/kfac_divergence.py                     # grid + ablations, ~2 min
    python benchmarks/kfac_divergence.py --trace 0.1 0.1     # per-step trace of one setting
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import time_to_loss as T  # noqa: E402

from curvlib import extend  # noqa: E402
from curvlib.optim import NaturalGradient  # noqa: E402

BASE = dict(curvature="kfac", fisher_type="mc", damping_mode="pi", momentum=0.9, ema_decay=0.95, T_cov=5,
            T_inv=10, kl_clip=None, curvature_warmup=0)


def _tr(F: torch.Tensor) -> float:
    return float(F.diagonal().mean()) if F.dim() == 2 else float(F.mean())


def train(problem: T.Problem, steps: int, record: bool = False, ema_bias_correction: bool = False,
          **hyper: Any) -> Dict[str, Any]:
    """``steps`` KFAC steps on the benchmark's batches; returns the loss per step, the failure
    (``None`` if none) and, with ``record``, per-step per-weight diagnostics.

    ``ema_bias_correction``: emulate a zero-started, bias-corrected moving average (Adam's) of
    the curvature instead of "the first capture initialises it", by setting the group's
    ``ema_decay`` before the ``j``-th capture to ``1 - (1 - β) / (1 - β^(j+1))`` (the weight of
    the first capture after ``j`` more is then ``β^j (1 - β) / (1 - β^(j+1))`` instead of ``β^j``)."""
    import copy

    model = extend(copy.deepcopy(problem.model))
    opt = NaturalGradient(model.parameters(), seed=0, **dict(BASE, **hyper))
    mu = float(opt.param_groups[0]["momentum"])
    beta, captures = float(opt.param_groups[0]["ema_decay"]), 0
    weights = [(n, p) for n, p in model.named_parameters() if p.ndim > 1]
    gen = torch.Generator().manual_seed(0)
    losses: List[float] = []
    trace: List[Dict[str, Any]] = []
    last_new: Dict[str, Any] = {}
    k = 0
    failure = None
    while k < steps and failure is None:
        perm = torch.randperm(problem.n_train, generator=gen)
        for idx in list(perm.split(problem.batch_size))[: problem.n_train // problem.batch_size]:
            if k >= steps:
                break
            x, y = problem.inputs(idx), problem.targets(idx)
            opt.zero_grad()
            loss = problem.loss(model(x), y)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ctx = opt.capture()
                    if ema_bias_correction and not isinstance(ctx, contextlib.nullcontext):
                        opt.param_groups[0]["ema_decay"] = 1.0 - (1.0 - beta) / (1.0 - beta ** (captures + 1))
                        captures += 1
                    with ctx:
                        loss.backward()
                    if record:
                        grads = {n: p.grad.clone() for n, p in weights}
                        before = {n: opt.state[p].get("momentum_buffer") for n, p in weights}
                        before = {n: (b.clone() if b is not None else None) for n, b in before.items()}
                        for n, p in weights:
                            if getattr(p, "kfac", None) is not None:
                                last_new[n] = [f.detach().clone() for f in p.kfac]
                    opt.step()
            except (FloatingPointError, RuntimeError, ValueError) as e:
                failure = f"step {k}: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
                break
            losses.append(loss.item())
            if record:
                lam, lr = float(opt.param_groups[0]["damping"]), float(opt.param_groups[0]["lr"])
                row: Dict[str, Any] = dict(step=k, loss=loss.item(), layers={})
                for n, p in weights:
                    G, A = opt.state[p]["running"]
                    b = opt.state[p]["momentum_buffer"]
                    d = b - mu * before[n] if before[n] is not None else b.clone()
                    g = grads[n].reshape(p.shape[0], -1)
                    D = d.reshape(p.shape[0], -1)
                    Gn, An = last_new[n]
                    dCd = float((D * (Gn @ D @ An)).sum())
                    dg = float((D * g).sum())
                    tA, tG = _tr(A), _tr(G)
                    pi = math.sqrt(tA / tG) if tG > 0 else math.inf
                    eA, eG = torch.linalg.eigvalsh(A.double()), torch.linalg.eigvalsh(G.double())
                    row["layers"][n] = dict(
                        trA=tA, trG=tG, newA=_tr(An) if k % 5 == 0 else None, newG=_tr(Gn) if k % 5 == 0 else None,
                        pi=pi, damp_A=pi * math.sqrt(lam), damp_G=math.sqrt(lam) / pi,
                        minA=float(eA[0]), maxA=float(eA[-1]), minG=float(eG[0]), maxG=float(eG[-1]),
                        g=float(g.norm()), d=float(D.norm()), dg=dg, dCd_dg=dCd / dg if dg else math.nan,
                        rel_update=float(lr * b.norm() / p.detach().norm()),
                    )
                trace.append(row)
            k += 1
            if not math.isfinite(losses[-1]):
                failure = f"step {k - 1}: the loss is {losses[-1]}"
                break
    full = problem.full_loss(model) if failure is None else math.nan
    return dict(losses=losses, failure=failure, trace=trace, full=full)


def print_trace(res: Dict[str, Any], every: int = 1) -> None:
    names = list(res["trace"][0]["layers"]) if res["trace"] else []
    for n in names:
        print(f"\n{n}")
        print(" step   loss    trA      newA     trG      newG      pi     dampA    dampG    minA      minG      "
              "maxG     |g|      |d|      <d,g>    dCd/dg  |lr b|/|W|")
        for row in res["trace"][::every]:
            L = row["layers"][n]
            f = lambda v: "    -    " if v is None else f"{v:9.3g}"  # noqa: E731
            print(f"{row['step']:5d} {row['loss']:7.3f} {f(L['trA'])}{f(L['newA'])}{f(L['trG'])}{f(L['newG'])}"
                  f"{f(L['pi'])}{f(L['damp_A'])}{f(L['damp_G'])}{f(L['minA'])}{f(L['minG'])}{f(L['maxG'])}"
                  f"{f(L['g'])}{f(L['d'])}{f(L['dg'])}{f(L['dCd_dg'])}{f(L['rel_update'])}")
    print(f"failure: {res['failure']}")


def summary_line(name: str, res: Dict[str, Any]) -> str:
    ls = res["losses"]
    tail = f"loss after {len(ls)} steps {ls[-1]:.3g}" if ls else "no step"
    return f"| {name} | {res['failure'] or 'ok'} | {tail} | {res['full']:.4g} |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=93, help="steps per run (31 per epoch)")
    p.add_argument("--trace", type=float, nargs=2, metavar=("LR", "DAMPING"), help="per-step trace of one setting")
    p.add_argument("--every", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    problem = T.cnn()
    if args.trace:
        lr, lam = args.trace
        print_trace(train(problem, args.steps, record=True, lr=lr, damping=lam), args.every)
        return
    print("| setting | failure | last batch loss | full training loss |\n|---|---|---|---|")
    for lam in (0.01, 0.1, 1.0):
        for lr in (0.03, 0.1, 0.3):
            print(summary_line(f"lr {lr}, damping {lam}", train(problem, args.steps, lr=lr, damping=lam)), flush=True)
    ablations = {
        "damping_mode exact": dict(damping_mode="exact"),
        "kl_clip 1e-2": dict(kl_clip=1e-2),
        "kl_clip 1e-3": dict(kl_clip=1e-3),
        "ema_decay 0 (latest capture only)": dict(ema_decay=0.0),
        "T_cov 1": dict(T_cov=1),
        "T_cov 1, T_inv 1": dict(T_cov=1, T_inv=1),
        "T_inv 1 for 20 steps, then 10": dict(T_inv=lambda k: 1 if k < 20 else 10),
        "T_cov 1, T_inv 1 for 20 steps, then 5 / 10": dict(T_cov=lambda k: 1 if k < 20 else 5, T_inv=lambda k: 1 if k < 20 else 10),
        "bias-corrected EMA": dict(ema_bias_correction=True),
        "bias-corrected EMA, T_inv 5 (every capture)": dict(ema_bias_correction=True, T_inv=5),
        "T_inv 5 (every capture)": dict(T_inv=5),
        "kl_clip 1e-3, T_inv 5": dict(kl_clip=1e-3, T_inv=5),
        "kl_clip 1e-3, bias-corrected EMA": dict(kl_clip=1e-3, ema_bias_correction=True),
        "kl_clip 1e-3, bias-corrected EMA, T_inv 5": dict(kl_clip=1e-3, ema_bias_correction=True, T_inv=5),
        "kl_clip 1e-3, T_cov 1, T_inv 1": dict(kl_clip=1e-3, T_cov=1, T_inv=1),
        "momentum 0, lr x10": dict(momentum=0.0, lr_factor=10.0),
        "momentum 0.5, lr x5": dict(momentum=0.5, lr_factor=5.0),
    }
    for lr in (0.1, 0.3):
        for lam in (0.1,):
            for name, change in ablations.items():
                change = dict(change)
                f = change.pop("lr_factor", 1.0)
                res = train(problem, args.steps, lr=lr * f, damping=lam, **change)
                print(summary_line(f"lr {lr}, damping {lam}: {name}", res), flush=True)


if __name__ == "__main__":
    main()
