"""Capture by operation (curvlib/engine/operations.py, engine/layers/op_*.py): parameters applied
functionally, inside any module, get the curvature of their module twin.

A user module applies every parameter through an operation (``F.embedding``, ``F.linear``,
``x @ W``, ``W @ x``, ``addmm`` on merged rows, ``F.layer_norm``, ``w * x + b``, ``F.conv2d``,
``F.conv_transpose1d``, ``F.group_norm``, ``F.rms_norm``, ``F.batch_norm``): per-sample gradients
equal ``torch.func``'s, the diagonal and blocks equal the dense GGN, and KFAC equals that of a twin
built from ``torch.nn`` modules (``x @ W``, ``addmm(b, x, W)``: the twin Linear's factors swapped,
``p.kfac = [A, G]``); a scale / shift parameter's ``[G]`` is its exact block. Refusals: rows whose
samples cannot be located raise naming the parameter and the operation.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import GGNMP, KFAC, BatchGrad, DiagGGN, ExactBlockFisher
from tests.utils import assert_batch_grad_and_diag_ggn, assert_exact_quantities, dense_ggn, param_slices, per_sample_grads

V, D, H, C, N, T = 7, 4, 5, 3, 4, 6


pytestmark = pytest.mark.usefixtures("float64")


class Functional(nn.Module):
    """Every parameter through an operation; ``ids [N, T] -> logits [N, C, T]``."""

    def __init__(self):
        super().__init__()
        p = lambda *s: nn.Parameter(torch.randn(*s) / s[-1] ** 0.5)  # noqa: E731
        self.E = p(V, D)
        self.W1, self.b1 = p(H, D), p(H)          # F.linear
        self.W2 = p(H, H)                         # x @ W2, W2 [in, out]
        self.W3 = p(H, H)                         # W3 @ x^T
        self.W4, self.b4 = p(H, H), p(H)          # addmm(b4, x.view(-1, H), W4)
        self.ln_w, self.ln_b = p(H), p(H)         # F.layer_norm
        self.scale, self.shift = p(H), p(1, T, H)  # w * x + b (a scale, a position table)
        self.K, self.kb = p(C, 1, 3, 3), p(C)     # F.conv2d

    def forward(self, ids):
        n = ids.shape[0]
        h = F.embedding(ids, self.E)
        h = torch.tanh(F.linear(h, self.W1, self.b1))
        h = torch.tanh(h @ self.W2)
        h = torch.tanh((self.W3 @ h.transpose(1, 2)).transpose(1, 2))
        h = torch.addmm(self.b4, h.reshape(-1, H), self.W4).view(n, T, H)
        h = F.layer_norm(h, (H,), self.ln_w, self.ln_b)
        h = self.scale * h + self.shift
        return F.conv2d(h.unsqueeze(1), self.K, self.kb, padding=1).mean(-1)  # [N, C, T]


class Twin(nn.Module):
    """The same map from ``torch.nn`` modules (scale and shift stay parameters)."""

    def __init__(self, f: Functional):
        super().__init__()
        lin = lambda w, b=None: nn.Linear(w.shape[1], w.shape[0], bias=b is not None)  # noqa: E731
        self.emb = nn.Embedding(V, D)
        self.l1, self.l2, self.l3, self.l4 = lin(f.W1, f.b1), lin(f.W2.T), lin(f.W3), lin(f.W4.T, f.b4)
        self.ln = nn.LayerNorm(H)
        self.conv = nn.Conv2d(1, C, 3, padding=1)
        with torch.no_grad():
            self.emb.weight.copy_(f.E)
            self.l1.weight.copy_(f.W1), self.l1.bias.copy_(f.b1)
            self.l2.weight.copy_(f.W2.T), self.l3.weight.copy_(f.W3)
            self.l4.weight.copy_(f.W4.T), self.l4.bias.copy_(f.b4)
            self.ln.weight.copy_(f.ln_w), self.ln.bias.copy_(f.ln_b)
            self.conv.weight.copy_(f.K), self.conv.bias.copy_(f.kb)
        self.scale, self.shift = nn.Parameter(f.scale.detach().clone()), nn.Parameter(f.shift.detach().clone())

    def forward(self, ids):
        h = torch.tanh(self.l1(self.emb(ids)))
        h = torch.tanh(self.l3(torch.tanh(self.l2(h))))
        h = self.ln(self.l4(h))
        h = self.scale * h + self.shift
        return self.conv(h.unsqueeze(1)).mean(-1)


#: functional parameter -> (twin parameter, factors swapped)
PAIRS = {"E": ("emb.weight", False), "W1": ("l1.weight", False), "b1": ("l1.bias", False),
         "W2": ("l2.weight", True), "W3": ("l3.weight", False), "W4": ("l4.weight", True),
         "b4": ("l4.bias", False), "ln_w": ("ln.weight", False), "ln_b": ("ln.bias", False),
         "K": ("conv.weight", False), "kb": ("conv.bias", False)}


def data():
    return torch.randint(0, V, (N, T)), torch.randint(0, C, (N, T))


def test_outputs_are_unchanged_and_no_warning():
    f = Functional()
    x, _ = data()
    ref = copy.deepcopy(f)(x)
    extend(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(f(x), ref, rtol=0, atol=0)


def assert_exact(model: nn.Module, x, y) -> None:
    """BatchGrad, DiagGGN, ExactBlockFisher and GGNMP of every parameter against torch.func on a
    copy without hooks; no curvlib warning."""
    plain = copy.deepcopy(model)
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with curvature(BatchGrad(), DiagGGN(fisher_type="type-2"), ExactBlockFisher(fisher_type="type-2"),
                       GGNMP(fisher_type="type-2")):
            loss_fn(model(x), y).backward()
    psg = per_sample_grads(plain, nn.CrossEntropyLoss(), x, y)
    ggn = dense_ggn(plain, nn.CrossEntropyLoss(), x, y)
    for (name, p), sl in zip(model.named_parameters(), param_slices(model)):
        assert_exact_quantities(p, psg[name] / N, ggn[sl, sl])


def test_exact_quantities_against_torch_func():
    assert_exact(Functional(), *data())


@pytest.mark.parametrize("fisher_type,approx", [("type-2", "expand"), ("mc", "expand"), ("empirical", "expand")])
def test_kfac_equals_the_module_twin(fisher_type, approx):
    f = Functional()
    twin = Twin(f)
    x, y = data()
    extend(f), extend(twin)
    loss_fn = extend(nn.CrossEntropyLoss())
    for model in (f, twin):
        torch.manual_seed(1)
        loss = loss_fn(model(x), y)
        with curvature(KFAC(fisher_type=fisher_type, kfac_approx=approx)):
            loss.backward()
    params = dict(twin.named_parameters())
    for name, (tname, swapped) in PAIRS.items():
        mine, theirs = getattr(f, name).kfac, params[tname].kfac
        if swapped:
            theirs = theirs[::-1]
        assert len(mine) == len(theirs), name
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, msg=name)
    assert f.W2.kfac[0].shape == (H, H) and len(f.scale.kfac) == 1


def test_scale_and_shift_get_their_exact_block():
    """A parameter broadcast over the samples is summed: KFAC's ``[G]`` is the exact empirical
    block ``1/(N T) sum_n g_n g_n^T`` of the samples' summed losses ``l_n`` (``g_n = T * grad`` of a
    sample's mean over its ``T`` positions)."""
    f = Functional()
    plain = copy.deepcopy(f)
    x, y = data()
    extend(f)
    loss_fn = extend(nn.CrossEntropyLoss())
    with curvature(KFAC(fisher_type="empirical")):
        loss_fn(f(x), y).backward()
    psg = per_sample_grads(plain, nn.CrossEntropyLoss(), x, y)
    for name in ("scale", "shift"):
        (G,) = getattr(f, name).kfac
        g = T * psg[name].flatten(1)
        torch.testing.assert_close(G, g.T @ g / (N * T))


class Convs(nn.Module):
    """``F.conv_transpose1d``, ``F.group_norm``, ``F.rms_norm``, ``F.batch_norm`` (eval), a channel
    scale ``w.view(1, -1, 1)``, and ``x @ W.T`` (a parameter view): ``[N, C_in, L] -> [N, 2]``."""

    def __init__(self):
        super().__init__()
        p = lambda *s: nn.Parameter(torch.randn(*s) / s[-1] ** 0.5)  # noqa: E731
        self.Wt, self.bt = p(3, 4, 2), p(4)
        self.gn_w, self.gn_b = p(4), p(4)
        self.rms_w = p(6)
        self.bn_w, self.bn_b = p(4), p(4)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = p(4)
        self.out = p(2, 6)

    def forward(self, x):
        h = F.conv_transpose1d(x, self.Wt, self.bt, stride=2)           # [N, 4, 6]
        h = torch.tanh(F.group_norm(h, 2, self.gn_w, self.gn_b))
        h = F.rms_norm(h, (6,), self.rms_w, 1e-5)
        h = F.batch_norm(h, self.mean, self.var, self.bn_w, self.bn_b, training=False)
        h = h * self.gamma.view(1, -1, 1)
        return (h @ self.out.T).mean(1)                                 # [N, 2]


def test_more_operations_exact():
    assert_exact(Convs(), torch.randn(N, 3, 3), torch.randint(0, 2, (N,)))


def test_conv_transpose_kfac_equals_the_module():
    m = Convs()
    twin = nn.ConvTranspose1d(3, 4, 2, stride=2)
    with torch.no_grad():
        twin.weight.copy_(m.Wt), twin.bias.copy_(m.bt)

    class Rest(nn.Module):  # the module twin followed by the same functional rest
        def __init__(self):
            super().__init__()
            self.conv, self.m = twin, m

        def forward(self, x):
            h = self.conv(x)
            h = torch.tanh(F.group_norm(h, 2, self.m.gn_w, self.m.gn_b))
            h = F.rms_norm(h, (6,), self.m.rms_w, 1e-5)
            h = F.batch_norm(h, self.m.mean, self.m.var, self.m.bn_w, self.m.bn_b, training=False)
            return (h * self.m.gamma.view(1, -1, 1) @ self.m.out.T).mean(1)

    x, y = torch.randn(N, 3, 3), torch.randint(0, 2, (N,))
    loss_fn = extend(nn.CrossEntropyLoss())
    mine, rest = extend(copy.deepcopy(m)), extend(Rest())
    for model in (mine, rest):
        with curvature(KFAC(fisher_type="type-2")):
            loss_fn(model(x), y).backward()
    for a, b in zip(mine.Wt.kfac + mine.bt.kfac, twin.weight.kfac + twin.bias.kfac):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(mine.out.kfac[0], rest.m.out.kfac[0])


def test_functional_batch_norm_in_training_couples_the_samples():
    class BN(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b, self.lin = nn.Parameter(torch.ones(3)), nn.Parameter(torch.zeros(3)), nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(F.batch_norm(x, None, None, self.w, self.b, training=True))

    m = extend(BN())
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(N, 3), torch.randint(0, 2, (N,))
    with pytest.raises(RuntimeError, match=r"BatchGrad needs independent samples.*batch_norm"):
        with curvature(BatchGrad()):
            loss_fn(m(x), y).backward()
    with pytest.warns(UserWarning, match="treats the samples as independent"):
        with curvature(KFAC(fisher_type="type-2")):
            loss_fn(m(x), y).backward()
    assert len(m.w.kfac) == 1


# ------------------------------------------------------------------ where the samples are
class TimeMajor(nn.Module):
    """``F.linear`` on a time-major view ``[T, N, D]`` of batch-first data (samples in dim 1)."""

    def __init__(self, merge: bool):
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, D))
        self.merge = merge

    def forward(self, x):  # x [N, T, D]
        h = torch.tanh(x).transpose(0, 1)
        if self.merge:  # [T N, D]: rows of all samples interleaved
            return F.linear(h.reshape(-1, D), self.W).view(T, -1, 3).transpose(0, 1)
        return F.linear(h, self.W).transpose(0, 1)


def test_samples_in_another_dimension_are_followed():
    m = TimeMajor(merge=False)
    plain = copy.deepcopy(m)
    x, y = torch.randn(N, T, D), torch.randn(N, T, 3)
    extend(m)
    with curvature(BatchGrad()):
        nn.MSELoss()(m(x), y).backward()
    ref = per_sample_grads(plain, nn.MSELoss(), x, y)["W"] / N
    torch.testing.assert_close(m.W.grad_batch, ref)


def test_rows_that_mix_the_samples_are_refused_naming_the_parameter_and_operation():
    m = extend(TimeMajor(merge=True))
    with pytest.raises(NotImplementedError, match=r"parameter 'W' is used by F.linear, but which rows of its input "
                                                  r"belong to which sample is not known"):
        m(torch.randn(N, T, D))
    with torch.no_grad():  # no curvature without gradients: nothing to refuse
        m(torch.randn(N, T, D))


class Flattened(nn.Module):
    """OPT's pattern with modules: ``fc(h.reshape(-1, D))`` (rows = positions of the samples)."""

    def __init__(self):
        super().__init__()
        self.inp, self.ln, self.fc = nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.fc(torch.relu(self.ln(h.reshape(-1, D)))).view(x.shape[0], -1, 3)


def test_module_on_merged_rows_gets_per_sample_quantities():
    """Before: ``fc``'s grad_batch came out ``[N T, ...]`` (per position, silently)."""
    assert_batch_grad_and_diag_ggn(Flattened(), nn.MSELoss(), torch.randn(N, T, D), torch.randn(N, T, 3))


def test_parameter_views_and_uncovered_uses():
    """``x @ W.T`` is ``F.linear``, ``(1 + g.float())`` is ``g`` (Gemma's norm scale); ``t.exp()``
    is not covered: the curvature backward names the parameter and the operation."""

    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.t, self.g = nn.Parameter(torch.randn(3, D)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(D))

        def forward(self, x):
            return ((x * (1.0 + self.g.float())) @ self.W.T) * self.t.exp()

    m = extend(Views())
    plain = copy.deepcopy(m)
    x, y = torch.randn(N, D), torch.randn(N, 3)
    loss = extend(nn.MSELoss())(m(x), y)
    with pytest.warns(UserWarning, match=r"parameter 't' reaches the loss through Tensor.exp") as rec:
        with curvature(KFAC(fisher_type="type-2"), BatchGrad()):
            loss.backward()
    assert len(rec) == 1 and len(m.W.kfac) == 2 and len(m.g.kfac) == 1 and not hasattr(m.t, "kfac")
    psg = per_sample_grads(plain, nn.MSELoss(), x, y)
    for name in ("W", "g"):
        torch.testing.assert_close(getattr(m, name).grad_batch, psg[name] / N)


class TiedFunctional(nn.Module):
    """A functional language model whose embedding table is also its output head (nanoGPT style
    without modules): ``E`` is used by ``F.embedding`` and by ``h @ E.T``, two operations."""

    def __init__(self):
        super().__init__()
        self.E = nn.Parameter(torch.randn(V, D) / 2)
        self.W = nn.Parameter(torch.randn(D, D) / 2)

    def forward(self, ids):
        return (torch.tanh(F.embedding(ids, self.E) @ self.W) @ self.E.T).transpose(1, 2)


def test_a_parameter_tied_across_operations():
    """Two operations applying one parameter are its two uses (engine/tying.py): exact quantities
    sum them, KFAC is one term per use, each that of the untied twin's copy."""
    ids, y = torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T))
    assert_exact(TiedFunctional(), ids, y)

    class Untied(TiedFunctional):
        def __init__(self, tied):
            super().__init__()
            self.load_state_dict(tied.state_dict())
            self.H = nn.Parameter(tied.E.detach().clone())

        def forward(self, ids):
            return (torch.tanh(F.embedding(ids, self.E) @ self.W) @ self.H.T).transpose(1, 2)

    tied = extend(TiedFunctional())
    twin = extend(Untied(tied))
    loss_fn = extend(nn.CrossEntropyLoss())
    for m in (tied, twin):
        with curvature(KFAC(fisher_type="type-2")):
            loss_fn(m(ids), y).backward()
    assert len(tied.E.kfac) == 2
    for got, want in zip(tied.E.kfac, [twin.E.kfac, twin.H.kfac]):
        assert len(got) == len(want) == 2
        for f, g in zip(got, want):
            torch.testing.assert_close(f, g)
