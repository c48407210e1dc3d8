"""Loading official-layout checkpoints (FP8 / FP4 / E8M0, encoded by tests/helpers) and HF-layout
ones into titan-v4 through the reader torchtitan uses, in one process.

The oracle for names is HF transformers: it loads an unquantised copy of the same official
checkpoint with its own renaming (conversion_mapping), and the titan model loaded from the
quantised files must hold exactly its weights and give its logits. The MTP block (which HF does
not load) is compared name by name."""

import pytest
import torch

from tests.helpers.initial_load import load_like_torchtitan
from tests.helpers.official_checkpoint import as_torch, official_weights, write_official
from tests.helpers.tolerances import TOLERANCES, errors
from titan_v4.checkpoint.hf_config import hf_config_from_args
from titan_v4.checkpoint.state_dict_adapter import DeepSeekV4StateDictAdapter
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.model import DeepSeekV4Model

transformers = pytest.importorskip("transformers", minversion="5.9")

# The debug flavor: every attention kind, hash and learned routing, MTP; wq_b and wo_a span two
# 128-row FP8 blocks, experts have four FP4 groups per row. HF clamps the shared expert too.
ARGS = deepseek_v4_args["debugmodel"].replace(max_seq_len=64, clamp_shared_experts=True)


def fresh_model(args=ARGS) -> DeepSeekV4Model:
    torch.manual_seed(0)
    model = DeepSeekV4Model(args)
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(directory, exact dequantised values by official name, the HF model loaded from the twin)."""
    root = tmp_path_factory.mktemp("official")
    exact = write_official(root / "fp4", ARGS, official_weights(ARGS, seed=1), config=hf_config_from_args(ARGS))
    write_official(root / "twin", ARGS, exact, config=hf_config_from_args(ARGS), quantize=False)
    hf, info = transformers.DeepseekV4ForCausalLM.from_pretrained(root / "twin", dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    return root / "fp4", as_torch(exact), hf.eval()


def test_official_checkpoint_loads_exactly(official):
    path, exact, hf = official
    model = fresh_model()
    load_like_torchtitan(model, path)
    titan_hf = DeepSeekV4StateDictAdapter(ARGS, None).to_hf(model.state_dict())
    hf_sd = hf.state_dict()
    main = [k for k in titan_hf if not k.startswith("mtp.")]
    assert sorted(main) == sorted(hf_sd)
    for key in main:
        assert torch.equal(titan_hf[key].to(hf_sd[key].dtype), hf_sd[key]), key
    mtp = [k for k in exact if k.startswith("mtp.") and not k.endswith(".scale")]
    assert sorted(k for k in titan_hf if k.startswith("mtp.")) == sorted(mtp)
    for key in mtp:
        assert torch.equal(titan_hf[key].double(), exact[key]), key
    # Hash tables are integers and exact; FP8 / FP4 weights came through quantisation.
    assert titan_hf["model.layers.0.mlp.gate.tid2eid"].dtype == torch.int64
    assert torch.equal(model.layers["0"].moe.router.tid2eid, exact["layers.0.ffn.gate.tid2eid"])


def test_loaded_model_gives_transformers_logits(official):
    path, _, hf = official
    model = fresh_model().eval()
    load_like_torchtitan(model, path)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        titan_logits, _ = model(tokens)
        hf_logits = hf(input_ids=tokens).logits
    err = errors(titan_logits, hf_logits).rel_rms
    assert err <= TOLERANCES[(torch.float32, "model_out")].rel_rms, err


def test_weights_are_within_the_formats_rounding(tmp_path):
    """Against the weights before quantisation: FP8 within 2^-4 relative, FP4 within 1/4 of the
    larger of the value and its group scale (the formats' half-steps); not equal (it did round)."""
    weights = official_weights(ARGS, seed=2)
    write_official(tmp_path, ARGS, weights, config=hf_config_from_args(ARGS))
    model = fresh_model()
    load_like_torchtitan(model, tmp_path)
    fp8 = model.layers["1"].attention.wq_b.weight.double()
    want = torch.from_numpy(weights["layers.1.attn.wq_b.weight"])
    assert 0 < (fp8 - want).abs().max() and torch.all((fp8 - want).abs() <= 2**-4 * want.abs() + 2**-6 * want.abs().max())
    fp4 = model.layers["2"].moe.experts.w2[5].double()
    want = torch.from_numpy(weights["layers.2.ffn.experts.5.w2.weight"])
    group_max = want.abs().reshape(want.shape[0], -1, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(want.shape)
    assert 0 < (fp4 - want).abs().max() and torch.all((fp4 - want).abs() <= 0.25 * torch.maximum(want.abs(), group_max / 6 * 2))


def test_base_checkpoints_with_fp8_experts(tmp_path):
    """-Base: routed experts in FP8 with fp32 block scales."""
    exact = as_torch(write_official(tmp_path, ARGS, official_weights(ARGS, seed=4), experts="fp8", config=hf_config_from_args(ARGS)))
    model = fresh_model()
    load_like_torchtitan(model, tmp_path)
    for e in (0, 7):
        assert torch.equal(model.layers["3"].moe.experts.w1[e].double(), exact[f"layers.3.ffn.experts.{e}.w1.weight"])
        assert torch.equal(model.mtp["0"].moe.experts.w2[e].double(), exact[f"mtp.0.ffn.experts.{e}.w2.weight"])


def random_hf_model(args, seed: int):
    hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**hf_config_from_args(args))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in hf.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], args.n_routed_experts, generator=g).argsort(-1)[:, : b.shape[1]])
    return hf


def test_hf_layout_from_transformers_state_dict_loads(tmp_path):
    """transformers' state-dict names (stacked experts), bf16, in two files written by the
    safetensors package, load and give transformers' logits (without MTP, which HF lacks)."""
    args = ARGS.replace(mtp_depth=0)
    hf = random_hf_model(args, seed=5)
    with torch.no_grad():  # bf16 values in an fp32 model (a bf16 HF model would round its RoPE tables too)
        for p in hf.parameters():
            p.copy_(p.bfloat16())
    state = {k: (v.bfloat16() if v.is_floating_point() else v).contiguous() for k, v in hf.state_dict().items()}
    keys = sorted(state)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({k: state[k] for k in keys[::2]}, tmp_path / "model-00001-of-00002.safetensors")
    safetensors_torch.save_file({k: state[k] for k in keys[1::2]}, tmp_path / "model-00002-of-00002.safetensors")
    model = fresh_model(args)
    load_like_torchtitan(model, tmp_path)
    assert torch.equal(model.layers["0"].moe.router.tid2eid, hf.model.layers[0].mlp.gate.tid2eid)
    tokens = torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        assert errors(model.eval()(tokens), ref).rel_rms <= TOLERANCES[(torch.float32, "model_out")].rel_rms


def test_save_pretrained_output_is_refused_by_name(tmp_path):
    args = ARGS.replace(mtp_depth=0)
    random_hf_model(args, seed=5).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="looks like the output of transformers' save_pretrained"):
        load_like_torchtitan(fresh_model(args), tmp_path)
