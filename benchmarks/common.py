"""Shared helpers for side-by-side benchmarks: interleaved repetitions, medians, peak memory."""
from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from typing import Callable, Dict, List

import torch


def interleaved_medians(fns: Dict[str, Callable[[], None]], reps: int = 15, warmup: int = 3) -> Dict[str, float]:
    """Run every function ``reps`` times in turn (round robin); median seconds each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory_mb(fn: Callable[[], None]) -> float:
    """Peak CPU memory allocated by torch during ``fn`` (MiB), via the profiler."""
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    # running sum of each op's *own* allocations (minus frees) in event order gives the
    # peak above the baseline; cpu_memory_usage would count a nested op's bytes again in
    # every enclosing op
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


def table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
