"""Test-only fault injection, outside the package: SIGKILL at the point ``EMBEDLENS_TEST_KILL_AT`` names.

Python imports ``sitecustomize`` at start-up from its path, so a subprocess whose
PYTHONPATH starts with this folder (`tests.support.faults.kill_env`) gets the
hook; nothing else does. The runner reports where it stands as audit events
(`embedlens.plan.runner.FINISH_EVENT`, `BATCH_EVENT`); the hook kills at:

- a finish phase (``after_gather``, ..., `embedlens.plan.runner.PHASES`);
- ``rankR_batchB``: data-parallel rank R once it has written its parts of batch B.
"""

import os
import signal
import sys

_AT = os.environ.get("EMBEDLENS_TEST_KILL_AT")


def _hook(event: str, args: tuple) -> None:
    if not event.startswith("embedlens.plan."):
        return
    if (event == "embedlens.plan.finish" and args[0] == _AT) or (
        event == "embedlens.plan.batch" and f"rank{args[0]}_batch{args[1]}" == _AT
    ):
        os.kill(os.getpid(), signal.SIGKILL)


if _AT:
    sys.addaudithook(_hook)
