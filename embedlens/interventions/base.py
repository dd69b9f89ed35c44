"""Base class of interventions: edits applied to a forward pass at prefill."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Intervention(ABC):
    """An edit of the forward pass (pruning, knockout, injection, ...).

    Subclasses take their parameters as explicit, typed constructor arguments
    and register with ``@interventions.register("name")``. `apply` receives the
    run context (adapter, batch, the open trace) and edits the model's
    activations or inputs; it never touches text positions unless asked.
    """

    @abstractmethod
    def apply(self, context: Any) -> None:
        """Edit the forward pass described by `context`."""
