"""Debug switches of the custom ops (listed in the README), read at call time.

``TITAN_V4_REFERENCE_OPS=1`` makes every op run its reference implementation on CUDA too, instead
of the Triton kernels: for A/B timings in one session, and to tell a kernel bug from a model bug.
Unset, "" or "0" leaves the kernels on. Any other value is refused with a ValueError at the op call,
so that a "yes" or "true" does not silently time the kernels. dispatch.py is the one reader.
"""

import os

REFERENCE_OPS = "TITAN_V4_REFERENCE_OPS"
_REFERENCE_OPS_VALUES = {"": False, "0": False, "1": True}


def reference_ops_only() -> bool:
    """Whether ``TITAN_V4_REFERENCE_OPS`` asks every op for its reference implementation.

    Raises:
        ValueError: the variable holds something other than "", "0" or "1".
    """
    value = os.environ.get(REFERENCE_OPS, "")
    if value not in _REFERENCE_OPS_VALUES:
        raise ValueError(f"{REFERENCE_OPS}={value!r} is not allowed: leave it unset or set it to '', '0' or '1'")
    return _REFERENCE_OPS_VALUES[value]
