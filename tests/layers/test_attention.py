"""nn.MultiheadAttention: outputs unchanged (masks, need_weights, dropout), KFAC block form
against separate q/k/v Linears + attention + out Linear (curvlinops and curvlib), exact
quantities against dense torch.func, TransformerEncoderLayer without warnings."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from curvlib import curvature, extend
from curvlib.extensions import GGNMP, KFAC, KPSVD, BatchGrad, DiagGGN, ExactBlockFisher
from tests.optim.common import train_step
from tests.utils import assert_exact_quantities, dense_ggn, per_sample_grads

pytestmark = pytest.mark.usefixtures("float64")

E, H, L, S, N, C = 4, 2, 3, 4, 5, 3

#: kind of attention: which inputs are the same tensor
KINDS = ["self", "kv", "cross"]


class Net(nn.Module):
    """``z [N, L + S, E]`` -> attention (query = first L positions, key/value from the rest,
    or all of z for self-attention) -> mean over positions -> Linear head."""

    def __init__(self, kind="self", batch_first=True, kdim=None, bias=True, causal=False):
        super().__init__()
        self.att = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
        self.head = nn.Linear(E, C)
        self.kind, self.kdim, self.causal = kind, kdim, causal

    def inputs(self, z):
        if self.kind == "self":
            return z, z, z
        q, m = z[:, :L], z[:, L:]
        if self.kdim is not None:
            m = m[..., : self.kdim]
        return (q, m, m) if self.kind == "kv" else (q, m, 2 * m)

    def mask(self, q):
        return nn.Transformer.generate_square_subsequent_mask(q.shape[1]) if self.causal else None

    def forward(self, z):
        q, k, v = self.inputs(z)
        mask = self.mask(q)
        if not self.att.batch_first:  # [T, N, E], keeping which inputs are the same tensor
            seq = {id(t): t.transpose(0, 1) for t in (q, k, v)}
            q, k, v = seq[id(q)], seq[id(k)], seq[id(v)]
        o, _ = self.att(q, k, v, attn_mask=mask, is_causal=self.causal, need_weights=False)
        if not self.att.batch_first:
            o = o.transpose(0, 1)
        return self.head(o.mean(1))


class Separate(nn.Module):
    """The same function from separate q/k/v Linears, scaled_dot_product_attention, an out Linear."""

    def __init__(self, net):
        super().__init__()
        att = net.att
        kd = net.kdim or E
        bias = att.in_proj_bias is not None
        self.q, self.k, self.v = nn.Linear(E, E, bias=bias), nn.Linear(kd, E, bias=bias), nn.Linear(kd, E, bias=bias)
        self.out = nn.Linear(E, E, bias=att.out_proj.bias is not None)
        self.head = copy.deepcopy(net.head)
        self.net = [net]  # not a submodule
        with torch.no_grad():
            if att.in_proj_weight is not None:
                Ws = att.in_proj_weight.chunk(3)
            else:
                Ws = (att.q_proj_weight, att.k_proj_weight, att.v_proj_weight)
            for lin, W in zip((self.q, self.k, self.v), Ws):
                lin.weight.copy_(W)
            if bias:
                for lin, b in zip((self.q, self.k, self.v), att.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
            self.out.load_state_dict(att.out_proj.state_dict())

    def forward(self, z):
        net = self.net[0]
        q, k, v = net.inputs(z)
        heads = lambda t: rearrange(t, "n t (h d) -> n h t d", h=H)  # noqa: E731
        o = F.scaled_dot_product_attention(heads(self.q(q)), heads(self.k(k)), heads(self.v(v)),
                                           is_causal=net.causal)
        return self.head(self.out(rearrange(o, "n h t d -> n t (h d)")).mean(1))

    def att_params(self):
        return [self.q, self.k, self.v, self.out]


def data():
    return torch.randn(N, L + S, E), torch.randint(0, C, (N,))


def kfac(model, x, y, **kw):
    loss_fn = extend(nn.CrossEntropyLoss())
    extend(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no adapter" / "took part in no call" warning
        with curvature(KFAC(**kw), generator=torch.Generator().manual_seed(1)):
            loss_fn(model(x), y).backward()


def compare_blocks(net, ref):
    """kron of the block form == the separate Linears' pairs, factor by factor."""
    att = net.att
    lins = ref.att_params()
    if att.in_proj_weight is not None:
        G, A = att.in_proj_weight.kfac
        assert G.shape == (3, E, E) and A.shape == (3, E, E)
        for b in range(3):
            torch.testing.assert_close(G[b], lins[b].weight.kfac[0])
            torch.testing.assert_close(A[b], lins[b].weight.kfac[1])
    else:
        for lin, W in zip(lins, (att.q_proj_weight, att.k_proj_weight, att.v_proj_weight)):
            for f, g in zip(W.kfac, lin.weight.kfac):
                torch.testing.assert_close(f, g)
    if att.in_proj_bias is not None:
        (Gb,) = att.in_proj_bias.kfac
        assert Gb.shape == (3, E, E)
        for b in range(3):
            torch.testing.assert_close(Gb[b], lins[b].bias.kfac[0])
    for p, q in zip(att.out_proj.parameters(), ref.out.parameters()):
        for f, g in zip(p.kfac, q.kfac):
            torch.testing.assert_close(f, g)


CASES = [  # kind, batch_first, kdim, bias, causal
    ("self", True, None, True, False),
    ("self", False, None, True, True),
    ("kv", True, None, True, False),
    ("cross", False, None, False, False),
    ("kv", True, 3, True, False),
    ("cross", False, 3, True, False),
]


#: every case with type-2 expand, and each other (fisher_type, approx) on three cases
OTHER = [(f, a) for f in ("type-2", "mc", "empirical") for a in ("expand", "reduce")][1:]
KFAC_CASES = [(c, "type-2", "expand") for c in CASES] + [
    (CASES[(i + j) % len(CASES)], f, a) for i, (f, a) in enumerate(OTHER) for j in (0, 2, 4)
]


def check_block_form(net, ref, fisher_type, approx):
    """Same outputs, then KFAC of ``net``'s attention in the block form == ``ref``'s Linears."""
    x, y = data()
    torch.testing.assert_close(net(x), ref(x))
    kw = dict(fisher_type=fisher_type, kfac_approx=approx)
    kfac(net, x, y, **kw)
    kfac(ref, x, y, **kw)
    compare_blocks(net, ref)


@pytest.mark.parametrize("case,fisher_type,approx", KFAC_CASES)
def test_kfac_block_form_equals_separate_linears(case, fisher_type, approx):
    net = Net(*case)
    check_block_form(net, Separate(net), fisher_type, approx)


@pytest.mark.parametrize("case,fisher_type,approx", [
    (CASES[0], "type-2", "expand"), (CASES[1], "type-2", "reduce"), (CASES[3], "empirical", "expand"),
    (CASES[5], "type-2", "expand"), (CASES[2], "empirical", "reduce"), (CASES[4], "type-2", "reduce"),
])
def test_kfac_blocks_equal_curvlinops_on_separate_linears(case, fisher_type, approx):
    from curvlinops import KFACLinearOperator

    net = Net(*case)
    ref = Separate(net)
    x, y = data()
    kfac(net, x, y, fisher_type=fisher_type, kfac_approx=approx)
    att = net.att
    W = att.in_proj_weight if att.in_proj_weight is not None else None
    for b, lin in enumerate(ref.att_params()):
        params = list(lin.parameters())
        K = KFACLinearOperator(ref, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type=fisher_type,
                               kfac_approx=approx, check_deterministic=False)
        dense = K @ torch.eye(sum(p.numel() for p in params))
        nw = lin.weight.numel()
        if b == 3:
            ob = att.out_proj.bias
            ours_w, ours_b = torch.kron(*att.out_proj.weight.kfac), None if ob is None else ob.kfac[0]
        else:
            Wb = W.kfac if W is not None else [att.q_proj_weight, att.k_proj_weight, att.v_proj_weight][b].kfac
            ours_w = torch.kron(Wb[0][b], Wb[1][b]) if W is not None else torch.kron(*Wb)
            ours_b = att.in_proj_bias.kfac[0][b] if lin.bias is not None else None
        torch.testing.assert_close(ours_w, dense[:nw, :nw])
        if ours_b is not None:
            torch.testing.assert_close(ours_b, dense[nw:, nw:])


def rearranged(F_, d0, d1):
    """Van Loan rearrangement of a [d0 d1, d0 d1] block: [(i k), (a b)] = F[(i a), (k b)]."""
    return rearrange(F_, "(i a) (k b) -> (i k) (a b)", i=d0, a=d1, k=d0, b=d1)


@pytest.mark.parametrize("case,make", [(CASES[0], Net), (CASES[3], Net), (CASES[5], Net),
                                       (CASES[0], "twice"), (CASES[5], "twice")])
def test_exact_quantities_against_torch_func(case, make):
    """Every exact extension against dense torch.func; ``"twice"``: the module called twice
    before one backward (:class:`TwiceNet`, defined below)."""
    net = (TwiceNet if make == "twice" else make)(*case)
    plain = copy.deepcopy(net)  # references run on a copy without hooks
    x, y = data()
    loss_fn = extend(nn.CrossEntropyLoss())
    extend(net)
    ggnmp = GGNMP(fisher_type="type-2")
    kpsvd = KPSVD(fisher_type="type-2", rank=1, method="lanczos", tol=1e-12, maxiter=400)
    with curvature(BatchGrad(), ExactBlockFisher(fisher_type="type-2"), DiagGGN(fisher_type="type-2"), ggnmp, kpsvd):
        loss_fn(net(x), y).backward()
    ggn = dense_ggn(plain, nn.CrossEntropyLoss(), x, y)
    psg = per_sample_grads(plain, nn.CrossEntropyLoss(), x, y)
    names = [n for n, _ in plain.named_parameters()]
    params = dict(net.named_parameters())
    starts, i = {}, 0
    for n, p in plain.named_parameters():
        starts[n] = slice(i, i + p.numel())
        i += p.numel()
    op = ggnmp.operator()
    order = [next(n for n in names if params[n] is p) for p in op.params]
    perm = torch.cat([torch.arange(starts[n].start, starts[n].stop) for n in order])
    assert sorted(order) == sorted(names)
    torch.testing.assert_close(op.to_dense(), ggn[perm][:, perm])
    for n in names:
        p, s = params[n], starts[n]
        block = ggn[s, s]
        assert_exact_quantities(p, psg[n] / N, block)
        if p.ndim == 2:  # rank-1 KPSVD: the top singular triplet of the rearranged exact block
            (G1, A1), = p.kpsvd
            d0, d1 = p.shape
            U, sv, Vh = torch.linalg.svd(rearranged(block, d0, d1))
            best = sv[0] * torch.kron(U[:, 0].reshape(d0, d0), Vh[0].reshape(d1, d1))
            torch.testing.assert_close(torch.kron(G1, A1), best)
        else:
            torch.testing.assert_close(p.kpsvd[0][0], block)


class TwiceNet(Net):
    """The attention module called twice before one backward: on ``z`` and on a shorter
    ``z2`` (one key/value position fewer, so the two calls' query/key row ratios differ)."""

    def forward(self, z):
        return super().forward(z) + super().forward(0.5 * z[:, 1:])


class TwiceSeparate(Separate):
    """The same two calls through the separate q/k/v/out Linears (each called twice)."""

    def forward(self, z):
        return super().forward(z) + super().forward(0.5 * z[:, 1:])


@pytest.mark.parametrize("case,fisher_type,approx", [
    (CASES[0], "type-2", "expand"), (CASES[2], "type-2", "expand"), (CASES[3], "mc", "expand"),
    (CASES[4], "empirical", "expand"), (CASES[5], "type-2", "reduce"), (CASES[1], "empirical", "reduce"),
])
def test_module_called_twice_kfac_equals_shared_separate_linears(case, fisher_type, approx):
    """Calls summed as positions (docs/design.md §2): block b of the block form == the pair of the
    separate Linear b called twice (itself checked against curvlinops in test_shared_calls_kfac);
    in cross-attention the query block averages the L1 + L2 query rows, the key / value blocks
    the S1 + S2 key rows."""
    net = TwiceNet(*case)
    check_block_form(net, TwiceSeparate(net), fisher_type, approx)


def clone_pair(m):
    """(extended module, plain copy with the same parameters)."""
    plain = copy.deepcopy(m)
    return extend(m), plain


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("mask", ["none", "padding", "attn_bool", "attn_float3d", "causal", "both"])
def test_outputs_equal_the_plain_module(batch_first, need_weights, average, mask):
    att, plain = clone_pair(nn.MultiheadAttention(E, H, batch_first=batch_first, dropout=0.3))
    q, kv = torch.randn(N, L, E, requires_grad=True), torch.randn(N, S, E)
    kw = {}
    if mask in ("padding", "both"):
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[:, -1] = True
        kw["key_padding_mask"] = kpm
    if mask in ("attn_bool", "both"):
        kw["attn_mask"] = torch.rand(L, S) > 0.7
        kw["attn_mask"][:, 0] = False
    if mask == "attn_float3d":
        kw["attn_mask"] = torch.randn(N * H, L, S)
    if mask == "causal":
        q_in = kv_in = q  # self-attention
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
        kw["is_causal"] = True
    else:
        q_in, kv_in = q, kv
    if not batch_first:
        q_in, kv_in = q_in.transpose(0, 1), kv_in.transpose(0, 1)
        if mask == "causal":
            kv_in = q_in
    for training in (False, True):  # dropout: the same random stream
        att.train(training), plain.train(training)
        torch.manual_seed(5)
        out = att(q_in, kv_in, kv_in, need_weights=need_weights, average_attn_weights=average, **kw)
        torch.manual_seed(5)
        ref = plain(q_in, kv_in, kv_in, need_weights=need_weights, average_attn_weights=average, **kw)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-12, atol=1e-12)
        if need_weights:
            torch.testing.assert_close(out[1], ref[1], rtol=1e-12, atol=1e-12)
        else:
            assert out[1] is None and ref[1] is None


def test_unbatched_input_and_attention_weights_in_the_loss():
    """An unbatched call (a batch of one) and a loss that also uses the attention weights."""
    att, plain = clone_pair(nn.MultiheadAttention(E, H))
    x = torch.randn(L, E)
    o, w = att(x, x, x)
    po, pw = plain(x, x, x)
    torch.testing.assert_close(o, po), torch.testing.assert_close(w, pw)
    with curvature(BatchGrad()):
        (o.square().sum() + w.square().sum()).backward()
    (po.square().sum() + pw.square().sum()).backward()
    for p, q in zip(att.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad_batch[0], q.grad)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_layer_gets_curvature_without_warnings(batch_first, norm_first):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=batch_first, norm_first=norm_first)
    model = nn.Sequential()
    model.enc = layer
    head = nn.Linear(8, 3)
    x = torch.randn(4, 5, 8) if batch_first else torch.randn(5, 4, 8)
    y = torch.randint(0, 3, (4,))
    plain, plain_head = copy.deepcopy(layer), copy.deepcopy(head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extend(layer), extend(head)
        loss_fn = extend(nn.CrossEntropyLoss())
        torch.manual_seed(3)  # dropout in training mode: the same draws as the plain layer
        loss = loss_fn(head(layer(x).mean(1 if batch_first else 0)), y)
        with curvature(KFAC(fisher_type="type-2"), DiagGGN(fisher_type="type-2")):
            loss.backward()
    torch.manual_seed(3)
    nn.CrossEntropyLoss()(plain_head(plain(x).mean(1 if batch_first else 0)), y).backward()
    for (n, p), q in zip(layer.named_parameters(), plain.parameters()):
        assert hasattr(p, "kfac") and hasattr(p, "diag_ggn"), n
        torch.testing.assert_close(p.grad, q.grad)
    assert layer.self_attn.in_proj_weight.kfac[0].shape == (3, 8, 8)


def test_add_bias_kv_and_zero_attn_are_refused():
    for kw in ({"add_bias_kv": True}, {"add_zero_attn": True}):
        with pytest.raises(NotImplementedError, match="add_bias_kv.*add_zero_attn"):
            extend(nn.Sequential(nn.MultiheadAttention(E, H, **kw)))


def test_no_grad_forward_is_not_intercepted():
    """Inference (no gradients) runs the plain module, fast path included, and records nothing."""
    att, plain = clone_pair(nn.MultiheadAttention(E, H).eval())
    x = torch.randn(L, N, E)
    with torch.no_grad():
        o, w = att(x, x, x)
        torch.testing.assert_close((o, w), plain(x, x, x))
    assert not getattr(att, "_curvlib_calls", None)


def test_hessian_products_through_attention():
    """HMP re-runs attention through the math kernel (the fused CPU one has no double backward)."""
    from curvlib.extensions import HMP

    net = Net("self")
    plain = copy.deepcopy(net)
    x, y = data()
    loss_fn = extend(nn.CrossEntropyLoss())
    extend(net)
    hmp = HMP()
    with curvature(hmp):
        loss_fn(net(x), y).backward()
    params = dict(plain.named_parameters())
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # forward-over-reverse needs the math kernel too
        H = torch.func.hessian(lambda p: nn.CrossEntropyLoss()(torch.func.functional_call(plain, p, (x,)), y))(params)
    W = net.att.in_proj_weight
    Hw = H["att.in_proj_weight"]["att.in_proj_weight"].reshape(W.numel(), W.numel())
    V = torch.randn(2, *W.shape)
    torch.testing.assert_close(W.hmp(V), (V.reshape(2, -1) @ Hw).reshape(V.shape))


def test_layer_called_twice_over_several_optimizer_steps():
    """An encoder layer applied twice (ALBERT-style) under NaturalGradient: the attention parts'
    live calls must survive the previous step's part objects being dropped during the next
    backward (they were keyed by those objects: 'computed twice in one backward' at step 1)."""
    from curvlib.optim import NaturalGradient

    torch.manual_seed(0)

    class Albert(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(E, H, 8, dropout=0.0, batch_first=True)
            self.head = nn.Linear(E, C)

        def forward(self, z):
            return self.head(self.layer(self.layer(z)).mean(1))

    model = extend(Albert().eval())
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = NaturalGradient(model.parameters(), lr=0.05, curvature="kfac", damping=1e-2, kl_clip=1e-3)
    x, y = data()
    for _ in range(3):
        train_step(model, loss_fn, opt, x, y)
    G, A = model.layer.self_attn.in_proj_weight.kfac
    assert G.shape == (3, E, E) and A.shape == (3, E, E)
