"""titan_v4.infra.pipeline: pipeline parallelism is refused with the field and what to use instead."""

import types

import pytest

import titan_v4


def test_pipeline_parallelism_is_refused_clearly():
    spec = titan_v4.get_v4_train_spec()
    with pytest.raises(NotImplementedError, match=r"parallelism.pipeline_parallel_degree=2: .* use 1"):
        spec.pipelining_fn(None, types.SimpleNamespace(pp=2), None)
