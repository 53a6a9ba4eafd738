"""nn.LSTM / nn.GRU / nn.RNN run unrolled into Linear parts (curvlib/engine/layers/recurrent.py):
outputs and gradients bitwise those of the fused module; exact quantities against torch.func on
the fused module; KFAC against a hand computation of the expand / reduce factors over time steps,
against a twin built from nn.Linear modules (every fisher_type) and, on one step, against
curvlinops on that twin; training on digits; refusals."""
import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from curvlib import curvature, extend
from curvlib.extensions import GGNMP, KFAC, BatchGrad, DiagGGN, ExactBlockFisher
from tests.utils import assert_exact_quantities, dense_ggn

D, H, T, N, C = 3, 4, 5, 4, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second thread only adds overhead (and PyTorch's fused kernels spin-wait
    for it on a loaded machine)."""
    torch.set_num_threads(1)

#: name -> constructor(**kw) of the recurrent layer
CELLS = {
    "lstm": lambda **kw: nn.LSTM(D, H, **kw),
    "lstm-proj": lambda **kw: nn.LSTM(D, H, proj_size=2, **kw),
    "gru": lambda **kw: nn.GRU(D, H, **kw),
    "rnn-tanh": lambda **kw: nn.RNN(D, H, **kw),
    "rnn-relu": lambda **kw: nn.RNN(D, H, nonlinearity="relu", **kw),
}
#: (num_layers, bidirectional, batch_first, bias)
SHAPES = [(1, False, True, True), (2, True, False, True), (2, False, True, False), (1, True, True, True)]


def out_size(rnn) -> int:
    return (rnn.proj_size or rnn.hidden_size) * (1 + rnn.bidirectional)


def initial_state(rnn, n, gen=None):
    """A random ``h0`` (``(h0, c0)`` for LSTM) for a batch of ``n`` (``None``: unbatched)."""
    L = rnn.num_layers * (1 + rnn.bidirectional)
    shape = (L,) if n is None else (L, n)
    h0 = torch.randn(*shape, rnn.proj_size or rnn.hidden_size, generator=gen)
    return (h0, torch.randn(*shape, rnn.hidden_size, generator=gen)) if isinstance(rnn, nn.LSTM) else h0


# ------------------------------------------------------------------ outputs equal the fused module
def assert_same(a, b, exact: bool):
    if isinstance(a, (tuple, list)):
        for u, v in zip(a, b):
            assert_same(u, v, exact)
    elif exact:
        assert torch.equal(a, b), (a - b).abs().max()
    else:
        torch.testing.assert_close(a, b)


def run_both(rnn, x, hx, seed=0):
    """Outputs and gradients (parameters, input) of an extended copy of ``rnn`` and of ``rnn``
    itself (never extended), from the same random stream (dropout)."""
    results = []
    for m in (extend(copy.deepcopy(rnn)), rnn):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed)
        out = m(xi) if hx is None else m(xi, hx)
        h = out[1] if isinstance(out[1], tuple) else (out[1],)
        (out[0].square().sum() + sum(t.sin().sum() for t in h)).backward()
        results.append((out, [p.grad for p in m.parameters()], xi.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cell", list(CELLS))
def test_outputs_and_gradients_are_bitwise_the_fused_modules(cell, shape, dtype):
    """Same operations in the same order as PyTorch's CPU kernel: bitwise equal outputs (output
    sequence, h_n, c_n) and gradients. The float32 LSTM without projections runs oneDNN's kernel
    on CPU: bitwise equal to PyTorch's native kernel (oneDNN off), to round-off to oneDNN's."""
    L, bi, bf, bias = shape
    rnn = CELLS[cell](num_layers=L, bidirectional=bi, batch_first=bf, bias=bias).to(dtype)
    x = torch.randn((N, T, D) if bf else (T, N, D), dtype=dtype)
    onednn = dtype == torch.float32 and cell == "lstm"
    with torch.backends.mkldnn.flags(enabled=not onednn):
        ours, ref = run_both(rnn, x, None)
    assert_same(ours, ref, exact=True)
    if onednn:
        ours, ref = run_both(rnn, x, None)
        assert_same(ours, ref, exact=False)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.usefixtures("float64")
def test_dropout_unbatched_and_initial_state_are_the_fused_modules(cell):
    """Training-mode dropout between layers (the mask drawn by the same call), an unbatched
    input, and a given initial state ``h0`` / ``(h0, c0)``: bitwise equal in float64."""
    rnn = CELLS[cell](num_layers=3, bidirectional=True, dropout=0.4).train()
    x = torch.randn(T, N, D)
    ours, ref = run_both(rnn, x, initial_state(rnn, N), seed=3)
    assert_same(ours, ref, exact=True)
    ours, ref = run_both(rnn.eval(), x[:, 0], initial_state(rnn, None))
    assert_same(ours, ref, exact=True)
    assert ours[0][0].shape == (T, out_size(rnn))


# --------------------------------------------------------------------- models and references
class Classifier(nn.Module):
    """``x [N, T, D]`` -> recurrent layer -> Linear head on the last step; ``tagger=True``: the
    head on every step, logits ``[N, C, T]``. ``init=True``: the initial state ``h0`` (``(h0, c0)``)
    is given, ``tanh`` of a Linear of the sample's mean input (a per-sample state with a graph)."""

    def __init__(self, rnn, tagger=False, init=False):
        super().__init__()
        self.rnn, self.head, self.tagger = rnn, nn.Linear(out_size(rnn), C), tagger
        self.L = rnn.num_layers * (1 + rnn.bidirectional)
        self.sizes = [rnn.proj_size or rnn.hidden_size] + ([rnn.hidden_size] if isinstance(rnn, nn.LSTM) else [])
        self.init = nn.Linear(D, self.L * sum(self.sizes)) if init else None

    def state(self, x):
        z = torch.tanh(self.init(x.mean(1))).split([self.L * s for s in self.sizes], 1)
        hx = [u.reshape(x.shape[0], self.L, -1).transpose(0, 1) for u in z]
        return tuple(hx) if len(hx) == 2 else hx[0]

    def forward(self, x):
        hx = None if self.init is None else self.state(x)
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        out = self.rnn(x, hx)
        out = out[0] if self.rnn.batch_first else out[0].transpose(0, 1)
        return self.head(out).transpose(1, 2) if self.tagger else self.head(out[:, -1])


class Unrolled(nn.Module):
    """The function of ``rnn`` from ``nn.Linear`` parts and textbook cell formulas (a twin
    written independently of curvlib's): per layer and direction ``ih_l{k}{sfx}`` is called once
    on the whole sequence ``[N, T, D]``, ``hh_l{k}{sfx}`` (and ``hr_l{k}{sfx}``) once per step.
    ``probes``: part name -> ``[N, T, G]`` added to the part's output at each step; the inputs
    of every part are kept in ``self.inputs`` (``[N, T, D]``)."""

    def __init__(self, rnn):
        super().__init__()
        self.mode, self.L, self.bidirectional = rnn.mode, rnn.num_layers, rnn.bidirectional
        self.batch_first, self.proj_size, self.hidden_size = rnn.batch_first, rnn.proj_size, rnn.hidden_size
        self.parts = nn.ModuleDict()
        for name in rnn._flat_weights_names:
            if not name.startswith("weight"):
                continue
            part = name[len("weight_"):]
            w = getattr(rnn, name)
            b = getattr(rnn, "bias" + name[len("weight"):], None)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            self.parts[part] = lin
        self.probes, self.inputs = {}, {}

    def part(self, name, a, t=None):
        """Part ``name`` on ``a`` (``[N, T, D]`` for ``t=None``, else step ``t`` ``[N, D]``)."""
        y = self.parts[name](a)
        e = self.probes.get(name)
        if e is not None:
            y = y + (e if t is None else e[:, t])
        if t is None:
            self.inputs[name] = a.detach()
        else:
            self.inputs.setdefault(name, [None] * self.T)[t] = a.detach()
        return y

    def cell(self, name, xw, t, state):
        h = state[0] if self.mode == "LSTM" else state
        hw = self.part(f"hh_{name}", h, t)
        if self.mode == "LSTM":
            i, f, g, o = (xw + hw).chunk(4, -1)
            c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
            m = torch.sigmoid(o) * torch.tanh(c)
            return (self.part(f"hr_{name}", m, t) if self.proj_size else m, c)
        if self.mode == "GRU":
            (xr, xz, xn), (hr, hz, hn) = xw.chunk(3, -1), hw.chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h
        return torch.tanh(xw + hw) if self.mode == "RNN_TANH" else torch.relu(xw + hw)

    def forward(self, x, hx=None):
        if not self.batch_first:
            x = x.transpose(0, 1)
        self.T, self.inputs = x.shape[1], {}
        dirs = 1 + self.bidirectional
        hout = self.proj_size or self.hidden_size
        if hx is None:
            z = x.new_zeros(self.L * dirs, x.shape[0], hout)
            hx = (z, x.new_zeros(self.L * dirs, x.shape[0], self.hidden_size)) if self.mode == "LSTM" else z
        finals = []
        for layer in range(self.L):
            outs = []
            for d in range(dirs):
                name = f"l{layer}" + ("_reverse" if d else "")
                k = layer * dirs + d
                state = (hx[0][k], hx[1][k]) if self.mode == "LSTM" else hx[k]
                xw = self.part(f"ih_{name}", x)
                seq = [None] * self.T
                for t in (reversed(range(self.T)) if d else range(self.T)):
                    state = self.cell(name, xw[:, t], t, state)
                    seq[t] = state[0] if self.mode == "LSTM" else state
                outs.append(torch.stack(seq, 1))
                finals.append(state)
            x = torch.cat(outs, -1)
        self.inputs = {k: torch.stack(v, 1) if isinstance(v, list) else v for k, v in self.inputs.items()}
        out = x if self.batch_first else x.transpose(0, 1)
        if self.mode == "LSTM":
            return out, (torch.stack([s[0] for s in finals]), torch.stack([s[1] for s in finals]))
        return out, torch.stack(finals)


def twin_of(model: Classifier) -> Classifier:
    """The same classifier with the recurrent layer replaced by its :class:`Unrolled` twin."""
    twin = copy.deepcopy(model)
    twin.rnn = Unrolled(model.rnn)
    return twin


def param_map(model, twin):
    """``model``'s recurrent parameters -> the twin's Linear parameters (``weight_ih_l0`` ->
    ``parts.ih_l0.weight``), and the head's to the head's."""
    out = {}
    for name, p in model.rnn.named_parameters():
        kind, part = name.split("_", 1)
        out[p] = getattr(twin.rnn.parts[part], kind)
    others = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if not name.startswith("rnn."):
            out[p] = others[name]
    return out


def per_sample_grads_loop(model, loss_fn, x, y):
    """``[N, *p.shape]`` gradients of each sample's loss by ``torch.func.grad`` of the fused module,
    one sample at a time (``vmap`` has no batching rule for the in-place operations of PyTorch's
    CPU recurrent kernel)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xn, yn):
        return loss_fn(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    gs = [grad(f)(params, x[n], y[n]) for n in range(x.shape[0])]
    return {k: torch.stack([g[k] for g in gs]) for k in params}


#: (cell, num_layers, bidirectional, batch_first, bias, tagger, h0 given)
MODELS = [
    ("lstm", 2, True, True, True, False, True),
    ("gru", 2, True, False, True, True, False),
    ("rnn-relu", 1, False, True, False, False, True),
    ("rnn-tanh", 2, False, False, True, False, False),
    ("lstm-proj", 2, True, True, True, True, True),
]


def make(case):
    cell, L, bi, bf, bias, tagger, h0 = case
    rnn = CELLS[cell](num_layers=L, bidirectional=bi, batch_first=bf, bias=bias)
    return Classifier(rnn, tagger, init=h0)


def data(case):
    x = torch.randn(N, T, D)
    y = torch.randint(0, C, (N, T) if case[5] else (N,))
    return x, y


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("case", MODELS, ids=lambda c: "-".join(map(str, c)))
def test_twin_is_the_fused_module(case):
    model = make(case)
    x, _ = data(case)
    torch.testing.assert_close(twin_of(model)(x), model(x), rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------- exact quantities
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("case", MODELS, ids=lambda c: "-".join(map(str, c)))
def test_exact_quantities_against_torch_func(case):
    """BatchGrad, DiagGGN, ExactBlockFisher, GGNMP (type-2) of every parameter against per-sample
    gradients and the dense GGN from torch.func on the fused module."""
    model = make(case)
    plain = copy.deepcopy(model)
    x, y = data(case)
    loss_fn = extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extend(model)
        ggnmp = GGNMP(fisher_type="type-2")
        with curvature(BatchGrad(), ExactBlockFisher(fisher_type="type-2"), DiagGGN(fisher_type="type-2"), ggnmp):
            loss_fn(model(x), y).backward()
    ggn = dense_ggn(plain, nn.CrossEntropyLoss(), x, y)
    psg = per_sample_grads_loop(plain, nn.CrossEntropyLoss(), x, y)
    i = 0
    for name, p in model.named_parameters():
        s = slice(i, i + p.numel())
        i += p.numel()
        assert_exact_quantities(p, psg[name] / N, ggn[s, s])
    # the whole-network operator, cross-layer terms included
    start, i = {}, 0
    for p in model.parameters():
        start[p] = torch.arange(i, i + p.numel())
        i += p.numel()
    perm = torch.cat([start[p] for p in ggnmp.operator().params])
    torch.testing.assert_close(ggnmp.operator().to_dense(), ggn[perm][:, perm])


@pytest.mark.usefixtures("float64")
def test_layer_called_twice_and_unbatched():
    """One LSTM on two sequences before one backward: its parts' calls are summed as positions,
    per-sample gradients exact. An unbatched call is a batch of one."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(D, H, batch_first=True), nn.Linear(H, C)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1] + self.rnn(0.5 * x.flip(1)[:, 1:])[0][:, -1])

    model = Twice()
    plain = copy.deepcopy(model)
    x, y = torch.randn(N, T, D), torch.randint(0, C, (N,))
    loss_fn = extend(nn.CrossEntropyLoss())
    extend(model)
    with curvature(BatchGrad(), DiagGGN(fisher_type="type-2")):
        loss_fn(model(x), y).backward()
    psg = per_sample_grads_loop(plain, nn.CrossEntropyLoss(), x, y)
    ggn = dense_ggn(plain, nn.CrossEntropyLoss(), x, y).diagonal()
    i = 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, psg[name] / N)
        torch.testing.assert_close(p.diag_ggn.flatten(), ggn[i:i + p.numel()])
        i += p.numel()
    rnn = extend(nn.GRU(D, H))
    out, h = rnn(torch.randn(T, D))
    with curvature(BatchGrad()):
        (out.square().sum() + h.sum()).backward()
    for p in rnn.parameters():
        torch.testing.assert_close(p.grad_batch[0], p.grad)


# ----------------------------------------------------------------------------------- KFAC
def hand_kfac(model, x, y, fisher_type, approx):
    """KFAC of the recurrent parameters by hand, on the :class:`Unrolled` twin: ``A`` from the
    parts' inputs (``x_t``, ``h_{t-1}``, ``m_t``), ``G`` from the cotangents of probes added to
    the parts' outputs (the gate pre-activations), per sample and step:

        expand: A = 1/(N T) sum_{n,t} a a^T      G = sum_{n,t} J_{nt}^T H_n J_{nt}   (type-2)
                                                 G = 1/N sum_{n,t} g_{nt} g_{nt}^T   (empirical)
        reduce: A = 1/N sum_n abar abar^T        the same with J_{nt}, g_{nt} summed over t

    (``J_{nt} = d f_n / d e_{nt}``, ``H_n`` the Hessian of the mean loss w.r.t. ``f_n``,
    ``g_{nt} = d l_n / d e_{nt}`` of the sample's own loss ``l_n``, ``1/N`` the weight of ``l_n`` in
    the objective: ``1/(N T)`` for a tagger). Type-2 by hand for classifiers only: with several
    output positions KFAC's type-2 columns are shared over the positions (curvlinops' convention),
    which depends on the square root of the loss Hessian. Returns ``{twin part name: (G, A)}``."""
    twin = twin_of(model)
    twin(x)
    probes = {k: torch.zeros(x.shape[0], x.shape[1], lin.out_features) for k, lin in twin.rnn.parts.items()}
    acts = dict(twin.rnn.inputs)

    def f(e):
        twin.rnn.probes = e
        return twin(x)

    out = f(probes)
    J = jacrev(f)(probes)  # name -> [*out.shape, N, T, G]
    twin.rnn.probes = {}
    n = x.shape[0]
    idx = torch.arange(n)
    result = {}
    for name, Jp in J.items():
        Jp = Jp.reshape(n, -1, n, *Jp.shape[-2:])[idx, :, idx]  # [N, C', T, G] (C' = out per sample)
        if fisher_type == "type-2":
            Hs = hessian(lambda o: nn.CrossEntropyLoss()(o, y))(out.detach()).reshape(n, -1, n, Jp.shape[1])[idx, :, idx]
            if approx == "reduce":
                Js = Jp.sum(2)
                G = torch.einsum("ncg,ncd,ndh->gh", Js, Hs, Js)
            else:
                G = torch.einsum("nctg,ncd,ndth->gh", Jp, Hs, Jp)
        else:  # kappa = 1 / (loss terms): the objective is kappa sum_n l_n
            dl = torch.func.vmap(grad(lambda o, t: F.cross_entropy(o[None], t[None], reduction="sum")))(out.detach(), y)
            g = torch.einsum("nc,nctg->ntg", dl.reshape(n, -1), Jp)
            if approx == "reduce":
                g = g.sum(1, keepdim=True)
            G = torch.einsum("ntg,nth->gh", g, g) / y.numel()
        a = acts[name]
        if approx == "reduce":
            a = a.mean(1)
            A = a.T @ a / n
        else:
            a = a.reshape(-1, a.shape[-1])
            A = a.T @ a / a.shape[0]
        result[name] = (G, A)
    return result


KFAC_MODELS = [MODELS[0], MODELS[1], MODELS[2], MODELS[4]]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("case,fisher_type,approx", [
    (c, f, a) for c, f, a in itertools.product(KFAC_MODELS, ["type-2", "empirical"], ["expand", "reduce"])
    if not (c[5] and f == "type-2")
], ids=str)
def test_kfac_equals_the_hand_computation(case, fisher_type, approx):
    model = make(case)
    x, y = data(case)
    ref = hand_kfac(copy.deepcopy(model), x, y, fisher_type, approx)
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    with curvature(KFAC(fisher_type=fisher_type, kfac_approx=approx)):
        loss_fn(model(x), y).backward()
    for name, p in model.rnn.named_parameters():
        kind, part = name.split("_", 1)
        G, A = ref[part]
        if kind == "weight":
            assert len(p.kfac) == 2
            torch.testing.assert_close(p.kfac[0], G)
            torch.testing.assert_close(p.kfac[1], A)
        else:
            assert len(p.kfac) == 1
            torch.testing.assert_close(p.kfac[0], G)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("case,fisher_type", [(c, "mc") for c in KFAC_MODELS]
                         + [(KFAC_MODELS[1], "type-2"), (KFAC_MODELS[3], "empirical")], ids=str)
def test_kfac_equals_the_linear_twin(case, fisher_type):
    """Expand over time steps = the twin's Linears (``hh`` called once per step: calls as
    positions) for every fisher_type, mc with the same sampled targets."""
    model = make(case)
    twin = twin_of(model)
    x, y = data(case)
    pairs = param_map(model, twin)
    for m in (model, twin):
        extend(m)
        loss_fn = extend(nn.CrossEntropyLoss())
        torch.manual_seed(7)
        loss = loss_fn(m(x), y)
        with curvature(KFAC(fisher_type=fisher_type, mc_samples=3 if fisher_type == "mc" else 1)):
            loss.backward()
    for p, q in pairs.items():
        assert len(p.kfac) == len(q.kfac)
        for u, v in zip(p.kfac, q.kfac):
            torch.testing.assert_close(u, v)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm-proj"])
def test_one_step_kfac_equals_curvlinops_on_the_linear_twin(cell, fisher_type):
    """A one-step sequence from a given initial state: every Linear of the twin is called once,
    so curvlinops' KFACLinearOperator on the twin is an independent reference for the blocks."""
    from tests.utils import curvlinops_blocks

    rnn = CELLS[cell](num_layers=2, bidirectional=True, batch_first=True)
    model = Classifier(rnn, init=True)
    twin = twin_of(model)
    x, y = torch.randn(N, 1, D), torch.randint(0, C, (N,))
    ref = curvlinops_blocks(twin, nn.CrossEntropyLoss(), x, y, fisher_type=fisher_type)
    ref = dict(zip(twin.parameters(), ref))
    pairs = param_map(model, twin)
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    with curvature(KFAC(fisher_type=fisher_type)):
        loss_fn(model(x), y).backward()
    for p in model.rnn.parameters():
        block = torch.kron(*p.kfac) if len(p.kfac) == 2 else p.kfac[0]
        torch.testing.assert_close(block, ref[pairs[p]])


# ------------------------------------------------------------------------------------ cells
#: cell -> the recurrent layer with the same step
CELL_OF = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn-tanh": nn.RNNCell,
           "rnn-relu": lambda d, h, bias: nn.RNNCell(d, h, bias, nonlinearity="relu")}


class CellLoop(nn.Module):
    """``model``'s one-layer recurrent layer as its cell in a Python loop over the steps (the
    same weights; the zero initial state left to the cell)."""

    def __init__(self, model, cell):
        super().__init__()
        rnn = model.rnn
        self.cell = CELL_OF[cell](D, H, rnn.bias)
        with torch.no_grad():
            for name, p in self.cell.named_parameters():
                p.copy_(getattr(rnn, name + "_l0"))
        self.head = copy.deepcopy(model.head)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cell", list(CELL_OF))
def test_cells_in_a_loop_are_bitwise_the_plain_cells(cell, dtype):
    model = CellLoop(make((cell, 1, False, True, True, False, False)), cell).to(dtype)
    plain = copy.deepcopy(model)
    extend(model)
    x = torch.randn(N, T, D, dtype=dtype)
    ours, ref = model(x), plain(x)
    assert torch.equal(ours, ref)
    ours.sin().sum().backward(), ref.sin().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn-relu"])
def test_cells_in_a_loop_equal_the_recurrent_layer(cell, fisher_type):
    """A cell called once per step: its calls summed as positions give the recurrent layer's
    KFAC (expand) and exact quantities; these equal torch.func on the plain loop."""
    model = make((cell, 1, False, True, True, False, False))
    loop = CellLoop(model, cell)
    plain = copy.deepcopy(loop)
    x, y = torch.randn(N, T, D), torch.randint(0, C, (N,))
    exts = lambda: (KFAC(fisher_type=fisher_type, mc_samples=2 if fisher_type == "mc" else 1), BatchGrad(),
                    DiagGGN(fisher_type="type-2"))
    for m in (model, loop):
        extend(m)
        torch.manual_seed(7)
        loss = extend(nn.CrossEntropyLoss())(m(x), y)
        with curvature(*exts()):
            loss.backward()
    psg = per_sample_grads_loop(plain, nn.CrossEntropyLoss(), x, y)
    ggn = dense_ggn(plain, nn.CrossEntropyLoss(), x, y).diagonal()
    i = 0
    for name, p in loop.named_parameters():
        q = getattr(model.rnn, name.split(".")[1] + "_l0") if name.startswith("cell.") else model.get_parameter(name)
        for u, v in zip(p.kfac, q.kfac):
            torch.testing.assert_close(u, v)
        torch.testing.assert_close(p.grad_batch, psg[name] / N)
        torch.testing.assert_close(p.diag_ggn.flatten(), ggn[i:i + p.numel()])
        i += p.numel()


# -------------------------------------------------------------------------------- training
def digit_sequences():
    """sklearn's digits, each image's 8 rows as a sequence of 8 steps of 8 features."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 8, 8), torch.tensor(y)


class DigitNet(nn.Module):
    """A tagger (the digit at every step, logits ``[N, 10, 8]``) or a classifier (last step)."""

    def __init__(self, rnn, tagger):
        super().__init__()
        self.rnn, self.head, self.tagger = rnn, nn.Linear(rnn.hidden_size, 10), tagger

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out).transpose(1, 2) if self.tagger else self.head(out[:, -1])


#: (cell, tagger, layers, steps, optimizer settings): the LSTM tagger (predicting the digit at every
#: step) after 30 steps: 2.31 -> 1.33 (Adam's best of lr {3e-3, 1e-2, 3e-2}: 1.60 after 40 steps)
TRAINING = [
    # T_cov = T_inv = 1: the curvature every step (the defaults these runs were written with)
    (nn.LSTM, True, 1, 30, dict(lr=0.3, fisher_type="type-2", damping=1e-3, kl_clip=1e-2, momentum=0.0, T_cov=1, T_inv=1)),
    (nn.GRU, False, 2, 15, dict(lr=0.1, fisher_type="mc", damping=1e-2, kl_clip=1e-2, momentum=0.9, T_cov=1, T_inv=1)),
]


@pytest.mark.parametrize("cell,tagger,layers,steps,settings", TRAINING, ids=["lstm-tagger", "gru-classifier"])
def test_natural_gradient_trains_on_digits(cell, tagger, layers, steps, settings):
    """NaturalGradient(curvature="kfac") steps lower the loss; no parameter is left without
    curvature (no warning), and the recurrent weights are preconditioned (they do not move by
    the plain gradient)."""
    from curvlib.optim import NaturalGradient

    X, Y = digit_sequences()
    torch.manual_seed(0)
    model = DigitNet(cell(8, 16, num_layers=layers, batch_first=True), tagger)
    loss_fn = nn.CrossEntropyLoss()
    target = (lambda y: y[:, None].expand(-1, 8)) if tagger else (lambda y: y)
    lr = settings["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extend(model)
        extend(loss_fn)
        opt = NaturalGradient(model.parameters(), curvature="kfac", **settings)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            before = float(loss_fn(model(X[:512]), target(Y[:512])))
        for k in range(steps):
            idx = torch.randint(0, X.shape[0], (64,), generator=g)
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), target(Y[idx]))
            with opt.capture():
                loss.backward()
            if k == 0:
                W = model.rnn.weight_hh_l0
                assert W.kfac[0].shape == (W.shape[0],) * 2 and W.kfac[1].shape == (W.shape[1],) * 2
                w0, g0 = W.detach().clone(), W.grad.clone()
            opt.step()
            if k == 0:
                assert not torch.allclose(W.detach() - w0, -lr * g0)
        with torch.no_grad():
            after = float(loss_fn(model(X[:512]), target(Y[:512])))
    assert all(hasattr(p, "kfac") for p in model.parameters())
    assert after < 0.7 * before, (before, after)


# ------------------------------------------------------------------------------ refusals, paths
def test_packed_sequence_is_refused_naming_the_module():
    from torch.nn.utils.rnn import pack_padded_sequence

    rnn = extend(nn.LSTM(D, H, batch_first=True))
    packed = pack_padded_sequence(torch.randn(N, T, D), [5, 3, 2, 4], batch_first=True, enforce_sorted=False)
    with pytest.raises(NotImplementedError, match=r"LSTM\(3, 4, batch_first=True\) got a PackedSequence.*pad_packed_sequence"):
        rnn(packed)
    with torch.no_grad():  # no curvature wanted: the fused kernel runs
        rnn(packed)


def test_unknown_rnn_mode_is_refused_at_extend():
    rnn = nn.RNNBase("LSTM", D, H)
    rnn.mode = "QRNN"  # a subclass with a kernel of its own
    with pytest.raises(NotImplementedError, match=r"nn.RNNBase of mode 'QRNN'"):
        extend(rnn)


def test_inference_and_frozen_layers_run_the_fused_kernel():
    """Without gradients (or with every parameter frozen) nothing is unrolled or recorded."""
    rnn = extend(nn.GRU(D, H))
    x = torch.randn(T, N, D)
    with torch.no_grad():
        rnn(x)
    assert not getattr(rnn, "_curvlib_calls", None)
    for p in rnn.parameters():
        p.requires_grad_(False)
    rnn(x.requires_grad_())
    assert not getattr(rnn, "_curvlib_calls", None)
    for p in rnn.parameters():
        p.requires_grad_(True)
    rnn(x)
    assert len(rnn._curvlib_calls) == 2  # ih and hh


@pytest.mark.usefixtures("float64")
def test_hessian_products_through_the_fused_kernel():
    """HMP re-runs the model with hooks paused: the fused CPU kernel (float64: composite
    operations with a double backward)."""
    from curvlib.extensions import HMP

    model = make(MODELS[0])
    plain = copy.deepcopy(model)
    x, y = data(MODELS[0])
    extend(model)
    hmp = HMP()
    with curvature(hmp):
        extend(nn.CrossEntropyLoss())(model(x), y).backward()
    params = {k: v.detach() for k, v in plain.named_parameters()}
    name = "rnn.weight_hh_l1_reverse"
    W = model.rnn.weight_hh_l1_reverse
    Hw = hessian(lambda w: nn.CrossEntropyLoss()(functional_call(plain, {**params, name: w}, (x,)), y))(params[name])
    Hw = Hw.reshape(W.numel(), W.numel())
    V = torch.randn(2, *W.shape)
    torch.testing.assert_close(W.hmp(V), (V.reshape(2, -1) @ Hw).reshape(V.shape))
