"""The lightning indexer's ops: ``v4::indexer_scores``, ``v4::indexer_topk``, ``v4::indexer_teacher``."""

from .api import indexer_scores, indexer_teacher, indexer_topk
from .contract import TeacherOutputs

__all__ = ["TeacherOutputs", "indexer_scores", "indexer_teacher", "indexer_topk"]
