"""Eager reference of the mHC ops: the specification (CPU implementation; runs in fp32 or fp64).

Notation: streams ``x [..., H, D]`` (H = hc_mult residual streams of width D), ``K = H * D``. The
mixing weights ``fn [M, K]``, ``base [M]`` and ``scale [G]`` give one logit per mix:

    rstd   = rsqrt(mean(flat(x)**2) + norm_eps)                  # [...]
    logits = (flat(x) * rstd) @ fn.T                             # [..., M]; = (flat(x) @ fn.T) * rstd

* collapse (HyperConnection.collapse; M = (2 + H) * H, G = 3): the logits split into pre [H], post [H]
  and comb [H * H];
      pre  = sigmoid(logits_pre * scale[0] + base_pre) + hc_eps          # [..., H]
      post = 2 * sigmoid(logits_post * scale[1] + base_post)             # [..., H]
      comb = sinkhorn(logits_comb * scale[2] + base_comb, iters, hc_eps) # [..., H, H] (HF's order)
      collapsed = sum_h pre[h] * x[h]                                    # [..., D]
* head (HyperHead.forward; M = H, G = 1): ``pre = sigmoid(logits * scale[0] + base) + hc_eps`` and
  ``out = sum_h pre[h] * x[h]``.
* expand (HyperConnection.expand): ``new[k] = post[k] * out + sum_j comb[j, k] * x[j]``.

Precision: everything is computed in the compute dtype (fp32, or fp64 for fp64 streams) and the
stream-shaped results are rounded once to the streams' dtype. For fp32 streams this is the same
sequence of torch ops as titan_v4's HyperConnection / HyperHead, so the CPU model is unchanged.

The forward ops also return ``logits [..., M]`` and ``rstd [...]`` (compute dtype) for their
backward, so that the backward does not recompute the pass over x that produced them.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sinkhorn import reference as sinkhorn_reference
from .contract import compute_dtype


# ---------------------------------------------------------------------------------- shared pieces
def mixing_logits(x: Tensor, fn: Tensor, norm_eps: float) -> tuple[Tensor, Tensor]:
    """``x [..., H, D]``, ``fn [M, H * D]`` -> (logits ``[..., M]``, rstd ``[...]``), compute dtype."""
    flat = x.flatten(-2).to(compute_dtype(x.dtype))
    rstd = torch.rsqrt(flat.square().mean(-1) + norm_eps)
    return F.linear(flat * rstd.unsqueeze(-1), fn.to(flat.dtype)), rstd


def weighted_sum(pre: Tensor, x: Tensor) -> Tensor:
    """``sum_h pre[..., h] * x[..., h, :]`` in the compute dtype, rounded to x's dtype: ``[..., D]``."""
    return (pre.unsqueeze(-1) * x.to(pre.dtype)).sum(dim=-2).to(x.dtype)


def mixing_logits_bwd(dlogits: Tensor, x: Tensor, fn: Tensor, logits: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`mixing_logits` w.r.t. the flattened streams and fn.

    ``logits = (flat @ fn.T) * rstd`` with ``rstd = (mean(flat**2) + eps) ** -1/2``, so with
    ``dmix = dlogits * rstd``: ``dfn = dmix.T @ flat`` (summed over tokens) and
    ``dflat = dmix @ fn + xcoef * flat`` where ``xcoef = -(dlogits . logits) * rstd**2 / K``
    (the path through rstd: ``d rstd / d flat = -rstd**3 * flat / K``).

    Returns (dflat ``[..., K]``, dfn ``[M, K]``) in the compute dtype.
    """
    flat = x.flatten(-2).to(logits.dtype)
    dmix = dlogits * rstd.unsqueeze(-1)
    xcoef = -(dlogits * logits).sum(-1) * rstd.square() / flat.shape[-1]
    dflat = dmix @ fn.to(flat.dtype) + xcoef.unsqueeze(-1) * flat
    dfn = dmix.reshape(-1, dmix.shape[-1]).T @ flat.reshape(-1, flat.shape[-1])
    return dflat, dfn


def _pre_gate(logits_pre: Tensor, base_pre: Tensor, scale_pre: Tensor) -> Tensor:
    return torch.sigmoid(logits_pre * scale_pre + base_pre)


# ---------------------------------------------------------------------------------- collapse
def collapse_fwd(
    x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, hc_eps: float, norm_eps: float, sinkhorn_iters: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """HyperConnection.collapse.

    Args:
        x: ``[..., H, D]`` streams (bf16 / fp32 / fp64).
        fn: ``[(2 + H) * H, H * D]``, base ``[(2 + H) * H]``, scale ``[3]``: compute dtype.
    Returns:
        collapsed ``[..., D]`` (x's dtype), post ``[..., H]``, comb ``[..., H, H]``, logits
        ``[..., (2 + H) * H]``, rstd ``[...]`` (all compute dtype).
    """
    hc = x.shape[-2]
    logits, rstd = mixing_logits(x, fn, norm_eps)
    logits_pre, logits_post, logits_comb = logits.split((hc, hc, hc * hc), dim=-1)
    base_pre, base_post, base_comb = base.split((hc, hc, hc * hc))
    pre = _pre_gate(logits_pre, base_pre, scale[0]) + hc_eps
    post = 2 * torch.sigmoid(logits_post * scale[1] + base_post)
    comb_logits = logits_comb.unflatten(-1, (hc, hc)) * scale[2] + base_comb.view(hc, hc)
    comb = sinkhorn_reference.sinkhorn_fwd(comb_logits, sinkhorn_iters, hc_eps)
    return weighted_sum(pre, x), post, comb, logits, rstd


def collapse_bwd(
    dcollapsed: Tensor,
    dpost: Tensor,
    dcomb: Tensor,
    x: Tensor,
    fn: Tensor,
    base: Tensor,
    scale: Tensor,
    logits: Tensor,
    rstd: Tensor,
    hc_eps: float,
    sinkhorn_iters: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`collapse_fwd` given those of collapsed, post and comb.

    Returns dx (x's dtype, x's shape), dfn ``[M, K]``, dbase ``[M]``, dscale ``[3]`` (fn's dtype).
    """
    hc = x.shape[-2]
    cdt = logits.dtype
    xc = x.to(cdt)
    dcollapsed = dcollapsed.to(cdt)
    logits_pre, logits_post, logits_comb = logits.split((hc, hc, hc * hc), dim=-1)
    base_pre, base_post, base_comb = base.split((hc, hc, hc * hc))

    sig_pre = _pre_gate(logits_pre, base_pre, scale[0])
    dpre = (dcollapsed.unsqueeze(-2) * xc).sum(-1)
    # Products in autograd's order (sigmoid_backward: grad * (1 - y) * y).
    dz_pre = dpre * (1 - sig_pre) * sig_pre
    sig_post = torch.sigmoid(logits_post * scale[1] + base_post)
    dz_post = (2 * dpost) * (1 - sig_post) * sig_post
    comb_logits = logits_comb.unflatten(-1, (hc, hc)) * scale[2] + base_comb.view(hc, hc)
    dz_comb = sinkhorn_reference.sinkhorn_bwd(dcomb, comb_logits, sinkhorn_iters, hc_eps).flatten(-2)

    # dz: gradient of the gate inputs (logits * scale + base), [..., M].
    dz = torch.cat([dz_pre, dz_post, dz_comb], dim=-1)
    dlogits = torch.cat([dz_pre * scale[0], dz_post * scale[1], dz_comb * scale[2]], dim=-1)
    dbase = dz.reshape(-1, dz.shape[-1]).sum(0)
    dscale = torch.stack([(dz_pre * logits_pre).sum(), (dz_post * logits_post).sum(), (dz_comb * logits_comb).sum()])

    dflat, dfn = mixing_logits_bwd(dlogits, x, fn, logits, rstd)
    pre = sig_pre + hc_eps
    dx = dflat.unflatten(-1, x.shape[-2:]) + pre.unsqueeze(-1) * dcollapsed.unsqueeze(-2)
    return dx.to(x.dtype), dfn.to(fn.dtype), dbase.to(base.dtype), dscale.to(scale.dtype)


# ---------------------------------------------------------------------------------- head
def head_fwd(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, hc_eps: float, norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """HyperHead.forward: ``x [..., H, D]``, fn ``[H, H * D]``, base ``[H]``, scale ``[1]``.

    Returns out ``[..., D]`` (x's dtype), logits ``[..., H]``, rstd ``[...]`` (compute dtype).
    """
    logits, rstd = mixing_logits(x, fn, norm_eps)
    pre = _pre_gate(logits, base, scale[0]) + hc_eps
    return weighted_sum(pre, x), logits, rstd


def head_bwd(
    dout: Tensor, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, logits: Tensor, rstd: Tensor, hc_eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`head_fwd`: dx (x's dtype), dfn ``[H, K]``, dbase ``[H]``, dscale ``[1]``."""
    cdt = logits.dtype
    dout = dout.to(cdt)
    sig = _pre_gate(logits, base, scale[0])
    dpre = (dout.unsqueeze(-2) * x.to(cdt)).sum(-1)
    dz = dpre * (1 - sig) * sig
    dbase = dz.reshape(-1, dz.shape[-1]).sum(0)
    dscale = (dz * logits).sum().reshape(1)
    dflat, dfn = mixing_logits_bwd(dz * scale[0], x, fn, logits, rstd)
    dx = dflat.unflatten(-1, x.shape[-2:]) + (sig + hc_eps).unsqueeze(-1) * dout.unsqueeze(-2)
    return dx.to(x.dtype), dfn.to(fn.dtype), dbase.to(base.dtype), dscale.to(scale.dtype)


# ---------------------------------------------------------------------------------- expand
def expand_fwd(x: Tensor, out: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """HyperConnection.expand: ``x [..., H, D]``, out ``[..., D]`` (x's dtype), post ``[..., H]``,
    comb ``[..., H, H]`` (compute dtype) -> ``[..., H, D]`` in x's dtype,
    ``new[k] = post[k] * out + sum_j comb[j, k] * x[j]``."""
    cdt = post.dtype
    new = post.unsqueeze(-1) * out.to(cdt).unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x.to(cdt))
    return new.to(x.dtype)


def expand_bwd(dnew: Tensor, x: Tensor, out: Tensor, post: Tensor, comb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`expand_fwd`: dx (x's dtype), dout (out's dtype), dpost, dcomb (post's dtype).

    ``dx[j] = sum_k comb[j, k] * dnew[k]``, ``dout = sum_k post[k] * dnew[k]``,
    ``dpost[k] = dnew[k] . out``, ``dcomb[j, k] = x[j] . dnew[k]``.
    """
    cdt = post.dtype
    g = dnew.to(cdt)
    dx = torch.matmul(comb, g)
    dout = (post.unsqueeze(-1) * g).sum(-2)
    dpost = (g * out.to(cdt).unsqueeze(-2)).sum(-1)
    dcomb = torch.matmul(x.to(cdt), g.transpose(-1, -2))
    return dx.to(x.dtype), dout.to(out.dtype), dpost, dcomb
