"""titan_v4.infra.cpu_shim: each of the five patches, the import order, idempotence.

Every check runs in a fresh interpreter, because the shim must act before torchtitan's first import,
with the GPUs hidden so that it also runs on GPU machines.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> str:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stdout


def test_importing_titan_v4_train_patches_torchtitan_for_the_cpu():
    out = run_python(
        """
        import sys
        import titan_v4.train  # must install the shim before anything imports torchtitan
        from titan_v4.infra import cpu_shim
        assert cpu_shim.install()  # idempotent: already active
        import torch
        import torchtitan.tools.utils as tt_utils
        from torchtitan.components import metrics
        from torchtitan.distributed import utils as dist_utils
        from torchtitan.models.moe import utils as moe_utils
        from torch.distributed.fsdp import FSDPModule

        # (2) device type, also where torchtitan bound it at import time
        assert tt_utils.device_type == metrics.device_type == dist_utils.device_type == "cpu"
        # (3) the device module everywhere is the proxy with the CUDA-like API
        dm = tt_utils.device_module
        assert metrics.device_module is dm and dist_utils.device_module is dm
        assert dm.current_device() == 0 and dm.get_device_name() == "cpu"
        assert dm.get_device_properties().total_memory > 2**30 and dm.memory_stats() == {}
        dm.reset_peak_memory_stats(); dm.empty_cache(); dm.synchronize()  # the last one is torch.cpu's
        # (1) permute indices on the CPU reference path; no triton stub left behind
        assert moe_utils.generate_permute_indices.keywords == {"use_cpu": True}
        for name in ("triton", "triton.language"):  # absent, or the real package (it has a file)
            assert getattr(sys.modules.get(name), "__file__", "absent"), f"the {name} stub leaked"
        # (4) FSDP2 keeps to SUM reductions
        assert FSDPModule.set_gradient_divide_factor.__code__.co_filename.endswith("cpu_shim.py")
        # (5) integer histc like CUDA: input dtype out
        counts = torch.histc(torch.tensor([0, 2, 2, 3]), bins=4, min=0, max=3)
        assert counts.dtype == torch.int64 and counts.tolist() == [1, 0, 2, 1]
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_shim_works_without_triton():
    """CPU torch wheels ship no triton: the kernels module must load through the temporary stub."""
    out = run_python(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        from titan_v4.infra import cpu_shim
        assert cpu_shim.install()
        import torchtitan.models.moe.kernels as kernels
        assert kernels.generate_permute_indices.keywords == {"use_cpu": True}
        assert not hasattr(kernels.triton, "__file__")  # kernels.py was loaded with the stub ...
        for name in ("triton", "triton.language"):  # ... which is gone again
            assert getattr(sys.modules.get(name), "__file__", "absent"), f"the {name} stub leaked"
        import torchtitan.train  # the rest of torchtitan imports fine
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_install_refuses_to_patch_after_torchtitan_was_imported():
    out = run_python(
        """
        import warnings
        import torchtitan  # too early: the shim can no longer set the device type
        from titan_v4.infra import cpu_shim
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_shim.install() is False
        assert any("imported before cpu_shim.install()" in str(w.message) for w in caught)
        print("late")
        """
    )
    assert out.strip() == "late"
