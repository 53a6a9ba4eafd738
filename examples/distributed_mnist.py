"""Data-parallel KFAC on MNIST over gloo on CPU
============================================
The CNN of ``train_mnist_kfac.py`` trained by ``curvlib.optim.NaturalGradient`` in
``DistributedDataParallel``.

Run from the repository root::

    torchrun --standalone --nproc_per_node 2 -m examples.distributed_mnist            # 300 steps
    torchrun --standalone --nproc_per_node 2 -m examples.distributed_mnist --steps 20 # quick
    python -m examples.distributed_mnist --steps 20                                   # 1 process

Every step draws one global batch of ``--batch-size`` digits (the same draw on every rank) and
rank ``r`` of ``W`` trains on its slice of ``batch-size / W`` digits. ``NaturalGradient`` finds
the process group that torchrun set up: on curvature steps it all-reduces the KFAC factors in
one bucket, builds each layer's inverse on one rank and broadcasts it, so every rank takes the
same step, the one a single process would take on the whole batch (exactly for
``fisher_type="type-2"`` / ``"empirical"``, in distribution for ``"mc"``). Rank 0 prints the
loss (averaged over ranks), the test accuracy, the wall time and the communication: bytes of
the curvature bucket per capture step against the parameter gradient's bytes, inverses built
on each rank, and the share of the step time spent communicating.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from curvlib import extend
from curvlib.optim import NaturalGradient
from examples.data import load_mnist
from examples.train_mnist_kfac import batches, make_cnn


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch (split over the ranks)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=0.9)
    ap.add_argument("--inv-every", type=int, default=10, help="T_inv")
    ap.add_argument("--warmup", type=int, default=10, help="curvature_warmup: an inverse at each of the first steps")
    ap.add_argument("--fisher-type", default="mc", choices=["mc", "type-2", "empirical"])
    ap.add_argument("--no-ddp", action="store_true", help="no DistributedDataParallel: the optimizer averages the gradients")
    ap.add_argument("--check-sync", action="store_true", help="compare a parameter checksum across ranks every step")
    ap.add_argument("--every", type=int, default=25, help="print the loss every N steps")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train on this rank (the process group, if any, is initialized); returns what rank 0 prints."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    local = args.batch_size // world
    torch.manual_seed(0)  # the same initialisation on every rank (DDP broadcasts it anyway)
    Xtr, ytr, Xte, yte = load_mnist(normalize=True)
    model = extend(make_cnn())
    net = DDP(model) if (world > 1 and not args.no_ddp) else model
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(
        model.parameters(), lr=args.lr, curvature="kfac", fisher_type=args.fisher_type, damping=args.damping,
        damping_mode="pi", T_cov=1, T_inv=args.inv_every, curvature_warmup=args.warmup, ema_decay=args.ema, momentum=0.9, seed=0,
        check_sync=args.check_sync,
    )
    dp = opt.distributed
    losses: List[float] = []
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches(Xtr, ytr, args.batch_size, args.steps, seed=1)):
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        with opt.capture():
            loss.backward()
        opt.step()
        value = loss.detach().clone()
        if world > 1:  # the loss of the whole batch, for printing only
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
        if rank == 0 and ((step + 1) % args.every == 0 or step == 0):
            print(f"step {step + 1:4d}/{args.steps}  loss {losses[-1]:.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    out: Dict[str, Any] = dict(losses=losses, accuracy=acc, seconds=seconds, world=world)
    if dp is not None:
        inv = torch.tensor([dp.stats["inverses"]], dtype=torch.float64)
        gathered = [torch.zeros_like(inv) for _ in range(world)]
        dist.all_gather(gathered, inv)
        out.update(
            inverses_per_rank=[int(t) for t in gathered], comm_seconds=dp.stats["comm_seconds"],
            bucket_bytes=dp.last.get("bucket_bytes", 0), grad_bytes=dp.last.get("grad_bytes", 0),
        )
    return out


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        res = run(args)
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            w = res["world"]
            print(f"{w} process(es), global batch {args.batch_size} ({args.batch_size // w} per process), "
                  f"{args.steps} steps, fisher_type={args.fisher_type}, DDP={'no' if args.no_ddp or w == 1 else 'yes'}")
            print(f"final loss (mean of the last 10 steps) {sum(res['losses'][-10:]) / len(res['losses'][-10:]):.4f}, "
                  f"test accuracy {res['accuracy']:.3f}, {res['seconds']:.1f} s ({1e3 * res['seconds'] / args.steps:.0f} ms/step)")
            if "inverses_per_rank" in res:
                print(f"inverses built per rank: {res['inverses_per_rank']} (each layer's once in the group)")
                print(f"curvature bucket per capture step: {res['bucket_bytes'] / 1e3:.1f} kB "
                      f"({res['bucket_bytes'] / max(res['grad_bytes'], 1):.2f} x the gradient's {res['grad_bytes'] / 1e3:.1f} kB); "
                      f"optimizer communication {res['comm_seconds']:.1f} s of {res['seconds']:.1f} s on rank 0")
        return res
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
