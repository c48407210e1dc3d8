"""Training data for titan-v4: the shipped synthetic corpus + tokenizer, or real data by config.

The TrainSpec uses ``build_tokenizer_fn=build_v4_tokenizer`` and
``build_dataloader_fn=build_v4_dataloader``; the ``[v4]`` config section picks the data.
"""

from titan_v4.data.build import build_v4_dataloader, build_v4_tokenizer
from titan_v4.data.dataset import ASSETS_DIR, PackedDocumentDataset, load_synthetic_documents

__all__ = [
    "ASSETS_DIR",
    "PackedDocumentDataset",
    "build_v4_dataloader",
    "build_v4_tokenizer",
    "load_synthetic_documents",
]
