"""engine/factors: the orientation helpers and per-sample gradients against dense einsum references."""
import pytest
import torch

from curvlib.engine.factors import LEFT, RIGHT, gram, gram_rows, orientation, outer_sum

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("o", [RIGHT, LEFT])
@pytest.mark.parametrize("K,T,Ds,Da", [(1, 1, 3, 4), (3, 1, 3, 4), (1, 4, 3, 4), (2, 3, 3, 4), (3, 6, 2, 7)])
@pytest.mark.parametrize("channel_major", [False, True])
def test_outer_sum_equals_einsum(o, K, T, Ds, Da, channel_major):
    """Both kernels (broadcast matmul; per-sample bmm over stacked columns, taken for the last
    shape, where T D_s + D_s D_a < T D_a) on row-major and channel-major (conv) cotangents."""
    N = 5
    s = torch.randn(K, N, Ds, T).transpose(2, 3) if channel_major else torch.randn(K, N, T, Ds)
    a = torch.randn(N, T, Da)
    ref = torch.einsum("knts,nta->knsa", s, a)
    if o is LEFT:
        ref = ref.transpose(-1, -2)
    X = outer_sum(s, a, o, s.new_empty(K * N, Ds * Da))
    torch.testing.assert_close(X.view(ref.shape), ref)
    torch.testing.assert_close(torch.einsum(o.outer_equation, s, a), ref)


@pytest.mark.parametrize("o", [RIGHT, LEFT])
def test_pair_order_and_weight_products(o):
    G, A = torch.randn(3, 3), torch.randn(4, 4)
    assert o.unpair(o.pair(G, A)) == (G, A)
    assert o.pair(G, A)[o.act_index] is A and o.side(o.act_index) == "act"
    # a weight-shaped V: sum_a a[r, a] W[s, a] and its adjoint, against dense references
    B, R, Ds, Da = 2, 6, 3, 4
    a2 = torch.randn(R, Da)
    Vsa = torch.randn(B, Ds, Da)
    V = o.from_cot_act(Vsa)
    torch.testing.assert_close(o.weight_times_act(a2, V, Ds), torch.einsum("ra,bsa->rbs", a2, Vsa).reshape(R, B * Ds))
    u = torch.randn(B, Ds, R)
    u2 = u.reshape(B * Ds, R) if o is RIGHT else u.permute(2, 0, 1).reshape(R, B * Ds)
    ref = o.from_cot_act(torch.einsum("bsr,ra->bsa", u, a2))
    torch.testing.assert_close(o.outer_to_weight(u2, a2, B), ref)


@pytest.mark.parametrize("o", [RIGHT, LEFT])
def test_block_of_grams_is_the_block_of_the_per_sample_gradients(o):
    N, Ds, Da = 4, 2, 3
    s, a = torch.randn(N, Ds), torch.randn(N, Da)
    X = o.from_cot_act(torch.einsum("ns,na->nsa", s, a)).reshape(N, -1)
    B = torch.einsum("ni,nj,nk,nl->ijkl", s, s, a, a)
    torch.testing.assert_close(o.block_of_grams(B), X.T @ X)


def test_gram_halves_match_matmul_and_bad_side_raises():
    x = torch.randn(7, 300)
    torch.testing.assert_close(gram(x), x.T @ x)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):  # panels of 64 / 128 rows
            torch.set_num_threads(t)
            for M, D in ((9, 1029), (130, 64), (130, 129), (130, 511), (130, 512), (200, 1029)):
                # one matmul (few rows, one panel); 2 panels, the last of 1 row; 4-17 panels, ragged last
                x = torch.randn(M, D, dtype=torch.float64)
                torch.testing.assert_close(gram(x), x.T @ x, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(gram(x.T.contiguous().T), x.T @ x, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(gram(x, 0.25), 0.25 * (x.T @ x), rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(gram_rows(x.view(2, -1, D) if M % 2 == 0 else x, 0.25), 0.25 * (x.T @ x), rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="act_side"):
        orientation("up")
