"""Registration of the indexer ops: ``v4::indexer_scores`` (+ ``v4::indexer_scores_bwd``),
``v4::indexer_topk`` and ``v4::indexer_teacher``.

The reference (reference.py) serves every device; on CUDA the Triton kernels (triton/) replace it for
bf16 and fp32 queries (fp64 stays on the reference: it is the oracle), as decided for every op in
custom_ops/dispatch.py (which also honours ``TITAN_V4_REFERENCE_OPS``). The backward of the scores is
its own op so that a compiled backward graph holds one opaque node. The schemas come from the
NamedTuples of contract.py; the ops take validated, contiguous tensors (model code calls the
functions of api.py).
"""

import torch
from torch import Tensor

from .. import dispatch
from ..schema import tensor_fields
from . import reference
from .contract import (
    ScoresGrads,
    ScoresInputs,
    TeacherInputs,
    TeacherOutputs,
    TopkInputs,
    compute_dtype,
    n_listed,
    triton_applies,
)


# ----------------------------------------------------------------------------------------- scores
indexer_scores_op = dispatch.op(
    "v4::indexer_scores", ScoresInputs, Tensor,
    reference=reference.indexer_scores_fwd, triton="custom_ops.indexer.triton.scores_fwd:indexer_scores_fwd",
    applies=triton_applies, reads="q", via=dispatch.packed(ScoresInputs),
)


@indexer_scores_op.register_fake
def _indexer_scores_fake(*args) -> Tensor:
    inputs = ScoresInputs(*args)
    q, keys, indices = inputs.q, inputs.keys, inputs.indices
    return q.new_empty((*q.shape[:2], n_listed(indices, keys.shape[1])), dtype=compute_dtype(q.dtype))


def _scores_bwd_on(bwd, grad: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    """``v4::indexer_scores_bwd`` on ``bwd`` (the reference's or the kernels': ``(ScoresInputs, grad)
    -> ScoresGrads``)."""
    return tuple(bwd(ScoresInputs(*args), grad))


indexer_scores_bwd_op = dispatch.op(
    "v4::indexer_scores_bwd", ScoresInputs, ScoresGrads, leading=("grad",),
    reference=reference.indexer_scores_bwd, triton="custom_ops.indexer.triton.scores_bwd:indexer_scores_bwd",
    applies=triton_applies, reads="q", via=_scores_bwd_on,
)


@indexer_scores_bwd_op.register_fake
def _indexer_scores_bwd_fake(grad: Tensor, *args):
    inputs = ScoresInputs(*args)
    return tuple(ScoresGrads(*(torch.empty_like(t) for t in (inputs.q, inputs.weights, inputs.keys))))


_SCORES_TENSORS = tensor_fields(ScoresInputs)


def _scores_setup_context(ctx, inputs, output):
    inputs = ScoresInputs(*inputs)
    # The backward recomputes the per-head products from the inputs; the scores are not kept.
    ctx.save_for_backward(*(getattr(inputs, name) for name in _SCORES_TENSORS))
    ctx.scalars = {name: value for name, value in inputs._asdict().items() if name not in _SCORES_TENSORS}


def _scores_backward(ctx, grad):
    inputs = ScoresInputs(**dict(zip(_SCORES_TENSORS, ctx.saved_tensors)), **ctx.scalars)
    grads = ScoresGrads(*indexer_scores_bwd_op(grad.contiguous(), *inputs))
    # One gradient per op input: ScoresGrads names them d<input>; indices and ratio get None.
    return tuple(getattr(grads, f"d{name}", None) for name in ScoresInputs._fields)


indexer_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup_context)


# ----------------------------------------------------------------------------------------- top-k
indexer_topk_op = dispatch.op(
    "v4::indexer_topk", TopkInputs, Tensor,
    reference=reference.indexer_topk, triton="custom_ops.indexer.triton.scores_fwd:indexer_topk",
    applies=triton_applies, reads="q", via=dispatch.packed(TopkInputs),
)


@indexer_topk_op.register_fake
def _indexer_topk_fake(*args) -> Tensor:
    inputs = TopkInputs(*args)
    return inputs.q.new_empty((*inputs.q.shape[:2], inputs.k), dtype=torch.int32)


# ----------------------------------------------------------------------------------------- teacher
indexer_teacher_op = dispatch.op(
    "v4::indexer_teacher", TeacherInputs, TeacherOutputs,
    reference=reference.indexer_teacher, triton="custom_ops.indexer.triton.teacher:indexer_teacher",
    applies=triton_applies, reads="q", via=dispatch.packed(TeacherInputs),
)


@indexer_teacher_op.register_fake
def _indexer_teacher_fake(*args):
    inputs = TeacherInputs(*args)
    q, pool, indices = inputs.q, inputs.pool, inputs.indices
    cdt = compute_dtype(q.dtype)
    return q.new_empty((*q.shape[:2], n_listed(indices, pool.shape[1])), dtype=cdt), q.new_empty(q.shape[:2], dtype=cdt)
