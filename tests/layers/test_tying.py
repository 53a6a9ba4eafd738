"""Weight tying across layers (docs/design.md §2): one parameter used by several layers.

References, float64: per-sample gradients of each sample's loss by autograd, the dense GGN block
``J^T H J`` of the tied parameter from ``torch.func``, the KFAC terms of the *untied twin* (the same
model with one parameter per use), dense inverses and dense Hessians. Models: a language model with
``tie_weights`` (``nn.Embedding`` and the ``nn.Linear`` head share ``[V, D]``, the head has its own
bias), two ``nn.Linear`` layers sharing one ``Parameter``, a ``Conv2d`` encoder and a
``ConvTranspose2d`` decoder sharing ``[3, 2, 3, 3]``, and Hugging Face's tiny ``GPT2LMHeadModel``
(``lm_head.weight = wte.weight``) and ``AlbertForMaskedLM`` (``decoder.weight =
word_embeddings.weight``, one layer group called three times). Before tying was built, the
backward of every one of them raised ``NotImplementedError`` ("computed twice in one backward").
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import List

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from curvlib import curvature, extend
from curvlib.extensions import (
    EKFAC, GGNMP, HMP, KFAC, KPSVD, BatchGrad, DiagGGN, ExactBlockFisher, KFACCorrected, SubBatch,
)
from curvlib.optim import NaturalGradient
from curvlib.solvers import KroneckerInverse

pytestmark = pytest.mark.usefixtures("float64")

V, D, T, N = 7, 3, 4, 5


# --------------------------------------------------------------------------- models


class TiedLM(nn.Module):
    """Embedding -> Linear -> tanh -> Linear head whose weight is the embedding's (``tie_weights``),
    with its own bias; logits ``[N, V, T]``."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V)
        if tie:
            self.tie_weights()

    def tie_weights(self):
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x)))).transpose(1, 2)


class TiedLinears(nn.Module):
    """Two ``Linear(D, D)`` sharing one weight ``Parameter`` (own biases), on ``[N, 2, D]``."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(D, D), nn.Linear(D, D)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


class TiedConv(nn.Module):
    """A ``Conv2d(2, 3, 3)`` encoder and a ``ConvTranspose2d(3, 2, 3)`` decoder sharing the weight
    ``[3, 2, 3, 3]`` (the conv's cotangent side is the transposed conv's activation side)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Conv2d(2, 3, 3), nn.ConvTranspose2d(3, 2, 3)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


class HF(nn.Module):
    """A Hugging Face masked / causal LM as ``x [N, T] -> logits [N, V, T]``."""

    def __init__(self, m: nn.Module, token_types: bool = False):
        super().__init__()
        self.m, self.token_types = m, token_types

    def forward(self, x):
        kw = {"token_type_ids": torch.zeros_like(x)} if self.token_types else {}
        return self.m(input_ids=x, **kw).logits.transpose(1, 2)


def gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    m = transformers.GPT2LMHeadModel(cfg).double().eval()
    assert m.lm_head.weight is m.transformer.wte.weight
    return HF(m)


def albert():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.AlbertConfig(
        vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=16, attn_implementation="eager",
    )
    m = transformers.AlbertForMaskedLM(cfg).double().eval()
    assert m.predictions.decoder.weight is m.albert.embeddings.word_embeddings.weight
    return HF(m, token_types=True)


@dataclass
class Case:
    model: nn.Module
    loss_fn: nn.Module
    x: Tensor
    y: Tensor
    uses: List[str]  # the modules that apply the tied parameter, in forward order
    #: the further parameters whose exact quantities are checked (the uses' untied biases)
    extra: List[str]

    @property
    def tied(self) -> nn.Parameter:
        return self.model.get_submodule(self.uses[0]).weight

    @property
    def checked(self) -> List[nn.Parameter]:
        return [self.tied] + [self.model.get_parameter(n) for n in self.extra]

    def loss(self, model=None):
        return self.loss_fn((model or self.model)(self.x), self.y)


def make(name: str) -> Case:
    torch.manual_seed(0)
    if name == "lm":
        x, y = torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T))
        return Case(TiedLM(), nn.CrossEntropyLoss(), x, y, ["emb", "head"], ["head.bias"])
    if name == "linears":
        return Case(TiedLinears(), nn.MSELoss(), torch.randn(N, 2, D), torch.randn(N, 2, D), ["enc", "dec"],
                    ["enc.bias", "dec.bias"])
    if name == "conv":
        x = torch.randn(3, 2, 5, 5)
        return Case(TiedConv(), nn.MSELoss(), x, torch.randn_like(x), ["enc", "dec"], ["dec.bias"])
    if name == "gpt2":
        x, y = torch.randint(0, 50, (3, 4)), torch.randint(0, 50, (3, 4))
        return Case(gpt2(), nn.CrossEntropyLoss(), x, y, ["m.transformer.wte", "m.lm_head"], [])
    if name == "albert":
        x, y = torch.randint(0, 40, (3, 4)), torch.randint(0, 40, (3, 4))
        return Case(albert(), nn.CrossEntropyLoss(), x, y, ["m.albert.embeddings.word_embeddings", "m.predictions.decoder"],
                    ["m.predictions.decoder.bias"])
    raise ValueError(name)


def extended(case: Case) -> Case:
    extend(case.model)  # warns about nothing: GPT-2's Conv1D layers are captured by operation
    extend(case.loss_fn)
    return case


def untied_twin(case: Case) -> nn.Module:
    """The same model with one parameter per use (copies of the tied one)."""
    twin = copy.deepcopy(case.model)
    for name in case.uses[1:]:
        mod = twin.get_submodule(name)
        mod.weight = nn.Parameter(mod.weight.detach().clone())
    return twin


# --------------------------------------------------------------------------- references


def per_sample_grads(case: Case, params: List[nn.Parameter]) -> List[Tensor]:
    """``[N, *p.shape]``: sample ``n``'s contribution to the gradient of the mean loss."""
    n = case.x.shape[0]
    rows = [torch.autograd.grad(case.loss_fn(case.model(case.x[i:i + 1]), case.y[i:i + 1]) / n, params) for i in range(n)]
    return [torch.stack(g) for g in zip(*rows)]


def dense_ggn(case: Case, params: List[nn.Parameter], x=None, y=None) -> Tensor:
    """``J^T H J`` over ``params`` (flattened, in that order), from ``torch.func``."""
    x = case.x if x is None else x
    y = case.y if y is None else y
    named = dict(case.model.named_parameters())  # one name per tied parameter
    keys = [next(k for k, q in named.items() if q is p) for p in params]
    base = {k: q.detach() for k, q in named.items()}

    def f(*ws):
        return functional_call(case.model, {**base, **dict(zip(keys, ws))}, (x,))

    ws = [p.detach() for p in params]
    out = f(*ws).detach()
    J = jacrev(f, argnums=tuple(range(len(ws))))(*ws)
    J = torch.cat([j.reshape(out.numel(), -1) for j in J], dim=1)
    H = hessian(lambda o: case.loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ H @ J


def dense(F: Tensor) -> Tensor:
    return torch.diag(F) if F.dim() == 1 else F


def kron_sum(terms) -> Tensor:
    return sum(torch.kron(dense(a), dense(b)) for a, b in terms)


def blocks_of(M: Tensor, params: List[nn.Parameter]) -> List[Tensor]:
    out, i = [], 0
    for p in params:
        out.append(M[i:i + p.numel(), i:i + p.numel()])
        i += p.numel()
    return out


CASES = ["lm", "linears", "conv", "gpt2", "albert"]


# --------------------------------------------------------------------------- exact quantities


@pytest.mark.parametrize("name", CASES)
def test_exact_quantities_sum_the_uses(name):
    """BatchGrad, DiagGGN, ExactBlockFisher and GGNMP of a tied parameter (and of its layers' untied
    biases) equal the per-sample gradients and the dense GGN block: the uses' per-sample gradients
    are summed, cross terms included (the regression test: this backward raised
    NotImplementedError)."""
    case = extended(make(name))
    exts = [BatchGrad(), DiagGGN(fisher_type="type-2"), ExactBlockFisher(fisher_type="type-2"), GGNMP(fisher_type="type-2")]
    with curvature(*exts):
        case.loss().backward()
    params = case.checked
    refs = per_sample_grads(case, params)
    ggn = dense_ggn(case, params)
    for p, ref, block in zip(params, refs, blocks_of(ggn, params)):
        torch.testing.assert_close(p.grad_batch, ref)
        torch.testing.assert_close(p.block_fisher, block)
        torch.testing.assert_close(p.diag_ggn, block.diagonal().reshape(p.shape))
        Vs = torch.randn(2, *p.shape)
        torch.testing.assert_close(p.ggnmp(Vs), (Vs.reshape(2, -1) @ block).reshape(Vs.shape))


def test_ggn_operator_couples_the_tied_parameter_with_the_network():
    """The whole-network GGNMP operator equals the dense GGN over all parameters (the tied one once)."""
    case = extended(make("lm"))
    ext = GGNMP(fisher_type="type-2")
    with curvature(ext):
        case.loss().backward()
    F = ext.operator()
    params = list(case.model.parameters())
    assert {id(p) for p in F.params} == {id(p) for p in params} and len(F.params) == len(params)
    ggn = dense_ggn(case, F.params)
    torch.testing.assert_close(F.to_dense(), ggn)


@pytest.mark.parametrize("name", ["lm", "conv"])
def test_hessian_products(name):
    """HMP block of the tied parameter equals the dense Hessian (torch.func)."""
    case = extended(make(name))
    with curvature(HMP()):
        case.loss().backward()
    W = case.tied
    named = dict(case.model.named_parameters())
    key = next(k for k, q in named.items() if q is W)
    base = {k: q.detach() for k, q in named.items()}
    H = hessian(lambda w: case.loss_fn(functional_call(case.model, {**base, key: w}, (case.x,)), case.y))(W.detach())
    H = H.reshape(W.numel(), W.numel())
    Vs = torch.randn(3, *W.shape)
    torch.testing.assert_close(W.hmp(Vs), (Vs.reshape(3, -1) @ H).reshape(Vs.shape))


def test_two_losses_one_reaching_only_one_use():
    """A second loss on the embedding's output reaches the Embedding use but not the head: the
    head's use gets zero columns for it (the uses are aligned as one group), and the exact block
    is the sum of both losses' GGN blocks."""
    torch.manual_seed(1)
    model, ce, mse = extend(TiedLM()), extend(nn.CrossEntropyLoss()), extend(nn.MSELoss())
    x, y, z = torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T)), torch.randn(N, T, D)
    e = model.emb(x)
    logits = model.head(torch.tanh(model.mid(e))).transpose(1, 2)
    with curvature(ExactBlockFisher(fisher_type="type-2"), DiagGGN(fisher_type="type-2")):
        (ce(logits, y) + mse(e, z)).backward()
    W = model.emb.weight
    p = {k: q.detach() for k, q in model.named_parameters()}

    def outputs(w):
        e = nn.functional.embedding(x, w)
        h = torch.tanh(nn.functional.linear(e, p["mid.weight"], p["mid.bias"]))
        return nn.functional.linear(h, w, p["head.bias"]).transpose(1, 2), e

    ref = 0
    for i, (lf, tgt) in enumerate([(ce, y), (mse, z)]):
        out = outputs(W.detach())[i].detach()
        J = jacrev(lambda w, i=i: outputs(w)[i])(W.detach()).reshape(out.numel(), -1)
        H = hessian(lambda o, lf=lf, tgt=tgt: lf(o, tgt))(out).reshape(out.numel(), out.numel())
        ref = ref + J.T @ H @ J
    torch.testing.assert_close(W.block_fisher, ref)
    torch.testing.assert_close(W.diag_ggn, ref.diagonal().reshape(W.shape))


def test_diagonal_is_not_the_sum_of_the_uses_diagonals():
    """The cross terms between the uses count: the tied diagonal equals the dense one and differs
    from the sum of the untied twin's two diagonals."""
    case = extended(make("lm"))
    twin = extend(untied_twin(case))
    for m in (case.model, twin):
        with curvature(DiagGGN(fisher_type="type-2")):
            case.loss(m).backward()
    W = case.tied
    ref = dense_ggn(case, [W]).diagonal().reshape(W.shape)
    torch.testing.assert_close(W.diag_ggn, ref)
    uses = twin.emb.weight.diag_ggn + twin.head.weight.diag_ggn
    assert (uses - ref).abs().max() > 1e-3 * ref.abs().max()


# --------------------------------------------------------------------------- KFAC


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("name", CASES)
def test_tied_kfac_is_the_sum_of_the_untied_twins_terms(name, fisher_type):
    """``p.kfac = [[F1, F2], [H1, H2]]``: one term per use, each the ``p.kfac`` of that use's own
    copy in the untied twin (already in ``p.flatten()`` order: the first factor over
    ``p.shape[0]``), and the untied biases' factors as the twin's."""
    case = extended(make(name))
    twin = extend(untied_twin(case))
    for m in (case.model, twin):
        with curvature(KFAC(fisher_type=fisher_type)):
            case.loss(m).backward()
    W = case.tied
    twin_terms = [twin.get_submodule(u).weight.kfac for u in case.uses]
    assert len(W.kfac) == len(case.uses)
    for got, want in zip(W.kfac, twin_terms):
        assert [f.shape for f in got] == [f.shape for f in want]
        for f, g in zip(got, want):
            torch.testing.assert_close(f, g)
    torch.testing.assert_close(kron_sum(W.kfac), kron_sum(twin_terms))
    for n in case.extra:
        torch.testing.assert_close(case.model.get_parameter(n).kfac[0], twin.get_parameter(n).kfac[0])


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_kronecker_inverse_of_tied_kfac(mode):
    """The two-term KFAC of the tied ``[V, D]`` weight (a 1-D Embedding factor next to the head's
    dense ones) inverted exactly: ``"exact"`` is ``(sum of terms + λI)^-1``; ``"pi"`` damps the
    first term by ``π`` (docs of KroneckerInverse) and adds the second."""
    case = extended(make("lm"))
    with curvature(KFAC(fisher_type="type-2")):
        case.loss().backward()
    W = case.tied
    (A1, G1), (G2, A2) = W.kfac
    assert A1.dim() == 1 and G2.dim() == 2
    lam = 1e-2
    P = KroneckerInverse(W.kfac, lam, mode)
    if mode == "exact":
        M = kron_sum(W.kfac) + lam * torch.eye(W.numel())
    else:
        pi = math.sqrt((G1.trace() / D) / (A1.sum() / V))
        s = math.sqrt(lam)
        M = torch.kron(torch.diag(A1) + s / pi * torch.eye(V), G1 + s * pi * torch.eye(D)) + torch.kron(G2, A2)
    Vs = torch.randn(4, V, D)
    ref = torch.linalg.solve(M, Vs.reshape(4, -1).T).T.reshape(Vs.shape)
    torch.testing.assert_close(P(Vs), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["lm", "gpt2"])
def test_natural_gradient_step(name):
    """One NaturalGradient step (kfac, damping_mode="exact", T_cov=T_inv=1) on a tied model moves
    every parameter by ``-lr (C_p + λI)^-1 g_p``, ``C_p`` the sum of the tied parameter's terms
    (the kron of its factors for the others; a parameter without curvature: ``-lr g``)."""
    case = extended(make(name))
    lr, lam = 0.1, 1e-2
    params = list(case.model.parameters())
    opt = NaturalGradient(params, lr=lr, curvature="kfac", fisher_type="type-2", damping=lam, damping_mode="exact",
                          T_cov=1, T_inv=1, kl_clip=None, momentum=0.0)
    before = [p.detach().clone() for p in params]
    loss = case.loss()
    with opt.capture():
        loss.backward()
    want = []
    for p in params:
        g, C = p.grad.flatten(), getattr(p, "kfac", None)
        if C is None:
            want.append(-lr * g)
            continue
        C = kron_sum(C) if not isinstance(C[0], Tensor) else (kron_sum([C]) if len(C) == 2 else dense(C[0]))
        want.append(-lr * torch.linalg.solve(C + lam * torch.eye(p.numel()), g))
    assert len(case.tied.kfac) == 2 and all(hasattr(p, "kfac") for p in params)  # GPT-2's Conv1D too
    opt.step()
    for p, b, d in zip(params, before, want):
        torch.testing.assert_close((p.detach() - b).flatten(), d, rtol=1e-8, atol=1e-12)


def test_kfac_accumulates_per_term_over_backwards():
    """Two micro-batches in one context equal one backward on the whole batch: per term, ``G``
    adds up and the activation factor is averaged over its own rows."""
    case = extended(make("lm"))
    with curvature(KFAC(fisher_type="type-2"), BatchGrad()):
        case.loss().backward()
    whole = [[f.clone() for f in t] for t in case.tied.kfac]
    gb = case.tied.grad_batch.clone()
    with curvature(KFAC(fisher_type="type-2"), BatchGrad()):
        for idx in (slice(0, 2), slice(2, N)):
            n = case.x[idx].shape[0]
            (case.loss_fn(case.model(case.x[idx]), case.y[idx]) * n / N).backward()
    for got, want in zip(case.tied.kfac, whole):
        for f, g in zip(got, want):
            torch.testing.assert_close(f, g)
    torch.testing.assert_close(case.tied.grad_batch, gb)


# --------------------------------------------------------------------------- other extensions


def test_kpsvd_is_the_best_kronecker_approximation_of_the_tied_block():
    """KPSVD of a tied parameter: the leading term of the Van Loan rearrangement of its exact block."""
    case = extended(make("linears"))
    with curvature(KPSVD(fisher_type="type-2", rank=1), ExactBlockFisher(fisher_type="type-2")):
        case.loss().backward()
    W = case.tied
    m, n = W.shape
    R = W.block_fisher.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)
    U, S, Vh = torch.linalg.svd(R)
    best = S[0] * torch.kron(U[:, 0].reshape(m, m), Vh[0].reshape(n, n))
    ((G, A),) = W.kpsvd
    torch.testing.assert_close(torch.kron(G, A), best)


def test_factor_extensions_without_a_tied_form_raise_naming_the_parameter():
    case = extended(make("lm"))
    for ext in (KFACCorrected(fisher_type="type-2"), EKFAC(fisher_type="type-2"), KFAC(fisher_type="type-2", cross_layer=True)):
        with pytest.raises(NotImplementedError, match=r"emb\.weight = head\.weight.*(Embedding 'emb', Linear 'head')"):
            with curvature(ext):
                case.loss().backward()
        case.model.zero_grad()


def test_ekfac_with_given_bases():
    """EKFAC(bases=...) of a tied parameter: ``S = diag(Q^T C Q)``, ``Q = kron(Q0, Q1)``, ``C`` its exact block."""
    case = extended(make("lm"))
    W = case.tied
    for q in case.model.parameters():  # bases for the tied parameter only
        q.requires_grad_(q is W)
    Q0, Q1 = torch.linalg.qr(torch.randn(V, V))[0], torch.linalg.qr(torch.randn(D, D))[0]
    with curvature(EKFAC(fisher_type="type-2", bases={W: [Q0, Q1]}), ExactBlockFisher(fisher_type="type-2")):
        case.loss().backward()
    Q = torch.kron(Q0, Q1)
    torch.testing.assert_close(W.ekfac[1], (Q.T @ W.block_fisher @ Q).diagonal().reshape(V, D))


def test_sub_batch():
    """SubBatch: the exact block of the tied parameter on the drawn samples (mean over them)."""
    case = extended(make("lm"))
    ext = SubBatch(ExactBlockFisher(fisher_type="type-2"), 0.6, generator=torch.Generator().manual_seed(0))
    with curvature(ext):
        case.loss().backward()
    idx = ext.sampler.index
    assert 0 < idx.numel() < N
    ref = dense_ggn(case, [case.tied], case.x[idx], case.y[idx])
    torch.testing.assert_close(case.tied.block_fisher, ref)


# --------------------------------------------------------------------------- engine


def test_tied_after_extend_and_one_use_called_twice():
    """A tie made after ``extend`` (``tie_weights`` afterwards), and an Embedding called twice (an
    encoder's and a decoder's tokens, T5-style) next to the tied head: the Embedding is one use
    (its calls are positions), the head another."""

    class Seq2Seq(TiedLM):
        def forward(self, x):
            h = torch.tanh(self.mid(self.emb(x) + self.emb(x.flip(1))))
            return self.head(h).transpose(1, 2)

    torch.manual_seed(0)
    model = extend(Seq2Seq(tie=False))
    model.tie_weights()
    x, y = torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T))
    case = Case(model, extend(nn.CrossEntropyLoss()), x, y, ["emb", "head"], ["head.bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "took part in no call" warning
        with curvature(BatchGrad(), ExactBlockFisher(fisher_type="type-2"), KFAC(fisher_type="type-2")):
            case.loss().backward()
    W = case.tied
    torch.testing.assert_close(W.grad_batch, per_sample_grads(case, [W])[0])
    torch.testing.assert_close(W.block_fisher, dense_ggn(case, [W]))
    assert len(W.kfac) == 2 and W.kfac[0][0].dim() == 1


def test_a_part_of_a_composite_layer_is_a_use():
    """The grouping is on the parameter, not on module types: an RNN's recurrent weight (applied by
    the RNN's ``hh`` part, recorded by its adapter) tied to a Linear's weight."""

    class RNNTied(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.RNN(D, D, batch_first=True), nn.Linear(D, D)
            self.out.weight = self.rnn.weight_hh_l0

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    torch.manual_seed(0)
    x = torch.randn(N, T, D)
    case = extended(Case(RNNTied(), nn.MSELoss(), x, torch.randn_like(x), ["out"], []))
    with curvature(BatchGrad(), ExactBlockFisher(fisher_type="type-2"), KFAC(fisher_type="type-2")):
        case.loss().backward()
    W = case.tied
    torch.testing.assert_close(W.grad_batch, per_sample_grads(case, [W])[0])
    torch.testing.assert_close(W.block_fisher, dense_ggn(case, [W]))
    twin = copy.deepcopy(case.model)
    twin.out.weight = nn.Parameter(twin.out.weight.detach().clone())
    extend(twin)
    with curvature(KFAC(fisher_type="type-2")):
        case.loss(twin).backward()
    torch.testing.assert_close(kron_sum(W.kfac), kron_sum([twin.rnn.weight_hh_l0.kfac, twin.out.weight.kfac]))
    with pytest.raises(NotImplementedError, match=r"rnn\.weight_hh_l0 = out\.weight \(used by RNN 'rnn\.hh_l0', Linear 'out'\)"):
        with curvature(KFACCorrected(fisher_type="type-2")):
            case.loss().backward()


def test_one_use_in_a_backward_is_an_untied_layer():
    """A backward that reaches only one use of the parameter gives that layer's own quantities."""
    case = extended(make("lm"))
    h = torch.tanh(case.model.mid(torch.randn(N, T, D)))
    with curvature(KFAC(fisher_type="empirical"), BatchGrad()):
        case.loss_fn(case.model.head(h).transpose(1, 2), case.y).backward()
    G, A = case.tied.kfac  # the head's [G, A] alone
    assert G.shape == (V, V) and A.shape == (D, D)
    assert case.tied.grad_batch.shape == (N, V, D)
    with pytest.raises(ValueError, match="uses differ between the backwards"):  # KFAC cannot match the terms
        with curvature(KFAC(fisher_type="empirical")):
            case.loss().backward()
            case.loss_fn(case.model.head(torch.tanh(case.model.mid(torch.randn(N, T, D)))).transpose(1, 2), case.y).backward()


def test_no_warning_for_a_module_whose_parameter_an_adapted_layer_applies():
    """ALBERT's ``predictions.bias`` is ``decoder.bias``: it gets curvature through the decoder, so
    ``extend`` names no module without an adapter."""
    m = albert()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extend(m)
