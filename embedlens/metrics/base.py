"""Base class of effect metrics: a condition's outcome compared with the baseline's."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

if TYPE_CHECKING:
    from embedlens.data import Sample
    from embedlens.interventions.engine import Outcome


class Metric(ABC):
    """Compares a condition's run with the baseline run on the same batch.

    Subclasses register with ``@metrics.register("name")``, take explicit,
    typed constructor parameters, and return per-sample columns. Both outcomes
    come from the prompt without its answer; metrics that continue it (answer
    scoring, candidates, generation) set ``needs_cache``.
    """

    registered_name: ClassVar[str] = ""
    needs_cache: ClassVar[bool] = False

    @abstractmethod
    def compute(self, baseline: "Outcome", condition: "Outcome", samples: Sequence["Sample"]) -> dict[str, list[Any]]:
        """Per-sample values: column name -> one value per sample of the batch."""

    def __repr__(self) -> str:
        from embedlens.registry import plugin_params

        args = ", ".join(f"{p.name}={getattr(self, p.name, p.default)!r}" for p in plugin_params(type(self)))
        return f"{type(self).__name__}({args})"
