"""Hugging Face ``transformers`` models built from tiny configs (no downloads): GPT-2, Llama, BERT,
ViT and OPT get curvature for every parameter, exactly where it is exact.

What each family exercises: GPT-2's ``Conv1D`` (``addmm(b, x.view(-1, D), W)``, ``W [in, out]``)
and ``wpe(position_ids [1, T])`` broadcast over the batch; Llama's ``LlamaRMSNorm``
(``self.weight * hidden``); BERT's position embeddings (batch 1, broadcast); ViT's ``cls_token``
(``expand``) and position table (``x + P``); OPT's feed-forward ``nn.Linear`` / ``nn.LayerNorm`` on
``hidden.reshape(-1, D)`` (rows = positions of the samples) and its ``nn.Embedding`` subclass with a
``forward(mask)``; GPT-2 with its default ``lm_head.weight = wte.weight`` (weight tying across
modules). Before issue 21 (items 1-3): no curvature for ``Conv1D`` and ``LlamaRMSNorm``, ``wpe`` /
BERT / OPT per-sample quantities summed over the samples or per token, silently;
``NotImplementedError`` for tied GPT-2.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvlib import curvature, extend
from curvlib.extensions import KFAC, BatchGrad, DiagGGN

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

N, T, V, C = 3, 8, 50, 3


def gpt2(tie=False):
    cfg = tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=V, n_positions=16, tie_word_embeddings=tie,
                        attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg)


def llama():
    cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=V, max_position_embeddings=16, tie_word_embeddings=False,
                         attn_implementation="eager", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg)


def bert():
    cfg = tf.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        vocab_size=V, max_position_embeddings=16, num_labels=C, attn_implementation="eager")
    return tf.BertForSequenceClassification(cfg)


def vit():
    cfg = tf.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_channels=3, num_labels=C, attn_implementation="eager")
    return tf.ViTForImageClassification(cfg)


def opt():
    cfg = tf.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=V,
                       word_embed_proj_dim=16, max_position_embeddings=16, tie_word_embeddings=False,
                       attn_implementation="eager", bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return tf.OPTForCausalLM(cfg)


def albert():
    """ALBERT ties its decoder to the word embeddings, and ``predictions.bias`` (a module without an
    adapter) to ``decoder.bias``."""
    cfg = tf.AlbertConfig(vocab_size=V, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=24, max_position_embeddings=16, attn_implementation="eager")
    return tf.AlbertForMaskedLM(cfg)


FAMILIES = {"gpt2": gpt2, "gpt2-tied": lambda: gpt2(tie=True), "llama": llama, "bert": bert, "vit": vit, "opt": opt,
            "albert": albert}


class Logits(nn.Module):
    """The model's logits as a ``CrossEntropyLoss`` input: ``[N, C]``, or ``[N, V, P]`` for a
    language model's last ``P`` positions (the gradients still flow through all ``T``)."""

    def __init__(self, hf: nn.Module, P: int = 3):
        super().__init__()
        self.hf, self.P = hf, P
        self.key = "pixel_values" if isinstance(hf, tf.ViTForImageClassification) else "input_ids"

    def forward(self, x):
        out = self.hf(**{self.key: x}).logits
        return out[:, -self.P:].transpose(1, 2) if out.ndim == 3 else out


def batch(name: str, gen: torch.Generator):
    if name == "vit":
        return torch.randn(N, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, C, (N,), generator=gen)
    x = torch.randint(2, V, (N, T), generator=gen)
    y = torch.randint(0, C, (N,), generator=gen) if name == "bert" else torch.randint(0, V, (N, 3), generator=gen)
    return x, y


def make(name: str):
    torch.manual_seed(0)
    return Logits(FAMILIES[name]().double().eval())


def curvlib_warnings(record):
    return [str(w.message) for w in record if "curvlib" in str(w.message)]


def references(plain: nn.Module, x, y):
    """Per-sample gradients (one backward per sample) and the dense GGN (``torch.func``)."""
    loss_fn = nn.CrossEntropyLoss()
    params = {k: v.detach() for k, v in plain.named_parameters()}
    psg = {k: [] for k in params}
    for n in range(x.shape[0]):
        ps = {k: v.clone().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(loss_fn(functional_call(plain, ps, (x[n:n + 1],)), y[n:n + 1]), list(ps.values()),
                                    allow_unused=True)
        for k, g in zip(ps, grads):
            psg[k].append(torch.zeros_like(params[k]) if g is None else g)
    out = functional_call(plain, params, (x,))
    J = jacrev(lambda p: functional_call(plain, p, (x,)))(params)
    J = torch.cat([j.reshape(out.numel(), -1) for j in J.values()], dim=1)
    H = hessian(lambda o: loss_fn(o, y))(out.detach()).reshape(out.numel(), out.numel())
    return {k: torch.stack(v) for k, v in psg.items()}, torch.einsum("oi,op,pi->i", J, H, J)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_parameter_gets_exact_curvature_without_warnings(name):
    """KFAC and BatchGrad for every parameter, no curvlib warning; BatchGrad and DiagGGN equal the
    per-sample gradients and the dense GGN diagonal."""
    model = make(name)
    plain = copy.deepcopy(model)
    x, y = batch(name, torch.Generator().manual_seed(1))
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loss = loss_fn(model(x), y)
        with curvature(KFAC(fisher_type="mc"), BatchGrad(), DiagGGN(fisher_type="type-2")):
            loss.backward()
    assert curvlib_warnings(rec) == []
    psg, diag = references(plain, x, y)
    scale_g = max(g.abs().max() for g in psg.values()) / N
    tol = 1e-5 if name == "llama" else 1e-8  # LlamaRMSNorm normalises in float32 (also in float64)
    i = 0
    for n, p in model.named_parameters():
        sl = slice(i, i + p.numel())
        i += p.numel()
        assert hasattr(p, "kfac") and p.grad_batch.shape == (N, *p.shape), n
        torch.testing.assert_close(p.grad_batch, psg[n] / N, rtol=tol, atol=tol * scale_g, msg=n)
        torch.testing.assert_close(p.diag_ggn.flatten(), diag[sl], rtol=tol, atol=tol * diag.abs().max(), msg=n)


def linear_twin(conv1d) -> nn.Linear:
    """The ``nn.Linear`` that computes what HF's ``Conv1D`` computes (weight transposed)."""
    lin = nn.Linear(conv1d.nx, conv1d.nf, dtype=conv1d.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv1d.weight.T), lin.bias.copy_(conv1d.bias)
    return lin


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_conv1d_kfac_equals_its_linear_twin_permuted(fisher_type):
    """``Conv1D.weight [in, out]`` is activation side first: ``p.kfac = [A, G]``, the twin
    ``nn.Linear``'s ``[G, A]`` swapped; the bias's ``[G]`` is the twin's."""
    model = make("gpt2")
    twin = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(names) == 8
    for n in names:
        parent, attr = n.rsplit(".", 1)
        setattr(twin.get_submodule(parent), attr, linear_twin(model.get_submodule(n)))
    x, y = batch("gpt2", torch.Generator().manual_seed(2))
    loss_fn = extend(nn.CrossEntropyLoss())
    for m in (extend(model), extend(twin)):
        with curvature(KFAC(fisher_type=fisher_type)):
            loss_fn(m(x), y).backward()
    for n in names:
        c, lin = model.get_submodule(n), twin.get_submodule(n)
        A, G = c.weight.kfac
        assert A.shape == (c.nx, c.nx) and G.shape == (c.nf, c.nf)
        torch.testing.assert_close(G, lin.weight.kfac[0])
        torch.testing.assert_close(A, lin.weight.kfac[1])
        torch.testing.assert_close(c.bias.kfac[0], lin.bias.kfac[0])


def test_position_embeddings_equal_explicitly_expanded_positions():
    """``wpe(position_ids [1, T])`` broadcast over the batch (HF's default) gives exactly what
    ``position_ids.expand(N, T)`` passed explicitly gives, for every quantity; before, grad_batch
    came out ``[1, T, D]``: summed over the samples."""
    model = make("gpt2")
    twin = copy.deepcopy(model)
    ids, y = batch("gpt2", torch.Generator().manual_seed(3))
    loss_fn = extend(nn.CrossEntropyLoss())

    class Expanded(nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, x):
            pos = torch.arange(T).expand(x.shape[0], T)
            return self.hf.hf(input_ids=x, position_ids=pos).logits[:, -3:].transpose(1, 2)

    out = {}
    for key, m in (("broadcast", extend(model)), ("expanded", extend(Expanded(twin)))):
        with curvature(KFAC(fisher_type="type-2"), BatchGrad(), DiagGGN(fisher_type="type-2")):
            loss_fn(m(ids), y).backward()
        wpe = m.get_submodule("hf.transformer.wpe") if key == "broadcast" else m.hf.hf.transformer.wpe
        out[key] = (wpe.weight.kfac, wpe.weight.grad_batch, wpe.weight.diag_ggn)
    (K1, g1, d1), (K2, g2, d2) = out["broadcast"], out["expanded"]
    assert g1.shape == (N, 16, 16)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(d1, d2)
    for a, b in zip(K1, K2):
        torch.testing.assert_close(a, b)


def test_tied_gpt2_kfac_is_the_untied_twins_terms_and_conv1d_its_linear_twins():
    """GPT-2 with ``lm_head.weight is wte.weight`` (the default): no curvlib warning; the tied
    weight's KFAC is the two terms ``[[A_wte, G_wte], [G_head, A_head]]``, each that of its use in
    the twin with ``lm_head`` untied and every ``Conv1D`` an ``nn.Linear``, whose factors the
    ``Conv1D`` weights' ``[A, G]`` are, swapped. Before tying and operations (issue 21 items 1, 2):
    ``NotImplementedError`` at the backward, no curvature for ``Conv1D``."""
    torch.manual_seed(0)
    model = Logits(gpt2(tie=True).double().eval())
    hf = model.hf
    assert hf.lm_head.weight is hf.transformer.wte.weight
    twin = copy.deepcopy(model)
    twin.hf.lm_head.weight = nn.Parameter(twin.hf.lm_head.weight.detach().clone())
    convs = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    for n in convs:
        parent, attr = n.rsplit(".", 1)
        setattr(twin.get_submodule(parent), attr, linear_twin(model.get_submodule(n)))
    x, y = batch("gpt2", torch.Generator().manual_seed(4))
    loss_fn = extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for m in (extend(model), extend(twin)):
            with curvature(KFAC(fisher_type="type-2")):
                loss_fn(m(x), y).backward()
    assert curvlib_warnings(rec) == []
    assert all(hasattr(p, "kfac") for p in model.parameters())
    terms = hf.transformer.wte.weight.kfac
    want = [twin.hf.transformer.wte.weight.kfac, twin.hf.lm_head.weight.kfac]
    assert len(terms) == 2 and [len(t) for t in terms] == [2, 2]
    assert terms[0][0].shape == (V,) and terms[1][0].shape == (V, V)  # Embedding's 1-D token frequencies
    for got, ref in zip(terms, want):
        for f, g in zip(got, ref):
            torch.testing.assert_close(f, g)
    for n in convs:
        c, lin = model.get_submodule(n), twin.get_submodule(n)
        torch.testing.assert_close(c.weight.kfac[0], lin.weight.kfac[1])
        torch.testing.assert_close(c.weight.kfac[1], lin.weight.kfac[0])
        torch.testing.assert_close(c.bias.kfac[0], lin.bias.kfac[0])
