"""Hugging Face models (capture by operation, issue 21 items 1 and 3): GPT-2 (``Conv1D``, position
embeddings broadcast over the batch) and Llama (``LlamaRMSNorm``), from configs (no downloads).

For a tiny and a medium configuration, float32, CPU time, interleaved medians:

- ``fwd``: the plain forward; ``fwd extended``: the forward of the extended model (the operation
  capture's ``TorchFunctionMode`` active; nothing computed);
- ``fwd+bwd``: the plain forward and backward; ``KFAC mc``: the extended forward and the backward
  inside ``curvature(KFAC(fisher_type="mc"))`` (every parameter's factors);
- ``make_fx trace``: one ``torch.fx.experimental.proxy_tensor.make_fx`` trace of the forward, the
  alternative to the ``TorchFunctionMode`` (what a graph-based capture pays per new input shape or
  control-flow path; ``torch.fx.symbolic_trace`` fails on these models).

GPT-2-small shapes (``--sizes small``: ``n_embd`` 768, 12 heads, 2 blocks, vocabulary 50,257,
sequence 128, batch 4; ``lm_head`` tied to ``wte``, the default): the KFAC ``"mc"`` capture against
the plain forward and backward, and the peak memory of one call against curvlinops'
``KFACLinearOperator`` (``fisher_type="mc"``) on the same model with tying removed and every
``Conv1D`` an ``nn.Linear`` (curvlinops supports ``nn.Linear`` / ``nn.Conv2d`` only: its
parameters are those Linears'; a 2-D output, ``[N T, V]``). The tied ``[50257, 768]`` weight is
frozen in both: its head term's ``G`` alone is ``V^2`` floats (10.1 GB in float32) in either
library (issue 21 item 5, ``max_factor_dim``); a row with vocabulary 8,192 keeps it (two-term KFAC).

    python benchmarks/bench_hf.py [--reps 10] [--threads 1] [--sizes tiny,medium,small]
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch
from torch import nn

from common import MEMORY_ENV, backward_fn, interleaved_medians, peak_memories, table

warnings.filterwarnings("ignore")


class Logits(nn.Module):
    """``[N, V, T]`` logits of a causal LM (a ``CrossEntropyLoss`` input)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        return self.hf(input_ids=ids).logits.transpose(1, 2)


def models(size: str):
    import transformers as tf

    tf.logging.set_verbosity_error()
    if size == "tiny":
        d, layers, heads, V, T, N = 16, 2, 2, 50, 8, 3
    else:
        d, layers, heads, V, T, N = 256, 4, 4, 1000, 64, 8
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=d, n_layer=layers, n_head=heads, vocab_size=V, n_positions=T,
                                            tie_word_embeddings=False, attn_implementation="eager"))
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                               num_attention_heads=heads, num_key_value_heads=heads, vocab_size=V,
                                               max_position_embeddings=T, tie_word_embeddings=False,
                                               attn_implementation="eager"))
    shape = f"d {d}, {layers} layers, vocab {V}, seq {T}, batch {N}"
    return {f"GPT-2 {size} ({shape})": gpt2, f"Llama {size} ({shape})": llama}, (N, T, V)


def fns(hf, N, T, V):
    import curvlib
    from curvlib.extensions import KFAC
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    ids, y = torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T))
    plain, ours = Logits(copy.deepcopy(hf).train()), curvlib.extend(Logits(copy.deepcopy(hf).train()))
    loss_fn, ours_loss = nn.CrossEntropyLoss(), curvlib.extend(nn.CrossEntropyLoss())
    for m in (plain, ours):  # dropout off, same computation in both
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0

    def fwd():
        plain(ids)

    def fwd_ext():
        ours(ids)

    def fwd_bwd():
        plain.zero_grad()
        loss_fn(plain(ids), y).backward()

    def kfac():
        ours.zero_grad()
        loss = ours_loss(ours(ids), y)
        with curvlib.curvature(KFAC(fisher_type="mc")):
            loss.backward()

    def trace():
        with torch.no_grad():
            make_fx(lambda i: plain(i))(ids)

    return {"fwd": fwd, "fwd extended": fwd_ext, "fwd+bwd": fwd_bwd, "KFAC mc": kfac}, trace


def gpt2_small(V: int, freeze_tied: bool):
    """GPT-2-small shapes (2 blocks), tied ``lm_head`` / ``wte``; the tied weight frozen or not."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=768, n_layer=2, n_head=12, vocab_size=V, n_positions=128,
                                         attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0))
    assert m.lm_head.weight is m.transformer.wte.weight
    m.lm_head.weight.requires_grad_(not freeze_tied)
    return m


def linear_twin(hf):
    """A copy with tying removed and every ``Conv1D`` an ``nn.Linear`` (curvlinops' layers)."""
    twin = copy.deepcopy(hf)
    twin.lm_head.weight = nn.Parameter(twin.lm_head.weight.detach().clone(),
                                       requires_grad=hf.lm_head.weight.requires_grad)
    for name, mod in list(twin.named_modules()):
        if type(mod).__name__ == "Conv1D":
            lin = nn.Linear(mod.nx, mod.nf)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T), lin.bias.copy_(mod.bias)
            parent, attr = name.rsplit(".", 1)
            setattr(twin.get_submodule(parent), attr, lin)
    return twin


class Flat(nn.Module):
    """``[N T, V]`` logits: curvlinops' KFAC takes 2-D outputs only."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        out = self.hf(input_ids=ids).logits
        return out.reshape(-1, out.shape[-1])


def small_rows(reps: int, N: int = 4, T: int = 128):
    """The GPT-2-small rows: times (interleaved medians) and peak memories (fresh processes)."""
    import curvlib
    from curvlib.extensions import KFAC
    from curvlinops import KFACLinearOperator

    times, mems = [], []
    for V, freeze in ((50257, True), (8192, False)):
        hf = gpt2_small(V, freeze)
        torch.manual_seed(1)
        ids, y = torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T))
        plain, ours = Logits(copy.deepcopy(hf)), curvlib.extend(Logits(copy.deepcopy(hf)))
        loss_fn, ours_loss = nn.CrossEntropyLoss(), curvlib.extend(nn.CrossEntropyLoss())
        twin = Flat(linear_twin(hf))
        cl_params = [p for m in twin.modules() if isinstance(m, nn.Linear) for p in m.parameters() if p.requires_grad]

        fwd_bwd = backward_fn(plain, loss_fn, ids, y)
        kfac = backward_fn(ours, ours_loss, ids, y, lambda: curvlib.curvature(KFAC(fisher_type="mc")))

        def cl_kfac():
            KFACLinearOperator(twin, nn.CrossEntropyLoss(), cl_params, [(ids, y.reshape(-1))], fisher_type="mc",
                               check_deterministic=False).compute_kronecker_factors()

        name = f"GPT-2-small shapes, vocab {V}, tied weight {'frozen' if freeze else 'with curvature'}"
        med = interleaved_medians({"fwd+bwd": fwd_bwd, "KFAC mc": kfac, "curvlinops KFAC mc": cl_kfac}, reps=reps,
                                  warmup=1, clock=time.process_time)
        mem = peak_memories(name, {"fwd+bwd": fwd_bwd, "curvlib KFAC mc": kfac, "curvlinops KFAC mc": cl_kfac})
        if os.environ.get(MEMORY_ENV) is None:
            times.append([name, f"{med['fwd+bwd'] * 1e3:.0f}", f"{med['KFAC mc'] * 1e3:.0f}",
                          f"{med['KFAC mc'] / med['fwd+bwd']:.2f}", f"{med['curvlinops KFAC mc'] * 1e3:.0f}",
                          f"{med['curvlinops KFAC mc'] / med['fwd+bwd']:.2f}"])
            mems.append([name, *(f"{mem[k]:.0f}" for k in ("fwd+bwd", "curvlib KFAC mc", "curvlinops KFAC mc")),
                         f"{len(cl_params)} of {len([p for p in ours.parameters() if p.requires_grad])}"])
            print(times[-1], mems[-1], flush=True)
    return times, mems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="tiny,medium")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if os.environ.get(MEMORY_ENV) is None:
        print(f"threads {args.threads}, load average {os.getloadavg()}, CPU time of the process", flush=True)
    rows = []
    sizes = args.sizes.split(",")
    if "small" in sizes:
        times, mems = small_rows(args.reps)
        print(table(times, ["model (d 768, 12 heads, 2 blocks, seq 128, batch 4)", "fwd+bwd ms", "KFAC mc ms",
                            "KFAC/fwd+bwd", "curvlinops KFAC mc ms", "curvlinops/fwd+bwd"]))
        print(table(mems, ["model", "fwd+bwd MiB", "curvlib KFAC mc MiB", "curvlinops KFAC mc MiB",
                           "parameters (curvlinops of curvlib)"]))
        sizes.remove("small")
    if not sizes:
        return
    for size in sizes:
        ms, (N, T, V) = models(size)
        for name, hf in ms.items():
            f, trace = fns(hf, N, T, V)
            med = interleaved_medians(f, reps=args.reps, warmup=2, clock=time.process_time)
            t0 = time.process_time()
            trace()
            tr = time.process_time() - t0
            rows.append([name, *(f"{med[k] * 1e3:.1f}" for k in f), f"{med['fwd extended'] / med['fwd']:.2f}",
                         f"{med['KFAC mc'] / med['fwd+bwd']:.2f}", f"{tr * 1e3:.0f}"])
            print(rows[-1], flush=True)
    print(table(rows, ["model", "fwd ms", "fwd extended ms", "fwd+bwd ms", "KFAC mc ms", "ext/plain fwd",
                       "KFAC/fwd+bwd", "make_fx trace ms"]))


if __name__ == "__main__":
    main()
