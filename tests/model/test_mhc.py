"""titan_v4.model.mhc: HyperConnection and HyperHead against their formulas written out (fp64)."""

import torch

from tests.helpers.tiny_model import close, randomize_, tiny_args
from titan_v4.model.mhc import HyperConnection, HyperHead


def test_hyper_connection_matches_formula_and_mixer_is_doubly_stochastic():
    a = tiny_args()
    hc = HyperConnection(a).double()
    randomize_(hc, seed=8)
    x = torch.randn(2, 5, a.hc_mult, a.dim, dtype=torch.float64)
    collapsed, post, comb = hc.collapse(x)
    flat = x.flatten(2)
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + a.norm_eps)
    mix = flat @ hc.fn.T
    n = a.hc_mult
    pre = torch.sigmoid(mix[..., :n] * hc.scale[0] + hc.base[:n]) + a.hc_eps
    close(collapsed, (pre.unsqueeze(-1) * x).sum(2))
    close(post, 2 * torch.sigmoid(mix[..., n : 2 * n] * hc.scale[1] + hc.base[n : 2 * n]))
    assert post.dtype == comb.dtype == collapsed.dtype == torch.float64  # an fp64 model computes mHC in fp64
    ones = torch.ones((), dtype=torch.float64)
    assert torch.allclose(comb.sum(-1), ones, atol=1e-3) and torch.allclose(comb.sum(-2), ones, atol=1e-5)
    out = torch.randn(2, 5, a.dim, dtype=torch.float64)
    expanded = HyperConnection.expand(x, out, post, comb)
    manual = torch.stack([post[..., k, None].double() * out + sum(comb[..., j, k, None].double() * x[:, :, j] for j in range(n)) for k in range(n)], 2)
    close(expanded, manual)


def test_hyper_head_matches_formula():
    a = tiny_args()
    head = HyperHead(a).double()
    randomize_(head, seed=9)
    x = torch.randn(2, 5, a.hc_mult, a.dim, dtype=torch.float64)
    flat = x.flatten(2)
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + a.norm_eps)
    pre = torch.sigmoid(flat @ head.fn.T * head.scale + head.base) + a.hc_eps
    close(head(x), (pre.unsqueeze(-1) * x).sum(2))
    assert head(x.bfloat16()).dtype == torch.bfloat16
