"""Declarative analysis plans: schema, loading with located errors, running."""

from embedlens.plan.loader import LoadedPlan, load_plan
from embedlens.plan.runner import Prepared, RunResult, prepare, run, run_all
from embedlens.plan.schema import DataSpec, ModelSpec, OutputSpec, Plan, ProbeSpec

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
