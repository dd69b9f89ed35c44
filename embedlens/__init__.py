"""embedlens: probe and intervene on the visual tokens of multimodal LLMs.

In a notebook: `run` a plan (a file or a dict) and read its tables as
DataFrames, `probe` a model on samples directly, or `intervene` on them with
conditions of intervention objects or plain functions (see docs/python-api.md).

Example:
    >>> import embedlens
    >>> adapter = embedlens.load_model("tiny:llava-clip")
    >>> adapter.name
    'llava'
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, imported on first use (see __getattr__)
    from embedlens import interventions, metrics, probes  # noqa: F401
    from embedlens.adapters import Adapter, Batch, load_model, wrap_model
    from embedlens.api import Results, probe, run
    from embedlens.api_intervene import intervene
    from embedlens.interventions.hook import Hook
    from embedlens.data import Sample, load_image, read_jsonl
    from embedlens.errors import AdapterError, EmbedLensError, InputError, PlanError, PluginError, UnknownNameError
    from embedlens.registry import Registry
    from embedlens.registry import adapters as adapter_registry
    from embedlens.registry import interventions as intervention_registry
    from embedlens.registry import metrics as metric_registry
    from embedlens.registry import probes as probe_registry
    from embedlens.roles import Role, TokenRoles
    from embedlens.sites import Site
    from embedlens.synthetic import SyntheticSpec
    from embedlens.tracing import collect

# Public name -> (module, attribute). Nothing heavy (torch, transformers, nnsight) is imported
# until a name needing it is used, so `embedlens --help` and plan errors are instant; the
# registries import their built-in plugins on their first look-up.
_LAZY = {
    "Adapter": ("embedlens.adapters", "Adapter"),
    "Batch": ("embedlens.adapters", "Batch"),
    "load_model": ("embedlens.adapters", "load_model"),
    "wrap_model": ("embedlens.adapters", "wrap_model"),
    "Results": ("embedlens.api", "Results"),
    "probe": ("embedlens.api", "probe"),
    "run": ("embedlens.api", "run"),
    "intervene": ("embedlens.api_intervene", "intervene"),
    "Hook": ("embedlens.interventions.hook", "Hook"),
    "Sample": ("embedlens.data", "Sample"),
    "load_image": ("embedlens.data", "load_image"),
    "read_jsonl": ("embedlens.data", "read_jsonl"),
    "AdapterError": ("embedlens.errors", "AdapterError"),
    "EmbedLensError": ("embedlens.errors", "EmbedLensError"),
    "InputError": ("embedlens.errors", "InputError"),
    "PlanError": ("embedlens.errors", "PlanError"),
    "PluginError": ("embedlens.errors", "PluginError"),
    "UnknownNameError": ("embedlens.errors", "UnknownNameError"),
    "Registry": ("embedlens.registry", "Registry"),
    "adapter_registry": ("embedlens.registry", "adapters"),
    "intervention_registry": ("embedlens.registry", "interventions"),
    "metric_registry": ("embedlens.registry", "metrics"),
    "probe_registry": ("embedlens.registry", "probes"),
    "Role": ("embedlens.roles", "Role"),
    "TokenRoles": ("embedlens.roles", "TokenRoles"),
    "Site": ("embedlens.sites", "Site"),
    "SyntheticSpec": ("embedlens.synthetic", "SyntheticSpec"),
    "collect": ("embedlens.tracing", "collect"),
}
_SUBPACKAGES = ("interventions", "metrics", "probes")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"embedlens.{name}")
    if name not in _LAZY:
        raise AttributeError(f"module 'embedlens' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBPACKAGES])


__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterError",
    "Batch",
    "EmbedLensError",
    "Hook",
    "InputError",
    "PlanError",
    "PluginError",
    "Registry",
    "Results",
    "Role",
    "Sample",
    "Site",
    "SyntheticSpec",
    "TokenRoles",
    "UnknownNameError",
    "adapter_registry",
    "collect",
    "intervene",
    "intervention_registry",
    "load_image",
    "load_model",
    "metric_registry",
    "probe",
    "probe_registry",
    "read_jsonl",
    "run",
    "wrap_model",
]
