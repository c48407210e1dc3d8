"""Registration of the indexer ops: ``v4::indexer_scores`` (+ ``v4::indexer_scores_bwd``),
``v4::indexer_topk`` and ``v4::indexer_teacher``.

The reference (reference.py) serves every device; on CUDA the Triton kernels (triton/) replace it for
bf16 and fp32 inputs (fp64 stays on the reference: it is the oracle). Triton is imported inside the
CUDA functions only, so a CPU install imports this module without a GPU or a working Triton. The
backward of the scores is its own op so that a compiled backward graph holds one opaque node. The
schemas come from the NamedTuples of contract.py; the ops take validated, contiguous tensors (model
code calls the functions of api.py).
"""

import torch
from torch import Tensor

from . import reference
from .contract import (
    ScoresGrads,
    ScoresInputs,
    TeacherInputs,
    TopkInputs,
    compute_dtype,
    n_listed,
    schema,
    tensor_fields,
)


def _on_triton(q: Tensor) -> bool:
    return q.dtype in (torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------- scores


@torch.library.custom_op("v4::indexer_scores", mutates_args=(), schema=f"({schema(ScoresInputs)}) -> Tensor")
def indexer_scores_op(*args) -> Tensor:
    """Scores ``[B, S, K or P]`` in the compute dtype; see reference.py."""
    return reference.indexer_scores_fwd(ScoresInputs(*args))


@indexer_scores_op.register_kernel("cuda")
def _indexer_scores_cuda(*args) -> Tensor:
    inputs = ScoresInputs(*args)
    if not _on_triton(inputs.q):
        return reference.indexer_scores_fwd(inputs)
    from .triton.scores_fwd import indexer_scores_fwd

    return indexer_scores_fwd(inputs)


@indexer_scores_op.register_fake
def _indexer_scores_fake(*args) -> Tensor:
    q, _, keys, indices, _ = ScoresInputs(*args)
    return q.new_empty((*q.shape[:2], n_listed(indices, keys.shape[1])), dtype=compute_dtype(q.dtype))


@torch.library.custom_op(
    "v4::indexer_scores_bwd", mutates_args=(), schema=f"({schema(ScoresInputs, ('grad',))}) -> (Tensor, Tensor, Tensor)"
)
def indexer_scores_bwd_op(grad: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    """dq (q's dtype), dweights (weights' dtype), dkeys (keys' dtype)."""
    return tuple(reference.indexer_scores_bwd(ScoresInputs(*args), grad))


@indexer_scores_bwd_op.register_kernel("cuda")
def _indexer_scores_bwd_cuda(grad: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    inputs = ScoresInputs(*args)
    if not _on_triton(inputs.q):
        return tuple(reference.indexer_scores_bwd(inputs, grad))
    from .triton.scores_bwd import indexer_scores_bwd

    return tuple(indexer_scores_bwd(inputs, grad))


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


@torch.library.custom_op("v4::indexer_topk", mutates_args=(), schema=f"({schema(TopkInputs)}) -> Tensor")
def indexer_topk_op(*args) -> Tensor:
    """Top-k entry ids ``[B, S, k]`` int32; see reference.py."""
    return reference.indexer_topk(TopkInputs(*args))


@indexer_topk_op.register_kernel("cuda")
def _indexer_topk_cuda(*args) -> Tensor:
    inputs = TopkInputs(*args)
    if not _on_triton(inputs.q):
        return reference.indexer_topk(inputs)
    from .triton.scores_fwd import indexer_topk

    return indexer_topk(inputs)


@indexer_topk_op.register_fake
def _indexer_topk_fake(*args) -> Tensor:
    inputs = TopkInputs(*args)
    return inputs.q.new_empty((*inputs.q.shape[:2], inputs.k), dtype=torch.int32)


# ----------------------------------------------------------------------------------------- teacher


@torch.library.custom_op("v4::indexer_teacher", mutates_args=(), schema=f"({schema(TeacherInputs)}) -> (Tensor, Tensor)")
def indexer_teacher_op(*args) -> tuple[Tensor, Tensor]:
    """log_mass ``[B, S, K or P]``, log_visible ``[B, S]``; see reference.py."""
    return tuple(reference.indexer_teacher(TeacherInputs(*args)))


@indexer_teacher_op.register_kernel("cuda")
def _indexer_teacher_cuda(*args) -> tuple[Tensor, Tensor]:
    inputs = TeacherInputs(*args)
    if not _on_triton(inputs.q):
        return tuple(reference.indexer_teacher(inputs))
    from .triton.teacher import indexer_teacher

    return tuple(indexer_teacher(inputs))


@indexer_teacher_op.register_fake
def _indexer_teacher_fake(*args):
    q, pool, _, _, indices, _, _ = TeacherInputs(*args)
    cdt = compute_dtype(q.dtype)
    return q.new_empty((*q.shape[:2], n_listed(indices, pool.shape[1])), dtype=cdt), q.new_empty(q.shape[:2], dtype=cdt)
