"""Base class of effect metrics: a condition's outputs compared with the baseline's."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Metric(ABC):
    """Compares a condition's run with the baseline run on the same batch.

    Subclasses register with ``@metrics.register("name")`` and take explicit,
    typed constructor parameters.
    """

    @abstractmethod
    def compute(self, baseline: Any, condition: Any) -> dict[str, float]:
        """Per-batch values of the metric."""
