"""Public entry points of the mHC ops: HyperConnection.collapse / expand and HyperHead.forward.

Shapes: streams ``x [..., H, D]`` (the model's ``[B, S, hc_mult, dim]``), ``K = H * D``. The streams
stay in their dtype (bf16 on GPU; the CPU reference also takes fp32 / fp64); statistics, mixing
logits, gates and the Sinkhorn projection are fp32 (fp64 for fp64 streams, for gradient checks).
Non-contiguous tensors are made contiguous (a copy). Errors are TypeError / ValueError naming the
bad argument. On CUDA, bf16 streams with a power-of-two H run the Triton kernels (contract.py's
triton_applies); anything else runs the reference (reference.py, the specification).
"""

import math

from torch import Tensor

from ..checks import check_int, check_tensor
from ..schema import contiguous
from . import ops
from .contract import (
    STREAM_DTYPES,
    CollapseInputs,
    CollapseOutputs,
    ExpandInputs,
    HeadInputs,
    HeadOutputs,
    compute_dtype,
)


def mhc_collapse(
    x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, *, hc_eps: float, norm_eps: float, sinkhorn_iters: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The mHC pre-step (HyperConnection.collapse): the sub-layer input and the residual mixing.

    ``rstd = rsqrt(mean(flat(x)**2) + norm_eps)``, ``logits = (flat(x) @ fn.T) * rstd`` split into
    pre / post / comb (H, H, H*H), then ``pre = sigmoid(logits_pre * scale[0] + base_pre) + hc_eps``,
    ``post = 2 * sigmoid(logits_post * scale[1] + base_post)``,
    ``comb = sinkhorn(logits_comb * scale[2] + base_comb, sinkhorn_iters, hc_eps)`` and
    ``collapsed = sum_h pre[h] * x[h]``.

    Args:
        x: ``[..., H, D]`` residual streams, bf16 / fp32 / fp64.
        fn: ``[(2 + H) * H, H * D]`` mixing weights, fp32 (fp64 with fp64 x; exactly this dtype, so a
            model holding bf16 parameters passes ``fn.float()``).
        base: ``[(2 + H) * H]`` mixing biases, fn's dtype.
        scale: ``[3]`` gate scales (pre, post, comb), fn's dtype.
        hc_eps: >= 0; added to pre and used as the Sinkhorn eps.
        norm_eps: > 0; the RMS statistic's eps.
        sinkhorn_iters: >= 1.
    Returns:
        collapsed ``[..., D]`` in x's dtype, post ``[..., H]`` and comb ``[..., H, H]`` in fp32 (fp64).
        Differentiable w.r.t. x, fn, base and scale.
    """
    hc = _check_streams(x)
    _check_weights(x, fn, base, scale, mixes=(2 + hc) * hc, scales=3)
    _check_eps("hc_eps", hc_eps, allow_zero=True)
    _check_eps("norm_eps", norm_eps, allow_zero=False)
    check_int("sinkhorn_iters", sinkhorn_iters)
    inputs = CollapseInputs(x, fn, base, scale, float(hc_eps), float(norm_eps), sinkhorn_iters)
    outputs = CollapseOutputs(*ops.mhc_collapse_op(*contiguous(inputs)))
    return outputs.collapsed, outputs.post, outputs.comb


def hyper_head(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, *, hc_eps: float, norm_eps: float) -> Tensor:
    """The final collapse of the streams (HyperHead.forward).

    ``pre = sigmoid((flat(x) @ fn.T) * rsqrt(mean(flat(x)**2) + norm_eps) * scale + base) + hc_eps``,
    ``out = sum_h pre[h] * x[h]``.

    Args:
        x: ``[..., H, D]`` streams, bf16 / fp32 / fp64.
        fn: ``[H, H * D]``, base ``[H]``, scale ``[1]``: fp32 (fp64 with fp64 x).
        hc_eps: >= 0; norm_eps: > 0.
    Returns:
        ``[..., D]`` in x's dtype; differentiable w.r.t. x, fn, base and scale.
    """
    hc = _check_streams(x)
    _check_weights(x, fn, base, scale, mixes=hc, scales=1)
    _check_eps("hc_eps", hc_eps, allow_zero=True)
    _check_eps("norm_eps", norm_eps, allow_zero=False)
    inputs = HeadInputs(x, fn, base, scale, float(hc_eps), float(norm_eps))
    return HeadOutputs(*ops.mhc_head_op(*contiguous(inputs))).out


def mhc_expand(x: Tensor, out: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """The mHC post-step (HyperConnection.expand): ``new[k] = post[k] * out + sum_j comb[j, k] * x[j]``.

    Args:
        x: ``[..., H, D]`` streams, bf16 / fp32 / fp64.
        out: ``[..., D]`` sub-layer output. Another floating dtype (bf16 from an autocast sub-layer
            over fp32 streams) is cast to x's dtype first.
        post: ``[..., H]`` and comb ``[..., H, H]`` from :func:`mhc_collapse`: fp32 (fp64 with fp64 x).
    Returns:
        ``[..., H, D]`` in x's dtype, computed in fp32 (fp64) and rounded once. Differentiable w.r.t.
        every input.
    """
    hc = _check_streams(x)
    lead, dim = x.shape[:-2], x.shape[-1]
    check_tensor("out", out)
    if out.shape != (*lead, dim):
        raise ValueError(f"out must be [..., D] = {(*lead, dim)} to match x, got shape {tuple(out.shape)}")
    if not out.is_floating_point():
        raise TypeError(f"out must be a floating tensor, got {out.dtype}")
    _check_device("out", out, x)
    gate_dtype = compute_dtype(x.dtype)
    for name, value, shape in (("post", post, (*lead, hc)), ("comb", comb, (*lead, hc, hc))):
        check_tensor(name, value)
        if value.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match x, got {tuple(value.shape)}")
        if value.dtype != gate_dtype:
            raise TypeError(f"{name} must be {gate_dtype} for x of dtype {x.dtype}, got {value.dtype}")
        _check_device(name, value, x)
    return ops.mhc_expand_op(*contiguous(ExpandInputs(x, out.to(x.dtype), post, comb)))


def _check_device(name: str, value: Tensor, x: Tensor) -> None:
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}; all tensors must share x's device")


def _check_streams(x) -> int:
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be [..., H, D] streams (at least 2-D), got shape {tuple(x.shape)}")
    if x.dtype not in STREAM_DTYPES:
        raise TypeError(f"x must be bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have H >= 1 streams of width D >= 1, got shape {tuple(x.shape)}")
    return x.shape[-2]


def _check_weights(x: Tensor, fn, base, scale, *, mixes: int, scales: int) -> None:
    width = x.shape[-2] * x.shape[-1]
    for name, value, shape in (("fn", fn, (mixes, width)), ("base", base, (mixes,)), ("scale", scale, (scales,))):
        check_tensor(name, value)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)}, got {tuple(value.shape)}")
        if value.dtype != compute_dtype(x.dtype):
            raise TypeError(f"{name} must be {compute_dtype(x.dtype)} for x of dtype {x.dtype}, got {value.dtype}")
        _check_device(name, value, x)


def _check_eps(name: str, value, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value}")
