"""Shared helpers of the experiment CLIs (``examples/exp_*.py``): arguments, data, the training
loop with a progress bar, the CSV, the PNG and the results table.

Every experiment script builds a dict ``method -> Method`` (how to make the optimizer) and calls
:func:`run_experiment`. Each run starts from the same initialisation (``torch.manual_seed(seed)``
before the model is built) and sees the same minibatches (one permutation per epoch drawn from
``seed``), so runs of one experiment differ only by their optimizer. Wall time counts the
training steps only (forward, backward, curvature, step); the per-epoch evaluation of the full
training loss and the test metric is not timed.

Outputs in ``--out`` (``NAME`` = the experiment's name):

- ``NAME.csv``: one row per (method, epoch) with ``train_loss`` (the loss on the whole training
  set at the end of the epoch; epoch 0 is the initialisation), ``test_metric`` and the cumulative
  ``wall_time_s``;
- ``NAME.png``: training loss against epoch and against wall time;
- ``NAME.md``: the results table (also printed): final loss and test metric, seconds, and the
  epochs and seconds each method needs to reach the reference method's final loss.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn


# ---------------------------------------------------------------------------- arguments
def parser(description: str, methods: Sequence[str], epochs: int, batch_size: int) -> argparse.ArgumentParser:
    """The common options; scripts may add their own before parsing."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--methods", nargs="+", default=list(methods), choices=list(methods))
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="directory for NAME.csv, NAME.png, NAME.md")
    p.add_argument("--subset", type=int, default=None, help="use only the first N training and N/4 test samples")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: the 2 cores here are shared)")
    return p


# ---------------------------------------------------------------------------- batches
def epoch_batches(n: int, batch_size: int, epochs: int, seed: int, max_steps: Optional[int] = None) -> List[List[Tensor]]:
    """Index batches per epoch (a fresh permutation each epoch; a last partial batch is dropped
    when a full one exists), shared by every method of an experiment."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        parts = list(torch.randperm(n, generator=g).split(batch_size))
        if len(parts) > 1 and len(parts[-1]) < batch_size:
            parts = parts[:-1]
        out.append(parts[:max_steps] if max_steps else parts)
    return out


# ---------------------------------------------------------------------------- runs
@dataclass
class Method:
    """How one method trains: ``make(model) -> optimizer`` (a ``torch.optim.Optimizer``; curvlib
    optimizers are used with ``opt.capture()`` around the backward)."""

    make: Callable[[nn.Module], Any]
    label: str = ""
    hyper: str = ""  # the hyper-parameters, for the table
    #: train only the first this many epochs of the shared batches (e.g. a cheaper method given
    #: the same wall time as a costlier one); ``None``: all of ``--epochs``
    epochs: Optional[int] = None


def natural_gradient(hyper: Dict[str, Any], text: str, **fields: Any) -> Method:
    """A :class:`Method` training with ``curvlib.optim.NaturalGradient(params, seed=0, **hyper)``
    (``hyper`` includes ``curvature``); ``text``: its hyper-parameters as the table shows them;
    ``fields``: further :class:`Method` fields (e.g. ``epochs``)."""
    from curvlib.optim import NaturalGradient

    return Method(lambda model: NaturalGradient(model.parameters(), seed=0, **hyper), hyper=text, **fields)


@dataclass
class Run:
    method: str
    rows: List[Dict[str, Any]] = field(default_factory=list)
    failure: Optional[str] = None


def _capture(opt):
    return opt.capture() if hasattr(opt, "capture") else contextlib.nullcontext()


def train_run(
    method: str,
    spec: Method,
    make_model: Callable[[], nn.Module],
    step_loss: Callable[[nn.Module, Tensor], Tensor],
    evaluate: Callable[[nn.Module], Dict[str, float]],
    batches: List[List[Tensor]],
    seed: int,
    progress: bool = True,
) -> Run:
    """Train one method; one row per epoch (epoch 0: the initialisation).

    ``step_loss(model, idx)``: the minibatch loss of the training samples ``idx`` (a graph);
    ``evaluate(model)``: ``{"train_loss": ..., "test_metric": ...}`` (run under ``no_grad``).
    A non-finite loss or a ``FloatingPointError`` / ``ValueError`` / ``RuntimeError`` from the
    optimizer ends the run and is recorded in ``Run.failure``.
    """
    torch.manual_seed(seed)
    model = make_model()
    opt = spec.make(model)
    run = Run(method)
    with torch.no_grad():
        run.rows.append(dict(method=method, epoch=0, step=0, wall_time_s=0.0, **evaluate(model)))
    if spec.epochs is not None:
        batches = batches[: spec.epochs]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(b) for b in batches), desc=f"{method:>16}", unit="step",
                   file=sys.stderr, mininterval=0.5, leave=True)
    wall, step = 0.0, 0
    try:
        for epoch, ep in enumerate(batches, start=1):
            for idx in ep:
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = step_loss(model, idx)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}")
                with _capture(opt):
                    loss.backward()
                opt.step()
                wall += time.perf_counter() - t0
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            with torch.no_grad():
                ev = evaluate(model)
            run.rows.append(dict(method=method, epoch=epoch, step=step, wall_time_s=wall, **ev))
            if not math.isfinite(ev["train_loss"]):
                raise FloatingPointError(f"training loss is {ev['train_loss']} after epoch {epoch}")
    except (FloatingPointError, ValueError, RuntimeError, torch.linalg.LinAlgError) as e:
        run.failure = f"{type(e).__name__} at step {step}: {str(e).splitlines()[0][:200]}"
        print(f"{method}: {run.failure}", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    return run


# ---------------------------------------------------------------------------- outputs
def write_csv(runs: Sequence[Run], path: str) -> None:
    rows = [r for run in runs for r in run.rows]
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def save_png(runs: Sequence[Run], path: str, title: str, ylabel: str = "training loss",
             key: str = "train_loss", logy: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        ep = [r["epoch"] for r in run.rows]
        t = [r["wall_time_s"] for r in run.rows]
        v = [r[key] for r in run.rows]
        (line,) = axes[0].plot(ep, v, marker=".", label=run.method)
        axes[1].plot(t, v, marker=".", color=line.get_color(), label=run.method)
    axes[0].set(xlabel="epoch", ylabel=ylabel)
    axes[1].set(xlabel="wall time (s, training steps only)", ylabel=ylabel)
    for ax in axes:
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def reach(run: Run, target: float, key: str = "train_loss"):
    """The first (epoch, seconds) at which ``run``'s ``key`` is <= ``target`` (None if never)."""
    for r in run.rows[1:]:
        if r[key] <= target:
            return r["epoch"], r["wall_time_s"]
    return None


def results_table(runs: Sequence[Run], methods: Dict[str, Method], metric_name: str,
                  reference: Optional[str] = "kfac", paper: Optional[Dict[str, float]] = None,
                  metric_fmt: str = "{:.4f}") -> str:
    """Markdown table: final training loss, test metric, seconds, epochs/seconds to reach the
    reference method's final training loss (where the reference ran)."""
    ref = next((r for r in runs if r.method == reference and r.failure is None), None)
    target = ref.rows[-1]["train_loss"] if ref is not None else None
    head = ["method", "final train loss"]
    if paper:
        head.append("paper (full MNIST, 200 ep.)")
    head += [f"final {metric_name}", "epochs", "seconds"]
    if target is not None:
        head += [f"epochs to {reference}'s final loss", f"seconds to {reference}'s final loss"]
    head.append("hyper-parameters")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        last = run.rows[-1]
        loss = f"{last['train_loss']:.4f}" + (" (failed)" if run.failure else "")
        cells = [run.method, loss]
        if paper:
            cells.append(f"{paper[run.method]:.4f}" if run.method in paper else "-")
        cells += [metric_fmt.format(last["test_metric"]), str(last["epoch"]), f"{last['wall_time_s']:.1f}"]
        if target is not None:
            hit = reach(run, target)
            cells += [str(hit[0]), f"{hit[1]:.1f}"] if hit else ["not reached", "-"]
        cells.append(methods[run.method].hyper if run.method in methods else "")
        lines.append("| " + " | ".join(cells) + " |")
    failures = [f"- {r.method}: {r.failure}" for r in runs if r.failure]
    return "\n".join(lines + ([""] + failures if failures else []))


def classification(Xtr: Tensor, ytr: Tensor, Xte: Tensor, yte: Tensor):
    """``(step_loss, evaluate)`` of a classifier for :func:`run_experiment`: the extended
    cross-entropy of a minibatch, and the full training loss with the test accuracy."""
    from curvlib import extend

    loss_fn = extend(nn.CrossEntropyLoss())

    def step_loss(model, idx):
        return loss_fn(model(Xtr[idx]), ytr[idx])

    def evaluate(model):
        return {"train_loss": float(nn.functional.cross_entropy(model(Xtr), ytr)),
                "test_metric": float((model(Xte).argmax(1) == yte).float().mean())}

    return step_loss, evaluate


def run_experiment(
    name: str,
    title: str,
    args: argparse.Namespace,
    methods: Dict[str, Method],
    make_model: Callable[[], nn.Module],
    step_loss: Callable[[nn.Module, Tensor], Tensor],
    evaluate: Callable[[nn.Module], Dict[str, float]],
    n_train: int,
    metric_name: str,
    reference: Optional[str] = "kfac",
    paper: Optional[Dict[str, float]] = None,
    metric_fmt: str = "{:.4f}",
) -> Dict[str, Run]:
    """Run ``args.methods`` in order; write ``NAME.csv``, ``NAME.png``, ``NAME.md``; print the table."""
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    batches = epoch_batches(n_train, args.batch_size, args.epochs, args.seed, args.max_steps)
    runs = []
    for m in args.methods:
        runs.append(train_run(m, methods[m], make_model, step_loss, evaluate, batches, args.seed,
                              progress=not args.no_progress))
    table = results_table(runs, methods, metric_name, reference, paper, metric_fmt)
    steps = f" (at most {args.max_steps} steps each)" if args.max_steps else ""
    subset = f", first {args.subset} training samples" if args.subset else ""
    header = (f"{title}\n\nbatch {args.batch_size}, {args.epochs} epochs{steps}{subset}, seed {args.seed}, "
              f"{args.threads} threads\n\n")
    write_csv(runs, os.path.join(args.out, f"{name}.csv"))
    save_png(runs, os.path.join(args.out, f"{name}.png"), f"{title} (batch {args.batch_size}, seed {args.seed})")
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(header + table + "\n")
    print(header + table)
    return {r.method: r for r in runs}
