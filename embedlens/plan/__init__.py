"""Declarative analysis plans: schema, loading with located errors, running."""

from typing import TYPE_CHECKING, Any

from embedlens.plan.loader import LoadedPlan, load_plan
from embedlens.plan.schema import DataSpec, ModelSpec, OutputSpec, Plan, ProbeSpec

if TYPE_CHECKING:
    from embedlens.plan.runner import Prepared, RunResult, prepare, run, run_all

_RUNNER = ("Prepared", "RunResult", "prepare", "run", "run_all")


def __getattr__(name: str) -> Any:
    # the runner (torch, the models) is imported on first use: a plan's file, YAML and
    # schema errors come before it, at once
    if name in _RUNNER:
        from embedlens.plan import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'embedlens.plan' has no attribute {name!r}")

__all__ = [
    "DataSpec",
    "LoadedPlan",
    "ModelSpec",
    "OutputSpec",
    "Plan",
    "Prepared",
    "ProbeSpec",
    "RunResult",
    "load_plan",
    "prepare",
    "run",
    "run_all",
]
