"""Debug switches of the custom ops (listed in the README), read at call time.

``TITAN_V4_REFERENCE_OPS=1`` makes every op run its reference implementation on CUDA too, instead
of the Triton kernels: for A/B timings in one session, and to tell a kernel bug from a model bug.
"""

import os


def reference_ops_only() -> bool:
    return os.environ.get("TITAN_V4_REFERENCE_OPS", "") == "1"
