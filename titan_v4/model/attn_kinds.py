"""The three attention kinds of a DeepSeek-V4 layer.

The released configs write them as `compress_ratios` 0 / 4 / 128 per layer (docs/deepseek_v4.md):

* `SWA`: sliding-window attention only;
* `CSA`: sliding window + an overlapping 4x compressor whose entries the lightning indexer selects
  (top-k per query);
* `HCA`: sliding window + every causally visible entry of a non-overlapping 128x compressor.
"""

SWA, CSA, HCA = "swa", "csa", "hca"
ATTN_TYPES = (SWA, CSA, HCA)
