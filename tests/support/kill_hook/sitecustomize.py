"""Test-only fault injection and tracing, outside the package, for the subprocesses of the run tests.

Python imports ``sitecustomize`` at start-up from its path, so a subprocess whose
PYTHONPATH starts with this folder (`tests.support.faults`) gets the hook;
nothing else does. The runner reports where it stands as audit events
(`embedlens.plan.finish.FINISH_EVENT`, `embedlens.plan.passes.BATCH_EVENT`).

- ``EMBEDLENS_TEST_KILL_AT``: SIGKILL at a finish phase (``after_gather``, ...,
  `embedlens.plan.finish.PHASES`), at ``rankR_batchB``: rank R once it has
  run the model on batch B of the main pass and written its parts, or at
  ``write:NAME``: inside `embedlens.files` with NAME's temporary file written,
  not yet renamed (event ``embedlens.files.write``).
- ``EMBEDLENS_TEST_EVENTS``: append every such event to that file, one line
  each (``embedlens.plan.batch 0 3``).
"""

import os
import signal
import sys

_AT = os.environ.get("EMBEDLENS_TEST_KILL_AT")
_LOG = os.environ.get("EMBEDLENS_TEST_EVENTS")


def _hook(event: str, args: tuple) -> None:
    if not event.startswith(("embedlens.plan.", "embedlens.files.")):
        return
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(" ".join([event, *map(str, args)]) + "\n")
    if (
        (event == "embedlens.plan.finish" and args[0] == _AT)
        or (event == "embedlens.plan.batch" and f"rank{args[0]}_batch{args[1]}" == _AT)
        or (event == "embedlens.files.write" and f"write:{args[0]}" == _AT)
    ):
        os.kill(os.getpid(), signal.SIGKILL)


if _AT or _LOG:
    sys.addaudithook(_hook)
