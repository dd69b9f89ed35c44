"""Fault injection and tracing for the run tests: the environment of a subprocess with the test hook
(`tests/support/kill_hook/sitecustomize.py`) on its path."""

from __future__ import annotations

import os
from pathlib import Path

KILL_AT = "EMBEDLENS_TEST_KILL_AT"  # read only by kill_hook/sitecustomize.py, never by the package
EVENTS = "EMBEDLENS_TEST_EVENTS"
HOOK_DIR = Path(__file__).resolve().parent / "kill_hook"


def hooked_env(env: dict[str, str], **settings: str) -> dict[str, str]:
    """`env` with the hook on the path (first, so its ``sitecustomize`` is the one imported) and `settings` set."""
    return {**env, **settings, "PYTHONPATH": os.pathsep.join(p for p in (str(HOOK_DIR), env.get("PYTHONPATH", "")) if p)}


def kill_env(env: dict[str, str], at: str) -> dict[str, str]:
    """`env` set to SIGKILL the process at `at` (a finish phase, or ``rankR_batchB``)."""
    return hooked_env(env, **{KILL_AT: at})


def batch_events(log: Path) -> list[tuple[int, int]]:
    """``(rank, batch)`` of every main-pass batch event an `EVENTS` log holds, in order."""
    lines = log.read_text().splitlines() if log.is_file() else []
    return [(int(p[1]), int(p[2])) for p in (line.split() for line in lines) if p[0] == "embedlens.plan.batch"]
