"""A titan_v4 plug-in that kills the process in the middle of a checkpoint save (fault injection).

Loaded with ``--experimental.custom_import tests.helpers.fault_plugin`` (the repository root on
PYTHONPATH) instead of ``titan_v4``, which it imports. When the environment names a step in
``TITAN_V4_TEST_KILL_AT_SAVE``, global rank 0 sends itself SIGKILL while saving that step's
checkpoint: after every rank has written its data files and before the ``.metadata`` index is
written, the state a ``kill -9`` (or a node loss) during a save leaves behind.
"""

import os
import signal

from torch.distributed.checkpoint.filesystem import FileSystemWriter

import titan_v4  # noqa: F401

_step = os.environ.get("TITAN_V4_TEST_KILL_AT_SAVE")
if _step:
    _finish = FileSystemWriter.finish

    def finish(self, metadata, results):
        if os.path.basename(os.fspath(self.path)) == f"step-{_step}":
            os.kill(os.getpid(), signal.SIGKILL)
        return _finish(self, metadata, results)

    FileSystemWriter.finish = finish
