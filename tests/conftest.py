"""Shared pytest setup for the whole suite."""

import torch
import torch.utils._device

# On a machine without CUDA, importing titan_v4 installs the torchtitan CPU shim, which must happen
# before anything imports torchtitan (test modules and helpers import it directly).
import titan_v4  # noqa: F401

# torch caches the set of tensor-constructing functions the first time `with torch.device(...)` is
# used. Build that cache now, from the real functions: the op tests' NaN-filling fixture swaps
# torch.empty for a wrapper, and a cache built while it is active would stop
# `with torch.device("meta")` from redirecting torch.empty (a 284B-parameter flavor built for real).
torch.utils._device._device_constructors()
