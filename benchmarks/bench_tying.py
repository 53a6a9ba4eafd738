"""Weight tying: a tied model against its untied twin, and the cost of the tying bookkeeping.

1. Hugging Face ``GPT2LMHeadModel`` (``lm_head.weight = wte.weight``) from a config, float32,
   against its *untied twin* (the same model with ``lm_head.weight`` a copy): forward + backward
   with the quantity computed. The tied weight's quantities sum its two uses (exact: per-sample
   gradients added; KFAC: one Kronecker term per use, the twin's two terms), so the work should be
   the twin's plus the sum. GPT-2's ``Conv1D`` layers get their curvature by operation
   (:mod:`curvlib.engine.operations`), in both models alike.
2. The bookkeeping every recorded call now does (which layers use which parameter, the group key)
   on an untied MLP 784-512-256-10, batch 256: KFAC empirical with it against the same capture
   with it switched off (monkeypatched in the same process).

Interleaved repetitions, medians; wall time and process CPU time (a loaded machine inflates the
latter less).

    python benchmarks/bench_tying.py [--reps 15] [--threads 2] [--config tiny|small]
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch
from torch import nn

from common import backward_fn, interleaved_medians, table

warnings.filterwarnings("ignore")

CONFIGS = {  # n_embd, n_layer, n_head, vocab, batch, sequence
    "tiny": (16, 2, 2, 50, 8, 16),
    "small": (64, 2, 4, 2000, 8, 64),
}


class LM(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(input_ids=x).logits.transpose(1, 2)


def gpt2(config: str):
    import transformers

    transformers.logging.set_verbosity_error()
    E, L, H, V, _, T = CONFIGS[config]
    cfg = transformers.GPT2Config(n_embd=E, n_layer=L, n_head=H, vocab_size=V, n_positions=T, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="eager")
    return LM(transformers.GPT2LMHeadModel(cfg).eval())


def tied_vs_twin(config: str, reps: int):
    import curvlib
    from curvlib.extensions import KFAC, BatchGrad, DiagGGN

    torch.manual_seed(0)
    tied = gpt2(config)
    twin = copy.deepcopy(tied)
    twin.m.lm_head.weight = nn.Parameter(twin.m.lm_head.weight.detach().clone())
    plain = copy.deepcopy(tied)
    assert tied.m.lm_head.weight is tied.m.transformer.wte.weight
    curvlib.extend(tied), curvlib.extend(twin)
    loss = curvlib.extend(nn.CrossEntropyLoss())
    _, _, _, V, N, T = CONFIGS[config]
    x, y = torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T))
    exts = {
        "KFAC mc": lambda: KFAC(fisher_type="mc"),
        "KFAC empirical": lambda: KFAC(fisher_type="empirical"),
        "BatchGrad": lambda: BatchGrad(reuse_buffers=False),
        "DiagGGN mc": lambda: DiagGGN(fisher_type="mc"),
    }
    fns = {"plain fwd+bwd": backward_fn(plain, nn.functional.cross_entropy, x, y)}
    for name, make in exts.items():
        for label, model in (("tied", tied), ("untied twin", twin)):
            fns[f"{name}, {label}"] = backward_fn(model, loss, x, y, lambda make=make: curvlib.curvature(make()))
    return fns


def mlp_bookkeeping():
    import curvlib
    import curvlib.engine.hooks as hooks
    import curvlib.engine.tying as tying
    from curvlib.extensions import KFAC

    torch.manual_seed(0)
    model = curvlib.extend(nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)))
    loss = curvlib.extend(nn.CrossEntropyLoss())
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    run = backward_fn(model, loss, x, y, lambda: curvlib.curvature(KFAC(fisher_type="empirical")))

    def without():
        old = hooks.note_params, hooks.group_key
        hooks.note_params, hooks.group_key = (lambda m: None), tying.layer_key
        try:
            run()
        finally:
            hooks.note_params, hooks.group_key = old

    return {"KFAC empirical, MLP, with tying bookkeeping": run, "KFAC empirical, MLP, bookkeeping off": without}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    E, L, H, V, N, T = CONFIGS[args.config]
    name = f"GPT-2 {args.config} (n_embd {E}, {L} layers, vocab {V}), batch {N} x {T} tokens, float32"
    fns = tied_vs_twin(args.config, args.reps)
    wall = interleaved_medians(fns, reps=args.reps)
    cpu = interleaved_medians(fns, reps=args.reps, clock=time.process_time)
    base = wall["plain fwd+bwd"]
    rows = [[k, f"{wall[k] * 1e3:.2f}", f"{wall[k] / base:.2f}", f"{cpu[k] * 1e3:.2f}"] for k in fns]
    print(f"\n## {name}\n")
    print(table(rows, ["method", "median ms (wall)", "x plain", "median ms (CPU)"]))
    for q in ("KFAC mc", "KFAC empirical", "BatchGrad", "DiagGGN mc"):
        print(f"{q}: tied / untied twin = {wall[f'{q}, tied'] / wall[f'{q}, untied twin']:.2f} (wall), "
              f"{cpu[f'{q}, tied'] / cpu[f'{q}, untied twin']:.2f} (CPU)")
    fns = mlp_bookkeeping()
    wall = interleaved_medians(fns, reps=args.reps)
    cpu = interleaved_medians(fns, reps=args.reps, clock=time.process_time)
    a, b = list(fns)
    print(f"\n## tying bookkeeping on an untied MLP 784-512-256-10, batch 256\n")
    print(table([[k, f"{wall[k] * 1e3:.2f}", f"{cpu[k] * 1e3:.2f}"] for k in fns], ["method", "median ms (wall)", "median ms (CPU)"]))
    print(f"with / without: {wall[a] / wall[b]:.3f} (wall), {cpu[a] / cpu[b]:.3f} (CPU)")


if __name__ == "__main__":
    main()
