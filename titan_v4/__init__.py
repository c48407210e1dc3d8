"""titan-v4: DeepSeek-V4 (Flash / Pro) pre-training as a torchtitan 0.2.2 plug-in.

Importing this package registers the TrainSpec "deepseek_v4" (TOML: `[model] name = "deepseek_v4"`,
`[experimental] custom_import = "titan_v4"`). On a machine without CUDA it first installs the
torchtitan CPU shim (titan_v4/infra/cpu_shim.py), which must run before torchtitan is imported.
"""

import torch

from titan_v4.infra import cpu_shim

if not torch.cuda.is_available():
    cpu_shim.install()

from torchtitan.components.lr_scheduler import build_lr_schedulers  # noqa: E402
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec  # noqa: E402

from titan_v4.data import build_v4_dataloader, build_v4_tokenizer  # noqa: E402
from titan_v4.infra.optimizer import build_v4_optimizers  # noqa: E402
from titan_v4.infra.parallelize import parallelize_deepseek_v4  # noqa: E402
from titan_v4.infra.pipeline import pipeline_deepseek_v4  # noqa: E402
from titan_v4.model.args import CSA, HCA, SWA, DeepSeekV4ModelArgs  # noqa: E402
from titan_v4.model.loss import build_v4_loss  # noqa: E402
from titan_v4.model.model import DeepSeekV4Model  # noqa: E402
from titan_v4.state_dict_adapter import DeepSeekV4StateDictAdapter  # noqa: E402

MODEL_NAME = "deepseek_v4"


class FlavorRegistry(dict):
    """The flavors; an unknown name fails with the allowed ones (torchtitan indexes this dict)."""

    def __missing__(self, key):
        raise KeyError(f"model.flavor={key!r} is not a DeepSeek-V4 flavor; allowed: {sorted(self)}")


def _flash_schedule(n_layers: int) -> tuple[str, ...]:
    """Flash: layers 0-1 sliding window only, then CSA on even and HCA on odd layers."""
    return tuple(SWA if i < 2 else (CSA if i % 2 == 0 else HCA) for i in range(n_layers))


def _pro_schedule(n_layers: int) -> tuple[str, ...]:
    """Pro: layers 0-1 HCA ("HCA-first"), then CSA on even and HCA on odd layers."""
    return tuple(HCA if i < 2 else (CSA if i % 2 == 0 else HCA) for i in range(n_layers))


deepseek_v4_args = FlavorRegistry(
    {
        # Tiny: every attention kind, hash + learned MoE, hc_mult 4, MTP; trains on a CPU in seconds.
        "debugmodel": DeepSeekV4ModelArgs(
            vocab_size=2048,
            dim=128,
            n_layers=4,
            n_heads=4,
            head_dim=64,
            rope_head_dim=16,
            q_lora_rank=64,
            o_groups=2,
            o_lora_rank=64,
            window_size=16,
            attn_types=(SWA, CSA, HCA, CSA),
            csa_ratio=4,
            hca_ratio=16,
            index_n_heads=4,
            index_head_dim=32,
            index_topk=8,
            original_seq_len=512,
            n_routed_experts=8,
            n_activated_experts=2,
            moe_inter_dim=128,
            n_hash_layers=1,
            route_scale=1.5,
            mtp_depth=1,
        ),
        # The released DeepSeek-V4-Flash (V4_REFERENCE.md §1.1).
        "flash": DeepSeekV4ModelArgs(attn_types=_flash_schedule(43)),
        # The released DeepSeek-V4-Pro.
        "pro": DeepSeekV4ModelArgs(
            dim=7168,
            n_layers=61,
            n_heads=128,
            q_lora_rank=1536,
            o_groups=16,
            attn_types=_pro_schedule(61),
            index_topk=1024,
            n_routed_experts=384,
            moe_inter_dim=3072,
            route_scale=2.5,
        ),
        # Flash widths on 4 layers and 16 + 1 experts: fits one 80 GB H100 at seq 4096 with fp32
        # master weights and AdamW.
        "flash_proxy": DeepSeekV4ModelArgs(
            n_layers=4,
            attn_types=(SWA, CSA, HCA, CSA),
            n_routed_experts=16,
            n_hash_layers=1,
        ),
    }
)


def get_v4_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=DeepSeekV4Model,
        model_args=deepseek_v4_args,
        parallelize_fn=parallelize_deepseek_v4,
        pipelining_fn=pipeline_deepseek_v4,
        build_optimizers_fn=build_v4_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_v4_dataloader,
        build_tokenizer_fn=build_v4_tokenizer,
        build_loss_fn=build_v4_loss,
        state_dict_adapter=DeepSeekV4StateDictAdapter,
    )


def _register() -> None:
    try:
        get_train_spec(MODEL_NAME)
        return  # already registered (the package was imported twice under two names)
    except ValueError:
        pass
    register_train_spec(MODEL_NAME, get_v4_train_spec())


_register()

__all__ = ["MODEL_NAME", "DeepSeekV4Model", "DeepSeekV4ModelArgs", "deepseek_v4_args", "get_v4_train_spec"]
