"""``v4::mhc_*``: the fused mHC hyper-connection (collapse, expand) and the HyperHead collapse."""

from .api import hyper_head, mhc_collapse, mhc_expand

__all__ = ["hyper_head", "mhc_collapse", "mhc_expand"]
