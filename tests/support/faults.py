"""Fault injection for the kill/resume tests: the environment of a subprocess that kills itself at one point."""

from __future__ import annotations

import os
from pathlib import Path

KILL_AT = "EMBEDLENS_TEST_KILL_AT"  # read only by kill_hook/sitecustomize.py, never by the package
HOOK_DIR = Path(__file__).resolve().parent / "kill_hook"


def kill_env(env: dict[str, str], at: str) -> dict[str, str]:
    """`env` with the kill hook on the path (first, so its ``sitecustomize`` is the one imported) set to kill `at`."""
    return {**env, KILL_AT: at, "PYTHONPATH": os.pathsep.join(p for p in (str(HOOK_DIR), env.get("PYTHONPATH", "")) if p)}
