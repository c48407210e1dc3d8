"""titan-v4 custom ops, all registered under the ``v4::`` torch.library namespace.

Importing this package imports torch only (never titan_v4); it registers the ops as a side effect.
"""

from .indexer import indexer_scores, indexer_teacher, indexer_topk
from .sinkhorn import sinkhorn
from .sparse_attention import sparse_attention

__all__ = ["indexer_scores", "indexer_teacher", "indexer_topk", "sinkhorn", "sparse_attention"]
