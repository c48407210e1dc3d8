"""``v4::sparse_attention``: sliding window + compressed pool (HCA) / top-k pool (CSA) attention."""

from .api import sparse_attention

__all__ = ["sparse_attention"]
