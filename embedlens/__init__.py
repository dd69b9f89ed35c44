"""embedlens: probe and intervene on the visual tokens of multimodal LLMs.

Example:
    >>> import embedlens
    >>> adapter = embedlens.load_model("tiny:llava-clip")
    >>> adapter.name
    'llava'
"""

from embedlens import interventions, metrics, probes  # noqa: F401 - registers built-in plugins
from embedlens.adapters import Adapter, Batch, load_model, wrap_model
from embedlens.data import Sample, load_image, read_jsonl
from embedlens.errors import AdapterError, EmbedLensError, InputError, PlanError, PluginError, UnknownNameError
from embedlens.registry import Registry
from embedlens.registry import adapters as adapter_registry
from embedlens.registry import interventions as intervention_registry
from embedlens.registry import metrics as metric_registry
from embedlens.registry import probes as probe_registry
from embedlens.roles import Role, TokenRoles
from embedlens.sites import Site
from embedlens.tracing import collect

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterError",
    "Batch",
    "EmbedLensError",
    "InputError",
    "PlanError",
    "PluginError",
    "Registry",
    "Role",
    "Sample",
    "Site",
    "TokenRoles",
    "UnknownNameError",
    "adapter_registry",
    "collect",
    "intervention_registry",
    "load_image",
    "load_model",
    "metric_registry",
    "probe_registry",
    "read_jsonl",
    "wrap_model",
]
