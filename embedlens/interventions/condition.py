"""Conditions: named lists of interventions applied together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from embedlens.errors import EmbedLensError, InterventionError
from embedlens.interventions.base import Intervention
from embedlens.state import Stateful

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


@dataclass
class Condition(Stateful):
    """A named list of interventions, applied together in one run.

    Example:
        >>> c = Condition.build("prune_dead", [{"name": "prune", "params": {"tokens": "dead"}}])
        >>> c.interventions
        [Prune(tokens='dead', mode='remove', if_empty='error')]
        >>> Condition.build("skip", [{"name": "skip_sublayer", "params": {"tokens": "visual", "sublayers": [1.3]}}])
        Traceback (most recent call last):
        ...
        embedlens.errors.InterventionError: condition 'skip', interventions[0] (skip_sublayer): sublayer 1.3 is neither n (attention of layer n) nor n + 0.5 (its MLP)
    """

    name: str
    interventions: list[Intervention] = field(default_factory=list)

    @classmethod
    def build(cls, name: str, specs: Iterable[Mapping[str, Any]]) -> "Condition":
        """Build from ``[{name: plugin, params: {...}}, ...]`` (the plan's form)."""
        from embedlens.registry import interventions as registry

        items = []
        for i, spec in enumerate(specs):
            plugin = spec.get("name")
            try:
                items.append(registry.get(plugin)(**dict(spec.get("params") or {})))
            except TypeError as exc:
                raise InterventionError(f"condition {name!r}, interventions[{i}] ({plugin}): {exc}") from None
            except EmbedLensError as exc:
                raise type(exc)(f"condition {name!r}, interventions[{i}] ({plugin}): {exc}") from None
        return cls(name, items)

    @property
    def needs_fit(self) -> bool:
        return any(iv.needs_fit for iv in self.interventions)

    def check(self, adapter: "Adapter") -> None:
        """Check every intervention against the model; errors name the condition and the intervention."""
        for i, iv in enumerate(self.interventions):
            try:
                iv.check(adapter)
            except InterventionError as exc:
                raise InterventionError(f"condition {self.name!r}, interventions[{i}] ({iv.registered_name}): {exc}") from None

    def fit(self, adapter: "Adapter", batches: Iterable["Batch"]) -> None:
        """The earlier pass over the data for interventions that need a data-set statistic."""
        from embedlens.tracing import collect

        wanted = self.fit_sites(adapter)
        self.fit_stream(adapter, ((batch, collect(adapter, batch, wanted) if wanted else {}) for batch in batches))

    def fit_sites(self, adapter: "Adapter") -> list:
        """The activations the fit pass reads (every fitted intervention's `fit_sites`), in forward order."""
        todo = [iv for iv in self.interventions if iv.needs_fit]
        return sorted({s for iv in todo for s in iv.fit_sites(adapter)}, key=lambda s: s.order_key())

    def fit_stream(self, adapter: "Adapter", stream: Iterable) -> None:
        """`fit` over ``(batch, acts)`` pairs read elsewhere (e.g. by other ranks), in batch order."""
        todo = [iv for iv in self.interventions if iv.needs_fit]
        if not todo:
            return
        for batch, acts in stream:
            for iv in todo:
                iv.observe(adapter, batch, acts)
        for iv in todo:
            iv.finish_fit()
