"""titan-v4 custom ops, all registered under the ``v4::`` torch.library namespace.

Importing this package imports torch only (never titan_v4); it registers the ops as a side effect.
"""

from .indexer import indexer_scores, indexer_teacher, indexer_topk
from .mhc import hyper_head, mhc_collapse, mhc_expand
from .sinkhorn import sinkhorn
from .sparse_attention import sparse_attention

__all__ = [
    "hyper_head", "indexer_scores", "indexer_teacher", "indexer_topk", "mhc_collapse", "mhc_expand",
    "sinkhorn", "sparse_attention",
]  # fmt: skip
