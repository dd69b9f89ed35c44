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
    #: Columns that record what a condition did (token counts, FLOPs), not an outcome it caused: the report gives
    #: their means and no test (a test of a count the condition sets by construction says nothing).
    descriptive: ClassVar[tuple[str, ...]] = ()

    def measure(self, outcome: "Outcome", samples: Sequence["Sample"]) -> dict[str, list[Any]]:
        """Per-run values (e.g. a score or a generation); `both` pairs them up."""
        raise NotImplementedError(f"{type(self).__name__} does not measure single runs")

    def both(self, baseline: "Outcome", condition: "Outcome", samples: Sequence["Sample"]) -> dict[str, list[Any]]:
        """`measure` on each run, baseline columns suffixed ``_base``. The baseline's
        values are kept on the outcome, so several conditions measure it once."""
        memo = baseline.memo.setdefault(id(self), None)
        if memo is None:
            memo = baseline.memo[id(self)] = self.measure(baseline, samples)
        out = {f"{k}_base": v for k, v in memo.items()}
        out.update(self.measure(condition, samples))
        return out

    @abstractmethod
    def compute(self, baseline: "Outcome", condition: "Outcome", samples: Sequence["Sample"]) -> dict[str, list[Any]]:
        """Per-sample values: column name -> one value per sample of the batch."""

    def __repr__(self) -> str:
        from embedlens.registry import plugin_params

        args = ", ".join(f"{p.name}={getattr(self, p.name, p.default)!r}" for p in plugin_params(type(self)))
        return f"{type(self).__name__}({args})"
