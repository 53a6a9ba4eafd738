"""Data-parallel step time on CPU (gloo): KFAC NaturalGradient in DDP vs plain DDP + SGD, 1/2/4 processes.

MLP 784-512-256-10 (ReLU), float32, CrossEntropy, a fixed **global** batch of 256 split over the
processes (random inputs: the timing does not depend on the data), one torch thread per
process. Per configuration: ``--steps`` timed steps after 3 warm-up steps, ``T_cov=1``,
``T_inv=10`` (so the timed steps include their share of inverse builds), ``damping_mode="pi"``.

Reported (rank 0, medians over ranks where it says so):

- ``ms/step``: wall time per step (forward, backward with DDP's gradient all-reduce, step);
- ``opt comm``: share of the step spent in the optimizer's collectives (flag all-reduce,
  curvature bucket, inverse metadata and broadcasts), measured around each collective;
- ``DDP comm``: share estimated as one all-reduce of the gradient's size per step, timed
  separately (DDP overlaps it with the backward, so this is an upper bound of its cost);
- ``inv/rank sharded`` / ``unsharded``: seconds per inverse build on the busiest rank, with
  the sharding, and building every layer's inverse locally (what each rank would do without it);
- ``bucket / grad``: bytes of the curvature bucket per capture step against the gradient's.

    python benchmarks/bench_distributed.py [--steps 20] [--procs 1 2 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = __file__.rsplit("/", 2)[0]
sys.path.insert(0, ROOT)
from curvlib import extend  # noqa: E402
from curvlib.optim import NaturalGradient  # noqa: E402
from curvlib.optim.curvatures import kind_for  # noqa: E402

BATCH = 256
WARMUP = 3


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def _worker(rank, world, tmp, steps, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, 784, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(4)]
    local = BATCH // world
    res = {}
    for method in ("sgd", "kfac"):
        model = make_model()
        if method == "kfac":
            model = extend(model)
            opt = NaturalGradient(model.parameters(), lr=0.01, curvature="kfac", fisher_type="mc", damping=1e-1, kl_clip=1e-3,
                                  T_cov=1, T_inv=10, curvature_warmup=0, momentum=0.9, seed=0, process_group="auto" if world > 1 else None)
            loss_fn = extend(nn.CrossEntropyLoss())
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            loss_fn = nn.CrossEntropyLoss()
        net = DDP(model) if world > 1 else model
        times = []
        for i in range(WARMUP + steps):
            if i == WARMUP and method == "kfac" and world > 1:
                for k in opt.distributed.stats:
                    opt.distributed.stats[k] = 0
            x, y = data[i % len(data)]
            x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            if method == "kfac":
                with opt.capture():
                    loss.backward()
            else:
                loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        step = statistics.median(times[WARMUP:])
        total = sum(times[WARMUP:])
        r = {"step": step}
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if world > 1:  # DDP's traffic: one all-reduce of the gradient's size, timed alone
            flat = torch.zeros(grad_bytes // 4)
            ts = []
            for _ in range(5):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(flat)
                ts.append(time.perf_counter() - t0)
            r["ddp_comm"] = statistics.median(ts) / step
        if method == "kfac":
            curv = kind_for("kfac")
            params = [p for p in model.parameters()]
            values = [opt.state[p]["running"] for p in params]
            t0 = time.perf_counter()
            curv.inverse(params, values, 1e-1, "pi", opt.param_groups[0])
            r["inv_unsharded"] = time.perf_counter() - t0
            builds = max(1, opt.core.groups[0].inv_updates - 1)  # builds in the timed steps (T_inv=10)
            if world > 1:
                dp = opt.distributed
                r["opt_comm"] = dp.stats["comm_seconds"] / total
                r["inv_sharded"] = dp.stats["inverse_seconds"] / builds
                r["bucket"] = dp.last.get("bucket_bytes", 0)
                r["grad"] = dp.last.get("grad_bytes", grad_bytes)
                r["inverses"] = dp.stats["inverses"]
            else:
                r["inv_sharded"] = r["inv_unsharded"]
        res[method] = r
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def measure(world: int, steps: int):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.pt")
        mp.spawn(_worker, args=(world, tmp, steps, out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args(argv)
    print(f"MLP 784-512-256-10, global batch {BATCH}, gloo on CPU, 1 thread per process, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; {args.steps} timed steps; KFAC: T_inv=10, mc")
    print("| procs | method | ms/step | opt comm | DDP comm (est.) | inv/rank sharded (ms) | unsharded (ms) | inverses per rank | bucket / grad |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world in args.procs:
        ranks = measure(world, args.steps)
        for method in ("sgd", "kfac"):
            rs = [r[method] for r in ranks]
            step = statistics.median(r["step"] for r in rs)
            cells = [str(world), "DDP+SGD" if method == "sgd" else "DDP+KFAC", f"{1e3 * step:.1f}"]
            cells.append(f"{100 * statistics.median(r['opt_comm'] for r in rs):.0f}%" if method == "kfac" and world > 1 else "-")
            cells.append(f"{100 * statistics.median(r['ddp_comm'] for r in rs):.0f}%" if world > 1 else "-")
            if method == "kfac":
                cells += [f"{1e3 * max(r['inv_sharded'] for r in rs):.1f}", f"{1e3 * statistics.median(r['inv_unsharded'] for r in rs):.1f}"]
                cells.append(str([r.get("inverses", "-") for r in rs]) if world > 1 else "-")
                r0 = rs[0]
                cells.append(f"{r0['bucket'] / 1e6:.2f} MB / {r0['grad'] / 1e6:.2f} MB" if world > 1 else "-")
            else:
                cells += ["-", "-", "-", "-"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
