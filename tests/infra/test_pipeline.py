"""titan_v4.infra.pipeline: V4's stage split, its validation, the schedule refusals, and (in one
process) that a chain of stages built by torchtitan's own splitter computes exactly what the whole
model computes, gradients included: the hc_mult-packed boundary, the MTP token embeddings carried
from the first stage, hash-routed layers on a later stage."""

import logging
import types
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.distributed.pipeline_parallel import pipeline_module_split

from tests.helpers.job_config import job_config
from tests.helpers.tiny_model import randomize_, tiny_args
from tests.helpers.tolerances import assert_close
from titan_v4.flavors import deepseek_v4_args
from titan_v4.infra.pipeline import (
    SCHEDULES,
    PipelineConfigError,
    autocast_forward,
    check_schedule,
    drop_no_mixed_precision_lines,
    check_stage_count,
    default_module_names,
    keep_counters_through_shape_inference,
    layer_counts,
    module_names_for_layer_counts,
    stage_autocast_dtype,
    stage_module_names,
    validate_module_names,
)
from titan_v4.model.loss import V4Loss
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.model.moe import moe_layers

DEBUG = deepseek_v4_args["debugmodel"]  # 4 layers, layer 0 hash-routed, MTP depth 1
HEAD = ["hc_head", "norm", "output", "mtp.0"]


def pp_dims(pp: int):
    return types.SimpleNamespace(pp=pp)


def test_module_names_put_the_embedding_first_and_the_head_and_mtp_last():
    assert module_names_for_layer_counts([1, 3], mtp_depth=2) == [
        ["tok_embeddings", "layers.0"],
        ["layers.1", "layers.2", "layers.3", "hc_head", "norm", "output", "mtp.0", "mtp.1"],
    ]
    assert module_names_for_layer_counts([0, 2, 2], mtp_depth=0) == [
        ["tok_embeddings"],
        ["layers.0", "layers.1"],
        ["layers.2", "layers.3", "hc_head", "norm", "output"],
    ]
    assert layer_counts(module_names_for_layer_counts([0, 2, 2], mtp_depth=1)) == [0, 2, 2]


def test_default_split_follows_torchtitans_layer_balance():
    # torchtitan counts the embedding and the head as one layer each by default (4 + 2 = 6 units).
    cfg = job_config()
    assert default_module_names(2, DEBUG, cfg) == [["tok_embeddings", "layers.0", "layers.1"], ["layers.2", "layers.3", *HEAD]]
    assert layer_counts(default_module_names(4, DEBUG, cfg)) == [1, 2, 1, 0]
    cfg = job_config("--parallelism.pipeline_parallel_last_stage_less_layers", "2")
    assert layer_counts(default_module_names(2, DEBUG, cfg)) == [3, 1]


def test_stage_count_comes_from_the_schedule_or_layers_per_stage():
    def count(*cli):
        return len(stage_module_names(pp_dims(2), job_config("--parallelism.pipeline_parallel_degree", "2", *cli), DEBUG))

    assert count("--parallelism.pipeline_parallel_schedule", "1F1B") == 2
    assert count("--parallelism.pipeline_parallel_schedule", "Interleaved1F1B") == 4
    assert count("--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble") == 4
    # (4 layers + 1 + 1) / 3 per stage = 2 stages
    assert count("--parallelism.pipeline_parallel_layers_per_stage", "3") == 2
    explicit = [["tok_embeddings"], ["layers.0", "layers.1", "layers.2", "layers.3", *HEAD]]
    cli = ["--parallelism.module_fqns_per_model_part", *(",".join(stage) for stage in explicit)]
    assert stage_module_names(pp_dims(2), job_config(*cli), DEBUG) == explicit


@pytest.mark.parametrize(
    "names, problem",
    [
        pytest.param([["tok_embeddings", "layers.0", "layers.1", "layers.2", "layers.3", *HEAD]], "at least two stages", id="one-stage"),
        pytest.param([["tok_embeddings", "layers.0", "layers.1"], ["layers.2", "layers.3", "norm", "output", "mtp.0"]], "'hc_head' appears 0 times", id="missing"),
        pytest.param([["tok_embeddings", "layers.0", "layers.1"], ["layers.1", "layers.2", "layers.3", *HEAD]], "'layers.1' appears 2 times", id="twice"),
        pytest.param([["tok_embeddings", "layers.0", "layers.1"], ["layers.2", "layers.3", "hc_head", "norm", "output", "mtp"]], "'mtp' is not a module", id="container"),
        pytest.param([["layers.0", "layers.1"], ["tok_embeddings", "layers.2", "layers.3", *HEAD]], "tok_embeddings is not on the first stage", id="embedding"),
        pytest.param([["tok_embeddings", "layers.0", "mtp.0"], ["layers.1", "layers.2", "layers.3", "hc_head", "norm", "output"]], "'mtp.0' is not on the last stage", id="mtp"),
        pytest.param([["tok_embeddings", "layers.2", "layers.3"], ["layers.0", "layers.1", *HEAD]], "out of order", id="order"),
        pytest.param([["tok_embeddings", "layers.0", "layers.1", "layers.2", "layers.3"], [], HEAD], "stage 1 is empty", id="empty"),
    ],
)
def test_bad_explicit_splits_are_refused_with_the_setting_and_the_rule(names, problem):
    with pytest.raises(PipelineConfigError, match=r"parallelism.module_fqns_per_model_part=.*" + problem) as info:
        validate_module_names(names, DEBUG)
    assert "tok_embeddings on the first stage" in str(info.value)  # states what is allowed


def test_stage_count_must_fit_the_schedule():
    check_stage_count(2, 2, "1F1B")
    check_stage_count(6, 2, "Interleaved1F1B")
    check_stage_count(4, 2, "DualPipeV")
    # torchtitan would hand a single-stage schedule only the first of a rank's two stages.
    with pytest.raises(PipelineConfigError, match=r"4 stages, but parallelism.pipeline_parallel_schedule='1F1B' needs exactly"):
        check_stage_count(4, 2, "1F1B")
    with pytest.raises(PipelineConfigError, match=r"'ZBVZeroBubble' needs exactly 2 x pipeline_parallel_degree=4"):
        check_stage_count(6, 2, "ZBVZeroBubble")
    with pytest.raises(PipelineConfigError, match=r"3 stages, .* needs a multiple of pipeline_parallel_degree=2"):
        check_stage_count(3, 2, "Interleaved1F1B")


def test_schedules_v4_cannot_train_are_refused_with_the_reason():
    for name in SCHEDULES:
        overlap = ["--parallelism.no-pipeline_parallel_expert_parallel_overlap"] if name == "DualPipeV" else []
        check_schedule(job_config("--parallelism.pipeline_parallel_schedule", name, *overlap))
    with pytest.raises(PipelineConfigError, match=r"'DualPipeV' with .*overlap=true is not supported .* CUDA streams"):
        check_schedule(job_config("--parallelism.pipeline_parallel_schedule", "DualPipeV"))
    with pytest.raises(PipelineConfigError, match=r"pipeline_parallel_schedule='PipelineScheduleMulti' is not supported"):
        check_schedule(job_config("--parallelism.pipeline_parallel_schedule", "PipelineScheduleMulti"))
    with pytest.raises(PipelineConfigError, match=r"pipeline_parallel_schedule_csv='x.csv': .* not supported"):
        check_schedule(job_config("--parallelism.pipeline_parallel_schedule_csv", "x.csv"))


def test_shape_inference_forward_leaves_the_running_counters_alone():
    model = DeepSeekV4Model(tiny_args(seq_balance_loss_weight=0.1)).train()
    model.init_weights()
    (moe, *_) = moe_layers([model])
    balance = model.layers["1"].moe.balance_loss  # a learned-routing layer: it records a value

    class Stage:
        submod = model

        def _forward_metadata_inference(self, tokens):
            model(tokens)  # a forward like the one torch runs on placeholder inputs
            return "meta"

    stage = Stage()
    keep_counters_through_shape_inference(stage)
    tokens = torch.randint(0, 64, (2, 16))
    assert stage._forward_metadata_inference(tokens) == "meta"
    assert int(moe.tokens_per_expert.sum()) == 0
    assert int(balance.count) == 0 and float(balance.sums.abs().sum()) == 0
    model(tokens)  # a real forward still counts
    assert int(moe.tokens_per_expert.sum()) == 2 * 16 * moe.router.top_k
    assert int(balance.count) == 1 and float(balance.sums.abs().sum()) > 0

    stage = types.SimpleNamespace(submod=model)  # a torch whose stages infer shapes some other way
    with pytest.raises(NotImplementedError, match=r"none of \('_shape_inference', '_forward_metadata_inference'\)"):
        keep_counters_through_shape_inference(stage)


def test_pipeline_without_fsdp_autocasts_its_forward_only():
    def dtype(pp, fsdp, precision):
        dims = types.SimpleNamespace(pp_enabled=pp, fsdp_enabled=fsdp)
        return stage_autocast_dtype(dims, job_config("--training.mixed_precision_param", precision))

    assert dtype(pp=True, fsdp=False, precision="bfloat16") == torch.bfloat16
    assert dtype(pp=True, fsdp=True, precision="bfloat16") is None  # FSDP casts
    assert dtype(pp=False, fsdp=False, precision="bfloat16") is None  # torchtitan's own AMP
    assert dtype(pp=True, fsdp=False, precision="float32") is None

    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen["forward"] = torch.is_autocast_enabled("cpu")
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen["backward"] = torch.is_autocast_enabled("cpu")
            return grad

    class Part(torch.nn.Module):
        def forward(self, x):
            return Probe.apply(torch.nn.functional.linear(x, torch.ones(3, 3)))

    part = Part()
    autocast_forward(part, "cpu", torch.bfloat16)
    x = torch.ones(2, 3, requires_grad=True)
    with torch.autocast("cpu", enabled=False):  # like the schedule's step: nothing around it
        out = part(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and seen == {"forward": True, "backward": False}


@pytest.fixture(scope="module")
def pp_mesh_of_one():
    """A one-process 'pp' mesh: torchtitan's splitter then builds every stage in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("pp",))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "layers_per_stage, mtp_depth",
    [
        pytest.param([2, 2], 1, id="2-stages-mtp"),
        pytest.param([0, 3, 1], 2, id="hash-layer-on-stage-1-mtp-depth-2"),
        pytest.param([1, 2, 1, 0], 0, id="head-alone-no-mtp"),
    ],
)
def test_stage_chain_equals_the_whole_model(pp_mesh_of_one, layers_per_stage, mtp_depth):
    args = tiny_args(mtp_depth=mtp_depth)
    whole = DeepSeekV4Model(args).double()
    whole.init_weights()
    randomize_(whole, seed=3)
    names = module_names_for_layer_counts(layers_per_stage, mtp_depth)
    validate_module_names(names, args)
    _, parts = pipeline_module_split(whole, pp_mesh_of_one, "Interleaved1F1B", torch.device("cpu"), names)

    tokens = torch.randint(0, args.vocab_size, (2, 16))
    labels = torch.randint(0, args.vocab_size, (2, 16))
    loss_fn = V4Loss(0.3)
    expected = loss_fn(whole(tokens), labels)
    expected.backward()

    # Forward stage by stage as the schedule does: each stage gets the ids as the keyword argument
    # V4Trainer passes every stage, and a fresh leaf holding what the stage before sent.
    inputs, outputs = [tokens], []
    for s, part in enumerate(parts):
        outputs.append(part(inputs[-1], token_ids=tokens))
        if s < len(parts) - 1:
            # One tensor crosses each boundary: the hc streams and the MTP token embeddings.
            assert outputs[-1].shape == (2, 16, args.hc_mult + mtp_depth, args.dim)
            inputs.append(outputs[-1].detach().requires_grad_())
    loss = loss_fn(outputs[-1], labels)
    assert_close(loss.detach(), expected.detach(), torch.float64, "out", "loss")
    # Backward stage by stage: each boundary's input gradient goes to the stage before.
    loss.backward()
    for s in range(len(parts) - 2, -1, -1):
        outputs[s].backward(inputs[s + 1].grad)

    grads = {name: p.grad for part in parts for name, p in part.named_parameters()}
    assert sorted(grads) == sorted(name for name, _ in whole.named_parameters())  # every parameter on one stage
    for name, p in whole.named_parameters():
        if p.grad is None:  # the frozen indexer: no gradient in either
            assert grads[name] is None, name
        else:
            assert_close(grads[name], p.grad, torch.float64, "grad", name)


def test_torchtitans_no_mixed_precision_lines_are_dropped_where_v4_autocasts():
    def record(message):
        return logging.LogRecord("root", logging.WARNING, __file__, 1, message, None, None)

    assert not drop_no_mixed_precision_lines(
        record("Mixed precision training with TP or PP is only supported when FSDP/HSDP/CP is enabled.")
    )
    assert not drop_no_mixed_precision_lines(record("Mixed precision training is disabled"))
    assert drop_no_mixed_precision_lines(record("Mixed precision training is handled by fully_shard"))
    assert drop_no_mixed_precision_lines(record("Using pipeline schedule 1F1B with 4 microbatches and 2 stages."))


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}  # fmt: skip


class MatmulDtypes(TorchDispatchMode):
    """Records (op, input dtypes) of every matmul and every v4:: custom op run under it, after
    autocast has cast the inputs."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        grouped = getattr(torch.ops.aten, "_grouped_mm", None)
        if func in MATMULS or (grouped is not None and func.overloadpacket is grouped) or func.namespace == "v4":
            dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
            self.calls[(str(func.overloadpacket), dtypes)] += 1
        return func(*args, **(kwargs or {}))


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_GPU)])
def test_stages_under_autocast_compute_in_the_dtypes_of_a_single_device_run(pp_mesh_of_one, device):
    """The question torchtitan's warning raises: in a pipeline without FSDP (fp32 parameters), the
    stages' matmuls, forward and backward, run in exactly the dtypes of a single-device run under
    bf16 autocast: bf16 where autocast casts, fp32 where V4 keeps fp32 (model/precision.py)."""
    args = tiny_args(mtp_depth=1)
    whole = DeepSeekV4Model(args).to(device)
    whole.init_weights()
    randomize_(whole, seed=3)
    names = module_names_for_layer_counts([2, 2], 1)
    _, parts = pipeline_module_split(whole, pp_mesh_of_one, "Interleaved1F1B", torch.device(device), names)
    for part in parts:
        autocast_forward(part, device, torch.bfloat16)
    tokens = torch.randint(0, args.vocab_size, (2, 16), device=device)
    labels = torch.randint(0, args.vocab_size, (2, 16), device=device)
    loss_fn = V4Loss(0.3)

    with MatmulDtypes() as single:  # torchtitan's single-device step: the forward under autocast
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn(whole(tokens, token_ids=tokens), labels)
        loss.backward()

    with MatmulDtypes() as staged:  # stage by stage, as the schedule runs them: nothing around them
        inputs, outputs = [tokens], []
        for s, part in enumerate(parts):
            outputs.append(part(inputs[-1], token_ids=tokens))
            if s < len(parts) - 1:
                inputs.append(outputs[-1].detach().requires_grad_())
        loss_fn(outputs[-1], labels).backward()
        for s in range(len(parts) - 2, -1, -1):
            outputs[s].backward(inputs[s + 1].grad)

    assert staged.calls == single.calls
    bf16 = sum(n for (_, dtypes), n in staged.calls.items() if "torch.bfloat16" in dtypes)
    assert bf16 > sum(staged.calls.values()) / 2, staged.calls  # the bulk of the matmuls are bf16
