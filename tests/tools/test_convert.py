"""python -m titan_v4.tools.convert: official / HF / DCP in, HF / DCP out, streaming.

The official input is encoded independently (tests/helpers/official_checkpoint.py); the HF output
is checked by HF transformers loading it."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.helpers.initial_load import load_like_torchtitan
from tests.helpers.official_checkpoint import as_torch, official_weights, write_official
from tests.helpers.tolerances import TOLERANCES, errors
from titan_v4.checkpoint.conversion import block_of, convert
from titan_v4.checkpoint.directory import CheckpointMismatchError
from titan_v4.checkpoint.hf_config import hf_config_from_args
from titan_v4.checkpoint.safetensors_file import read_header, write_file
from titan_v4.checkpoint.state_dict_adapter import expected_hf_tensors
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.attn_kinds import CSA, HCA, SWA
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.tools.convert import main

ARGS = deepseek_v4_args["debugmodel"].replace(max_seq_len=64, clamp_shared_experts=True)


def loaded_model(path) -> DeepSeekV4Model:
    torch.manual_seed(0)
    model = DeepSeekV4Model(ARGS)
    model.init_weights()
    load_like_torchtitan(model, path)
    return model.eval()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("official")
    exact = write_official(path, ARGS, official_weights(ARGS, seed=7), config=hf_config_from_args(ARGS))
    return path, as_torch(exact)


def test_hf_output_loads_in_transformers_with_mtp_beside_it(official, tmp_path):
    transformers = pytest.importorskip("transformers", minversion="5.9")
    path, exact = official
    convert(path, "official", tmp_path, "hf")
    hf, info = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    tokens = torch.randint(0, ARGS.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = errors(loaded_model(path)(tokens)[0], hf.eval()(input_ids=tokens).logits).rel_rms
    assert err <= TOLERANCES[(torch.float32, "model_out")].rel_rms, err
    stored = {}
    for file in tmp_path.glob("*.safetensors"):
        stored.update(read_header(file))
    mtp = sorted(k for k in stored if k.startswith("mtp."))
    assert mtp == sorted(k for k in exact if k.startswith("mtp.") and not k.endswith(".scale"))
    for key in ("mtp.0.e_proj.weight", "mtp.0.ffn.experts.6.w2.weight", "mtp.0.hc_head_fn"):
        s = stored[key]
        assert torch.equal(s.read_rows(0, s.shape[0]).double(), exact[key]), key
    assert stored["model.layers.1.self_attn.q_b_proj.weight"].dtype == "BF16"  # dequantised, exactly
    assert stored["model.layers.0.mlp.gate.tid2eid"].dtype == "I64"


def test_round_trips_are_exact(official, tmp_path):
    """official -> HF -> DCP (fp32) -> HF (fp32): the model loaded from each is the same, bit for
    bit, and torchtitan's model-only DCP load of the DCP output gives it too."""
    path, _ = official
    convert(path, "official", tmp_path / "hf", "hf")
    convert(tmp_path / "hf", "hf", tmp_path / "dcp", "dcp")
    convert(tmp_path / "dcp", "dcp", tmp_path / "hf2", "hf", flavor="debugmodel")
    reference = loaded_model(path).state_dict()
    for other in (tmp_path / "hf", tmp_path / "hf2"):
        state = loaded_model(other).state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.items()), other
    model = DeepSeekV4Model(ARGS)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    first = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in read_header(f).items()}
    second = {k: v for f in (tmp_path / "hf2").glob("*.safetensors") for k, v in read_header(f).items()}
    assert sorted(first) == sorted(second)
    for key, s in first.items():
        rows = s.shape[0] if s.shape else 1
        assert torch.equal(s.read_rows(0, rows).double(), second[key].read_rows(0, rows).double()), key


def test_wrong_inputs_are_refused(official, tmp_path):
    path, _ = official
    with pytest.raises(CheckpointMismatchError, match="--input-format hf, but .* is in the official layout"):
        convert(path, "hf", tmp_path / "a", "dcp")
    with pytest.raises(CheckpointMismatchError, match="config.json: vocab_size = 2048, but the configured model has vocab_size = 129280"):
        convert(path, "official", tmp_path / "b", "hf", flavor="flash")
    convert(path, "official", tmp_path / "dcp", "dcp")
    with pytest.raises(CheckpointMismatchError, match="has no config.json: name the model with --flavor"):
        convert(tmp_path / "dcp", "dcp", tmp_path / "c", "hf")
    with pytest.raises(SystemExit):
        main(["--input", str(path), "--input-format", "official", "--output", str(tmp_path / "dcp"), "--output-format", "hf"])
    # A missing or wrong --input is named as such, as the last line and without a traceback.
    missing = tmp_path / "nonexistent"
    for fmt in ("official", "hf", "dcp"):
        with pytest.raises(SystemExit, match=f"^convert: {re.escape(str(missing))} does not exist$"):
            main(["--input", str(missing), "--input-format", fmt, "--output", str(tmp_path / "e"), "--output-format", "hf"])
    a_file = tmp_path / "dcp" / ".metadata"
    with pytest.raises(SystemExit, match=f"^convert: {re.escape(str(a_file))} is not a directory$"):
        main(["--input", str(a_file), "--input-format", "dcp", "--output", str(tmp_path / "f"), "--output-format", "hf", "--flavor", "debugmodel"])


def write_random_hf(path, args) -> int:
    """A random HF-layout checkpoint, one file per block (the streaming unit); returns the largest
    block's bytes."""
    path.mkdir()
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    g = torch.Generator().manual_seed(0)
    for key, meta in expected_hf_tensors(args).items():
        value = torch.randint(0, args.n_routed_experts, meta.shape, generator=g) if not meta.dtype.is_floating_point else torch.randn(meta.shape, generator=g).bfloat16()
        blocks.setdefault(block_of(key), {})[key] = value
    (path / "config.json").write_text(json.dumps(hf_config_from_args(args)))
    for i, tensors in enumerate(blocks.values()):
        write_file(path / f"model-{i:05d}.safetensors", tensors)
    return max(sum(t.numel() * t.element_size() for t in b.values()) for b in blocks.values())


def test_peak_host_memory_is_about_one_block(tmp_path):
    """8 layers + MTP of ~25 MiB each (bf16) stream into a DCP checkpoint (fp32: ~50 MiB a block)
    with the peak host memory, above what the process held before, under three fp32 blocks plus
    48 MiB: far from the whole model."""
    args = deepseek_v4_args["debugmodel"].replace(
        n_layers=8, attn_types=(SWA, CSA, HCA, CSA) * 2, n_routed_experts=64, moe_inter_dim=512, max_seq_len=64
    )
    block = 2 * write_random_hf(tmp_path / "hf", args)  # in fp32
    proc = subprocess.run(
        [sys.executable, "-m", "titan_v4.tools.convert", "--input", str(tmp_path / "hf"), "--input-format", "hf",
         "--output", str(tmp_path / "dcp"), "--output-format", "dcp"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    total = sum(f.stat().st_size for f in (tmp_path / "dcp").glob("*.distcp"))
    assert total > 8 * block
    grew = float(re.search(r"peak host memory [\d.]+ GiB \(([\d.]+) GiB above the start\)", proc.stdout).group(1)) * 2**30
    assert grew < 3 * block + 48 * 2**20, (grew / 2**20, block / 2**20, proc.stdout[-3000:])
    assert len(re.findall(r"convert: \[\d+/10\]", proc.stdout)) == 10  # progress: top + 8 layers + MTP


# ---------------------------------------------------------------------------------- RoPE settings
def with_compress_rope(path, compress: dict) -> dict:
    """Rewrite path/config.json's compressed-layer RoPE (HF's nested form); returns the new
    rope_parameters."""
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"]["compress"] = compress
    (path / "config.json").write_text(json.dumps(config))
    return config["rope_parameters"]


ROTARY_FRACTION = ARGS.rope_head_dim / ARGS.head_dim
OTHER_COMPRESS_ROPES = {
    "default": {"rope_type": "default", "rope_theta": 160000.0, "partial_rotary_factor": ROTARY_FRACTION},
    "yarn-own-values": {
        "rope_type": "yarn", "rope_theta": 40000.0, "partial_rotary_factor": ROTARY_FRACTION, "factor": 4.0,
        "original_max_position_embeddings": 2048, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.25,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OTHER_COMPRESS_ROPES))
def test_hf_to_hf_keeps_the_rope_parameters(tmp_path, name):
    write_random_hf(tmp_path / "in", ARGS)
    rope = with_compress_rope(tmp_path / "in", OTHER_COMPRESS_ROPES[name])
    convert(tmp_path / "in", "hf", tmp_path / "out", "hf")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"] == rope


def test_a_rope_the_model_lacks_is_refused_naming_the_field(tmp_path):
    write_random_hf(tmp_path / "in", ARGS)
    with_compress_rope(tmp_path / "in", {**OTHER_COMPRESS_ROPES["default"], "rope_type": "llama3"})
    config = re.escape(str(tmp_path / "in" / "config.json"))
    with pytest.raises(SystemExit, match=rf"^convert: {config}: .*rope_parameters.compress.rope_type = 'llama3' is not supported; allowed: 'default', 'yarn'$"):
        main(["--input", str(tmp_path / "in"), "--input-format", "hf", "--output", str(tmp_path / "out"), "--output-format", "dcp"])


def test_a_config_without_yarn_is_compared_with_a_flavor_on_what_it_states(tmp_path):
    """debugmodel has YaRN (original length 512); a file without YaRN differs from it in the RoPE
    type, which is what the refusal names, not YaRN values the file does not have."""
    write_random_hf(tmp_path / "in", ARGS)
    with_compress_rope(tmp_path / "in", OTHER_COMPRESS_ROPES["default"])
    with pytest.raises(CheckpointMismatchError, match=r"config.json: compress_rope_type = 'default', but the configured model has compress_rope_type = 'yarn'$"):
        convert(tmp_path / "in", "hf", tmp_path / "out", "dcp", flavor="debugmodel")


# ---------------------------------------------------------------------------------- non-finite values
def overwrite(stored, element: int, raw: bytes) -> None:
    """Overwrite the bytes of element `element` (and on) of a stored tensor, in place."""
    with open(stored.file, "r+b") as f:
        f.seek(stored.begin + element * stored.torch_dtype.itemsize)
        f.write(raw)


def stored_tensor(path, name):
    return next(t for f in sorted(path.glob("*.safetensors")) for n, t in read_header(f).items() if n == name)


def test_non_finite_hf_values_are_refused_naming_tensor_and_file(tmp_path):
    write_random_hf(tmp_path / "hf", ARGS)
    name = "model.layers.2.self_attn.q_b_proj.weight"
    stored = stored_tensor(tmp_path / "hf", name)
    size = stored.file.stat().st_size
    columns = stored.shape[1]
    overwrite(stored, 3 * columns + 5, b"\xff\xff" + b"\x80\x7f")  # bf16 NaN, +inf at [3, 5], [3, 6]
    overwrite(stored, 7 * columns, b"\x80\xff")  # -inf at [7, 0]
    assert stored.file.stat().st_size == size
    file = re.escape(str(stored.file))
    with pytest.raises(SystemExit, match=rf"^convert: {file}: {re.escape(name)} holds 3 non-finite values \(NaN or inf\), the first at \[3, 5\]$"):
        main(["--input", str(tmp_path / "hf"), "--input-format", "hf", "--output", str(tmp_path / "dcp"), "--output-format", "dcp"])


@pytest.mark.parametrize(
    "name, raw, dtype, found",
    [
        pytest.param("layers.1.attn.wq_b.weight", b"\x7f", [], "", id="fp8-weight"),  # E4M3 NaN
        pytest.param("layers.1.attn.wq_b.scale", b"\xff", [], "", id="fp8-scale"),  # E8M0 NaN
        pytest.param("layers.3.ffn.experts.5.w2.scale", b"\xff", [], "", id="fp4-scale"),
        # fp32's largest value, finite as stored, rounds to inf in bf16
        pytest.param("layers.1.hc_attn_fn", b"\xff\xff\x7f\x7f", ["--dtype", "bfloat16"], " once cast to torch.bfloat16", id="cast-overflow"),
    ],
)  # fmt: skip
def test_non_finite_official_values_are_refused_naming_tensor_and_file(official, tmp_path, name, raw, dtype, found):
    """A NaN code in an FP8 weight or in the E8M0 scale of an FP8 / FP4 weight (E2M1 codes are all
    finite), or a value `--dtype` cannot hold, is named with the stored tensor that holds it."""
    shutil.copytree(official[0], tmp_path / "official")
    stored = stored_tensor(tmp_path / "official", name)
    overwrite(stored, 1, raw)
    file = re.escape(str(stored.file))
    index = [int(i) for i in torch.unravel_index(torch.tensor(1), stored.shape)]  # element 1, overwritten
    with pytest.raises(SystemExit, match=rf"^convert: {file}: {re.escape(name)} holds 1 non-finite value \(NaN or inf\), the first at {re.escape(str(index))}{found}$"):
        main(["--input", str(tmp_path / "official"), "--input-format", "official", "--output", str(tmp_path / "hf"), "--output-format", "hf", *dtype])


def test_non_finite_dcp_values_are_refused_naming_tensor_and_file(official, tmp_path):
    convert(official[0], "official", tmp_path / "dcp", "dcp")
    state = DeepSeekV4Model(ARGS).state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    state["layers.2.attention.wkv.weight"][4, 9] = float("inf")
    dcp.save(state, checkpoint_id=str(tmp_path / "bad"), no_dist=True)
    with pytest.raises(SystemExit, match=r"^convert: \S+\.distcp: layers.2.attention.wkv.weight holds 1 non-finite value \(NaN or inf\), the first at \[4, 9\]$"):
        main(["--input", str(tmp_path / "bad"), "--input-format", "dcp", "--output", str(tmp_path / "hf"), "--output-format", "hf", "--flavor", "debugmodel"])
