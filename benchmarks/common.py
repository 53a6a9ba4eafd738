"""Shared helpers for side-by-side benchmarks: interleaved repetitions, medians, peak memory."""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List



def backward_fn(model, loss_fn, x, y, context: Callable[[], object] = contextlib.nullcontext) -> Callable[[], None]:
    """A benchmark function: zero ``model``'s gradients, then ``loss_fn(model(x), y).backward()``
    inside a fresh ``context()`` (e.g. ``lambda: curvlib.curvature(KFAC())``; default: none)."""
    def fn():
        model.zero_grad()
        loss = loss_fn(model(x), y)
        with context():
            loss.backward()
    return fn


def curvlinops_kfac_fn(model, params, x, y, fisher_type: str) -> Callable[[], None]:
    """A benchmark function: curvlinops' KFAC factors of ``params`` on the batch ``(x, y)``."""
    from curvlinops import KFACLinearOperator
    from torch import nn

    def fn():
        KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type=fisher_type,
                           check_deterministic=False).compute_kronecker_factors()
    return fn


def interleaved_medians(
    fns: Dict[str, Callable[[], None]], reps: int = 15, warmup: int = 3, clock: Callable[[], float] = time.perf_counter
) -> Dict[str, float]:
    """Run every function ``reps`` times in turn (round robin); median seconds each (``clock``:
    wall time by default; ``time.process_time`` gives the process's CPU time, which a loaded
    shared machine inflates much less)."""
    if os.environ.get(MEMORY_ENV) is not None:  # memory-measuring child: no timings
        return {k: float("nan") for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            gc.collect()
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


MEMORY_ENV = "CURVLIB_BENCH_MEMORY_OF"


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def _child_peak(fn: Callable[[], None]) -> float:
    fn()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark VmHWM
    base = _status_mb("VmRSS:")
    fn()
    return _status_mb("VmHWM:") - base


def peak_memories(problem: str, fns: Dict[str, Callable[[], None]]) -> Dict[str, float]:
    """Peak resident-memory increase (MiB) of one call of each function, after a warm-up call.

    Each is measured in a fresh run of the calling script (``CURVLIB_BENCH_MEMORY_OF`` names
    the problem and the method; there :func:`interleaved_medians` does nothing and this
    function measures and exits), with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed large
    blocks leave the resident set and ``VmHWM - VmRSS`` counts the live tensors of the call.
    In-process numbers are useless: memory freed earlier stays resident and is reused, and
    the profiler counts nested ops' allocations more than once. Linux only (NaN elsewhere).
    """
    spec = os.environ.get(MEMORY_ENV)
    if spec is not None:  # child: measure the one asked for, then stop
        want_problem, method = spec.split("::", 1)
        if want_problem == problem:
            print(f"{_child_peak(fns[method]):.3f}")
            sys.exit(0)
        return {k: float("nan") for k in fns}
    if not os.path.exists("/proc/self/clear_refs"):
        return {k: float("nan") for k in fns}
    out = {}
    for method in fns:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        env[MEMORY_ENV] = f"{problem}::{method}"
        run = subprocess.run([sys.executable, *sys.argv], env=env, capture_output=True, text=True)
        try:
            out[method] = float(run.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[method] = float("nan")
    return out


def timing_report(
    name: str, fns: Dict[str, Callable[[], None]], reps: int, base: str = "plain fwd+bwd",
    ms_digits: int = 2, warmup: int = 3,
) -> Dict[str, float]:
    """Interleaved medians and peak memories of ``fns``, printed under ``## name`` as a table of
    median ms, the ratio to the ``base`` entry and the peak RSS; returns the medians (seconds)."""
    med = interleaved_medians(fns, reps=reps, warmup=warmup)
    mem = peak_memories(name, fns)
    rows = [[k, f"{v * 1e3:.{ms_digits}f}", f"{v / med[base]:.2f}", f"{mem[k]:.1f}"] for k, v in med.items()]
    print(f"\n## {name}\n")
    print(table(rows, ["method", "median ms", "x plain" if base == "plain fwd+bwd" else f"x {base}", "peak RSS +MiB"]))
    return med


def table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def sigmoid_mlp():
    """MLP 784-256-128-10 with sigmoids (the issues' workload for the extensions)."""
    from torch import nn

    return nn.Sequential(nn.Linear(784, 256), nn.Sigmoid(), nn.Linear(256, 128), nn.Sigmoid(), nn.Linear(128, 10))


def model_copies(make_model):
    """Copies of one initialisation, each with its CrossEntropy loss: ``curvlib`` (extended),
    ``backpack`` (BackPACK-extended) and ``plain`` (untouched), as ``name -> (model, loss)``."""
    import torch
    from backpack import extend as bp_extend
    from torch import nn

    import curvlib

    torch.manual_seed(0)
    ours = curvlib.extend(make_model())
    bp, plain = bp_extend(make_model()), make_model()
    bp.load_state_dict(ours.state_dict())
    plain.load_state_dict(ours.state_dict())
    return {
        "curvlib": (ours, curvlib.extend(nn.CrossEntropyLoss())),
        "backpack": (bp, bp_extend(nn.CrossEntropyLoss())),
        "plain": (plain, nn.CrossEntropyLoss()),
    }
