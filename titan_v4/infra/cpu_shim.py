"""Make torchtitan 0.2.2 train on a machine without a CUDA device (CPU + gloo).

Call :func:`install` once, before anything imports ``torchtitan``, and only when
``torch.cuda.is_available()`` is False. It imports ``torchtitan`` itself, under the patches
below, and never copies or edits a torchtitan file. It is idempotent.

What breaks on a CPU-only machine, and what each patch does:

1. ``import torchtitan`` reaches ``models/moe/kernels.py``, which does ``import triton``; CPU torch
   wheels ship no triton. A stub left in ``sys.modules`` breaks ``torch._dynamo`` instead, so we
   load ``kernels.py`` ourselves with a stub that exists only while that one file executes. Its
   ``generate_permute_indices`` defaults to a Triton kernel (``use_cpu=False``) that cannot run on a
   CPU, so we default it to the CPU reference (``use_cpu=True``).
2. ``tools/utils.get_device_info()`` falls back to ``"cuda"`` when no accelerator is found, and
   several modules (``parallel_dims``, ``metrics``, ``distributed/utils``, ``profiling``) bind
   ``device_type`` / ``device_module`` with ``from ... import`` at import time. So the device must
   read ``"cpu"`` while ``torchtitan`` is first imported; patching later is too late (that is why
   ``--experimental.custom_import`` cannot host this shim).
3. ``device_module`` = ``torch.cpu`` lacks the CUDA memory API used by ``DeviceMemoryMonitor``
   (``get_device_name``, ``get_device_properties().total_memory``, ``memory_stats``,
   ``reset_peak_memory_stats``, ``empty_cache``), and ``torch.cpu.current_device()`` returns
   ``"cpu"``, which ``barrier(device_ids=[...])`` in ``set_pg_timeouts`` rejects. We hand torchtitan
   a proxy of ``torch.cpu`` that adds those (memory numbers read 0; total memory is the RAM).
4. With more than one process, FSDP2 on gloo: torchtitan calls
   ``set_gradient_divide_factor(1.0)``, which makes FSDP2 reduce with ``ReduceOp.PREMUL_SUM``;
   gloo rejects it. We also force plain SUM reductions, which is the same number for factor 1.0.
5. MoE: the router and reorderer call ``torch.histc`` on int64 expert ids; CPU ``histc`` has no
   integer kernel. We compute it in float and cast back (CUDA returns the input dtype, and the
   for-loop experts slice with the result, so the dtype must match).

Not patched, harmless: "Peak flops undefined for: cpu" (MFU is meaningless on a CPU) and
memory reading 0 GiB; titan_v4/train/run_log.py drops those log lines and
titan_v4/train/metrics.py leaves memory and MFU out of the CPU metrics line. Use ``--training.mixed_precision_param float32`` on a CPU: single-process
runs use bf16 autocast otherwise, which is ~12x slower there.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
import warnings

import torch

_installed = False


def install() -> bool:
    """Apply the five CPU patches and import torchtitan under them.

    Returns True when the patches are active (installed now or by an earlier call). Returns False,
    changing nothing, when a CUDA device is present (torchtitan needs no help there) or when
    torchtitan was already imported (too late to patch; a warning says so). Callers that are about
    to train on a CPU should treat False as fatal.
    """
    global _installed
    if _installed:
        return True
    if torch.cuda.is_available():
        return False
    if "torchtitan" in sys.modules:
        warnings.warn(
            "titan_v4 CPU shim: torchtitan was imported before cpu_shim.install(); the CPU patches "
            "are not applied. Install the shim before the first `import torchtitan`.",
            stacklevel=2,
        )
        return False

    # Let torch probe for triton (and fail) before any stub exists; dynamo caches what it found.
    importlib.import_module("torch._dynamo")

    _load_moe_kernels_for_cpu()  # (1)
    cpu_module = _cpu_device_module()
    _import_torchtitan_as_cpu(cpu_module)  # (2) and (3)
    _force_sum_reductions_for_gloo()  # (4)
    _patch_histc_for_int_inputs()  # (5)
    _installed = True
    return True


def _load_moe_kernels_for_cpu() -> None:
    """(1) Import torchtitan.models.moe.kernels without triton and default it to the CPU path."""
    name = "torchtitan.models.moe.kernels"
    # find_spec("torchtitan") locates the package without running torchtitan/__init__.py.
    pkg_dir = importlib.util.find_spec("torchtitan").submodule_search_locations[0]
    try:
        import triton  # noqa: F401

        stubbed = False
    except ImportError:
        triton_stub = types.ModuleType("triton")
        language_stub = types.ModuleType("triton.language")
        # kernels.py only decorates with @triton.jit and annotates with tl.constexpr at import.
        triton_stub.jit = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)
        language_stub.constexpr = object
        triton_stub.language = language_stub
        sys.modules["triton"], sys.modules["triton.language"] = triton_stub, language_stub
        stubbed = True
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(pkg_dir, "models", "moe", "kernels.py"))
        kernels = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels)
        kernels.generate_permute_indices = functools.partial(kernels.generate_permute_indices, use_cpu=True)
        # moe/utils.py later does `from .kernels import generate_permute_indices` and gets ours.
        sys.modules[name] = kernels
    finally:
        if stubbed:  # torch._dynamo / inductor must never see the stub
            del sys.modules["triton"], sys.modules["triton.language"]


class _CpuDeviceModule(types.ModuleType):
    """torch.cpu plus the few CUDA-module functions torchtitan calls; the rest falls through."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)


def _cpu_device_module() -> types.ModuleType:
    """(3) Build the torch.cpu proxy that torchtitan will use as its `device_module`."""
    module = _CpuDeviceModule("titan_v4_cpu_device_module")
    module.current_device = lambda: 0  # barrier(device_ids=[...]) needs an int
    module.get_device_name = lambda *args, **kwargs: "cpu"
    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    module.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(total_memory=total_ram)
    module.memory_stats = lambda *args, **kwargs: {}
    module.reset_peak_memory_stats = lambda *args, **kwargs: None
    module.empty_cache = lambda *args, **kwargs: None
    return module


def _import_torchtitan_as_cpu(cpu_module: types.ModuleType) -> None:
    """(2)+(3) Import torchtitan while torch reports device "cpu" with our proxy module.

    torchtitan.tools.utils binds both torch._utils helpers by name and computes
    `device_type, device_module` at import, so patching the helpers only for the duration of the
    first import is enough, and every later `from torchtitan.tools.utils import device_module`
    (whatever the import order) gets the proxy.
    """
    import torch._utils as torch_utils

    orig_type, orig_module = torch_utils._get_available_device_type, torch_utils._get_device_module
    torch_utils._get_available_device_type = lambda: "cpu"
    torch_utils._get_device_module = lambda device_type=None: (
        cpu_module if device_type == "cpu" else orig_module(device_type)
    )
    try:
        import torchtitan.tools.utils as tt_utils
    finally:
        torch_utils._get_available_device_type, torch_utils._get_device_module = orig_type, orig_module
    if tt_utils.device_type != "cpu" or tt_utils.device_module is not cpu_module:
        raise RuntimeError(
            "titan_v4 CPU shim: torchtitan.tools.utils did not pick up the CPU device "
            f"(device_type={tt_utils.device_type!r}); was it imported before install()?"
        )


def _force_sum_reductions_for_gloo() -> None:
    """(4) Keep FSDP2 off ReduceOp.PREMUL_SUM, which gloo does not implement."""
    from torch.distributed.fsdp import FSDPModule

    orig = FSDPModule.set_gradient_divide_factor

    @functools.wraps(orig)
    def set_gradient_divide_factor(self, factor: float) -> None:
        orig(self, factor)
        self.set_force_sum_reduction_for_comms(True)

    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor


def _patch_histc_for_int_inputs() -> None:
    """(5) torch.histc on CPU integer tensors: compute in float, return the input dtype like CUDA."""
    orig = torch.histc

    @functools.wraps(orig)
    def histc(input, *args, **kwargs):
        if input.device.type == "cpu" and not input.is_floating_point():
            return orig(input.float(), *args, **kwargs).to(input.dtype)
        return orig(input, *args, **kwargs)

    torch.histc = histc
