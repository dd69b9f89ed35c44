"""Interventions on visual tokens, found through `embedlens.registry.interventions`,
and the engine that applies them."""

from embedlens.interventions.base import Intervention
from embedlens.attention import attention_rows
from embedlens.interventions.context import Context, Rows
from embedlens.interventions.engine import Engine
from embedlens.interventions.hook import Hook
from embedlens.interventions.outcome import Outcome, RowCache
from embedlens.interventions.select import Selection
from embedlens.interventions import ablate, layers, prune  # noqa: F401, E402 - registers the built-ins
import embedlens.reduction  # noqa: F401, E402 - registers the token-reduction methods

__all__ = ["Context", "Engine", "Hook", "Intervention", "Outcome", "RowCache", "Rows", "Selection", "attention_rows"]
