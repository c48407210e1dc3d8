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

from titan_v4.checkpoint.state_dict_adapter import DeepSeekV4StateDictAdapter  # noqa: E402
from titan_v4.data import build_v4_dataloader, build_v4_tokenizer  # noqa: E402
from titan_v4.flavors import deepseek_v4_args  # noqa: E402
from titan_v4.infra.parallelize import parallelize_deepseek_v4  # noqa: E402
from titan_v4.infra.pipeline import pipeline_deepseek_v4  # noqa: E402
from titan_v4.model.loss import build_v4_loss  # noqa: E402
from titan_v4.model.model import DeepSeekV4Model  # noqa: E402
from titan_v4.train.metrics import build_v4_metrics_processor  # noqa: E402
from titan_v4.train.optimizer import build_v4_optimizers  # noqa: E402

MODEL_NAME = "deepseek_v4"


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
        build_metrics_processor_fn=build_v4_metrics_processor,
    )


def _register() -> None:
    try:
        get_train_spec(MODEL_NAME)
        return  # already registered (the package was imported twice under two names)
    except ValueError:
        pass
    register_train_spec(MODEL_NAME, get_v4_train_spec())


_register()

__all__ = ["MODEL_NAME", "get_v4_train_spec"]
