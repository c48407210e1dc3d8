"""A torchtitan plug-in that adds the flavor ``tiny`` to titan_v4's flavors, for tool tests that run
the trainer in a subprocess (``--experimental.custom_import tests.helpers.tiny_flavor_plugin
--model.flavor tiny``; the repository root on PYTHONPATH).

``tiny`` is tiny_model.tiny_args with the bundled tokenizer's vocabulary and two routed experts:
every block kind (SWA hash, CSA and HCA learned, MTP) with the smallest graphs, because on a CPU
the routed experts run as a loop over the experts (model/moe.py) and Inductor's compile time grows
with the graph.
"""

import titan_v4  # noqa: F401  (registers the TrainSpec; installs the CPU shim first)
from titan_v4.flavors import deepseek_v4_args

from .tiny_model import tiny_args

deepseek_v4_args["tiny"] = tiny_args(vocab_size=2048, n_routed_experts=2, n_activated_experts=1)
