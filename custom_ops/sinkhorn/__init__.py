"""``v4::sinkhorn``: the mHC residual-mixing projection (Sinkhorn normalisation of a softmax)."""

from .api import sinkhorn

__all__ = ["sinkhorn"]
