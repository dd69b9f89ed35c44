"""Effect metrics (found through `embedlens.registry.metrics`) and `compare`,
which runs a batch's baseline and conditions and applies them."""

from embedlens.metrics.base import Metric
from embedlens.metrics import builtin  # noqa: F401, E402 - registers the built-ins
from embedlens.metrics.compare import compare, prefill_flops

__all__ = ["Metric", "compare", "prefill_flops"]
