"""Interventions on visual tokens, found through `embedlens.registry.interventions`."""

from embedlens.interventions.base import Intervention

__all__ = ["Intervention"]
