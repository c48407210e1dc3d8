"""Pipeline parallelism for DeepSeek-V4: not supported yet, refused with a clear error.

torchtitan's generic `pipeline_llm` splits `tok_embeddings / layers / norm / output` and sets every
other top-level module to None on every stage, so V4's HyperHead and MTP block would vanish, and the
MTP block on the last stage needs the embedding that lives on the first. The V4 split (hc_mult-packed
stage boundary, token ids as kwargs on every stage, HyperHead / norm / head / MTP / loss on the last
stage with a copy of the embedding) is its own piece of work.
"""

from __future__ import annotations

from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims


def pipeline_deepseek_v4(model, parallel_dims: ParallelDims, job_config: JobConfig, *args, **kwargs):
    raise NotImplementedError(
        f"parallelism.pipeline_parallel_degree={parallel_dims.pp}: pipeline parallelism is not supported for "
        "DeepSeek-V4 yet (its HyperHead and MTP block need a V4-specific stage split); use 1"
    )
