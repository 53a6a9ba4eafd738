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

    python benchmarks/bench_hf.py [--reps 10] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

from common import interleaved_medians, table

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="tiny,medium")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes.split(","):
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
